"""Fast decoding keeps its tokens: the cached decode loop against a from-scratch greedy reference,
the torch.compile'd static-shape decode step (inductor on CPU), and the bf16 autocast and compiled
training paths on a tiny model."""

from __future__ import annotations

import pytest
import torch
from test_model import FAMILIES, VOCAB, tiny_model

from retrofit.model.generation_raven import compiled_cache_capacity
from retrofit.model.modeling_raven import Block, KVCache


@torch.no_grad()
def reference_greedy(model, ids, mask, new_tokens, num_steps, eos, pad):
    """Greedy decoding with no cache and no generate(): every step runs the model's forward on the
    whole sequence so far. Finished rows are padded and their later tokens masked out."""
    ids, mask = ids.clone(), mask.clone()
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(new_tokens):
        logits = model(ids, attention_mask=mask, num_steps=num_steps).logits[:, -1]
        token = torch.where(done, torch.tensor(pad), logits.argmax(-1))
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        done |= token == eos
        if done.all():
            break
    return ids


def left_padded_batch(lengths, width, pad=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[b, width - n :] = 1
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_steps", [1, 5])
def test_cached_decode_equals_full_recompute_reference(family, num_steps):
    model = tiny_model(seed=1, **family)
    ids, mask = left_padded_batch([7, 3, 5, 7], 7)
    # An EOS that one row emits part-way through, so masking of finished rows is exercised too.
    free = reference_greedy(model, ids, mask, 10, num_steps, eos=-1, pad=2)
    eos = int(free[1, 7 + 3])
    expected = reference_greedy(model, ids, mask, 10, num_steps, eos=eos, pad=2)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=10, num_steps=num_steps, eos_token_id=eos, pad_token_id=2)
    assert torch.equal(got, expected)
    assert (got[1, 7 + 4 :] == 2).all()  # row 1 finished at its EOS and is padded from there
    # Unpadded prompts take the path without a mask: same tokens as the reference too.
    plain = ids[[0, 3]]
    ones = torch.ones_like(plain)
    assert torch.equal(model.generate(plain, max_new_tokens=10, num_steps=num_steps, eos_token_id=[]),
                       reference_greedy(model, plain, ones, 10, num_steps, eos=-1, pad=2))


def test_cache_with_capacity_is_written_in_place_and_still_grows():
    model = tiny_model()
    ids = torch.randint(3, VOCAB, (2, 8))
    cache = KVCache(capacity=7)
    with torch.no_grad():
        model(ids[:, :5], num_steps=2, past_key_values=cache, use_cache=True)
        assert {t.shape[2] for t in cache.keys.values()} == {7}  # allocated once, at the capacity
        buffers = {slot: t.data_ptr() for slot, t in cache.keys.items()}
        model(ids[:, 5:7], num_steps=2, past_key_values=cache, use_cache=True)
        assert {slot: t.data_ptr() for slot, t in cache.keys.items()} == buffers  # written in place
        last = model(ids[:, 7:], num_steps=2, past_key_values=cache, use_cache=True).logits
        assert cache.seen_tokens == 8 and {t.shape[2] for t in cache.keys.values()} == {14}  # grew by doubling
        torch.testing.assert_close(last[:, -1], model(ids, num_steps=2).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_compiled_cache_capacity_is_a_power_of_two_of_at_least_64():
    assert [compiled_cache_capacity(n) for n in (1, 12, 64, 65, 96, 128, 129, 2049)] == [64, 64, 64, 128, 128, 128, 256, 4096]


@pytest.mark.slow  # inductor compiles C++ on the CPU: about a minute per variant
@pytest.mark.parametrize("static", [False, True], ids=["dynamic_length", "static_shapes_as_on_cuda"])
def test_compiled_decode_step_gives_the_same_tokens(static, monkeypatch):
    """Both variants of the compiled step: CPU's (attends the written columns, a dynamic length)
    and CUDA's (static shapes, the whole capacity masked), forced here on CPU."""
    from torch._dynamo.utils import counters

    import retrofit.model.generation_raven as modeling

    monkeypatch.setattr(modeling, "static_decode_shapes", lambda device: static)
    model = tiny_model(seed=2, n_layers_in_recurrent_block=1)
    ids, mask = left_padded_batch([6, 2, 4], 6, seed=3)
    kw = dict(attention_mask=mask, max_new_tokens=6, num_steps=3, eos_token_id=[], pad_token_id=2)
    eager = model.generate(ids, **kw)
    compiled = model.generate(ids, compile=True, **kw)
    assert torch.equal(compiled, eager)
    graphs = counters["stats"]["unique_graphs"]
    again = model.generate(ids, compile=True, **{**kw, "max_new_tokens": 9})  # another length, same capacity
    assert torch.equal(again[:, :12], eager)
    assert counters["stats"]["unique_graphs"] == graphs  # no new graph for it
    with pytest.raises(ValueError, match="compile=True"):
        model.generate(ids, compile=True, adaptive_threshold=1e-3, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_training_step(family):
    model = tiny_model(**family).train()
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        reference = model(ids, labels=ids, num_steps=(1, 2)).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids, num_steps=(1, 2))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert abs(out.loss.item() - reference.item()) < 0.05 * reference.item()


def test_bf16_weights_generate():
    model = tiny_model().to(torch.bfloat16)
    ids, mask = left_padded_batch([5, 3], 5)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_steps=3, eos_token_id=[], pad_token_id=2)
    assert out.shape == (2, 9) and int(out.max()) < VOCAB


@pytest.mark.slow  # inductor compiles C++ on the CPU: about half a minute
def test_compiled_decode_step_with_a_random_initial_state_has_no_graph_break():
    """The converted models keep Huginn's random initial state (std > 0): its truncated-normal
    draw (rejection sampling, `Tensor.item()`) happens outside the compiled step, so the step is one
    graph without a break."""
    from torch._dynamo.utils import counters

    counters.clear()
    model = tiny_model(seed=4, init_values={"std": 0.5})
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=5, num_steps=2, eos_token_id=[], pad_token_id=2)
    out = model.generate(ids, compile=True, **kw)
    assert out.shape == (2, 10)
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow  # inductor compiles forward and backward: one to two minutes
def test_compiled_layers_training_step_matches_eager():
    """train.py --compile compiles each layer, so the depths the sampler draws reuse one graph."""
    model = tiny_model(n_layers_in_recurrent_block=1).train()
    ids = torch.randint(3, VOCAB, (2, 8))
    expected = {}
    for num_steps in ((1, 1), (0, 3)):
        loss = model(ids, labels=ids, num_steps=num_steps).loss
        loss.backward()
        expected[num_steps] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    for module in model.modules():
        if isinstance(module, Block):
            module.compile()
    for num_steps, (eager_loss, grads) in expected.items():
        loss = model(ids, labels=ids, num_steps=num_steps).loss
        loss.backward()
        torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-3, atol=1e-5, msg=name)
        model.zero_grad(set_to_none=True)


def test_decode_bench_floor_replays_exactly_the_generations_matmuls(monkeypatch):
    """bench/decode.py --floor times each model's matrix multiplies alone: check, by counting
    FLOPs, that its replay does the same multiplies as a real generate of both models."""
    import importlib.util

    from conftest import ROOT
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # as `python bench/decode.py` has it: finds bench/_common.py
    spec = importlib.util.spec_from_file_location("decode_bench", ROOT / "bench" / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shape = dict(hidden=32, intermediate=48, heads=4, kv_heads=2, vocab=64, prelude=1, core=2, coda=1)
    r, batch, prompt_len, new = 3, 2, 5, 4
    ours = bench.recurrent_model("cpu", torch.float32, shape)
    hf = bench.hf_model(shape["prelude"] + r * shape["core"] + shape["coda"], "cpu", torch.float32, shape)
    prompt = torch.randint(3, shape["vocab"], (batch, prompt_len))

    def matmul_flops(fn) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        counts = counter.get_flop_counts()["Global"]
        return sum(v for op, v in counts.items() if "mm" in str(op))  # mm, addmm, bmm: attention's are SDPA

    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=new, eos_token_id=[], pad_token_id=2)
    real = {"ours": matmul_flops(lambda: ours.generate(prompt, num_steps=r, **kw)),
            "hf": matmul_flops(lambda: hf.generate(prompt, min_new_tokens=new, do_sample=False, **kw))}
    for name, model in (("ours", ours), ("hf", hf)):
        replay = bench.matmul_floor(bench.decode_matmuls(model, r), batch, prompt_len, new, "cpu", torch.float32)
        assert matmul_flops(replay) == real[name] > 0, name


@pytest.mark.slow  # runs the GPU check script end to end at tiny shapes
def test_gpu_check_script_smoke_run_on_cpu(capsys, monkeypatch):
    import importlib.util

    from conftest import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # finds bench/_common.py
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--tiny", "--device", "cpu", "--skip_compile", "--peak_tflops", "1"]) == 0
    out = capsys.readouterr().out
    assert "MFU against 1.0 TFLOP/s (--peak_tflops)" in out
    assert "  False   (2, 2)" in out  # the training row at (n, k) = (mean - backprop, backprop)
    assert [line.split()[:2] for line in out.splitlines() if line.strip().endswith("x")] == [["1", "10"], ["4", "10"]]
