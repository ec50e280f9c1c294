"""choose_split.py / retrofit/model/split.py: the statistics against HF's own forward, the ranking on a
base with known no-op layers, every data format, padding, the CLI and its errors."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from tiny_components import save_hf_model, tiny_llama_config, write_token_parquet

import choose_split
from retrofit.model.conversion import LayerChoice
from retrofit.model.conversion import main as convert_main
from retrofit.model.split import (
    SplitError,
    candidate_splits,
    load_sample_rows,
    measure,
    paper_shape,
    paper_style_split,
    rank_splits,
)

NOOP_LAYERS = (4, 5)


@pytest.fixture(scope="module")
def noop_base(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    """A tiny random Llama (8 layers) whose layers 4 and 5 add nothing to the residual stream
    (zero output projections): they are identities, so dropping them costs nothing."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("noop_base")
    save_hf_model(tiny_llama_config(len(tokenizer)), out, tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        for i in NOOP_LAYERS:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sample_parquet(tmp_path_factory, tokenizer, corpus) -> Path:
    from tiny_components import pack_token_rows

    rows = pack_token_rows(tokenizer, corpus, 33)
    return write_token_parquet(rows[:48], tmp_path_factory.mktemp("split_parquet"), num_shards=2, row_group_size=8)


def hf_hidden_states(model, ids) -> list[torch.Tensor]:
    """h_0..h_L from HF's own forward: the model cut after j layers, final norm removed."""
    layers, norm, n = model.model.layers, model.model.norm, model.config.num_hidden_layers
    states = []
    try:
        model.model.norm = torch.nn.Identity()
        for j in range(n + 1):
            model.model.layers = torch.nn.ModuleList(layers[:j])
            model.config.num_hidden_layers = j
            states.append(model.model(input_ids=ids, use_cache=False).last_hidden_state)
    finally:
        model.model.layers, model.model.norm, model.config.num_hidden_layers = layers, norm, n
    return states


def test_statistics_match_hf_forward(tiny_llama_dir, sample_parquet, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids, mask = load_sample_rows(sample_parquet, tokenizer, 12, 32)
    assert ids.shape == (12, 32) and bool(mask.all())
    stats = measure(model, ids, mask, batch_size=5, progress=False)
    assert stats.tokens == 12 * 32
    with torch.no_grad():
        h = [s.reshape(-1, s.shape[-1]).double() for s in hf_hidden_states(model, ids)]
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
    influence = stats.block_influence()
    for i in range(8):
        assert influence[i] == pytest.approx(1 - cos(h[i], h[i + 1]).mean().item(), abs=1e-5)
        for j in range(i, 8):
            expected = (torch.arccos(cos(h[i], h[j + 1])) / math.pi).mean().item()
            assert stats.angular_distance(i, j) == pytest.approx(expected, abs=1e-4)


def test_noop_layers_are_found_dropped_and_cost_nothing(noop_base, sample_parquet, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(noop_base, dtype=torch.float32).eval()
    ids, mask = load_sample_rows(sample_parquet, tokenizer, 16, 32)
    stats = measure(model, ids, mask, progress=False)
    influence = stats.block_influence()
    assert max(influence[i] for i in NOOP_LAYERS) < 1e-6 < min(influence[i] for i in range(8) if i not in NOOP_LAYERS)
    ranked = rank_splits(stats, (2, 2, 2))
    assert len(ranked) == math.comb(8 - 6 + 3, 3)
    best = ranked[0]
    assert best.dropped == NOOP_LAYERS and best.score < 1e-3
    assert (best.prelude, best.core, best.coda) == ((0, 1), (2, 3), (6, 7))
    assert ranked[-1].score > 10 * max(best.score, 1e-3)
    paper = paper_style_split(8, (2, 2, 2), stats)
    assert (paper.prelude, paper.core, paper.coda, paper.dropped) == ((0, 1), (4, 5), (6, 7), (2, 3))
    assert paper.score > best.score
    # The recommendation's flags work in the converter, and the converted model (identity adapter,
    # r = 1) computes exactly what the base computes: the dropped layers were no-ops.
    flags = best.flags().split()
    assert convert_main(None, ["--model_name", str(noop_base), "--save_name", str(tmp_path / "rec"), *flags,
                               "--dtype", "float32", "--adapter_init", "identity"]) == 0
    from retrofit.model.modeling_raven import RavenForCausalLM

    rec = RavenForCausalLM.from_pretrained(tmp_path / "rec").eval()
    with torch.no_grad():
        ours = rec(ids[:4], num_steps=1, initial_state=torch.zeros(4, 32, 64)).logits
        base = model(ids[:4], use_cache=False).logits
    torch.testing.assert_close(ours, base, atol=1e-5, rtol=1e-5)


def test_shapes_and_candidates():
    assert [paper_shape(n) for n in (6, 8, 14, 16)] == [(2, 2, 2), (2, 4, 2), (4, 6, 4), (4, 8, 4)]
    assert len(candidate_splits(22, (4, 8, 4))) == math.comb(22 - 16 + 3, 3)
    for prelude, core, coda in candidate_splits(10, (2, 3, 2)):
        kept = prelude + core + coda
        assert list(kept) == sorted(kept) and len(set(kept)) == 7
        LayerChoice(list(prelude), list(core), list(coda)).validate(10)
    with pytest.raises(SplitError, match="keeps 17 layers but the base has only 16"):
        candidate_splits(16, (4, 9, 4))
    with pytest.raises(SplitError, match="--keep must be >= 3"):
        paper_shape(2)


def test_every_data_format_and_padding(tmp_path, tokenizer, corpus, tiny_llama_dir, sample_parquet):
    """Text file, save_to_disk dataset (text), parquet (token rows): the same statistics whether
    rows are right-padded in batches or run one by one."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    text_file = tmp_path / "sample.txt"
    text_file.write_text("\n\n".join(corpus[:60]))
    ids, mask = load_sample_rows(text_file, tokenizer, 10, 24)
    assert ids.shape == (10, 24) and bool(mask.all())
    saved = tmp_path / "saved"
    Dataset.from_dict({"text": corpus[:20]}).save_to_disk(str(saved))
    ids, mask = load_sample_rows(saved, tokenizer, 6, 256)
    lengths = mask.sum(1)
    assert ids.shape[0] == 6 and len(set(lengths.tolist())) > 1  # ragged rows, right-padded
    assert ids[0, : lengths[0]].tolist() == tokenizer(corpus[0])["input_ids"][:256]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    batched = measure(model, ids, mask, batch_size=6, progress=False)
    alone = [measure(model, ids[i : i + 1, : lengths[i]], mask[i : i + 1, : lengths[i]], progress=False) for i in range(6)]
    assert batched.tokens == sum(a.tokens for a in alone) == int(lengths.sum())
    torch.testing.assert_close(batched.cos_sum, sum(a.cos_sum for a in alone), atol=1e-4, rtol=1e-5)
    ids, _ = load_sample_rows(sample_parquet, tokenizer, 100, 32)
    assert ids.shape == (48, 32)  # fewer rows than asked: all of them


@pytest.mark.parametrize("args,message", [
    (["--data", "{missing}", "--keep", "6"], "--data {missing} does not exist"),
    (["--data", "{parquet}", "--keep", "9"], "keeps 9 layers but"),
    (["--data", "{parquet}", "--shape", "2,x,2"], "--shape '2,x,2': expected three whole numbers"),
    (["--data", "{parquet}", "--keep", "6", "--plot", "{out}.jpg"], "use a .png or .pdf file name"),
    (["--data", "{empty}", "--keep", "6"], "is a folder without *.parquet files"),
    (["--data", "{parquet}", "--keep", "6", "--top", "0"], "--top must be >= 1"),
    (["--data", "{bad_ids}/negative.parquet", "--keep", "6"], "token id -5 in"),
    (["--data", "{bad_ids}/null.parquet", "--keep", "6"], "holds null values"),
])
def test_cli_errors_are_one_line(tiny_llama_dir, sample_parquet, tmp_path, capsys, args, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad_ids = tmp_path / "bad_ids"
    bad_ids.mkdir()
    pq.write_table(pa.table({"input_ids": [[1, -5, 3, 4]] * 2}), bad_ids / "negative.parquet")
    pq.write_table(pa.table({"input_ids": [[1, None, 3, 4]] * 2}), bad_ids / "null.parquet")
    paths = {"missing": tmp_path / "missing", "parquet": sample_parquet, "out": tmp_path / "plot", "empty": tmp_path,
             "bad_ids": bad_ids}
    args = [a.format(**paths) for a in args]
    code = choose_split.main(["--model_name", str(tiny_llama_dir), *args, "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message.format(**paths) in err, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    assert not list(tmp_path.glob("plot*"))


@pytest.mark.slow
def test_cli_prints_table_flags_and_writes_plot(noop_base, sample_parquet, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "choose_split.py"), "--model_name", str(noop_base), "--data", str(sample_parquet),
         "--keep", "6", "--num_sequences", "16", "--max_length", "32", "--plot", str(tmp_path / "split.png"),
         "--out_json", str(tmp_path / "split.json")],
        capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "layer  block influence  angular distance" in out and "paper-style" in out and "worst (#10)" in out
    flags = re.search(r"recommended converter flags:\n  (.+)", out).group(1)
    assert flags == "--prelude_idx 0-1 --core_idx 2-3 --coda_idx 6-7"
    assert "measuring layers" not in result.stderr  # its progress bar is drawn only on a terminal (retrofit.progress)
    assert (tmp_path / "split.png").read_bytes()[:4] == b"\x89PNG"
    import json

    data = json.loads((tmp_path / "split.json").read_text())
    assert data["recommended"]["dropped"] == list(NOOP_LAYERS) and data["recommended"]["flags"] == flags
    assert data["candidates"] == 10 and len(data["statistics"]["block_influence"]) == 8
