"""Does choose_split.py's recommendation beat the paper-style split? On the quickstart's model.

    python bench/choose_split_quickstart.py [--workdir runs/choose_split_bench] [--pretrained DIR --parquet DIR]

Without --pretrained, builds the quickstart's small pretrained Llama (8 layers, hidden 64) with the
quickstart's own data, pack, parquet and pretrain commands and flags (shells/quickstart.sh; about
3 minutes on 2 cores). Then:

1. choose_split.py on the training shards (256 rows), shape (2,2,2) as the quickstart converts;
2. converts the base three times, identity adapter, float32: the recommended split, the
   paper-style split (0-1 | 4-5 | 6-7, what the quickstart converts) and the worst split considered;
3. held-out loss at recurrence 1 (initial state zeros) on 256 rows of the validation shard, which
   choose_split.py never saw, beside the base with all 8 layers.

Prints a table and writes WORKDIR/choose_split_bench.json. Deterministic (seeded pretraining,
identity adapters, zero initial state).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_quickstart_base(workdir: Path) -> tuple[Path, Path]:
    """The quickstart's data, pack, parquet and pretrain stages (same scripts and flags)."""
    python = sys.executable
    data, packed_root, parquet, runs = workdir / "data", workdir / "packed", workdir / "parquet", workdir / "runs"
    packed = packed_root / "llama_huginn_preprocessed_data_packed_wrapped/tokenizer/quickstart/dataset"
    pretrained = runs / "pretrain" / "final_checkpoint"
    steps = [
        (data / "synthetic_data.json", [python, "utils/make_synthetic_data.py", "--out_dir", str(data), "--num_train", "20000",
                                        "--num_test", "200", "--hidden", "64", "--layers", "8", "--max_length", "128"]),
        (packed, [python, "preprocess_data_packing.py", f"--tokenizer_name={data}/tokenizer", f"--dataset_location={data}/text_dataset",
                  "--out_path=quickstart", f"--save_path={packed_root}", f"--cache_path={packed_root}/cache", "--max_length=128",
                  "--num_proc=1"]),
        (parquet / "val", [python, "utils/to_parquet.py", "--dataset_path", str(packed), "--dataset_save_dir", str(parquet),
                           "--num_shards", "9", "--val_shards", "1", "--row_group_size", "256"]),
        (pretrained / "config.json", [python, "train.py", f"--model_name={data}/base_config", "--non_recurrent_model=true",
                                      "--init_from_scratch=true", "--run_name=pretrain", "--max_steps=300", "--save_interval=60",
                                      "--optim_config.lr=3e-3", "--optim_config.weight_decay=0.01", "--is_parquet_dataset=true",
                                      f"--preprocessed_data_path={parquet}", "--max_length=128", "--micro_batch_size=16",
                                      "--batch_size=16", "--epochs=100", "--scheduler_args.warmup=0.05",
                                      "--scheduler_args.cooldown=0.3", "--device=cpu", "--wandb_disabled=true",
                                      f"--out_path={runs}", "--resume_path=auto"]),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    for marker, command in steps:
        if marker.exists():
            continue
        print(f"running: {' '.join(command[1:3])} ...", flush=True)
        subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return pretrained, parquet


def held_out_loss(model_dir: Path, val: Path, num_sequences: int, recurrent: bool) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from retrofit.evaluate.loss_over_depth import inputs_and_labels, load_eval_rows
    from retrofit.model.modeling_raven import RavenForCausalLM

    rows, mask = load_eval_rows(val, num_sequences)
    input_ids, attention_mask, labels = inputs_and_labels(rows, mask)
    with torch.no_grad():
        if recurrent:
            model = RavenForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            state = torch.zeros(*input_ids.shape, model.config.n_embd)
            logits = model(input_ids, attention_mask=attention_mask, num_steps=1, initial_state=state).logits
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            logits = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    return float(loss)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "choose_split_bench"))
    parser.add_argument("--pretrained", help="an already pretrained quickstart model (runs/quickstart/runs/pretrain/final_checkpoint)")
    parser.add_argument("--parquet", help="its parquet folder (training shards + val/)")
    parser.add_argument("--num_sequences", type=int, default=256)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.pretrained:
        pretrained, parquet = Path(args.pretrained), Path(args.parquet)
    else:
        pretrained, parquet = build_quickstart_base(workdir)

    from retrofit.model.conversion import LayerChoice, convert

    split_json = workdir / "split.json"
    # The stage script itself, as a user runs it (scripts do not import scripts).
    code = subprocess.run([sys.executable, str(ROOT / "choose_split.py"), "--model_name", str(pretrained),
                           "--data", str(parquet), "--shape", "2,2,2", "--num_sequences", str(args.num_sequences),
                           "--max_length", "128", "--no_progress", "--plot", str(workdir / "split.png"),
                           "--out_json", str(split_json)]).returncode
    if code != 0:
        return code
    ranking = json.loads(split_json.read_text())
    results = {"base (all 8 layers)": {"loss": held_out_loss(pretrained, parquet / "val", args.num_sequences, recurrent=False)}}
    for label, key in (("recommended", "recommended"), ("paper-style", "paper_style"), ("worst considered", "worst")):
        split = ranking[key]
        out = workdir / f"converted_{key}"
        convert(pretrained, out, LayerChoice(split["prelude"], split["core"], split["coda"]), dtype="float32",
                adapter_init="identity", mean_recurrence=1, overwrite=True, verify=True)
        results[label] = {"flags": split["flags"], "dropped": split["dropped"], "score": split["score"],
                          "loss": held_out_loss(out, parquet / "val", args.num_sequences, recurrent=True)}
    print()
    print(f"held-out loss at recurrence 1, identity adapter, {args.num_sequences} validation rows:")
    print(f"{'model':<20} {'split flags':<50} {'dropped':<8} {'score':>7} {'loss':>7}")
    for label, r in results.items():
        print(f"{label:<20} {r.get('flags', '-'):<50} {','.join(map(str, r.get('dropped', []))) or '-':<8} "
              f"{r.get('score', float('nan')):7.4f} {r['loss']:7.4f}")
    (workdir / "choose_split_bench.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
