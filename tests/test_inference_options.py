"""Huginn's inference options on a tiny model: KV-cache policies across iterations, continuous
thought and self-speculative greedy decoding (generate, the cached depth sweep and the CLIs)."""

from __future__ import annotations

import json

import pytest
import torch
from test_decode import left_padded_batch, reference_greedy
from test_eval_loss import run_cli, shard  # noqa: F401  (module fixture)
from test_generate import load_generate, recurrent_dir  # noqa: F401  (module fixture)
from test_model import VOCAB, tiny_model

from retrofit.evaluate.cached_sweep import cached_losses, teacher_forced_logits
from retrofit.evaluate.loss_over_depth import EvalError, depth_sweep, loss_over_depth
from retrofit.model.layers_raven import KVCache, parse_cache_policy

R = 5  # target depth of the tests


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def prompts(batch=2, length=6, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- KV-cache policies ----------------------------------------------------------------------------


def test_cache_policies_map_iterations_to_slots():
    assert [KVCache().core_slot(i) for i in range(5)] == [0, 1, 2, 3, 4]
    assert [KVCache(policy="latest-2").core_slot(i) for i in range(5)] == [0, 1, 0, 1, 0]
    assert [KVCache(policy="compress-2").core_slot(i) for i in range(5)] == [0, 0, 1, 1, 2]
    assert KVCache(bounded=True).policy == "latest-1" and KVCache(policy="latest-1").bounded
    for bad in ("latest", "latest-0", "compress-x", "full-2", "every-2"):
        with pytest.raises(ValueError, match="cache_policy must be"):
            parse_cache_policy(bad)
    with pytest.raises(ValueError, match="conflicts with 'compress-2'"):
        KVCache(bounded=True, policy="compress-2")


@pytest.mark.parametrize("policy", ["latest-5", "latest-9", "compress-1"])
def test_policies_that_keep_every_iteration_equal_the_full_cache(model, policy):
    ids = prompts()
    kw = dict(max_new_tokens=8, num_steps=R, eos_token_id=[])
    assert torch.equal(model.generate(ids, cache_policy=policy, **kw), model.generate(ids, **kw))
    state = torch.zeros(*ids.shape, model.config.n_embd)
    full, full_cache = teacher_forced_logits(model, ids, None, R, state)
    same, cache = teacher_forced_logits(model, ids, None, R, state, cache_policy=policy)
    torch.testing.assert_close(same, full, rtol=0, atol=0)
    assert cache.memory_bytes() == full_cache.memory_bytes()


def test_smaller_policies_hold_fewer_slots_and_change_the_output(model):
    ids = prompts()
    state = torch.zeros(*ids.shape, model.config.n_embd)
    full, full_cache = teacher_forced_logits(model, ids, None, R, state)
    core = len(model.transformer.core_block)
    for policy, slots in (("latest-1", 1), ("latest-2", 2), ("compress-2", 3)):  # compress-2 at R=5: 0-1, 2-3, 4
        logits, cache = teacher_forced_logits(model, ids, None, R, state, cache_policy=policy)
        assert sum(key[0] == "core" for key in cache.keys) == slots * core
        assert cache.memory_bytes() < full_cache.memory_bytes()
        assert not torch.allclose(logits, full)
        torch.testing.assert_close(logits[:, 0], full[:, 0])  # the first token sees only itself
    kw = dict(max_new_tokens=6, num_steps=R, eos_token_id=[])
    assert torch.equal(model.generate(ids, bounded_cache=True, **kw), model.generate(ids, cache_policy="latest-1", **kw))


def test_full_cache_teacher_forcing_equals_the_parallel_sweep(model):
    ids = prompts(3, 9)
    labels = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], 1)
    state = model.initial_state(torch.empty(3, 9, model.config.n_embd))
    parallel = depth_sweep(model, ids, None, labels, [1, 3], state)
    cached = cached_losses(model, ids, None, labels, [1, 3], state, cache_policy="full")
    for r in (1, 3):
        torch.testing.assert_close(cached.losses[r], parallel.losses[r], rtol=1e-5, atol=1e-5)


# -- continuous thought ------------------------------------------------------------------------


def test_continuous_generation_seeds_each_token_with_the_previous_final_state(model):
    ids = prompts(2, 1)  # one prompt token: the prefill is then position 0 of the teacher-forced run
    out = model.generate(ids, max_new_tokens=7, num_steps=R, eos_token_id=[], continuous=True)
    state = torch.zeros(2, out.shape[1] - 1, model.config.n_embd)
    chained, _ = teacher_forced_logits(model, out[:, :-1], None, R, state, continuous=True)
    assert torch.equal(chained.argmax(-1), out[:, 1:])
    fresh, _ = teacher_forced_logits(model, out[:, :-1], None, R, state)
    assert not torch.allclose(chained[:, 1:], fresh[:, 1:])  # it changes what later tokens compute
    torch.testing.assert_close(chained[:, 0], fresh[:, 0])


def test_continuous_loss_sweep_and_its_errors(model):
    ids = prompts(2, 9)
    mask = torch.ones_like(ids)
    plain = loss_over_depth(model, ids, mask, [1, 2], batch_size=2, progress=False)
    through_cache = loss_over_depth(model, ids, mask, [1, 2], batch_size=2, progress=False, cache_policy="full")
    continuous = loss_over_depth(model, ids, mask, [1, 2], batch_size=2, progress=False, continuous=True)
    torch.testing.assert_close(torch.tensor(through_cache.losses[2]), torch.tensor(plain.losses[2]), rtol=1e-5, atol=1e-5)
    assert continuous.losses[2] != through_cache.losses[2]
    with pytest.raises(EvalError, match="not with --adaptive_threshold or --independent_runs"):
        loss_over_depth(model, ids, mask, [1], progress=False, continuous=True, independent_runs=True)
    with pytest.raises(EvalError, match="cache_policy must be"):
        loss_over_depth(model, ids, mask, [1], progress=False, cache_policy="latest-0")
    with pytest.raises(ValueError, match="continuous=True needs use_cache=True"):
        model.generate(ids, max_new_tokens=2, continuous=True, compile=True)


# -- self-speculative decoding -------------------------------------------------------------------


@pytest.mark.parametrize("k,draft", [(1, 1), (3, 1), (4, 3), (6, R)])
def test_speculative_greedy_equals_plain_greedy(model, k, draft):
    ids, mask = left_padded_batch([7, 3, 5], 7)
    free = reference_greedy(model, ids, mask, 11, R, eos=-1, pad=2)
    eos = int(free[1, 7 + 4])  # row 1 stops part-way through
    kw = dict(attention_mask=mask, max_new_tokens=11, num_steps=R, eos_token_id=eos, pad_token_id=2)
    plain = model.generate(ids, **kw)
    speculative = model.generate(ids, speculative_k=k, speculative_draft_steps=draft, **kw)
    assert torch.equal(speculative, plain)
    stats = model.last_generation_stats
    assert 1 <= stats["tokens_per_round"] <= k
    if draft == R:  # drafts at the target depth are always accepted: 10 tokens after the prefill's
        assert stats["rounds"] == -(-10 // k)


def test_speculative_with_a_random_initial_state_needs_the_same_state_seed():
    noisy = tiny_model(seed=2, init_values={"std": 0.4})
    ids = prompts(2, 5)
    kw = dict(max_new_tokens=10, num_steps=R, eos_token_id=[], state_seed=11)
    torch.manual_seed(0)
    plain = noisy.generate(ids, **kw)
    torch.manual_seed(1)  # the global RNG plays no part
    assert torch.equal(noisy.generate(ids, speculative_k=3, speculative_draft_steps=2, **kw), plain)
    assert torch.equal(noisy.generate(ids, **kw), plain)
    kw["state_seed"] = 12
    assert not torch.equal(noisy.generate(ids, **kw), plain)  # the seed does pick the states


@pytest.mark.parametrize("kwargs,message", [
    (dict(speculative_k=2), "needs speculative_draft_steps"),
    (dict(speculative_draft_steps=2), "needs speculative_k >= 1"),
    (dict(speculative_k=2, speculative_draft_steps=1, do_sample=True), "greedy decoding with the cache"),
    (dict(speculative_k=-1, speculative_draft_steps=1), "speculative_k must be an integer >= 1"),
    (dict(cache_policy="ring-3"), "cache_policy must be"),
])
def test_inference_option_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(prompts(1, 3), max_new_tokens=2, **kwargs)


# -- the command lines ---------------------------------------------------------------------------


def test_generate_cli_options(recurrent_dir, capsys):  # noqa: F811
    gen = load_generate()
    base = [str(recurrent_dir), "--prompt", "Ava has 3 apples.", "--num_steps", "3", "--max_new_tokens", "6", "--no_chat"]
    # This converted model draws a random initial state per token (std > 0): the same tokens as
    # plain decoding need the same per-position states, --state_seed.
    assert gen.main(base + ["--state_seed", "7"]) == 0
    plain = capsys.readouterr().out
    assert gen.main(base + ["--state_seed", "7", "--speculative_k", "3", "--speculative_draft_steps", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "tokens per draft-and-verify round" in captured.err
    assert gen.main(base + ["--cache_policy", "latest-2", "--continuous"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        gen.main(base + ["--speculative_k", "2"])
    assert exit_info.value.code == 2 and "needs speculative_draft_steps" in capsys.readouterr().err


def test_multi_recurrence_eval_cli_through_the_cache(eval_run_dir, tmp_path, monkeypatch, capsys, shard):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    common = ["--eval_file_path", shard, "--recurrences", "1,2", "--num_sequences", 2, "--device", "cpu"]
    assert run_cli(eval_run_dir, "10", *common, "--cache_policy", "latest-1", "--continuous") == 0
    out = tmp_path / "loss_over_rec_eval" / eval_run_dir.name / "chkpt_10_cache-latest-1_continuous.json"
    assert list(json.loads(out.read_text())) == ["1", "2"] and "through the cache" in capsys.readouterr().out
    assert run_cli(eval_run_dir, "10", *common, "--cache_policy", "every-2") == 2
    assert "cache_policy must be" in capsys.readouterr().err
