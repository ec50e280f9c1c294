"""Adaptive exit (retrofit/model/exits_raven.py): each criterion against a value computed by hand,
threshold 0 = fixed depth for every criterion (decoding and the depth sweep), and rows that exit
really stop running the recurrent block, with the same tokens as each prompt decoded alone."""

from __future__ import annotations

import math

import pytest
import torch

from retrofit.evaluate.loss_over_depth import AdaptiveExit, EvalError, depth_sweep, loss_over_depth
from retrofit.model.exits_raven import EXIT_CRITERIA, ExitTracker, exit_criterion
from test_model import VOCAB, tiny_model

CRITERIA = [name for name in EXIT_CRITERIA if name != "gate"] + ["argmax-stability-2", "gate"]


def with_gate(model, change_weight: float = 0.0):
    """The model with a learned exit gate whose weights are set by hand: no state term, the log
    relative change weighted by `change_weight`, iteration biases 0, 2, -1, 3 (p_stop = sigmoid(bias))."""
    model.add_exit_gate(iterations=4)
    with torch.no_grad():
        model.exit_gate.change_weight.fill_(change_weight)
        model.exit_gate.iteration_bias.copy_(torch.tensor([0.0, 2.0, -1.0, 3.0]))
    return model


def changes(name, measures, model=None):
    """The criterion's change after each observation of `measures` (states or log-probs)."""
    criterion, memory, out = exit_criterion(name), None, []
    for m in measures:
        change, memory = criterion.step(model, m, m, memory)
        out.append(None if change is None else change.item())
    return out


def test_criteria_against_hand_computed_values():
    log = lambda p: torch.tensor([p], dtype=torch.float64).log()  # noqa: E731
    half, skew = log([0.5, 0.5]), log([0.25, 0.75])
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert changes("kl", [half, skew]) == [None, pytest.approx(kl, abs=1e-12)]
    entropy_skew = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert changes("entropy-diff", [half, skew]) == [None, pytest.approx(math.log(2) - entropy_skew, abs=1e-12)]
    # min-p: 0.05 < 0.1 * 0.7, so those become 1/4 before renormalising; nothing is cut from the second.
    q1 = [0.7 / 1.4, 0.2 / 1.4, 0.25 / 1.4, 0.25 / 1.4]
    q2 = [0.4, 0.4, 0.1, 0.1]
    minp = sum(a * math.log(a / b) for a, b in zip(q1, q2))
    got = changes("minp-kl", [log([0.7, 0.2, 0.05, 0.05]), log(q2)])
    assert got == [None, pytest.approx(minp, abs=1e-12)]
    s1, s2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert changes("latent", [s1, s2]) == [None, pytest.approx(math.sqrt(5) / 2)]
    assert changes("cosine", [s1, torch.tensor([[1.0, 1.0]])]) == [None, pytest.approx(1 - 1 / math.sqrt(2))]
    # argmax 0, 0, 0, 1, 1: held for n = 0, 1, 2, 0, 1 iterations.
    argmaxes = [log([0.6, 0.4]), log([0.7, 0.3]), log([0.9, 0.1]), log([0.2, 0.8]), log([0.1, 0.9])]
    assert changes("argmax-stability", argmaxes) == [None, 1 / 2, pytest.approx(1 / 3), 1.0, 1 / 2]
    assert changes("argmax-stability-2", argmaxes) == [None, 1.0, 0.0, 1.0, 1.0]
    gated = with_gate(tiny_model())
    h = gated.config.n_embd
    unit = torch.eye(h)[:2].unsqueeze(1)  # two (1, h) states along different axes
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # iterations 1, 2, 3: p_stop = sigmoid(0), sigmoid(2), sigmoid(-1)
    assert changes("gate", [unit[0], unit[1], unit[0]], gated) == [
        pytest.approx(0.5), pytest.approx(1 - sig(2.0)), pytest.approx(1 - sig(-1.0))]
    # the change term reads s_{i-1}, s_0 from `start`: s_0 = e_0, s_1 = 2 e_1, ||s_1 - s_0|| / ||s_1|| = sqrt(5)/2
    weighted, gate = with_gate(tiny_model(), change_weight=1.0), exit_criterion("gate")
    change, _ = gate.step(weighted, 2 * unit[1], None, gate.start(unit[0]))
    assert change.item() == pytest.approx(1 - sig(math.log(math.sqrt(5) / 2)), rel=1e-6)


def test_tracker_exits_below_threshold_and_only_for_the_rows_it_is_given():
    tracker = ExitTracker("latent", 0.5, (3, 1), "cpu")
    states = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[1.0, 0.0]]])
    tracker.count_iteration()
    tracker.observe(states)
    moved = torch.tensor([[[1.0, 0.1]], [[0.0, 5.0]]])  # row 0 barely moves, row 2 jumps
    rows = torch.tensor([0, 2])
    tracker.count_iteration(rows)
    tracker.observe(moved, rows=rows)
    assert tracker.active[:, 0].tolist() == [False, True, True]
    assert tracker.used[:, 0].tolist() == [2, 1, 2]


def test_bad_criteria_are_one_line_errors_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown adaptive_criterion 'entropy'; valid: kl, latent, entropy-diff"):
        exit_criterion("entropy")
    with pytest.raises(ValueError, match="M in argmax-stability-M must be an integer >= 1"):
        exit_criterion("argmax-stability-0")
    model = tiny_model()
    with pytest.raises(ValueError, match="'gate' needs a checkpoint with a learned exit gate"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, adaptive_threshold=0.1, adaptive_criterion="gate")
    with pytest.raises(EvalError, match="learned exit gate"):
        loss_over_depth(model, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), [2],
                        adaptive=AdaptiveExit(0.1, "gate"), progress=False)
    with pytest.raises(ValueError, match="adaptive_threshold must be a finite number >= 0, got -1"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, adaptive_threshold=-1)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_threshold_zero_is_fixed_depth(criterion):
    model = with_gate(tiny_model())
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    fixed = model.generate(ids, max_new_tokens=4, num_steps=4, eos_token_id=[])
    adaptive = model.generate(ids, max_new_tokens=4, num_steps=4, eos_token_id=[],
                              adaptive_threshold=0.0, adaptive_criterion=criterion)
    assert torch.equal(fixed, adaptive) and model.last_generation_stats["mean_depth"] == 4.0
    labels = torch.roll(ids, -1, dims=1)
    swept = depth_sweep(model, ids, None, labels, [1, 3], adaptive=AdaptiveExit(0.0, criterion))
    plain = depth_sweep(model, ids, None, labels, [1, 3])
    for r in (1, 3):
        assert torch.equal(swept.losses[r], plain.losses[r])
        assert swept.executed[r] == plain.executed[r] == r * ids.numel()


def recurrent_rows_per_call(model):
    """Instrument `recur` on the real model: the batch rows each recurrent-block call runs."""
    rows, recur = [], model.recur

    def counting(state, *args, **kwargs):
        rows.append(state.shape[0])
        return recur(state, *args, **kwargs)

    model.recur = counting
    return rows


@pytest.mark.parametrize("criterion,threshold", [("latent", 0.4), ("kl", 1e-3), ("argmax-stability", 0.5)])
def test_batched_rows_stop_and_match_each_prompt_alone(criterion, threshold):
    # float64 and a zero initial state: the left-padded batch and a prompt alone then agree to
    # ~1e-16, far from any exit threshold or argmax tie (float32 rounding differences between the
    # masked batch and the unmasked single prompt could flip either).
    model = tiny_model(seed=1).double()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (6, 4, 5, 6)]
    width = max(len(p) for p in prompts)
    batch = torch.stack([torch.cat([torch.full((width - len(p),), 2), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]).long() for p in prompts])
    kwargs = dict(max_new_tokens=6, num_steps=8, eos_token_id=[], adaptive_threshold=threshold, adaptive_criterion=criterion)
    rows = recurrent_rows_per_call(model)
    batched = model.generate(batch, attention_mask=mask, **kwargs)
    stats = model.last_generation_stats
    # Recurrent-block row-iterations actually run after the prompt = the depths the tokens used.
    prefill = 8
    assert sum(rows[prefill:]) == round(stats["mean_depth"] * stats["tokens"]) < 8 * stats["tokens"]
    assert min(rows[prefill:]) < len(prompts)  # some iterations ran on fewer rows than the batch
    # A batched step lasts as long as its deepest row: one recurrent call per iteration of it.
    steps = kwargs["max_new_tokens"] - 1
    assert stats["mean_step_depth"] * steps == pytest.approx(len(rows) - prefill)
    assert stats["mean_depth"] <= stats["mean_step_depth"] <= 8
    assert stats["prefill_seconds"] > 0 and stats["decode_seconds"] > 0  # the clock of bench/adaptive_decode.py
    depth_total = 0.0
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **kwargs)
        assert torch.equal(alone[0, len(prompt):], batched[i, width:]), f"row {i}"
        depth_total += model.last_generation_stats["mean_depth"] * model.last_generation_stats["tokens"]
    assert depth_total == pytest.approx(stats["mean_depth"] * stats["tokens"])


def test_sweep_drops_exited_rows_and_counts_the_compute_it_ran():
    model = tiny_model(seed=1)
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    # Every token exits after its second iteration: depth 6 runs 2 of 6 iterations per token.
    early = loss_over_depth(model, ids, mask, [2, 6], adaptive=AdaptiveExit(1e9, "cosine"), progress=False)
    assert early.mean_depth == {2: 2.0, 6: 2.0} and early.executed_fraction == {2: 1.0, 6: pytest.approx(1 / 3)}
    middle = loss_over_depth(model, ids, mask, [8], adaptive=AdaptiveExit(0.05, "cosine"), progress=False)
    assert middle.mean_depth[8] <= 8 * middle.executed_fraction[8] <= 8


class MergedKeyValues:
    """Reference for the sweep's rule, computed the slow way: every token runs every iteration,
    and the keys and values of tokens that exited before it are put back to their last ones."""

    bounded = True

    def __init__(self):
        self.keys, self.values, self.active = {}, {}, None

    def slot(self, kind, layer, iteration=0):
        return (kind, layer)

    def update(self, slot, k, v, start):
        if slot in self.keys:
            keep_new = self.active[:, None, :, None]
            k, v = torch.where(keep_new, k, self.keys[slot]), torch.where(keep_new, v, self.values[slot])
        self.keys[slot], self.values[slot] = k, v
        return k, v


def reference_sweep(model, ids, mask, labels, depth, criterion, threshold):
    from retrofit.evaluate.loss_over_depth import readout_loss
    from retrofit.model.layers_raven import AttentionContext

    ctx = model.attention_context(ids, mask)
    e = model.run_prelude(model.embed(ids), ctx)
    state = torch.zeros_like(e)
    tracker = ExitTracker(criterion, threshold, ids.shape, "cpu", model=model)
    store = MergedKeyValues()
    merged = AttentionContext(cos=ctx.cos, sin=ctx.sin, mask=ctx.mask, cache=store)
    for i in range(depth):
        store.active = tracker.active.clone()
        tracker.count_iteration()
        state = torch.where(store.active[..., None], model.recur(state, e, merged, i), state)
        log_probs = None
        if tracker.reads_logits:
            log_probs = model.lm_head(model.run_coda(state, merged)).float().log_softmax(-1)
        tracker.observe(state, log_probs)
    return readout_loss(model, state, ctx, labels), float(tracker.used[labels != -100].sum())


@pytest.mark.parametrize("criterion,threshold", [("latent", 0.3), ("kl", 1e-3)])
def test_sweep_runs_only_active_tokens_with_the_reference_result(criterion, threshold):
    model = tiny_model(seed=1).double()
    ids = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: per-row positions and a mask
    labels = torch.roll(ids, -1, dims=1).masked_fill(mask == 0, -100)
    labels[:, -1] = -100
    swept = depth_sweep(model, ids, mask, labels, [8], adaptive=AdaptiveExit(threshold, criterion))
    loss, depth_sum = reference_sweep(model, ids, mask, labels, 8, criterion, threshold)
    torch.testing.assert_close(swept.losses[8], loss.cpu(), rtol=1e-9, atol=1e-9)
    assert swept.depth_sum[8] == depth_sum
    # Some tokens exited early, and only the others ran: less compute than fixed depth.
    assert 2 * swept.token_count < depth_sum < 8 * swept.token_count
    assert swept.executed[8] < 8 * ids.numel()



def test_bench_adaptive_decode_runs_and_prints_the_ratio(capsys, monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "adaptive_decode.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as `python bench/adaptive_decode.py` has it: finds bench/_common.py
    spec = importlib.util.spec_from_file_location("adaptive_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--model", "random", "--random_hidden", "64", "--batch", "3", "--depth", "4", "--new_tokens", "3",
            "--prompt_tokens", "5", "--context", "7", "--repeats", "1", "--search_steps", "2", "--criteria",
            "cosine,argmax-stability-2", "--device", "cpu"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "prompt 12 tokens" in out  # 7 of context + 5
    assert "fixed depth" in out and "cosine @" in out and "argmax-stability-2 @" in out and "step depth" in out
    with pytest.raises(SystemExit):
        bench.main(["--criteria", "entropy"])
