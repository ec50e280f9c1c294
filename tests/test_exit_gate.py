"""The learned exit gate (ExitGate, RavenForCausalLM.exit_probability, retrofit/train/exit_gate.py,
train_exit_gate.py): its training lowers its objective, it saves and loads with the checkpoint
(trust_remote_code, outside the repo), checkpoints without it are unchanged, and at threshold 0
adaptive decoding and the depth sweep with `gate` equal fixed depth."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from retrofit.evaluate.loss_over_depth import AdaptiveExit, depth_sweep
from retrofit.model.loading import load_saved_model
from retrofit.model.modeling_raven import RavenForCausalLM
from tiny_components import tiny_raven_config, write_token_parquet
from retrofit.train.exit_gate import (
    ExitGateError, GateObjective, collect_depth_records, evaluate_objective, gate_objective, init_latent_equivalent,
    remaining_gain, resolve_init, save_gated_checkpoint, stop_logits, train_gate, trainable_parameters,
)

VOCAB = 96
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(seed: int = 0) -> RavenForCausalLM:
    torch.manual_seed(seed)
    return RavenForCausalLM(tiny_raven_config(VOCAB)).eval()


def token_rows(rows: int = 6, length: int = 17, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
    return ids, torch.ones_like(ids)


@pytest.fixture(scope="module")
def gated():
    """A tiny model with a gate trained for a few steps on records of random rows."""
    model = tiny_model()
    records = collect_depth_records(model, *token_rows(), iterations=4, batch_size=3, seed=0, progress=False)
    model.add_exit_gate(4)
    train_gate(model, records, GateObjective("remaining_gain"), steps=5, lr=0.05, tokens_per_step=64, seed=0,
               progress=False)
    return model


def test_remaining_gain_is_the_gain_still_to_come():
    losses = torch.tensor([[3.0], [2.5], [2.7], [2.0], [2.2]])
    assert remaining_gain(losses).squeeze(1).tolist() == pytest.approx([1.0, 0.5, 0.7, 0.0, 0.0])


@pytest.mark.parametrize("objective", ["remaining_gain", "expected_loss", "exit_cost"])
def test_training_the_gate_lowers_its_objective_and_nothing_else_changes(objective):
    model = tiny_model()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    records = collect_depth_records(model, *token_rows(), iterations=4, batch_size=3, seed=0, progress=False)
    assert records.states.shape == (5, 6 * 16, 64) and records.losses.shape == (4, 6 * 16)
    model.add_exit_gate(4)
    goal = GateObjective(objective)
    before = evaluate_objective(model, records, goal)
    history = train_gate(model, records, goal, steps=30, lr=0.05, tokens_per_step=96, seed=0, progress=False)
    after = evaluate_objective(model, records, goal)
    assert len(history) == 30 and after < before - 1e-3, (before, after)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # only the gate's weights moved
    assert sorted(k for k in state if k not in frozen) == [
        "exit_gate.change_weight", "exit_gate.iteration_bias", "exit_gate.norm.weight", "exit_gate.proj.weight"
    ]


def test_exit_cost_is_the_expected_loss_plus_the_price_of_the_expected_depth():
    losses = torch.tensor([[3.0], [2.0], [1.5]])
    logits = torch.tensor([[0.0], [math.log(3.0)], [5.0]])  # stop 1/2, then 3/4 of the rest, the last takes the rest
    p = [0.5, 0.375, 0.125]
    expected = sum(pi * (loss + 0.1 * (i + 1)) for i, (pi, loss) in enumerate(zip(p, [3.0, 2.0, 1.5])))
    value = gate_objective(logits, losses, GateObjective("exit_cost", depth_cost=0.1))
    assert float(value) == pytest.approx(expected, rel=1e-6)


def test_latent_equivalent_gate_exits_where_latent_does_and_training_keeps_its_scale():
    """The exit_cost gate's starting point is exactly the latent criterion (gate at T = latent at
    T / (1 - T)) in the depth sweep; training moves only w and the biases and lowers exit_cost."""
    model = tiny_model()
    model.add_exit_gate(4)
    init_latent_equivalent(model)
    inputs, labels = token_rows(3, 13, seed=4)[0][:, :-1], token_rows(3, 13, seed=4)[0][:, 1:]
    s0 = torch.randn(3, 12, 64, generator=torch.Generator().manual_seed(1))
    exited_somewhere = False
    for threshold in (0.5, 0.7, 0.75):  # latent 1, 2.3, 3: this random model changes a lot
        gate = depth_sweep(model, inputs, None, labels, [4], initial_state=s0, adaptive=AdaptiveExit(threshold, "gate"))
        latent = depth_sweep(model, inputs, None, labels, [4], initial_state=s0,
                             adaptive=AdaptiveExit(threshold / (1 - threshold), "latent"))
        assert gate.depth_sum[4] == latent.depth_sum[4] and torch.equal(gate.losses[4], latent.losses[4])
        exited_somewhere |= 2 * gate.token_count < gate.depth_sum[4] < 4 * gate.token_count
    assert exited_somewhere  # some tokens exited and some did not: the comparison is not vacuous
    records = collect_depth_records(model, *token_rows(), iterations=4, batch_size=3, seed=0, progress=False)
    goal = GateObjective("exit_cost", depth_cost=0.05)
    before = evaluate_objective(model, records, goal)
    history = train_gate(model, records, goal, steps=20, lr=0.05, tokens_per_step=10**6, seed=0, progress=False,
                         parameters=trainable_parameters(model, "latent"))
    assert evaluate_objective(model, records, goal) < before - 1e-4 and history[-1] < history[0]
    assert float(model.exit_gate.change_weight) == -1.0 and bool((model.exit_gate.norm.weight == 1).all())
    first = 1 - torch.sigmoid(stop_logits(model, records.states)[0])  # the change after iteration 1
    assert bool((first == 1).all())  # rounds to 1: still no threshold <= 1 exits after the first iteration
    assert resolve_init("auto", goal) == "latent" and resolve_init("auto", GateObjective("remaining_gain")) == "zero"
    with pytest.raises(ExitGateError, match="init 'nope'"):
        resolve_init("nope", goal)


def test_exit_probability_is_a_probability_per_token(gated):
    state, previous = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    p = gated.exit_probability(state, previous, 7)  # past the gate's 4 biases: the last is reused
    assert p.shape == (2, 5) and p.dtype == torch.float32 and bool(((p >= 0) & (p <= 1)).all())
    with torch.no_grad():
        gated.exit_gate.iteration_bias.copy_(torch.tensor([0.0, 2.0, -1.0, 3.0]))
    # Each token's own iteration (tokens of one call may have run different numbers of iterations).
    iterations = torch.tensor([[1, 2, 3, 4, 9], [2, 2, 1, 4, 3]])
    per_token = gated.exit_probability(state, previous, iterations)
    for b in range(2):
        for t in range(5):
            alone = gated.exit_probability(state[b : b + 1, t : t + 1], previous[b : b + 1, t : t + 1], int(iterations[b, t]))
            assert torch.allclose(per_token[b, t], alone[0, 0])
    assert not torch.allclose(per_token[0, 0], gated.exit_probability(state, previous, 2)[0, 0])  # the bias matters
    with pytest.raises(ValueError, match="no exit gate"):
        tiny_model().exit_probability(state, previous, 1)


def test_gated_checkpoint_round_trip_with_checkpoint_code(gated, tmp_path):
    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    saved_config = json.loads((base / "config.json").read_text())
    assert "exit_gate" not in saved_config  # checkpoints without a gate: config as before
    (base / "tokenizer_config.json").write_text("{}")  # any other file of the base is carried over
    out = save_gated_checkpoint(gated, base, tmp_path / "gated")
    assert (out / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "gated"]  # no temporary folder left
    assert json.loads((out / "config.json").read_text())["exit_gate"] == {"iterations": 4}
    with pytest.raises(ExitGateError, match="already exists"):
        save_gated_checkpoint(gated, base, out)
    state, previous = torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    for loaded in (load_saved_model(out), load_saved_model(out, checkpoint_code=True)):
        assert loaded.config.exit_gate == {"iterations": 4}
        torch.testing.assert_close(loaded.exit_probability(state, previous, 2), gated.exit_probability(state, previous, 2))
    assert type(loaded).__module__.startswith("transformers_modules")
    plain = RavenForCausalLM.from_pretrained(base)  # strict loading: no missing or unexpected keys
    assert plain.exit_gate is None and plain.config.exit_gate is None


def test_threshold_zero_with_the_gate_equals_fixed_depth(gated):
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    fixed = gated.generate(ids, max_new_tokens=5, num_steps=4, eos_token_id=None)
    torch.manual_seed(0)
    adaptive = gated.generate(ids, max_new_tokens=5, num_steps=4, eos_token_id=None, adaptive_threshold=0.0,
                              adaptive_criterion="gate")
    assert torch.equal(fixed, adaptive) and gated.last_generation_stats["mean_depth"] == 4.0
    inputs, labels = ids[:, :-1], ids[:, 1:]
    s0 = torch.zeros(2, 5, 64)
    plain = depth_sweep(gated, inputs, None, labels, [4], initial_state=s0)
    zero = depth_sweep(gated, inputs, None, labels, [4], initial_state=s0, adaptive=AdaptiveExit(0.0, "gate"))
    assert torch.equal(plain.losses[4], zero.losses[4]) and zero.depth_sum[4] == plain.depth_sum[4]
    # Threshold 1 stops every token after its first iteration (1 - p_stop < 1 whenever p_stop > 0).
    one = depth_sweep(gated, inputs, None, labels, [4], initial_state=s0, adaptive=AdaptiveExit(1.0, "gate"))
    assert one.depth_sum[4] == one.token_count
    assert torch.allclose(one.losses[4], depth_sweep(gated, inputs, None, labels, [1], initial_state=s0).losses[1])


def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    import train_exit_gate

    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    data = write_token_parquet(token_rows(4)[0].tolist(), tmp_path / "data", num_shards=1)
    capsys.readouterr()  # the save's progress bar
    cases = [
        ([str(base), "--data", str(data), "--save_name", str(base)], "already exists"),
        ([str(tmp_path), "--data", str(data), "--save_name", str(tmp_path / "o")], "no config.json"),
        ([str(base), "--data", str(data), "--save_name", str(tmp_path / "o"), "--objective", "nope"], "objective 'nope'"),
        ([str(base), "--data", str(data), "--save_name", str(tmp_path / "o"), "--steps", "0"], "--steps must be"),
        ([str(base), "--data", str(data), "--save_name", str(tmp_path / "o"), "--init", "x"], "init 'x'"),
        ([str(base), "--data", str(data), "--save_name", str(tmp_path / "o"), "--depth_cost", "-1"], "depth_cost must be"),
        ([str(base), "--data", str(data), "--save_name", str(tmp_path / "o"), "--init", "zero", "--exit_after_first"],
         "--exit_after_first needs --init latent"),
    ]
    for argv, message in cases:
        assert train_exit_gate.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_trains_a_gate_that_loads_with_trust_remote_code_outside_the_repo(tmp_path):
    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    data = write_token_parquet(token_rows(8)[0].tolist(), tmp_path / "data", num_shards=1)
    out = tmp_path / "elsewhere" / "gated"
    train = [sys.executable, os.path.join(ROOT, "train_exit_gate.py"), str(base), "--data", str(data),
             "--save_name", str(out), "--steps", "10", "--iterations", "4", "--device", "cpu"]
    result = subprocess.run(train, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "objective" in result.stdout
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path = [p for p in sys.path if not p.startswith({ROOT!r}) and 'work/main' not in p or 'site-packages' in p]
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert 'retrofit' not in sys.modules and m.config.exit_gate == {{'iterations': 4}}
        ids = torch.tensor([[5, 6, 7, 8]])
        m.generate(ids, max_new_tokens=3, adaptive_threshold=0.5, adaptive_criterion='gate', eos_token_id=None)
        print(m.last_generation_stats['mean_depth'])
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 1.0 <= float(result.stdout.strip().splitlines()[-1]) <= 4.0


def test_adaptive_depth_bench_writes_its_table_and_figure(gated, tmp_path):
    from bench import adaptive_depth

    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    ckpt = save_gated_checkpoint(gated, base, tmp_path / "gated")
    data = write_token_parquet(token_rows(4)[0].tolist(), tmp_path / "data", num_shards=1)
    out = tmp_path / "out"
    argv = [str(ckpt), "--data", str(data), "--out", str(out), "--num_sequences", "4", "--max_depth", "4",
            "--device", "cpu", "--thresholds", "kl=0,1e-3", "--thresholds", "latent=0,0.1", "--thresholds", "gate=0,0.5,1"]
    assert adaptive_depth.main(argv) == 0
    points = json.loads((out / "adaptive_depth.json").read_text())
    assert [row[0] for row in points["fixed"]] == [1, 2, 3, 4] and len(points["gate"]) == 3
    fixed4 = points["fixed"][3][2]
    for name in ("kl", "latent", "gate"):  # threshold 0 is fixed depth 4: same loss, 4 iterations
        assert points[name][0][1] == 4.0 and points[name][0][2] == pytest.approx(fixed4, abs=1e-6)
    assert points["gate"][2][1] == 1.0  # threshold 1 stops every token after one iteration
    assert "| gate |" in (out / "adaptive_depth.md").read_text() and (out / "adaptive_depth.png").stat().st_size > 0
    assert adaptive_depth.main(argv[:-2] + ["--thresholds", "nope=1"]) == 2
