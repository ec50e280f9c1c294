"""lm-eval output JSON -> tidy rows of the paper data schema (paper_plots/data/README.md), and the JSONL table in and out.

One row per (run, checkpoint, test recurrence, task) with the columns of `paper_plots/data/*.jsonl`:
model, chkpt, task, acc, stderr, train_rec, num_rec, cooldown, effective_params, FLOPs.

The headline metric of each task (docs/evaluation.md, Tasks and metrics) lives in TASK_METRICS, the one table that both
plot_evals.py and paper_plots/plot.py use.

Eval layout written by shells/eval.sh (anything else reasonable is accepted too):
    {run_dir}/{model_only_chkpt_{step} | final_checkpoint}/eval/rec_{R}/<lm-eval output>.json
lm-eval 0.4.x writes `{output_path}/{sanitized model name}/results_{timestamp}.json`, or
`{stem}_{timestamp}.json` when --output_path ends in .json, with the keys
`results` -> {task: {"acc,none": .., "acc_stderr,none": .., ...}} and
`config` -> {"model_args": "pretrained=DIR,mean_recurrence=R,..." (a str, or a dict in newer CLIs)}.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from retrofit.atomic import write_file_atomic
from retrofit.train.flops import DEFAULT_TOKENS_PER_STEP, ParamCounts, count_model_dir, read_config, training_flops
from retrofit.train.run_folder import FINAL_CHECKPOINT
from retrofit.train.run_record import checkpoint_step, counting_schedule, read_run_record, record_schedule

log = logging.getLogger(__name__)

COLUMNS = ("model", "chkpt", "task", "acc", "stderr", "train_rec", "num_rec", "cooldown", "effective_params", "FLOPs")

# Headline metric per task (docs/evaluation.md, Tasks and metrics). lm-eval names the standard error "<metric>_stderr,<filter>".
TASK_METRICS = {
    "arc_challenge": "acc_norm,none",
    "arc_easy": "acc_norm,none",
    "hellaswag": "acc_norm,none",
    "openbookqa": "acc_norm,none",
    "piqa": "acc_norm,none",
    "lambada_openai": "acc,none",
    "mmlu": "acc,none",
    "social_iqa": "acc,none",
    "winogrande": "acc,none",
    "asdiv": "acc,none",
    "gsm8k_cot_sean": "exact_match,flexible-extract",
    "minerva_math": "math_verify,none",
    # the bundled quickstart's multiple-choice task (utils/make_synthetic_data.py); its other task,
    # quickstart_gsm8k_cot_sean, is a local variant of gsm8k_cot_sean (`known_task`)
    "quickstart_arith_mc": "acc,none",
}

# Names on plots.
TASK_TITLES = {
    "arc_challenge": "ARC-Challenge",
    "arc_easy": "ARC-Easy",
    "hellaswag": "HellaSwag",
    "openbookqa": "OpenBookQA",
    "piqa": "PIQA",
    "lambada_openai": "LAMBADA",
    "mmlu": "MMLU",
    "social_iqa": "Social IQa",
    "winogrande": "WinoGrande",
    "asdiv": "ASDiv",
    "gsm8k_cot_sean": "GSM8K",
    "minerva_math": "MATH",
    "quickstart_gsm8k_cot_sean": "Synthetic GSM8K (1-shot CoT)",
    "quickstart_arith_mc": "Arithmetic multiple choice",
}

# Accuracy of guessing, drawn as a reference line.
TASK_CHANCE = {
    "arc_challenge": 0.25,
    "arc_easy": 0.25,
    "hellaswag": 0.25,
    "openbookqa": 0.25,
    "piqa": 0.5,
    "social_iqa": 1 / 3,
    "winogrande": 0.5,
    "mmlu": 0.25,
    "lambada_openai": 0.0,
    "asdiv": 0.0,
    "gsm8k_cot_sean": 0.0,
    "minerva_math": 0.0,
    "quickstart_arith_mc": 0.25,
}

# Files that live in checkpoint folders and are never eval output.
_NOT_EVAL_FILES = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "model.safetensors.index.json",
    "trainer_state.json",
    "chat_template.json",
    "run.json",  # train.py's run record (retrofit/train/run_record.py), in every run folder and checkpoint
}
_CHECKPOINT_STEP = re.compile(r"chkpt_(\d+)")
_REC_DIR = re.compile(r"^rec_(\d+)$")


# A local variant of a known task: a task file that includes the known one and reads other data
# (docs/evaluation.md's gsm8k_cot_sean_local, the quickstart's quickstart_gsm8k_cot_sean). It is
# scored, titled and given a chance level as the known task is.
_LOCAL_VARIANT = re.compile(r"^(?:quickstart_)?(?P<known>.+?)(?:_local)?$")


def known_task(task: str) -> str | None:
    """The TASK_METRICS entry that scores `task`: itself, or the task it is a local variant of."""
    if task in TASK_METRICS:
        return task
    known = _LOCAL_VARIANT.match(task)["known"]
    return known if known != task and known in TASK_METRICS else None


def task_metric(task: str) -> str | None:
    known = known_task(task)
    return None if known is None else TASK_METRICS[known]


def task_title(task: str) -> str:
    """The name on plots: the task's own title, else its known task's with "(local)", else the task name."""
    if task in TASK_TITLES:
        return TASK_TITLES[task]
    known = known_task(task)
    return f"{TASK_TITLES[known]} (local)" if known in TASK_TITLES else task


def task_chance(task: str) -> float | None:
    known = known_task(task)
    return None if known is None else TASK_CHANCE.get(known)


class NotLmEvalOutput(ValueError):
    """A JSON file that is not an lm-eval results file."""


def metric_stderr_key(metric: str) -> str:
    """'acc,none' -> 'acc_stderr,none' (lm-eval's naming)."""
    name, _, filter_name = metric.partition(",")
    return f"{name}_stderr,{filter_name}" if filter_name else f"{name}_stderr"


def read_lm_eval_json(path: str | Path) -> dict:
    """Load an lm-eval results file; raise NotLmEvalOutput naming the file if it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NotLmEvalOutput(f"{path} is not lm-eval output: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        keys = sorted(data)[:6] if isinstance(data, dict) else type(data).__name__
        raise NotLmEvalOutput(f"{path} is not lm-eval output: no 'results' mapping (top-level keys: {keys})")
    return data


def parse_model_args(model_args) -> dict:
    """lm-eval's model_args, a 'k=v,k=v' string or a dict, as a dict of strings."""
    if model_args is None:
        return {}
    if isinstance(model_args, dict):
        return {str(k): str(v) for k, v in model_args.items()}
    out = {}
    for item in str(model_args).split(","):
        key, sep, value = item.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def recurrence_from(data: dict, path: Path) -> int | None:
    """Test recurrence: config.model_args.mean_recurrence, else a `rec_{R}` path part, else the
    task metadata (the authors' runs), else None."""
    args = parse_model_args(data.get("config", {}).get("model_args"))
    if "mean_recurrence" in args:
        return int(float(args["mean_recurrence"]))
    for part in reversed(path.parts):
        match = _REC_DIR.match(part)
        if match:
            return int(match.group(1))
    for task_config in (data.get("configs") or {}).values():
        metadata = task_config.get("metadata") if isinstance(task_config, dict) else None
        if isinstance(metadata, dict) and "mean_recurrence" in metadata:
            return int(metadata["mean_recurrence"])
    return None


def checkpoint_from(path: Path, data: dict) -> tuple[int | None, bool]:
    """(step, is_final) from `chkpt_{step}` in the path (or the evaluated model's path)."""
    pretrained = parse_model_args(data.get("config", {}).get("model_args")).get("pretrained", "")
    for text in (str(path), pretrained):
        steps = _CHECKPOINT_STEP.findall(text)
        if steps:
            return int(steps[-1]), False
    is_final = FINAL_CHECKPOINT in str(path) or FINAL_CHECKPOINT in pretrained
    return None, is_final


def find_result_files(path: str | Path) -> list[tuple[Path, bool]]:
    """Candidate lm-eval result JSONs under `path` (or `path` itself), sorted, each with whether it
    must be lm-eval output (named results*, under an eval/ or rec_R folder, or given directly) or may
    be some other JSON (any other *.json directly inside `path`, e.g. `--output_path x.json` files)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run folder {str(path)!r} does not exist")
    if path.is_file():
        return [(path, True)]
    found = []
    for candidate in sorted(path.rglob("*.json")):
        name = candidate.name
        if name in _NOT_EVAL_FILES or name.startswith(("samples_", "tokenizer")):
            continue
        under_eval = any(p == "eval" or _REC_DIR.match(p) for p in candidate.relative_to(path).parts[:-1])
        if name.startswith("results") or under_eval:
            found.append((candidate, True))
        elif candidate.parent == path:
            found.append((candidate, False))
    return found


@dataclass
class RunSpec:
    """One training run to collect: where its evals are, and overrides of how it was trained (for FLOPs).

    How a run was trained comes from its run.json (the run folder's, else the evaluated checkpoint's
    copy); every field below left at None is taken from there. Without run.json the run is assumed
    to have used train.py's defaults on the checkpoint's config, and max_steps must be given."""

    path: Path
    label: str | None = None
    train_rec: int | None = None  # final (or constant) mean recurrence of training
    max_steps: int | None = None  # the run's length (curriculum length; the step of final_checkpoint)
    warmup: float | None = None  # fraction of max_steps the mean-recurrence curriculum ramps over (0 = none)
    warmup_type: str | None = None
    backprop_depth: int | None = None
    tokens_per_step: int | None = None
    non_recurrent: bool = False
    model_dir: Path | None = None  # config.json to count parameters when the evaluated dir is gone
    cooldown: bool = False

    def __post_init__(self):
        self.path = Path(self.path)
        if self.label is None:
            self.label = self.path.name if self.path.is_dir() else self.path.parent.name
        if self.model_dir is not None:
            self.model_dir = Path(self.model_dir)


@dataclass
class Collected:
    rows: list[dict] = field(default_factory=list)
    unknown_tasks: set = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)


def _model_dir_for(spec: RunSpec, data: dict, result_file: Path) -> Path | None:
    """Where to read config.json: the evaluated checkpoint, else the run's --model_dir."""
    pretrained = parse_model_args(data.get("config", {}).get("model_args")).get("pretrained")
    candidates = []
    if pretrained:
        candidates.append(Path(pretrained))
    # {run}/{checkpoint}/eval/rec_R/...: the checkpoint folder is an ancestor of the result file.
    for parent in result_file.parents:
        if _CHECKPOINT_STEP.search(parent.name) or parent.name == FINAL_CHECKPOINT:
            candidates.append(parent)
            break
    if spec.model_dir is not None:
        candidates.append(spec.model_dir)
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def collect_run(spec: RunSpec) -> Collected:
    """Rows of the paper_data schema for every lm-eval result file of one run."""
    out = Collected()
    run_record = read_run_record(spec.path) if spec.path.is_dir() else None
    files = find_result_files(spec.path)
    if not files:
        raise FileNotFoundError(
            f"no lm-eval results (*.json) found under {str(spec.path)!r}; expected "
            "{run}/{model_only_chkpt_STEP|final_checkpoint}/eval/rec_R/.../results_*.json"
        )
    by_key = {}  # (chkpt, num_rec, task) -> row; later files (newer timestamps) win
    flops_steps = {}  # (model dir, train_rec) -> (counts, steps to count FLOPs at)
    read_any = False
    for result_file, must_be_eval in files:
        try:
            data = read_lm_eval_json(result_file)
        except NotLmEvalOutput as e:
            if must_be_eval:
                raise
            out.warnings.append(f"skipped {e}")
            continue
        read_any = True
        model_dir = _model_dir_for(spec, data, result_file)
        checkpoint_record = read_run_record(model_dir) if model_dir is not None else None
        record = run_record or checkpoint_record
        counts: ParamCounts | None = count_model_dir(model_dir) if model_dir else None
        if spec.non_recurrent and counts is not None and counts.recurrent:
            raise ValueError(f"run {spec.label!r} is marked non_recurrent but {model_dir} holds a recurrent model")
        static = spec.non_recurrent or (counts is not None and not counts.recurrent)

        num_rec = 1 if static else recurrence_from(data, result_file)
        if num_rec is None:
            raise ValueError(
                f"cannot tell the test recurrence of {result_file}: no mean_recurrence in config.model_args "
                "and no rec_R folder in its path"
            )
        step = _evaluated_step(spec, result_file, data, checkpoint_record, record, out)

        recorded = record_schedule(record)
        train_rec = 1 if static else spec.train_rec
        if train_rec is None and recorded is not None:
            train_rec = recorded.max_mean_rec
        if train_rec is None and model_dir is not None:
            train_rec = int(read_config(model_dir).get("mean_recurrence", num_rec))

        effective_params = counts.non_embedding(num_rec) if counts else None
        # FLOPs are filled in after the loop: one replay of the curriculum per (model, train_rec).
        flops_key = None
        knows_length = spec.max_steps is not None or recorded is not None
        if counts is not None and step is not None and (static or (knows_length and train_rec)):
            flops_key = (str(model_dir), 1 if static else train_rec)
            entry = flops_steps.setdefault(flops_key, (counts, set(), record))
            entry[1].add(step)
        elif counts is not None and step is not None:
            out.warnings.append(f"{result_file}: no run.json and no max_steps for run {spec.label!r}; FLOPs left empty")
        if counts is None:
            out.warnings.append(
                f"{result_file}: no config.json found for parameter counts; effective_params and FLOPs left empty "
                f"(give the run a model_dir)"
            )

        shared = dict(model=spec.label, chkpt=step, train_rec=train_rec, num_rec=num_rec, cooldown=spec.cooldown,
                      effective_params=effective_params, FLOPs=flops_key)
        for row in _task_rows(data, shared, out):
            by_key[(step, num_rec, row["task"])] = row
    if not read_any:
        raise FileNotFoundError(f"no lm-eval results under {str(spec.path)!r}; {'; '.join(out.warnings)}")
    flops = _training_flops(spec, flops_steps)
    for row in by_key.values():
        key = row["FLOPs"]
        row["FLOPs"] = None if key is None else flops[(*key, row["chkpt"])]
    out.rows = sorted(by_key.values(), key=lambda r: (r["chkpt"] is None, r["chkpt"] or 0, r["num_rec"], r["task"]))
    if not out.rows:
        raise ValueError(
            f"run {spec.label!r} ({spec.path}) has lm-eval files but no task with a known metric; "
            f"tasks seen: {sorted(out.unknown_tasks)}; known: {sorted(TASK_METRICS)} and their local variants "
            f"(quickstart_TASK, TASK_local)"
        )
    return out


def _evaluated_step(spec: RunSpec, result_file: Path, data: dict, checkpoint_record, record, out: Collected) -> int | None:
    """The training step of the evaluated checkpoint: from its name, for final_checkpoint from its
    run.json (else the run's length), 0 for an untrained model."""
    step, is_final = checkpoint_from(result_file, data)
    if step is None and is_final:
        # the step final_checkpoint was saved at (its run.json), else the run's length
        step = checkpoint_step(checkpoint_record) or spec.max_steps or (record or {}).get("max_steps")
        if step is None:
            out.warnings.append(f"{result_file}: final_checkpoint has no step (no run.json); pass max_steps for"
                                f" run {spec.label!r}")
    elif step is None:
        step = 0  # an evaluation of the untrained (base or freshly converted) model
    return step


def _task_rows(data: dict, shared: dict, out: Collected) -> list[dict]:
    """One row per task with a known metric (`shared` holds the columns every task shares);
    other tasks are noted in `out.unknown_tasks`, unless they are a group's subtasks."""
    rows = []
    subtasks = {t for subs in (data.get("group_subtasks") or {}).values() for t in subs}
    for task, metrics in data["results"].items():
        metric = task_metric(task)
        if metric is None or metric not in metrics:
            if task not in subtasks:
                out.unknown_tasks.add(task if metric is None else f"{task} (no {metric!r})")
            continue
        values = dict(shared, task=task, acc=float(metrics[metric]), stderr=_float_or_none(metrics.get(metric_stderr_key(metric))))
        rows.append({column: values[column] for column in COLUMNS})
    return rows


def _training_flops(spec: RunSpec, flops_steps: dict) -> dict:
    """(model dir, train_rec, step) -> training FLOPs: one replay of the curriculum per (model, train_rec)."""
    flops = {}
    for (model_dir_key, train_rec), (counts, steps, record) in flops_steps.items():
        schedule = None
        if counts.recurrent:
            schedule = counting_schedule(
                record, read_config(model_dir_key), max_steps=spec.max_steps, max_mean_rec=train_rec,
                warmup=spec.warmup, warmup_type=spec.warmup_type, backprop_depth=spec.backprop_depth,
                where=str(spec.path),
            )
        tokens_per_step = spec.tokens_per_step or (record or {}).get("tokens_per_step") or DEFAULT_TOKENS_PER_STEP
        for step, value in training_flops(counts, steps, schedule, tokens_per_step).items():
            flops[(model_dir_key, train_rec, step)] = value
    return flops


def _float_or_none(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" when it has no stderr


def collect_runs(specs: list[RunSpec]) -> list[dict]:
    """All rows of all runs; warns once, listing the tasks skipped for lack of a known metric."""
    rows, unknown = [], set()
    for spec in specs:
        collected = collect_run(spec)
        rows.extend(collected.rows)
        unknown |= collected.unknown_tasks
        for warning in collected.warnings:
            log.warning(warning)
    if unknown:
        log.warning("skipped tasks with no known metric (add them to TASK_METRICS, or name a local copy TASK_local): %s", ", ".join(sorted(unknown)))
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows (paper_data column order) atomically: a temp file renamed over the target."""
    lines = []
    for row in rows:
        ordered = {k: row.get(k) for k in COLUMNS}
        ordered.update({k: v for k, v in row.items() if k not in ordered})
        lines.append(json.dumps(ordered) + "\n")
    return write_file_atomic(path, "".join(lines))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    rows = []
    with path.open() as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number} is not a JSON line: {e}") from None
            missing = [c for c in ("model", "chkpt", "task", "acc", "num_rec") if c not in row]
            if missing:
                raise ValueError(f"{path}:{line_number} lacks columns {missing}; expected the paper_data schema {COLUMNS}")
            rows.append(row)
    return rows
