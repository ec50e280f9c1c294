"""Loading a saved model folder (and its tokenizer) for training, evaluation, generation or
distillation: this repository's classes by default, the checkpoint's own code only when asked."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_saved_tokenizer(name_or_dir: str | Path, **kwargs):
    """`AutoTokenizer.from_pretrained` for any model folder or Hub id, recurrent checkpoints included.

    AutoTokenizer first reads the model's config to pick the tokenizer class. A recurrent
    checkpoint's config names its code in `auto_map` under a model_type transformers does not
    know, so transformers would ask whether to run that code (a 15 s prompt on a terminal, a
    traceback without one) and fall back to a generic config with warnings. With this repo's
    RavenConfig registered for that model_type first, the config resolves to it and no checkpoint
    code is ever considered.
    """
    from transformers import AutoConfig, AutoTokenizer

    from retrofit.model.configuration_raven import RavenConfig

    AutoConfig.register(RavenConfig.model_type, RavenConfig, exist_ok=True)
    return AutoTokenizer.from_pretrained(name_or_dir, **kwargs)


def quiet_transformers_bars() -> None:
    """transformers 5 draws "Loading weights" / "Writing model shards" bars on stderr even when it
    is a log file or a pipe; keep them to terminals, as every bar of this repo (retrofit.progress)."""
    from transformers.utils import logging as hf_logging

    from retrofit.progress import progress_shown

    if not progress_shown():
        hf_logging.disable_progress_bar()


def load_saved_model(model_dir: str | Path, dtype: torch.dtype | None = None, checkpoint_code: bool = False):
    """A saved model folder (`model_only_chkpt_*`, `final_checkpoint`, a conversion, a plain HF model).

    By default a recurrent checkpoint runs this repository's `RavenForCausalLM`, never the
    modeling file copied beside its weights (that copy is for machines without this repo, and
    a checkpoint from someone else could put any code there). `checkpoint_code=True` runs the
    checkpoint's own code (`trust_remote_code=True`) instead.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers_bars()
    kwargs = {} if dtype is None else {"dtype": dtype}
    config_file = Path(model_dir) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if checkpoint_code:
        remote_class = (config.get("auto_map") or {}).get("AutoModelForCausalLM")
        if remote_class is None:
            return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, **kwargs)
        # Named explicitly: once this repo's classes are registered with the Auto classes,
        # transformers prefers them even with trust_remote_code=True.
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(remote_class, str(model_dir)).from_pretrained(model_dir, **kwargs)
    model_type = config.get("model_type")
    from retrofit.model.configuration_raven import RavenConfig
    from retrofit.model.modeling_raven import RavenForCausalLM

    if model_type == RavenConfig.model_type:
        return RavenForCausalLM.from_pretrained(model_dir, **kwargs)
    AutoConfig.from_pretrained(model_dir, trust_remote_code=False)  # a clear error for custom code
    return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False, **kwargs)
