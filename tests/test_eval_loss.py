"""multi_recurrence_eval.py: validation loss over depth on a real converted model and real parquet.

The one-pass sweep is checked against the model's own forward run from scratch at each depth,
with a random (seeded) initial state as well as the deterministic zero state; adaptive exit with
threshold 0 must reproduce fixed depth, and an always-exit threshold must freeze every token.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ROOT

from retrofit.model.configuration_raven import DEFAULT_STATE_STD
from retrofit.evaluate.loss_over_depth import (
    AdaptiveExit,
    EvalError,
    depth_sweep,
    inputs_and_labels,
    load_eval_rows,
    loss_over_depth,
    parse_recurrences,
)
from tiny_components import pack_token_rows, write_token_parquet

RECURRENCES = [1, 2, 3, 6]
ROW = 33  # max_length 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(eval_run_dir):
    return eval_run_dir / "model_only_chkpt_10"


@pytest.fixture(scope="module")
def model(checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def shard(tmp_path_factory, tokenizer, corpus):
    """One val shard: 10 packed rows of 33 tokens; the last two end in 8 and 20 padding tokens."""
    rows = pack_token_rows(tokenizer, corpus[:60], ROW)[:10]
    masks = [[1] * ROW for _ in rows]
    for row, pad in ((8, 8), (9, 20)):
        rows[row] = rows[row][: ROW - pad] + [tokenizer.pad_token_id] * pad
        masks[row] = [1] * (ROW - pad) + [0] * pad
    out = tmp_path_factory.mktemp("val")
    write_token_parquet(rows, out, num_shards=1, row_group_size=4, masks=masks)
    return out / "shard-00000.parquet"


@pytest.fixture
def random_state(model):
    """Huginn's random initial state for one test (the fixture checkpoint has std 0)."""
    model.config.init_values["std"] = DEFAULT_STATE_STD
    yield
    model.config.init_values["std"] = 0.0


def flat(losses):
    return torch.tensor([v for batch in losses for v in batch])


def test_one_pass_equals_independent_runs(model, shard, random_state):
    """With Huginn's random initial state, seeded alike: the one-pass sweep equals a from-scratch
    forward per depth (the model's own `forward`), batch by batch and sequence by sequence."""
    ids, mask = load_eval_rows(shard, 10)
    one = loss_over_depth(model, ids, mask, RECURRENCES, batch_size=4, seed=3, progress=False)
    ind = loss_over_depth(model, ids, mask, RECURRENCES, batch_size=4, seed=3, independent_runs=True, progress=False)
    for r in RECURRENCES:
        assert len(one.losses[r]) == 3 and [len(b) for b in one.losses[r]] == [4, 4, 2]
        torch.testing.assert_close(flat(one.losses[r]), flat(ind.losses[r]), rtol=1e-6, atol=1e-6)
        assert one.mean_depth[r] == ind.mean_depth[r] == r
    # The depth matters (so the comparison above is not vacuous) ...
    assert not torch.allclose(flat(one.losses[1]), flat(one.losses[6]), atol=1e-4)
    # ... and so does the random state: another seed gives other losses.
    other = loss_over_depth(model, ids, mask, [2], batch_size=4, seed=4, progress=False)
    assert not torch.allclose(flat(other.losses[2]), flat(one.losses[2]))


def test_readout_in_chunks_equals_one_chunk(model, shard, monkeypatch):
    """The sweep's head + loss over chunks of tokens (bounded logits memory at real vocabulary
    sizes) gives the losses of the whole-batch readout; 7 rows per chunk leaves a ragged last
    chunk and crosses the padded rows."""
    import retrofit.evaluate.loss_over_depth as evaluation

    ids, mask = load_eval_rows(shard, 10)
    whole = loss_over_depth(model, ids, mask, RECURRENCES, batch_size=5, progress=False)
    monkeypatch.setattr(evaluation, "READOUT_LOGITS_PER_CHUNK", 7 * model.lm_head.out_features)
    chunked = loss_over_depth(model, ids, mask, RECURRENCES, batch_size=5, progress=False)
    for r in RECURRENCES:
        torch.testing.assert_close(flat(chunked.losses[r]), flat(whole.losses[r]), rtol=1e-6, atol=1e-7)


def test_padding_is_not_scored(model, shard):
    """A padded row scores exactly its real tokens: same loss as the unpadded prefix on its own."""
    ids, mask = load_eval_rows(shard, 10)
    real = int(mask[9].sum())
    padded = depth_sweep(model, *inputs_and_labels(ids[9:10], mask[9:10]), [4])
    alone = depth_sweep(model, *inputs_and_labels(ids[9:10, :real], mask[9:10, :real]), [4])
    torch.testing.assert_close(padded.losses[4], alone.losses[4], rtol=1e-5, atol=1e-5)
    assert padded.token_count == real - 1
    # loss_over_depth drops the mask of right-padded rows (causal attention suffices): same result.
    swept = loss_over_depth(model, ids[8:10], mask[8:10], [4], batch_size=2, progress=False)
    torch.testing.assert_close(torch.tensor(swept.losses[4][0][1:]), alone.losses[4], rtol=1e-5, atol=1e-5)
    # Left padding keeps the mask and scores the same tokens the same way.
    left_ids = torch.cat([ids[9:10, real:], ids[9:10, :real]], dim=1)
    left_mask = torch.cat([mask[9:10, real:], mask[9:10, :real]], dim=1)
    left = loss_over_depth(model, left_ids, left_mask, [4], progress=False)
    torch.testing.assert_close(torch.tensor(left.losses[4][0]), alone.losses[4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("criterion", ["kl", "latent"])
def test_adaptive_exit(model, shard, criterion):
    depths = [1, 2, 4]
    ids, mask = load_eval_rows(shard, 4)
    batch = inputs_and_labels(ids, mask)
    fixed = depth_sweep(model, *batch, depths)
    # Threshold 0: no token ever exits, so every depth is run in full and matches fixed depth.
    never = depth_sweep(model, *batch, depths, adaptive=AdaptiveExit(0.0, criterion))
    for r in depths:
        assert torch.equal(never.losses[r], fixed.losses[r])
        assert never.depth_sum[r] == r * never.token_count
    # A huge threshold: every token exits at iteration 2 (the first with a previous one to compare),
    # so deeper budgets give exactly the depth-2 result and a mean depth of 2.
    always = loss_over_depth(model, ids, mask, depths, batch_size=4, adaptive=AdaptiveExit(1e9, criterion), progress=False)
    assert always.mean_depth == {1: 1.0, 2: 2.0, 4: 2.0}
    torch.testing.assert_close(flat(always.losses[4]), fixed.losses[2], rtol=0, atol=0)
    # The one-pass adaptive sweep equals per-budget adaptive runs from scratch.
    threshold = 1e-3 if criterion == "kl" else 0.5
    swept = loss_over_depth(model, ids, mask, depths, batch_size=2, adaptive=AdaptiveExit(threshold, criterion), progress=False)
    single = loss_over_depth(model, ids, mask, depths, batch_size=2, adaptive=AdaptiveExit(threshold, criterion),
                             independent_runs=True, progress=False)
    for r in depths:
        torch.testing.assert_close(flat(swept.losses[r]), flat(single.losses[r]), rtol=1e-6, atol=1e-6)
        assert swept.mean_depth[r] == single.mean_depth[r] <= r


def run_cli(*argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location("multi_recurrence_eval", ROOT / "multi_recurrence_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


def test_cli_writes_the_original_format(eval_run_dir, shard, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--eval_file_path", shard, "--recurrences", "[1,2,4]", "--num_sequences", 6, "--batch_size", 4, "--device", "cpu"]
    assert run_cli(eval_run_dir, "[10]", *common) == 0
    out = tmp_path / "loss_over_rec_eval" / eval_run_dir.name / "chkpt_10.json"
    data = json.loads(out.read_text())
    assert list(data) == ["1", "2", "4"] and [len(b) for b in data["4"]] == [4, 2]
    assert all(math.isfinite(v) and v > 0 for b in data["4"] for v in b)
    printed = capsys.readouterr().out
    assert "one pass" in printed and "depth" in printed

    # Rerun: skipped; adaptive: its own file with the mean depth used.
    assert run_cli(eval_run_dir, "10", *common) == 0
    assert "skip chkpt_10" in capsys.readouterr().out
    assert run_cli(eval_run_dir, "model_only_chkpt_10", *common, "--adaptive_threshold", 0, "--adaptive_criterion", "latent") == 0
    adaptive = json.loads((out.parent / "chkpt_10_adaptive_latent_0.json").read_text())
    assert adaptive["mean_depth"] == {"1": 1.0, "2": 2.0, "4": 4.0}
    assert adaptive["loss"] == data


@pytest.mark.parametrize("argv,message", [
    (["{run}", "99"], "model_only_chkpt_99"),
    (["{run}", "no_config"], "has no config.json"),
    (["{run}", "10", "--recurrences", "1,0,4"], "recurrence 0 is < 1"),
    (["{run}", "10", "--eval_file_path", "{bad_shard}"], "no column 'input_ids'"),
    (["{run}", "10", "--adaptive_threshold", "-1"], "adaptive threshold"),
    (["{run}", "10", "--adaptive_threshold", "0.1", "--adaptive_criterion", "entropy"], "'entropy'"),
    (["{run}/nope", "10"], "does not exist"),
    (["{run}", "10", "--recurrences", "1000000000"], "recurrence 1000000000 is more than 1024"),
    (["{run}", "10", "--eval_file_path", "{negative_ids}", "--num_sequences", "2"], "token id -5 in"),
    (["{run}", "10", "--eval_file_path", "{huge_ids}", "--num_sequences", "2"], "token id 1000000 in"),
])
def test_cli_errors(eval_run_dir, shard, tmp_path, capsys, monkeypatch, argv, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (eval_run_dir / "no_config").mkdir(exist_ok=True)
    bad_shard = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"tokens": [[1, 2, 3]]}), bad_shard)
    negative_ids, huge_ids = tmp_path / "negative.parquet", tmp_path / "huge.parquet"
    pq.write_table(pa.table({"input_ids": [[1, -5, 3, 4]] * 2}), negative_ids)
    pq.write_table(pa.table({"input_ids": [[1, 10**6, 3, 4]] * 2}), huge_ids)
    monkeypatch.chdir(tmp_path)
    argv = [a.format(run=eval_run_dir, bad_shard=bad_shard, negative_ids=negative_ids, huge_ids=huge_ids) for a in argv]
    if "--eval_file_path" not in argv:
        argv += ["--eval_file_path", str(shard)]
    assert run_cli(*argv, "--device", "cpu") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "loss_over_rec_eval").exists()


def test_parse_recurrences():
    assert parse_recurrences("8, 1,2,[4]") == [1, 2, 4, 8]
    assert parse_recurrences([16, "32"]) == [16, 32]
    with pytest.raises(EvalError, match="'x' is not an integer"):
        parse_recurrences("1,x")


def test_cli_runs_this_repos_model_code_unless_asked(eval_run_dir, shard, tmp_path, capsys, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(eval_run_dir / "model_only_chkpt_10", run / "model_only_chkpt_10")
    marker = tmp_path / "checkpoint_code_ran"
    with open(run / "model_only_chkpt_10" / "modeling_raven.py", "a") as handle:
        handle.write(f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    monkeypatch.chdir(tmp_path)
    common = ["--eval_file_path", shard, "--recurrences", "1,2", "--num_sequences", 2, "--device", "cpu", "--overwrite"]
    assert run_cli(run, "10", *common) == 0 and not marker.exists()
    assert run_cli(run, "10", *common, "--trust_remote_code") == 0 and marker.read_text() == "ran"
