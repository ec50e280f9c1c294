"""inspect_recurrence.py: the per-iteration logit lens on a tiny real recurrent model.

The lens must read out exactly what the model computes (each iteration's readout is `forward`'s
logits at that depth, bit for bit, from the same initial state), give a sequence the same table
in a padded batch as alone, and the CLI must write its three outputs and refuse bad input.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from retrofit.evaluate.logit_lens import (
    InspectError,
    batch_initial_state,
    inspect_sequences,
    iteration_logits,
    pad_right,
    read_parquet_sequences,
    sequence_record,
    trace_recurrence,
)
from retrofit.model.modeling_raven import RavenForCausalLM
from tiny_components import stderr_noise, tiny_raven_config

import inspect_recurrence

STEPS = 4
LENGTHS = (5, 11, 3)


@pytest.fixture(scope="module")
def model(tokenizer):
    """The tiny (1, 2, 1) recurrent model with Huginn's random initial state (std > 0). Its head is
    scaled up so next-token distributions are peaked, not near-uniform: padding changes kernel
    shapes and so rounding (1e-6), which must not flip a top-1 token or rank between near-ties."""
    torch.manual_seed(0)
    model = RavenForCausalLM(tiny_raven_config(len(tokenizer))).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def sequences(model):
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in LENGTHS]


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_every_iteration_reads_out_forwards_logits_exactly(model, sequences, padded):
    seqs = sequences if padded else [s[:5] for s in sequences[:2]]
    ids, mask = pad_right(seqs, model.config.pad_token_id)
    s0 = batch_initial_state(model, mask, seed=3)
    attention_mask = mask if padded else None
    trace = trace_recurrence(model, ids, attention_mask, STEPS, s0)
    for depth in range(1, STEPS + 1):
        expected = model(ids, attention_mask=attention_mask, num_steps=depth, initial_state=s0).logits
        assert torch.equal(iteration_logits(model, trace, depth - 1), expected), depth


@torch.no_grad()
def test_seeded_state_is_the_one_forward_draws_from_the_same_seed(model, sequences):
    """A single sequence's s_0 is what `forward` draws itself after torch.manual_seed(seed)."""
    ids = torch.tensor([sequences[1]])
    trace = trace_recurrence(model, ids, None, STEPS, batch_initial_state(model, torch.ones_like(ids), seed=5))
    torch.manual_seed(5)
    assert torch.equal(iteration_logits(model, trace, STEPS - 1), model(ids, num_steps=STEPS).logits)


def test_padded_batch_gives_each_sequence_its_own_table(model, sequences):
    together = inspect_sequences(model, sequences, STEPS, seed=2)
    for seq, batched in zip(sequences, together):
        alone = inspect_sequences(model, [seq], STEPS, seed=2)[0]
        assert batched.token_ids == alone.token_ids == seq
        assert batched.top1.shape == (STEPS, len(seq))
        np.testing.assert_array_equal(batched.top1, alone.top1)
        np.testing.assert_array_equal(batched.target_rank, alone.target_rank)
        np.testing.assert_allclose(batched.entropy, alone.entropy, rtol=0, atol=1e-5)
        np.testing.assert_allclose(batched.kl_to_final, alone.kl_to_final, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(batched.states, alone.states, rtol=0, atol=1e-5)
    # Different sequences really differ (the comparison above is not vacuous).
    assert not np.array_equal(together[0].top1, together[1].top1[:, : LENGTHS[0]])


@torch.no_grad()
def test_readout_statistics_follow_their_definitions(model, sequences, tokenizer):
    seq = sequences[1]
    lens = inspect_sequences(model, [seq], STEPS, seed=0)[0]
    ids = torch.tensor([seq])
    s0 = batch_initial_state(model, torch.ones_like(ids), seed=0)
    final = torch.log_softmax(model(ids, num_steps=STEPS, initial_state=s0).logits[0].float(), -1)
    logits = model(ids, num_steps=2, initial_state=s0).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    np.testing.assert_array_equal(lens.top1[1], logits.argmax(-1).numpy())
    np.testing.assert_allclose(lens.entropy[1], -(logp.exp() * logp).sum(-1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(lens.kl_to_final[1], (final.exp() * (final - logp)).sum(-1).numpy(), rtol=1e-4, atol=1e-6)
    assert (lens.kl_to_final[-1] == 0).all()
    targets = torch.tensor(seq[1:])
    ranks = 1 + (logits[:-1] > logits[:-1].gather(-1, targets[:, None])).sum(-1)
    np.testing.assert_array_equal(lens.target_rank[1, :-1], ranks.numpy())
    assert (lens.target_rank[:, -1] == -1).all()  # the last token has no next token

    record = sequence_record(0, "text 0", lens, tokenizer)
    assert record["num_tokens"] == len(seq) and len(record["tokens"]) == len(seq)
    first, last = record["tokens"][0], record["tokens"][-1]
    assert first["target_id"] == seq[1] and last["target_id"] is None
    assert [it["iteration"] for it in first["iterations"]] == list(range(1, STEPS + 1))
    assert last["iterations"][0]["target_rank"] is None
    assert first["iterations"][1]["target_rank"] == int(ranks[0])


def test_bad_sequences_are_refused(model):
    with pytest.raises(InspectError, match="sequence 1 has no tokens"):
        inspect_sequences(model, [[5, 6], []], STEPS)
    with pytest.raises(InspectError, match="token id 100000"):
        inspect_sequences(model, [[5, 100000]], STEPS)
    with pytest.raises(InspectError, match="num_steps must be >= 1, got 0"):
        inspect_sequences(model, [[5, 6]], 0)


def test_data_rows_of_any_length_give_their_real_tokens(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ragged = tmp_path / "ragged.parquet"  # unpacked rows: no attention_mask, lengths differ
    pq.write_table(pa.table({"input_ids": [[5, 6, 7], [8, 9, 10, 11, 12], [13]]}), ragged)
    assert read_parquet_sequences(ragged, 2) == [[5, 6, 7], [8, 9, 10, 11, 12]]
    packed = tmp_path / "packed.parquet"  # packed rows: padding marked by attention_mask
    pq.write_table(pa.table({"input_ids": [[5, 6, 2, 2], [7, 8, 9, 10]], "attention_mask": [[1, 1, 0, 0], [1, 1, 1, 1]]}),
                   packed, row_group_size=1)
    assert read_parquet_sequences(packed, 5) == [[5, 6], [7, 8, 9, 10]]
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"input_ids": [[5, 6]], "attention_mask": [[0, 0]]}), empty)
    with pytest.raises(InspectError, match="row 0 has no real tokens"):
        read_parquet_sequences(empty, 1)
    with pytest.raises(InspectError, match="does not exist"):
        read_parquet_sequences(tmp_path / "missing.parquet", 1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{missing}", "--text", "x"], "has no config.json"),
        (["{ckpt}", "--text", "  "], "--text number 1 is empty"),
        (["{ckpt}", "--text", "x", "--num_steps", "0"], "--num_steps must be in [1,"),
        (["{ckpt}"], "one of the arguments --text --data is required"),
        (["{ckpt}", "--text", "x", "--data", "d.parquet"], "not allowed with argument"),
        (["{ckpt}", "--data", "{missing}"], "does not exist"),
        (["{ckpt}", "--text", "x", "--num_sequences", "2"], "--num_sequences applies to --data only"),
        (["{ckpt}", "--text", "x", "--out", "{ckpt}"], "exists (--overwrite to replace it)"),
    ],
)
def test_cli_refuses_bad_input_in_one_line(train_raven_dir, tmp_path, capsys, argv, message):
    argv = [a.format(ckpt=train_raven_dir, missing=tmp_path / "nothing") for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        inspect_recurrence.parse_args(argv)
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], error_lines


def test_cli_writes_table_heatmap_and_pca(train_raven_dir, train_parquet_dir, tmp_path, capsys):
    out = tmp_path / "inspection"
    code = inspect_recurrence.main([str(train_raven_dir), "--data", str(train_parquet_dir), "--num_sequences", "2",
                                    "--num_steps", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.png", "pca.png", "readout.json"]
    table = json.loads((out / "readout.json").read_text())
    assert table["num_steps"] == 3 and [s["source"] for s in table["sequences"]] == ["row 0", "row 1"]
    assert all(len(tok["iterations"]) == 3 for s in table["sequences"] for tok in s["tokens"])
    for name in ("heatmap.png", "pca.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "next token top-1" in capsys.readouterr().out
    before = (out / "readout.json").read_bytes()
    with pytest.raises(SystemExit):  # never silently replaced
        inspect_recurrence.main([str(train_raven_dir), "--text", "x", "--out", str(out)])
    assert (out / "readout.json").read_bytes() == before


@pytest.mark.slow
def test_cli_subprocess_end_to_end(train_raven_dir, tmp_path):
    out = tmp_path / "inspection"
    command = [sys.executable, str(ROOT / "inspect_recurrence.py"), str(train_raven_dir), "--text", "Q: 2 + 3?",
               "--text", "A: 5", "--num_steps", "3", "--out", str(out), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not stderr_noise(result.stderr), result.stderr
    table = json.loads((out / "readout.json").read_text())
    assert [s["source"] for s in table["sequences"]] == ["text 0", "text 1"]
    assert (out / "heatmap.png").is_file() and (out / "pca.png").is_file()
