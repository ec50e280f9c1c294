"""LoRA per loop and per-iteration activation checkpointing in the modeling file itself."""

from __future__ import annotations

import pytest
import torch

from tiny_components import tiny_raven_config

from retrofit.model.modeling_raven import LoRALinear, RavenForCausalLM


def build(vocab=96, seed=0, **overrides) -> RavenForCausalLM:
    torch.manual_seed(seed)
    # std 0: a zero initial state, so two forwards of the same model agree to the last bit
    return RavenForCausalLM(tiny_raven_config(vocab, init_values={"std": 0.0}, **overrides))


def randomise_lora(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.05)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_bytes(fn) -> int:
    total, seen = 0, set()

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("lora", [False, True])
def test_activation_checkpointing_gives_identical_gradients_and_keeps_less(lora):
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    results = {}
    for recompute in (False, True):
        model = build().train()
        if lora:
            model.add_lora(4, targets=["core_block", "prelude"], num_deltas=3)
            randomise_lora(model)
        model.activation_checkpointing = recompute
        out = model(ids, labels=ids, num_steps=(2, 4))
        out.loss.backward()
        memory = saved_bytes(lambda: model(ids, labels=ids, num_steps=(2, 4)))
        results[recompute] = (out.loss.detach(), grads(model), memory)
    (loss_a, grads_a, mem_a), (loss_b, grads_b, mem_b) = results[False], results[True]
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    assert mem_b < 0.6 * mem_a  # 4 grad iterations of 2 layers each keep only their inputs


def test_lora_starts_at_zero_and_round_trips_through_remote_code(tmp_path):
    from retrofit.model.loading import load_saved_model

    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    model = build().eval()
    before = model(ids, num_steps=5).logits
    model.add_lora(4, alpha=8, targets=["core_block", "coda"], num_deltas=3)
    assert torch.equal(model(ids, num_steps=5).logits, before)  # B = 0: no change yet
    names = [n for n, _ in model.named_parameters()]
    assert "transformer.core_block.0.attn.Wqkv.weight" in names  # base names unchanged
    assert "transformer.core_block.1.mlp.proj.lora_A" in names and not any("prelude.0.attn.Wqkv.lora" in n for n in names)
    randomise_lora(model)
    changed = model(ids, num_steps=5).logits
    assert not torch.allclose(changed, before, atol=1e-4)
    model.save_pretrained(tmp_path / "lora")
    for checkpoint_code in (False, True):  # this repo's class, and the file copied beside the weights
        loaded = load_saved_model(tmp_path / "lora", checkpoint_code=checkpoint_code).eval()
        assert loaded.config.lora == {"rank": 4, "alpha": 8.0, "targets": ["core_block", "coda"], "num_deltas": 3}
        assert torch.equal(loaded(ids, num_steps=5).logits, changed)


def test_per_iteration_deltas_pick_by_index_and_reuse_the_last():
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(5))
    two = build().eval()
    two.add_lora(4, num_deltas=2)
    randomise_lora(two)
    three = build().eval()
    three.add_lora(4, num_deltas=3)
    with torch.no_grad():  # the same deltas 0 and 1, and delta 2 a copy of delta 1
        for a, b in zip(two.modules(), three.modules()):
            if isinstance(a, LoRALinear):
                b.lora_A.copy_(torch.cat([a.lora_A, a.lora_A[1:]]))
                b.lora_B.copy_(torch.cat([a.lora_B, a.lora_B[1:]]))
    assert torch.equal(two(ids, num_steps=6).logits, three(ids, num_steps=6).logits)
    with torch.no_grad():  # a different delta for iteration 2 changes depth-6 outputs, not depth-2 ones
        for module in three.modules():
            if isinstance(module, LoRALinear):
                module.lora_B[2].mul_(-3.0)
    assert torch.equal(two(ids, num_steps=2).logits, three(ids, num_steps=2).logits)
    assert not torch.allclose(two(ids, num_steps=6).logits, three(ids, num_steps=6).logits, atol=1e-4)


def test_merge_folds_shared_deltas_and_keeps_per_iteration_ones(tmp_path):
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(6))
    shared = build().eval()
    shared.add_lora(4, targets=["prelude", "core_block", "coda"])
    randomise_lora(shared)
    expected = shared(ids, num_steps=4).logits
    assert shared.merge_lora_() == ["prelude", "core_block", "coda"]
    assert shared.config.lora is None and not any(isinstance(m, LoRALinear) for m in shared.modules())
    torch.testing.assert_close(shared(ids, num_steps=4).logits, expected, atol=1e-5, rtol=0)
    shared.save_pretrained(tmp_path / "merged")
    reloaded = RavenForCausalLM.from_pretrained(tmp_path / "merged")
    assert set(reloaded.state_dict()) == set(build().state_dict())  # a plain checkpoint again

    per_iteration = build().eval()
    per_iteration.add_lora(4, targets=["core_block", "coda"], num_deltas=2)
    randomise_lora(per_iteration)
    expected = per_iteration(ids, num_steps=4).logits
    assert per_iteration.merge_lora_() == ["coda"]
    assert per_iteration.config.lora["targets"] == ["core_block"]
    torch.testing.assert_close(per_iteration(ids, num_steps=4).logits, expected, atol=1e-5, rtol=0)


def test_freeze_base_weights_and_bad_lora_settings():
    model = build()
    with pytest.raises(ValueError, match="needs LoRA"):
        model.freeze_base_weights()
    model.add_lora(2, targets=["core_block"], num_deltas=4)
    model.freeze_base_weights()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and ".core_block." in n for n in trainable)
    for bad, message in (({"rank": 0}, "lora.rank"), ({"rank": 2, "targets": ["adapter"]}, "lora.targets"),
                         ({"rank": 2, "num_deltas": 0}, "lora.num_deltas"), ({"rank": 2, "ranks": 3}, "unknown key")):
        with pytest.raises(ValueError, match=message):
            tiny_raven_config(96, lora=bad)


def test_param_counter_and_flops_count_lora_deltas(tmp_path, capsys):
    import json

    import param_counter
    from retrofit.train.flops import count_parameters, step_flops

    plain = count_parameters(build())
    model = build()
    model.add_lora(4, targets=["core_block", "coda"], num_deltas=3)
    counts = count_parameters(model)
    # each of the 4 linear layers of a block: A (r x in) + B (out x r); the tiny block's shapes:
    # Wqkv 64 -> 128, attn.proj 64 -> 64, mlp.fc 64 -> 256, mlp.proj 128 -> 64
    per_block = 4 * ((64 + 128) + (64 + 64) + (64 + 256) + (128 + 64))
    assert counts.lora_recurrent_block == 2 * per_block and counts.lora_coda == per_block
    assert counts.lora_prelude == 0 and counts.lora_stored == 3 * 2 * per_block + per_block
    assert (counts.prelude, counts.recurrent_block, counts.coda) == (plain.prelude, plain.recurrent_block, plain.coda)
    assert counts.total == plain.total + counts.lora_stored
    assert counts.non_embedding(4) == plain.non_embedding(4) + per_block + 4 * 2 * per_block
    assert step_flops(counts, 6, 2, 10) - step_flops(plain, 6, 2, 10) == 6 * 10 * (per_block + 2 * 2 * per_block) + 2 * 10 * 4 * 2 * per_block
    model.save_pretrained(tmp_path / "m")
    param_counter.main([str(tmp_path / "m"), "--num_rec", "4"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["parts"]["lora (stored)"] == counts.lora_stored
    assert printed["effective_params"]["4"] == counts.non_embedding(4)
