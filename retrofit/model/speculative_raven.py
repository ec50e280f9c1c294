"""Self-speculative greedy decoding for the depth-recurrent model, and generate's inference
options (`InferenceOptions`: KV-cache policy, continuous thought, speculative decoding, seeded states).

The recurrent model drafts with itself: K tokens at a low depth D (cheap: the prelude and coda
cost the same, the recurrent block D times instead of r), then one pass over the K drafted
positions at the target depth r verifies them. The longest prefix on which the target's greedy
choice agrees with the draft is accepted, plus the target's own token at the first disagreement,
so every round writes between 1 and K tokens that plain greedy decoding at depth r would write.
Rejected positions are rolled back by moving the cache's write position: their entries are
overwritten by the next round (docs/generation.md, Self-speculative decoding).

Part of the model's self-contained code (torch + transformers only): copied beside saved weights
with modeling_raven.py, whose generation mixin imports it relatively.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layers_raven import parse_cache_policy


@dataclass
class InferenceOptions:
    """generate's inference options (docs/generation.md), each off by default."""

    cache_policy: str | None = None  # "full" | "latest-M" | "compress-S"
    continuous: bool = False  # each new token starts from the previous position's final state
    speculative_k: int = 0  # tokens drafted per round (0: no speculative decoding)
    speculative_draft_steps: int | None = None  # the drafts' depth
    state_seed: int | None = None  # initial states seeded per position
    bounded_cache: bool = False  # the older name of cache_policy "latest-1"

    @property
    def policy(self) -> str:
        return "latest-1" if self.bounded_cache else (self.cache_policy or "full")

    def check(self, use_cache: bool, adaptive_threshold, compile: bool, do_sample: bool) -> None:
        """One-line ValueErrors for bad values or combinations."""
        if self.cache_policy is not None:
            parse_cache_policy(self.cache_policy)
            if self.bounded_cache and parse_cache_policy(self.cache_policy) not in (("latest", 1), ("full", 0)):
                raise ValueError(f"bounded_cache=True is cache_policy 'latest-1'; it conflicts with {self.cache_policy!r}")
        if self.continuous and (not use_cache or compile or adaptive_threshold is not None):
            raise ValueError("continuous=True needs use_cache=True, no compile and no adaptive_threshold")
        if self.state_seed is not None and (adaptive_threshold is not None or not use_cache):
            raise ValueError("state_seed needs use_cache=True and no adaptive_threshold")
        k, draft = self.speculative_k, self.speculative_draft_steps
        if not k:
            if draft is not None:
                raise ValueError("speculative_draft_steps needs speculative_k >= 1")
            return
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"speculative_k must be an integer >= 1, got {k!r}")
        if not isinstance(draft, int) or draft < 1:
            raise ValueError(f"speculative_k needs speculative_draft_steps, an integer >= 1, got {draft!r}")
        if do_sample or not use_cache or compile or adaptive_threshold is not None or self.continuous:
            raise ValueError("speculative_k is greedy decoding with the cache: not with do_sample, use_cache=False, "
                         "compile, adaptive_threshold or continuous")


class SpeculativeDecodingMixin:
    """`generate(speculative_k=K, speculative_draft_steps=D)`; uses the model's `attention_context`,
    `run_layers`, `lm_head` and `resolve_num_steps`, and generate's `DecodeRun` bookkeeping."""

    def _speculative_generate(self, run, input_ids, attention_mask, cache, target_steps, options: InferenceOptions,
                              streamer, stopping_criteria, depth) -> torch.Tensor:
        """Prefill at the target depth, then draft-and-verify rounds until max_new_tokens or done."""
        lookahead = options.speculative_k
        if streamer is not None:
            streamer.put(input_ids.cpu())
        max_new_tokens = run.total - run.prompt_length
        draft = self.resolve_num_steps(options.speculative_draft_steps)
        rounds = drafted = 0
        logits = self._prefill(input_ids, attention_mask, cache, *target_steps, run).float()
        finished = run.append(logits.argmax(-1), logits, streamer, stopping_criteria)
        while not finished and run.length - run.prompt_length < max_new_tokens:
            k = min(lookahead, max_new_tokens - (run.length - run.prompt_length))
            finished = self._speculative_round(run, cache, target_steps, draft, k, streamer, stopping_criteria)
            rounds, drafted = rounds + 1, drafted + k
        if streamer is not None:
            streamer.end()
        self.last_generation_stats = run.stats(depth)
        new = run.length - run.prompt_length - 1  # tokens after the prefill's
        self.last_generation_stats.update(rounds=rounds, drafted=drafted,
                                          tokens_per_round=new / rounds if rounds else 0.0)
        return run.tokens[:, : run.length]

    def _speculative_round(self, run, cache, target_steps, draft_steps, k: int, streamer, stopping_criteria) -> bool:
        """Draft k tokens, verify them in one pass, append the accepted ones; returns whether done.

        Positions start .. start+k-1 are the last written token and the first k-1 drafts; the
        verify pass recomputes all of them at the target depth (overwriting the draft-depth cache
        entries), so every kept cache entry is the one plain decoding would have written."""
        start = run.length - 1  # the last written token: its position is not in the cache yet
        end = start + k
        tokens = run.tokens[:, : end + 1].clone()
        mask = run.mask[:, : end + 1].clone()
        mask[:, run.length :] = (~run.done).to(mask.dtype)[:, None]  # finished rows: padding, as plain decoding writes
        for j in range(k):
            logits = self._positions_logits(run, tokens, mask, cache, start + j, 1, draft_steps)
            tokens[:, start + j + 1] = torch.where(run.done, run.pad_token_id, logits[:, -1].argmax(-1))
        logits = self._positions_logits(run, tokens, mask, cache, start, k, target_steps).float()
        target = logits.argmax(-1)  # (B, k): the target depth's greedy choice after each position
        agree = (target == tokens[:, start + 1 : end + 1]) | run.done[:, None]
        disagree = (~agree.all(0)).nonzero()
        accepted = int(disagree[0]) + 1 if disagree.numel() else k  # the matching drafts + the target's correction
        finished = False
        for j in range(accepted):
            finished = run.append(target[:, j], logits[:, j], streamer, stopping_criteria)
            if finished:
                break
        cache.seen_tokens = run.length - 1  # roll back: later entries are stale, overwritten next round
        return finished

    def _positions_logits(self, run, tokens, mask, cache, start: int, length: int, steps) -> torch.Tensor:
        """Logits (B, length, V) of positions [start, start + length) through the cache at depth
        steps = (n, k); the cache then holds every position before start + length."""
        cache.seen_tokens = start
        ids = tokens[:, start : start + length]
        ctx = self.attention_context(ids, mask[:, : start + length], None, cache)
        x, _ = self.run_layers(ids, ctx, *steps, initial_state=run.seeded_states(self, start, length))
        return self.lm_head(x)
