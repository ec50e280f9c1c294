"""The recurrent model: forward semantics, padding, truncated backprop, caching, portability."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import textwrap

import pytest
import torch

from retrofit.model.configuration_raven import RavenConfig
from retrofit.train.depth import sample_num_steps
from retrofit.model.modeling_raven import KVCache, RavenForCausalLM, RMSNorm
from tiny_components import tiny_raven_config

VOCAB = 97


def tiny_config(**overrides) -> RavenConfig:
    """conftest's tiny recurrent config, narrower (hidden 32), with a zero initial state."""
    kwargs = dict(n_embd=32, intermediate_size=64, max_position_embeddings=128, init_values={"std": 0.0})
    return tiny_raven_config(VOCAB, **{**kwargs, **overrides})


def tiny_model(seed: int = 0, **overrides) -> RavenForCausalLM:
    torch.manual_seed(seed)
    return RavenForCausalLM(tiny_config(**overrides)).eval()


FAMILIES = [
    pytest.param({}, id="llama"),
    pytest.param({"norm_placement": "post", "qk_norm": True}, id="olmo2"),
    pytest.param({"qkv_bias": True}, id="qwen2"),
    pytest.param({"qk_norm": "per_head", "head_dim": 16}, id="qwen3"),
]


def test_state_dict_uses_the_authors_names():
    names = set(tiny_model(norm_placement="post", qk_norm=True).state_dict())
    expected = {
        "transformer.wte.weight",
        "transformer.adapter.weight",
        "transformer.ln_f.weight",
        "lm_head.weight",
        "transformer.prelude.0.norm_1.weight",
        "transformer.prelude.0.attn.Wqkv.weight",
        "transformer.prelude.0.attn.proj.weight",
        "transformer.prelude.0.attn.q_norm.weight",
        "transformer.prelude.0.attn.k_norm.weight",
        "transformer.prelude.0.norm_2.weight",
        "transformer.prelude.0.mlp.fc.weight",
        "transformer.prelude.0.mlp.proj.weight",
        "transformer.core_block.1.mlp.proj.weight",
        "transformer.coda.0.attn.Wqkv.weight",
    }
    assert expected <= names
    assert len(names) == 4 * 8 + 4  # 4 OLMo layers of 8 tensors + wte, adapter, ln_f, lm_head


def test_authors_state_dict_loads_strictly():
    """A state dict keyed the way the authors' Recurrent-* checkpoints are loads with strict=True."""
    cfg = tiny_config()
    h, kv = cfg.n_embd, cfg.num_key_value_heads * cfg.head_dim
    sd = {
        "transformer.wte.weight": torch.randn(VOCAB, h),
        "transformer.adapter.weight": torch.randn(h, 2 * h),
        "transformer.ln_f.weight": torch.ones(h),
        "lm_head.weight": torch.randn(VOCAB, h),
    }
    for group, n in (("prelude", 1), ("core_block", 2), ("coda", 1)):
        for i in range(n):
            p = f"transformer.{group}.{i}."
            sd[p + "norm_1.weight"] = torch.ones(h)
            sd[p + "norm_2.weight"] = torch.ones(h)
            sd[p + "attn.Wqkv.weight"] = torch.randn(h + 2 * kv, h)
            sd[p + "attn.proj.weight"] = torch.randn(h, h)
            sd[p + "mlp.fc.weight"] = torch.randn(2 * cfg.intermediate_size, h)
            sd[p + "mlp.proj.weight"] = torch.randn(h, cfg.intermediate_size)
    model = RavenForCausalLM(cfg)
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.transformer.core_block[1].attn.Wqkv.weight, sd["transformer.core_block.1.attn.Wqkv.weight"])


def test_authors_config_keys_load():
    """Huginn-style config keys (rope_base, tie_word_embeddings, unknown extras) are accepted."""
    cfg = RavenConfig(n_embd=32, n_heads=4, rope_base=500000.0, tie_word_embeddings=False, block_size=4096,
                      injection_type="linear", init_values={"std": 0.01, "out_proj": 0.001})
    assert cfg.rope_theta == 500000.0 and cfg.init_values["std"] == 0.01 and cfg.init_values["embed_scale"] == 1.0
    assert cfg.injection_type == "linear"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_exactly_hf_llamas_formula(dtype):
    """The float32 fast path (weight passed into F.rms_norm) and the general path both give HF
    Llama's RMSNorm bit for bit: normalise in float32, cast, then scale."""
    torch.manual_seed(0)
    norm = RMSNorm(256, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(256) * 0.3 + 1)
    x = (torch.randn(3, 5, 256) * 4).to(dtype)
    xf = x.float()
    expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert torch.equal(norm(x), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_shapes_loss_and_stats(family):
    model = tiny_model(**family)
    ids = torch.randint(3, VOCAB, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels, num_steps=(1, 2))
    assert out.logits.shape == (2, 9, VOCAB)
    # labels are shifted inside (HF's convention): position t is scored on labels[t + 1]
    expected = torch.nn.functional.cross_entropy(out.logits[:, 2:-1].reshape(-1, VOCAB).float(), ids[:, 3:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.log_ppl, expected.exp())
    aligned = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(model(ids, shift_labels=aligned, num_steps=(1, 2)).loss, expected)
    assert out.stats == {"num_steps_no_grad": 1, "num_steps_with_grad": 2}
    assert model(ids, num_steps=3).stats == {"num_steps_no_grad": 3, "num_steps_with_grad": 0}
    assert model(ids).stats["num_steps_no_grad"] == 4  # eval mode: config.mean_recurrence


def test_more_iterations_change_the_output_and_int_equals_pair():
    model = tiny_model()
    ids = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        r1, r4 = model(ids, num_steps=1).logits, model(ids, num_steps=4).logits
        r4_pair = model(ids, num_steps=(2, 2)).logits
    assert not torch.allclose(r1, r4)
    torch.testing.assert_close(r4, r4_pair)


def test_initial_state_std_read_at_call_time():
    model = tiny_model(init_values={"std": 0.0})
    ids = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
        assert torch.equal(a, b)  # std 0: deterministic
        model.config.init_values["std"] = 0.5
        c, d = model(ids).logits, model(ids).logits
    assert not torch.equal(c, d) and not torch.equal(a, c)
    state = model.initial_state(torch.zeros(1000, 32))
    assert state.abs().max() <= 1.5 + 1e-6  # truncated at 3 std
    assert 0.4 < state.std().item() < 0.5  # a N(0, .5^2) truncated at 3 std has std ~0.493


@pytest.mark.parametrize("family", FAMILIES)
def test_truncated_backprop_has_no_grad_path_through_first_n(family):
    torch.manual_seed(0)
    model = tiny_model(**family).train()
    ids = torch.randint(3, VOCAB, (2, 8))
    init = torch.randn(2, 8, 32, requires_grad=True)
    out = model(ids, labels=ids, num_steps=(3, 2), initial_state=init)
    out.loss.backward()
    assert init.grad is None  # gradient never reaches the state before the n no-grad iterations
    assert model.transformer.core_block[0].attn.Wqkv.weight.grad.abs().sum() > 0
    assert model.transformer.prelude[0].mlp.fc.weight.grad.abs().sum() > 0  # through the k grad iterations
    model.zero_grad(set_to_none=True)
    init.grad = None
    model(ids, labels=ids, num_steps=(0, 2), initial_state=init).loss.backward()
    assert init.grad is not None and init.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, num_steps=(3, 0))
    out.loss.backward()
    assert model.transformer.core_block[0].attn.Wqkv.weight.grad is None  # all iterations without grad


def test_training_mode_samples_depth_with_the_reference_rule():
    model = tiny_model(mean_recurrence=8, mean_backprop_depth=4).train()
    ids = torch.randint(3, VOCAB, (1, 4))
    drawn = [tuple(model(ids, num_steps=None).stats.values()) for _ in range(3)]
    assert drawn == [sample_num_steps(8, 4, step) for step in (1, 2, 3)]


@pytest.mark.parametrize("mean_rec,depth", [(4, 2), (16, 8), (32, 8)])
def test_sampler_mean_and_truncation(mean_rec, depth):
    draws = [sample_num_steps(mean_rec, depth, step) for step in range(1, 3001)]
    total = [n + k for n, k in draws]
    # p = Poisson(rate) + 1 with E[rate] = mean_rec, so the mean depth is mean_rec + 1.
    assert abs(statistics.mean(total) - (mean_rec + 1)) < 0.04 * mean_rec + 0.2
    assert all(k == min(depth, n + k) and n == max(n + k - depth, 0) for n, k in draws)
    assert draws == [sample_num_steps(mean_rec, depth, step) for step in range(1, 3001)]  # reproducible


def test_sampler_matches_hand_computation():
    """The rule of docs/training.md (Depth sampler) written out with torch's generator, for a handful of steps."""
    import math

    for step in (1, 2, 100):
        g = torch.Generator().manual_seed((514229 + step) % (2**31 - 1))
        mu = math.log(16 - 8 + 8) - 0.125
        rate = torch.empty(1).log_normal_(mean=mu, std=0.5, generator=g)
        p = int(torch.poisson(rate, generator=g).item()) + 1
        assert sample_num_steps(16, 8, step) == (max(p - 8, 0), min(8, p))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(family, side):
    model = tiny_model(**family)
    lengths = [7, 4, 2]
    seqs = [torch.randint(3, VOCAB, (n,)) for n in lengths]
    T = max(lengths)
    ids = torch.full((3, T), 2)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[b, sl], mask[b, sl] = s, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, num_steps=3).logits
        for b, s in enumerate(seqs):
            alone = model(s[None], num_steps=3).logits[0]
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            torch.testing.assert_close(batched[b, sl], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batched).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_steps", [1, 3, 6])
def test_cached_generation_equals_uncached(family, num_steps):
    model = tiny_model(**family)
    prompts = [torch.randint(3, VOCAB, (n,)) for n in (6, 3, 5)]
    T = 6
    ids = torch.full((3, T), 2)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    kw = dict(attention_mask=mask, max_new_tokens=8, num_steps=num_steps, eos_token_id=None, pad_token_id=2)
    cached = model.generate(ids, use_cache=True, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.shape == (3, T + 8)
    assert torch.equal(cached, uncached)
    # and each row equals generating that prompt alone
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=8, num_steps=num_steps, eos_token_id=None)
        assert torch.equal(alone[0, len(p):], cached[b, T:])


def test_generate_stops_at_eos_and_honours_stopping_criteria():
    model = tiny_model()
    ids = torch.randint(3, VOCAB, (2, 5))
    free = model.generate(ids, max_new_tokens=6, eos_token_id=None)
    first = int(free[0, 5])
    stopped = model.generate(ids, max_new_tokens=6, eos_token_id=first, pad_token_id=2)
    assert stopped[0, 5] == first and (stopped[0, 6:] == 2).all()  # row 0 stops at its EOS, then pads
    row1 = free[1, 5:].tolist()
    until = row1.index(first) + 1 if first in row1 else len(row1)
    assert stopped[1, 5 : 5 + until].tolist() == row1[:until]  # row 1 runs on unaffected

    calls = []

    def stop_after_two(input_ids, scores):
        calls.append(input_ids.shape[1])
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 7)

    out = model.generate(ids, max_length=20, stopping_criteria=stop_after_two, eos_token_id=None)
    assert out.shape[1] == 7 and calls == [6, 7]


def test_bounded_cache_keeps_one_entry_per_core_layer():
    model = tiny_model()
    ids = torch.randint(3, VOCAB, (1, 6))
    full, bounded = KVCache(), KVCache(bounded=True)
    with torch.no_grad():
        model(ids, num_steps=8, past_key_values=full, use_cache=True)
        model(ids, num_steps=8, past_key_values=bounded, use_cache=True)
    assert len(full.keys) == 1 + 8 * 2 + 1 and len(bounded.keys) == 1 + 2 + 1
    assert bounded.memory_bytes() < full.memory_bytes() / 4


# One interpreter start per family is the cost here; Qwen2/Qwen3 checkpoints are loaded the same way,
# all in one interpreter, by test_conversion_families.py.
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES[:2])
def test_save_copy_elsewhere_and_load_with_trust_remote_code(tmp_path, family):
    model = tiny_model(**family)
    src = tmp_path / "saved"
    model.save_pretrained(src)
    assert {"modeling_raven.py", "configuration_raven.py", "exits_raven.py", "model.safetensors", "config.json"} <= {p.name for p in src.iterdir()}
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(src, moved)
    ids = torch.randint(3, VOCAB, (1, 7))
    with torch.no_grad():
        expected = model(ids, num_steps=3).logits
    # A fresh interpreter that cannot import this repo: only the copied files define the model.
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path = [p for p in sys.path if 'work/main' not in p or 'site-packages' in p]
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(moved)!r}, trust_remote_code=True).eval()
        assert 'retrofit' not in sys.modules, 'loaded from the repo, not the copied files'
        ids = torch.tensor({ids.tolist()})
        with torch.no_grad():
            torch.save(m(ids, num_steps=3).logits, {str(tmp_path / 'logits.pt')!r})
            m.generate(ids, max_new_tokens=3, num_steps=3, adaptive_threshold=0.1, adaptive_criterion='argmax-stability-2')
        m4 = AutoModelForCausalLM.from_pretrained({str(moved)!r}, trust_remote_code=True, mean_recurrence=5)
        assert m4.config.mean_recurrence == 5, m4.config.mean_recurrence
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected)


def test_mean_recurrence_override_changes_the_result(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    ids = torch.randint(3, VOCAB, (1, 7))
    with torch.no_grad():
        default = RavenForCausalLM.from_pretrained(tmp_path).eval()
        one = RavenForCausalLM.from_pretrained(tmp_path, mean_recurrence=1).eval()
        assert default.config.mean_recurrence == 4 and one.config.mean_recurrence == 1
        assert not torch.allclose(default(ids).logits, one(ids).logits)
        torch.testing.assert_close(one(ids).logits, default(ids, num_steps=1).logits)


@pytest.mark.parametrize("bad,match", [
    (dict(norm_placement="middle"), "norm_placement"),
    (dict(n_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(mean_recurrence=0), "mean_recurrence"),
    (dict(tie_embeddings=True), "tie_embeddings"),
    (dict(qk_norm="heads"), "qk_norm must be one of none, whole, per_head"),
])
def test_config_errors_name_the_bad_value(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**bad)


def test_num_steps_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="num_steps"):
        model(torch.tensor([[3, 4]]), num_steps=(0, 0))


@pytest.mark.parametrize("criterion", ["kl", "latent"])
def test_adaptive_exit_threshold_zero_runs_every_step(criterion):
    model = tiny_model()
    ids = torch.randint(3, VOCAB, (2, 5))
    fixed = model.generate(ids, max_new_tokens=6, num_steps=5, eos_token_id=None)
    adaptive = model.generate(ids, max_new_tokens=6, num_steps=5, eos_token_id=None,
                              adaptive_threshold=0.0, adaptive_criterion=criterion)
    assert torch.equal(fixed, adaptive)
    assert model.last_generation_stats["mean_depth"] == 5.0


@pytest.mark.parametrize("criterion", ["kl", "latent"])
def test_adaptive_exit_stops_early_and_keeps_the_cache_consistent(criterion):
    model = tiny_model(seed=3)
    ids = torch.randint(3, VOCAB, (1, 5))
    early = model.generate(ids, max_new_tokens=5, num_steps=6, eos_token_id=None,
                           adaptive_threshold=1e9, adaptive_criterion=criterion)
    assert model.last_generation_stats["mean_depth"] == 2.0  # exits at the first comparison
    assert early.shape == (1, 10) and int(early.max()) < VOCAB
    full = model.generate(ids, max_new_tokens=5, num_steps=6, eos_token_id=None)
    assert model.last_generation_stats["mean_depth"] == 6.0
    assert torch.equal(early[:, :6], full[:, :6])  # the first new token comes from the full-depth prompt pass


def test_bounded_cache_generation_runs_and_matches_at_depth_one():
    model = tiny_model()
    ids = torch.randint(3, VOCAB, (2, 5))
    # With one iteration there is nothing to bound: both caches hold the same keys.
    assert torch.equal(model.generate(ids, max_new_tokens=5, num_steps=1, eos_token_id=None),
                       model.generate(ids, max_new_tokens=5, num_steps=1, eos_token_id=None, bounded_cache=True))
    out = model.generate(ids, max_new_tokens=5, num_steps=6, eos_token_id=None, bounded_cache=True)
    assert out.shape == (2, 10)
