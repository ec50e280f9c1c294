"""Decoding for the depth-recurrent model (retrofit/model/modeling_raven.py): `generate` with the
model's own KV cache, per-token adaptive exit and the compiled decode step.

`generate` reads as three parts: the prefill (the prompt through the cache, full depth), the
selection of how each later token runs (eager, compiled, or with adaptive exit) and the
bookkeeping of the output (`DecodeRun`: tokens, mask, finished rows, depths used). Part of the
model's self-contained code (torch + transformers only): copied beside saved weights with
modeling_raven.py, which imports it relatively.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch

from .exits_raven import ExitTracker, check_exit_threshold, decode_with_exits, exit_criterion
from .layers_raven import AttentionContext, KVCache
from .speculative_raven import InferenceOptions, SpeculativeDecodingMixin


def compiled_cache_capacity(total: int) -> int:
    """Cache length of `generate(compile=True)` for a prompt + new tokens of `total`: the next
    power of two, at least 64. The capacity is a shape of the compiled step, so powers of two give
    few graphs (one per doubling, each reused by every shorter generation in it); with static
    shapes (CUDA) the step attends over the whole (masked) capacity, and under half of it is
    padding. A fixed multiple of 256 made that step slower than eager at batch 16 on CPU (a
    96-token generation attended 256 columns)."""
    return max(64, 1 << (max(total, 1) - 1).bit_length())


def static_decode_shapes(device: torch.device) -> bool:
    """Whether `generate(compile=True)` keeps every shape of its decode step fixed. On CUDA yes:
    attention runs over the whole (masked) cache capacity, so one graph serves a generation and
    can be replayed as a CUDA graph. Elsewhere the attended length is a dynamic dimension of one
    graph: each token attends only the columns written so far (on CPU, reading the padded
    capacity was about a tenth of a batch-16 step)."""
    return torch.device(device).type == "cuda"


@dataclass
class DecodeRun:
    """The bookkeeping of one `generate` call. Everything a step needs is allocated once: the
    output tokens, the mask and the RoPE tables at their final length; nothing is concatenated
    per token."""

    tokens: torch.Tensor  # (B, total): prompt, then new tokens (pad where not written yet)
    mask: torch.Tensor  # (B, total): 1 = a real token
    real_tokens: torch.Tensor  # per row, the tokens the mask counts
    done: torch.Tensor  # per row: finished (EOS or a stopping criterion)
    masked: bool  # a prompt is padded or a row has finished: steps need a mask and per-row positions
    length: int  # tokens written so far
    prompt_length: int
    pad_token_id: int
    eos: torch.Tensor | None
    cos_table: torch.Tensor
    sin_table: torch.Tensor
    depths: list[torch.Tensor] = field(default_factory=list)  # adaptive exit: depth used per new token
    # Wall clock (perf_counter) at the start, after the prefill and at the end: stats' seconds.
    clock: list[float] = field(default_factory=list)
    # Continuous thought: the last processed position's final latent state, (B, 1, h), which
    # seeds the next token's recurrence instead of a fresh random state; None = off.
    latent: torch.Tensor | None = None
    continuous: bool = False
    state_seed: int | None = None  # initial states keyed by cache column (`seeded_states`); None = global RNG

    def seeded_states(self, model, start: int, length: int) -> torch.Tensor | None:
        """`generate(state_seed=...)`: the initial states of cache columns [start, start + length),
        (B, length, h), each column's drawn from its own generator seeded by (state_seed, column),
        so any path that processes a column (one token at a time, a prompt, a verify pass) starts
        it from the same state. None without a state_seed (the model draws fresh states)."""
        if self.state_seed is None:
            return None
        like = torch.zeros(self.tokens.shape[0], 1, model.config.n_embd, dtype=model.transformer.wte.weight.dtype,
                           device=self.tokens.device)
        generator = torch.Generator(device=like.device)
        states = []
        for column in range(start, start + length):
            generator.manual_seed((self.state_seed * 1_000_003 + column) % (2**63))
            states.append(model.initial_state(like, generator=generator))
        return torch.cat(states, dim=1)

    @classmethod
    def start(cls, model, input_ids, attention_mask, max_new_tokens: int, pad_token_id: int, eos_ids,
              options: InferenceOptions | None = None) -> DecodeRun:
        B, T = input_ids.shape
        device = input_ids.device
        total = T + max_new_tokens
        tokens = torch.full((B, total), pad_token_id, dtype=input_ids.dtype, device=device)
        tokens[:, :T] = input_ids
        mask = torch.ones((B, total), dtype=attention_mask.dtype, device=device)
        mask[:, :T] = attention_mask
        cos_table, sin_table = model.rope_tables(total, device)
        run = cls(
            tokens=tokens, mask=mask, real_tokens=attention_mask.long().sum(-1),
            done=torch.zeros(B, dtype=torch.bool, device=device), masked=not bool(attention_mask.all()),
            length=T, prompt_length=T, pad_token_id=pad_token_id,
            eos=torch.tensor(sorted(eos_ids), device=device) if eos_ids else None,
            cos_table=cos_table, sin_table=sin_table,
            continuous=bool(options and options.continuous), state_seed=options.state_seed if options else None,
        )
        run.tick()
        return run

    @property
    def total(self) -> int:
        return self.tokens.shape[1]

    def step_input(self) -> torch.Tensor:
        return self.tokens[:, self.length - 1 : self.length]

    def step_context(self, cache: KVCache) -> AttentionContext:
        """RoPE at each row's position and, once masked, the keys the new token may see."""
        positions = (self.real_tokens - 1).clamp(min=0)
        ctx = AttentionContext(
            cos=self.cos_table.index_select(0, positions)[:, None, None],
            sin=self.sin_table.index_select(0, positions)[:, None, None],
            mask=None, cache=cache, past_length=self.length - 1,
        )
        if self.masked:
            # The new token sees every real token and itself, as `attention_context` does.
            key_mask = self.mask[:, : self.length].bool()
            key_mask[:, -1] = True
            ctx.mask = key_mask[:, None, None, :]
        return ctx

    def append(self, next_token: torch.Tensor, logits: torch.Tensor, streamer=None, stopping_criteria=None) -> bool:
        """Write the chosen tokens (pad for finished rows); returns whether every row has finished."""
        next_token = torch.where(self.done, self.pad_token_id, next_token)
        self.tokens[:, self.length] = next_token
        if self.masked or bool(self.done.any()):
            self.masked = True
            self.mask[:, self.length] = ~self.done
            self.real_tokens += ~self.done
        else:
            self.real_tokens += 1
        self.length += 1
        if self.length == self.prompt_length + 1:
            self.tick()  # the prefill's end: the prompt and the first new token
        if streamer is not None:
            streamer.put(next_token.cpu())
        if self.eos is not None:
            self.done |= torch.isin(next_token, self.eos)
        if stopping_criteria is not None:
            found = stopping_criteria(self.tokens[:, : self.length], logits)
            self.done |= torch.as_tensor(found, device=self.done.device).bool().reshape(-1).expand(self.done.shape[0])
        return bool(self.done.all())

    def tick(self) -> None:
        """Read the clock (after the device has finished its queued work)."""
        if self.tokens.is_cuda:
            torch.cuda.synchronize(self.tokens.device)
        self.clock.append(time.perf_counter())

    def timings(self) -> dict:
        """`prefill_seconds` (the prompt and the first new token) and `decode_seconds` (the rest)."""
        if len(self.clock) < 3:
            return {}
        start, prefilled, end = self.clock[0], self.clock[1], self.clock[-1]
        return {"prefill_seconds": prefilled - start, "decode_seconds": end - prefilled}

    def stats(self, depth) -> dict:
        """`last_generation_stats` at the end of a generation: the mean depth per generated token,
        how many tokens, `prefill_seconds` and `decode_seconds` (`timings`); with
        adaptive exit also `mean_step_depth`, the mean over decode steps of the deepest row's
        depth: the iterations a batched step lasts, since every row waits for the slowest."""
        self.tick()
        if self.depths:
            used = torch.cat(self.depths)
            steps = [d.max() for d in self.depths if d.numel()]  # one host sync below, not one per step
            return {"mean_depth": used.mean().item() if used.numel() else 0.0, "tokens": int(used.numel()),
                    "mean_step_depth": torch.stack(steps).double().mean().item() if steps else 0.0, **self.timings()}
        return {"mean_depth": float(sum(depth) if isinstance(depth, (tuple, list)) else depth),
                "tokens": int(self.length - self.prompt_length) * self.tokens.shape[0], **self.timings()}


class RavenGenerationMixin(SpeculativeDecodingMixin):
    """Decoding for RavenForCausalLM: cached `generate` (greedy or sampled, left-padded batches,
    stopping criteria, streamer), per-token adaptive exit, the bounded cache and the compiled
    static-shape decode step. Kept apart from the model class so that the model file reads like
    HF's modeling files (layers, then the model). It uses the model's own pieces:
    `attention_context`, `run_layers`, `embed`, `run_prelude`, `recur`, `run_coda`, `lm_head`."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        stopping_criteria=None,
        num_steps: int | None = None,
        use_cache: bool = True,
        streamer=None,
        generator: torch.Generator | None = None,
        adaptive_threshold: float | None = None,
        adaptive_criterion: str = "kl",
        bounded_cache: bool = False,
        compile: bool = False,
        cache_policy: str | None = None,
        continuous: bool = False,
        speculative_k: int = 0,
        speculative_draft_steps: int | None = None,
        state_seed: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Greedy or sampled decoding with this model's own KV cache; returns prompt + new tokens.

        Accepts the arguments lm-eval's HF backend passes (`max_length`, `stopping_criteria`, `pad_token_id`,
        `do_sample`, `temperature`). A left-padded batch needs `attention_mask`; without one, it is inferred
        from `pad_token_id` when that differs from EOS. Finished sequences are padded with `pad_token_id` (or EOS).

        `adaptive_threshold`: per-token early exit while decoding (Huginn-style). A new token stops
        iterating once its `adaptive_criterion` (a name of `exits_raven.EXIT_CRITERIA`: "kl", the
        KL between successive iterations' output distributions, "latent", "entropy-diff",
        "minp-kl", "cosine", "argmax-stability[-M]", "gate") falls below the threshold, at most
        `num_steps` (default `config.mean_recurrence`) iterations; rows that exited stop running
        the recurrent block. The prompt itself runs the full depth. `last_generation_stats["mean_depth"]` reports the
        mean depth used per generated token.

        `compile=True` runs each new token through a `torch.compile`d decode step, one graph per batch
        size, depth and cache capacity (`compiled_cache_capacity`): on CUDA with static shapes (attention
        over the whole cache, masked), so it can be replayed as a CUDA graph; elsewhere over the columns
        written so far, a dynamic length (`static_decode_shapes`). Same tokens up to float rounding.

        Huginn's inference options (docs/generation.md; `InferenceOptions`): `cache_policy`
        ("full", "latest-M", "compress-S"; `bounded_cache=True` is "latest-1"), `continuous`,
        `speculative_k` with `speculative_draft_steps`, `state_seed`.
        """
        max_new_tokens, eos_token_id = self._decode_length(input_ids, max_new_tokens, max_length, eos_token_id, kwargs)
        eos_ids, pad_token_id, attention_mask = self._special_tokens(input_ids, attention_mask, eos_token_id, pad_token_id)
        if temperature is not None and temperature <= 0:
            do_sample = False
        self._check_decoding_options(use_cache, num_steps, adaptive_threshold, adaptive_criterion, compile)
        options = InferenceOptions(cache_policy, continuous, speculative_k, speculative_draft_steps, state_seed, bounded_cache)
        options.check(use_cache, adaptive_threshold, compile, do_sample)
        depth = num_steps if num_steps is not None else int(self.config.mean_recurrence)
        n_steps, k_steps = self.resolve_num_steps(depth)
        run = DecodeRun.start(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_ids, options)
        cache = self._decode_cache(run, use_cache, compile, options.policy)
        if options.speculative_k and max_new_tokens:
            return self._speculative_generate(run, input_ids, attention_mask, cache, (n_steps, k_steps), options,
                                              streamer, stopping_criteria, depth)
        next_logits = self._select_step(cache, num_steps, n_steps, k_steps, adaptive_threshold, adaptive_criterion, compile)
        if streamer is not None:
            streamer.put(input_ids.cpu())  # HF streamer convention: the prompt comes first
        for step in range(max_new_tokens):
            first = step == 0 and use_cache  # the prompt through the cache, at the full depth
            logits = self._prefill(input_ids, attention_mask, cache, n_steps, k_steps, run) if first else next_logits(run)
            logits = logits.float()
            next_token = self._choose_next(logits, do_sample, temperature, top_k, top_p, generator)
            if run.append(next_token, logits, streamer, stopping_criteria):
                break
        if streamer is not None:
            streamer.end()
        self.last_generation_stats = run.stats(depth)
        return run.tokens[:, : run.length]

    @staticmethod
    def _decode_length(input_ids, max_new_tokens, max_length, eos_token_id, kwargs) -> tuple[int, object]:
        """(new tokens to generate, EOS), from the arguments or a `generation_config` in kwargs."""
        generation_config = kwargs.pop("generation_config", None)
        if generation_config is not None:
            max_new_tokens = max_new_tokens or generation_config.max_new_tokens
            eos_token_id = eos_token_id if eos_token_id is not None else generation_config.eos_token_id
        if max_new_tokens is None:
            max_new_tokens = (max_length - input_ids.shape[1]) if max_length is not None else 20
        return max(max_new_tokens, 0), eos_token_id

    @staticmethod
    def _decode_cache(run: DecodeRun, use_cache: bool, compile: bool, policy: str) -> KVCache | None:
        # The compiled step's shapes include the cache capacity: round it up so that generations
        # of similar length reuse one compiled graph.
        capacity = compiled_cache_capacity(run.total) if compile else run.total
        return KVCache(capacity=capacity, policy=policy) if use_cache else None

    def _special_tokens(self, input_ids, attention_mask, eos_token_id, pad_token_id):
        """(EOS ids, pad id, attention mask): the config's where not given; a mask inferred from the
        pad id when that differs from EOS, else all ones."""
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        eos_ids = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        if pad_token_id is None:
            pad_token_id = self.config.pad_token_id if self.config.pad_token_id is not None else (min(eos_ids) if eos_ids else 0)
        if attention_mask is None:
            if pad_token_id not in eos_ids and bool((input_ids == pad_token_id).any()):
                attention_mask = (input_ids != pad_token_id).long()
            else:
                attention_mask = torch.ones_like(input_ids)
        return eos_ids, pad_token_id, attention_mask

    def _check_decoding_options(self, use_cache, num_steps, adaptive_threshold, adaptive_criterion, compile) -> None:
        if adaptive_threshold is not None:
            if not use_cache:
                raise ValueError("adaptive_threshold needs use_cache=True")
            exit_criterion(adaptive_criterion, self)  # one-line ValueError listing the valid names
            check_exit_threshold(adaptive_threshold)
            if num_steps is not None and not isinstance(num_steps, int):
                raise ValueError(f"adaptive decoding takes an int num_steps (the maximum depth), got {num_steps!r}")
        if compile and (adaptive_threshold is not None or not use_cache):
            raise ValueError("compile=True needs use_cache=True and no adaptive_threshold")

    # -- prefill and the per-token steps ---------------------------------------------------------

    def _select_step(self, cache, num_steps, n: int, k: int, adaptive_threshold, adaptive_criterion, compile):
        """How each token after the prompt runs: `step(run) -> last-position logits`."""
        if cache is None:
            return partial(self._uncached_logits, num_steps=num_steps)
        if adaptive_threshold is not None:
            return partial(self._adaptive_decode_step, cache=cache, max_steps=n + k,
                           threshold=adaptive_threshold, criterion=adaptive_criterion)
        if compile:
            return partial(self._compiled_decode, cache=cache, n=n, k=k)
        return partial(self._eager_decode, cache=cache, n=n, k=k)

    def _prefill(self, input_ids, attention_mask, cache: KVCache, n: int, k: int, run: DecodeRun | None = None) -> torch.Tensor:
        """The prompt through the cache, at the full depth; the last position's logits."""
        ctx = self.attention_context(input_ids, attention_mask, None, cache)
        states = run.seeded_states(self, 0, input_ids.shape[1]) if run is not None else None
        x, state = self.run_layers(input_ids, ctx, n, k, initial_state=states)
        if run is not None and run.continuous:
            run.latent = state[:, -1:]
        return self.lm_head(x[:, -1])

    def _uncached_logits(self, run: DecodeRun, num_steps) -> torch.Tensor:
        """use_cache=False: the whole sequence so far, every token."""
        out = self(run.tokens[:, : run.length], attention_mask=run.mask[:, : run.length], num_steps=num_steps, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _eager_decode(self, run: DecodeRun, cache: KVCache, n: int, k: int) -> torch.Tensor:
        start = run.latent if run.latent is not None else run.seeded_states(self, run.length - 1, 1)
        x, state = self.run_layers(run.step_input(), run.step_context(cache), n, k, initial_state=start)
        if run.continuous:
            run.latent = state
        return self.lm_head(x[:, -1])

    def _compiled_decode(self, run: DecodeRun, cache: KVCache, n: int, k: int) -> torch.Tensor:
        """One token through `_decode_step` compiled; the mask and write position are tensors."""
        B, length, device = run.tokens.shape[0], run.length, run.tokens.device
        static_shapes = static_decode_shapes(device)
        ctx = run.step_context(cache)
        if static_shapes:
            # Keys over the whole capacity, the columns not written yet masked.
            key_mask = (torch.arange(cache.capacity, device=device) < length)[None].expand(B, -1).clone()
            if run.masked:
                key_mask[:, : run.total] &= run.mask.bool()
        else:
            key_mask = run.mask[:, :length].to(torch.bool, copy=True)
        key_mask[:, length - 1] = True
        ctx.mask = key_mask[:, None, None, :]
        if not static_shapes:  # the attended length (`Attention` slices the cache to the mask's) is dynamic
            torch._dynamo.maybe_mark_dynamic(ctx.mask, 3)
        ctx.cache_position = torch.full((1,), length - 1, dtype=torch.long, device=device)
        ctx.past_length = 0  # not a shape here: keeps the compiled step from specialising on it
        # The random initial state is drawn here, eagerly: truncated-normal sampling rejects and
        # redraws until every value is in range (`Tensor.item()` and a data-dependent loop), which
        # would break the compiled graph on every call. `state_like`: the shape and dtype of one
        # decode step's prelude output.
        state_like = torch.zeros(B, 1, self.config.n_embd, dtype=self.transformer.wte.weight.dtype, device=device)
        state = run.seeded_states(self, length - 1, 1)
        if state is None:
            state = self.initial_state(state_like)
        # contiguous: a column of `tokens` has its row stride, which differs with the generation's
        # length, and a new stride means a new graph.
        logits = self._compiled_decode_step(device)(self, run.step_input().contiguous(), ctx, n, k, state)
        cache.seen_tokens = length
        return logits

    def _compiled_decode_step(self, device: torch.device):
        """The decode step, compiled once per model and device type (`generate(compile=True)`).
        On CPU, inductor's C++ wrapper calls the step's kernels without going through Python per
        kernel: per-token overhead is what a small decode step is made of (measured: 1.3-2.2x
        the eager step at batch 1, against 1.3-1.7x without it)."""
        steps = self.__dict__.setdefault("_compiled_decode_steps", {})
        step = steps.get(device.type)
        if step is None:
            options = {"cpp_wrapper": True} if device.type == "cpu" else None
            dynamic = False if static_decode_shapes(device) else None  # None: honour maybe_mark_dynamic
            step = torch.compile(RavenGenerationMixin._decode_step, dynamic=dynamic, fullgraph=False, options=options)
            steps[device.type] = step
        return step

    @staticmethod
    def _decode_step(model, step_input, ctx: AttentionContext, n: int, k: int, initial_state: torch.Tensor) -> torch.Tensor:
        """One token through the preallocated cache, for `torch.compile`: the write position is a
        tensor and the attended length a static or a dynamic shape, so one compiled graph serves
        every token of a generation. The caller draws `initial_state` (`initial_state()`, eager)."""
        x, _ = model.run_layers(step_input, ctx, n, k, initial_state=initial_state)
        return model.lm_head(x[:, -1])

    def _adaptive_decode_step(self, run: DecodeRun, cache: KVCache, max_steps: int, threshold: float, criterion: str):
        """One token with per-row early exit (`exits_raven.decode_with_exits`: rows that exited
        stop running the recurrent block); records the depth each running row used in
        `run.depths` and returns the last position's logits."""
        step_input = run.step_input()
        ctx = run.step_context(cache)
        e = self.run_prelude(self.embed(step_input), ctx)
        tracker = ExitTracker(criterion, threshold, step_input.shape, step_input.device, model=self)  # (B, 1)
        logits = decode_with_exits(self, ctx, e, self.initial_state(e), max_steps, tracker)
        cache.seen_tokens = ctx.past_length + step_input.shape[1]
        run.depths.append(tracker.used[:, -1][~run.done].float())
        return logits

    @staticmethod
    def _choose_next(logits, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(dim=-1)
        logits = logits / max(temperature or 1.0, 1e-5)
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1, None]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            remove = cumulative - sorted_logits.softmax(-1) > top_p
            logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
