"""Distillation from the parent: the base model the recurrent model was converted from runs beside
it on the same micro-batch (no grad, eval mode) and a KL term on the logits joins the loss:

    loss = CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

averaged over the positions that carry a label (label != -100), so the KL sees the tokens the CE
sees. T^2 keeps the term's gradient scale independent of the temperature (Hinton et al., 2015,
"Distilling the Knowledge in a Neural Network"). Only the teacher's vocabulary is compared: a
student whose embedding is padded beyond it ignores the padding rows here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def load_teacher(model_dir: str, student: nn.Module, device: torch.device) -> nn.Module:
    """The teacher as a frozen eval-mode model (a plain HF model, or a recurrent one) in the
    student's dtype on `device`; ConfigError when it does not load or the student's output cannot
    cover the teacher's vocabulary."""
    from retrofit.errors import ConfigError, first_line
    from retrofit.model.loading import load_saved_model

    try:
        teacher = load_saved_model(model_dir, dtype=next(student.parameters()).dtype)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # no weights, a broken config.json, ...
        raise ConfigError(f"--distill.teacher={model_dir} does not load: {first_line(exc)[:300]}") from None
    teacher_rows = teacher.get_output_embeddings().weight.shape[0]
    student_rows = student.get_output_embeddings().weight.shape[0]
    if student_rows < teacher_rows:
        raise ConfigError(
            f"--distill.teacher={model_dir} has {teacher_rows} output rows but the model only {student_rows}: distil from"
            " the model it was converted from"
        )
    teacher = teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * mean over labelled positions of KL(teacher || student) at temperature T (float32)."""
    vocab = teacher_logits.shape[-1]
    keep = (labels != -100).reshape(-1)
    student = student_logits[..., :vocab].reshape(-1, vocab)[keep].float() / temperature
    teacher = teacher_logits.reshape(-1, vocab)[keep].float() / temperature
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0  # no labelled token: a zero that still joins the graph
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="batchmean", log_target=True)
    return kl * temperature**2


@torch.no_grad()
def teacher_logits(teacher: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The teacher's logits for the micro-batch (aligned like the student's: position t predicts t + 1)."""
    return teacher(input_ids=input_ids).logits
