"""Write the bundled tiny default's data: a synthetic GSM8K-style corpus, a tokenizer, eval sets.

    python utils/make_synthetic_data.py --out_dir runs/quickstart/data [--num_train 6000] [--seed 0]

Writes (deterministic for a given seed, no network):
  text_dataset/      a `save_to_disk` dataset with a `text` column (for preprocess_data_packing.py)
  tokenizer/         a byte-level BPE tokenizer trained on the corpus (BOS/EOS/PAD, chat template)
  base_config/       config.json of a small Llama + the tokenizer: the "pretrained model" is
                     trained from scratch from it (train.py --init_from_scratch --non_recurrent_model)
  gsm8k_test.jsonl   held-out problems in GSM8K format (question, answer ending "#### N")
  mc_test.jsonl      held-out multiple-choice arithmetic (question, choices, label)
  tasks/             lm-eval task yamls over those files (gsm8k_cot_sean format, and multiple choice)
An existing complete output is left as it is (the quickstart reruns skip this stage).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from retrofit.atomic import atomic_directory
from retrofit.data.synthetic import arithmetic_problems, problem_text, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DONE = "synthetic_data.json"


def mc_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        answer = a + b
        choices = sorted({answer, answer + 1, answer - 1, answer + 2} - {answer})[:3] + [answer]
        rng.shuffle(choices)
        rows.append({"question": f"What is {a} + {b}?", "choices": [str(c) for c in choices],
                     "label": choices.index(answer)})
    return rows


def task_yamls(out: Path, shot: dict) -> dict[str, str]:
    # The few-shot exemplar is a training problem (in the corpus' own format), not GSM8K's
    # "15 trees" exemplar, which a model that only ever read the synthetic corpus cannot follow.
    gsm8k = f"""# gsm8k_cot_sean (eval_yamls/gsm8k-cot-sean.yaml) on the quickstart's held-out problems.
include: {ROOT / 'eval_yamls' / 'gsm8k-cot-sean.yaml'}
task: quickstart_gsm8k_cot_sean
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {out / 'gsm8k_test.jsonl'}
num_fewshot: 1
fewshot_config:
  sampler: first_n
  samples:
  - question: {json.dumps(shot["question"])}
    target: {json.dumps(shot["answer"])}
generation_kwargs:
  until:
  - "Q:"
  - "</s>"
  - "<|im_end|>"
  do_sample: false
  max_gen_toks: 64
"""
    mc = f"""# Multiple-choice arithmetic on held-out sums (loglikelihood of each choice).
task: quickstart_arith_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {out / 'mc_test.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
- metric: acc
  aggregation: mean
  higher_is_better: true
- metric: acc_norm
  aggregation: mean
  higher_is_better: true
metadata:
  version: 1.0
"""
    return {"quickstart_gsm8k_cot_sean.yaml": gsm8k, "quickstart_arith_mc.yaml": mc}


def base_config(vocab_size: int, hidden: int, layers: int, max_length: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=int(2.75 * hidden) // 8 * 8,
        num_hidden_layers=layers, num_attention_heads=max(hidden // 32, 1), num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=max(2 * max_length, 256), rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )


def write(out: Path, num_train: int, num_test: int, seed: int, vocab_size: int, hidden: int, layers: int,
          max_length: int) -> None:
    from datasets import Dataset

    problems = arithmetic_problems(num_train + num_test, seed=seed)
    train, test = problems[:num_train], problems[num_train:]
    texts = [problem_text(p) for p in train]
    tokenizer = train_tokenizer(texts, out / "tokenizer", vocab_size=vocab_size)
    Dataset.from_dict({"text": texts}).save_to_disk(str(out / "text_dataset"))
    with open(out / "gsm8k_test.jsonl", "w") as f:
        for p in test:
            f.write(json.dumps({"question": p["question"], "answer": p["answer"]}) + "\n")
    with open(out / "mc_test.jsonl", "w") as f:
        for row in mc_rows(num_test, seed + 1):
            f.write(json.dumps(row) + "\n")
    config = base_config(len(tokenizer), hidden, layers, max_length)
    config.save_pretrained(out / "base_config")
    tokenizer.save_pretrained(out / "base_config")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--num_train", type=int, default=6000)
    parser.add_argument("--num_test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the base Llama")
    parser.add_argument("--layers", type=int, default=8, help="layers of the base Llama")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    for name in ("num_train", "num_test", "vocab_size", "hidden", "layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    out = Path(args.out_dir)
    if (out / DONE).exists() and not args.overwrite:
        print(f"{out} already holds the synthetic data; skipping (--overwrite to rebuild)")
        return 0
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: --out_dir {out} exists and is not a finished synthetic-data folder (pass --overwrite)", file=sys.stderr)
        return 2
    with atomic_directory(out) as tmp:
        write(tmp, args.num_train, args.num_test, args.seed, args.vocab_size, args.hidden, args.layers, args.max_length)
        # Task yamls name absolute data paths, so they are written for the final location.
        (tmp / "tasks").mkdir()
        shot = arithmetic_problems(1, seed=args.seed)[0]  # the first training problem
        for name, text in task_yamls(out.resolve(), shot).items():
            (tmp / "tasks" / name).write_text(text)
        (tmp / DONE).write_text(json.dumps(vars(args), indent=2))
    print(f"wrote {args.num_train} training problems, {args.num_test} test problems, tokenizer and base config to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
