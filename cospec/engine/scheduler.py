"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget (``max_num_batched_tokens``). Running sequences that decode go first, then running
sequences still prefilling, then new admissions from the waiting queue, each prefill cut into chunks that fit what
is left of the budget. A new sequence starts on the longest prefix of its tokens that the prefix cache holds (whole
blocks, never its last token: that one must run to give logits) and prefills only the rest. A sequence that needs a
KV block when none is free preempts the most recently admitted running sequence, which drops its cache and is
recomputed later (its generated tokens are kept; its full blocks stay in the prefix cache until evicted).

Fair admission (``EngineConfig.scheduling_policy='fair'``, the default). Decode windows and the first chunks of
waiting requests are latency-sensitive work: someone waits for their next token. In a step that carries such work
(``L`` tokens: the decode windows and a reserve for the waiting requests' first chunks, at most half the budget),
prefills already running share at most ``L + C`` tokens, where ``C`` is the number of tokens whose forward costs
as much as a step's fixed cost: ``a / b`` of the linear fit ``a + b * tokens`` of recent step times (32 until steps
of different sizes have been timed), or ``EngineConfig.fair_prefill_tokens``. Such a step costs
``a + b L + b (L + C) = 2 (a + b L)``: at most about twice what its latency-sensitive work costs alone. So a short
request gets its first chunk in the next step however long the prompt being prefilled, decodes slow down by at most
~2x (but in the step that admits a new request, whose first chunk may take the rest of the budget), and a long
prompt still advances every step; with no latency-sensitive work a running prefill takes the whole budget. 'fcfs'
lets running prefills take the budget first (best throughput for a long prompt; requests behind it wait until it
is done).

A waiting request whose next block after its cached prefix is being computed by a running sequence (the same
tokens up to that block's end: a system prompt or a conversation that another request is prefilling, or the prompt
of the first of ``n`` samples) waits until it is computed and then finds it cached, rather than computing the same
tokens again beside it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from cospec.decoding.draft_length import CostModel
from cospec.engine.block_manager import BlockManager
from cospec.engine.config import EngineConfig
from cospec.engine.sequence import Sequence, SequenceStatus

# C until steps of different sizes have been timed (a fresh engine).
UNMEASURED_FAIR_PREFILL_TOKENS = 32


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    """Tokens of ``seq.token_ids`` from ``num_computed_tokens`` on that run this step."""
    num_draft_tokens: int = 0
    """Draft tokens appended after them for verification (speculative decoding)."""


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.release_hooks: list = []  # called with seq_id whenever a sequence's cache is dropped
        self.max_reusable_prefix: Callable[[int], int] | None = None
        """Set by the engine when the proposer can reuse only part of a cached prefix (a draft head that needs
        the target's hidden states of the positions it has not seen): cached tokens found -> tokens to reuse."""
        self.step_costs = CostModel()
        self._step_sizes = (0, 0)  # (fewest, most) tokens of an observed step
        self._computing: dict[tuple, list[Sequence]] | None = None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def has_unfinished(self) -> bool:
        return self.num_unfinished > 0

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """The measured time of a forward over ``num_tokens`` tokens (for fair admission's step-cost model)."""
        self.step_costs.observe_forward(num_tokens, seconds)
        fewest, most = self._step_sizes
        self._step_sizes = (min(fewest, num_tokens) if fewest else num_tokens, max(most, num_tokens))

    def schedule(self, num_draft_tokens: dict[int, int] | None = None) -> list[ScheduledSeq]:
        """Pick this step's work. ``num_draft_tokens[seq_id]`` asks for room for that many drafts after a decode."""
        num_draft_tokens = num_draft_tokens or {}
        budget = self.config.max_num_batched_tokens
        self._computing = None  # built on first use this step (_sequences_computing)
        scheduled: list[ScheduledSeq] = []
        # Decoding sequences first, then those still prefilling; each in admission order.
        decoding, prefilling = [], []
        for seq in self.running:
            (decoding if len(seq.token_ids) - seq.num_computed_tokens == 1 else prefilling).append(seq)
        try_grow, running = self.block_manager.try_grow, SequenceStatus.RUNNING
        for seq in decoding:
            if seq.status is not running or budget <= 0:
                continue  # preempted by an earlier sequence of this loop, or no budget left
            drafts = max(0, min(num_draft_tokens.get(seq.seq_id, 0), budget - 1)) if num_draft_tokens else 0
            new_length = seq.num_computed_tokens + 1 + drafts
            if not try_grow(seq.seq_id, new_length) and not self._make_room(seq, new_length, scheduled):
                continue  # seq itself was preempted
            scheduled.append(ScheduledSeq(seq, 1, drafts))
            budget -= 1 + drafts
        running_budget = budget
        if self.config.scheduling_policy == "fair" and prefilling:
            decode_tokens = self.config.max_num_batched_tokens - budget
            reserve = min(self._waiting_tokens(), budget // 2)
            running_budget = budget - reserve
            if decode_tokens or reserve:
                running_budget = min(running_budget, decode_tokens + reserve + self._fair_prefill_tokens())
        for seq in prefilling:
            if seq.status != SequenceStatus.RUNNING or running_budget <= 0:
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, running_budget)
            if not self._make_room(seq, seq.num_computed_tokens + num_new, scheduled):
                continue
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            running_budget -= num_new
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            prefix = self._start_on(seq)
            if prefix is None:
                continue
            num_cached = len(prefix) * self.block_manager.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.block_manager.can_allocate(prefix, num_cached + num_new):
                break
            self.waiting.remove(seq)
            self.block_manager.allocate(seq.seq_id, prefix, num_cached + num_new, num_lookup_tokens=seq.num_tokens)
            self._admit(seq, num_cached)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return scheduled

    def _admit(self, seq: Sequence, num_cached: int) -> None:
        seq.status = SequenceStatus.RUNNING
        seq.num_computed_tokens = num_cached
        self.running.append(seq)
        if self._computing is not None:
            self._add_computing(seq)
        if seq.stats.first_scheduled_time is None:
            seq.stats.first_scheduled_time = time.perf_counter()
            seq.stats.num_cached_prompt_tokens = min(num_cached, seq.num_prompt_tokens)

    def _start_on(self, seq: Sequence) -> list[int] | None:
        """The cached blocks a waiting sequence would start on now (never covering its last token, which must run
        to give logits), or None if it should wait: a running sequence is computing the next block it could reuse."""
        block_size = self.block_manager.block_size
        if seq.prompt_embeds is not None:  # its K/V are not a function of its token ids: never shared
            return []
        prefix = self.block_manager.lookup(seq.token_ids, seq.num_tokens - 1)
        if prefix and self.max_reusable_prefix is not None:
            reusable = self.max_reusable_prefix(len(prefix) * block_size)
            if reusable < len(prefix) * block_size:  # the proposer would not reuse more anyway: no point waiting
                return prefix[: max(reusable, 0) // block_size]
        end = (len(prefix) + 1) * block_size  # the next block
        if self.block_manager.enable_prefix_caching and end <= seq.num_tokens - 1:
            computing = self._sequences_computing().get((end, tuple(seq.token_ids[end - block_size: end])), ())
            if computing:
                tokens = seq.token_ids[:end]
                if any(r.status is SequenceStatus.RUNNING and r.num_computed_tokens < end <= r.num_tokens
                       and r.token_ids[:end] == tokens for r in computing):
                    return None
        return prefix

    def _sequences_computing(self) -> dict[tuple, list[Sequence]]:
        """(block end, the block's tokens) -> the running sequences whose block there is not computed yet. Built once
        per step and extended as sequences are admitted: looking each waiting request's next block up in it keeps a
        step that admits many requests linear in their number, where comparing each with every running sequence
        was quadratic. Entries are rechecked on use (a sequence may have been preempted since)."""
        if self._computing is None:
            self._computing = {}
            for seq in self.running:
                self._add_computing(seq)
        return self._computing

    def _add_computing(self, seq: Sequence) -> None:
        block_size, tokens = self.block_manager.block_size, seq.token_ids
        for end in range((seq.num_computed_tokens // block_size + 1) * block_size, seq.num_tokens + 1, block_size):
            self._computing.setdefault((end, tuple(tokens[end - block_size: end])), []).append(seq)

    def _waiting_tokens(self) -> int:
        """Tokens that the waiting requests that may start this step have to prefill (after their cached prefix)."""
        tokens = 0
        for seq in list(self.waiting)[: max(self.config.max_num_seqs - len(self.running), 0)]:
            prefix = self._start_on(seq)
            if prefix is not None:
                tokens += seq.num_tokens - len(prefix) * self.block_manager.block_size
        return tokens

    def _fair_prefill_tokens(self) -> int:
        """C: tokens whose forward costs a step's fixed cost (configured, else from the measured step times)."""
        if self.config.fair_prefill_tokens is not None:
            return self.config.fair_prefill_tokens
        fewest, most = self._step_sizes
        if most < 2 * fewest or not fewest:  # steps of about one size tell nothing about the cost per token yet
            return UNMEASURED_FAIR_PREFILL_TOKENS
        fixed, per_token = self.step_costs.coefficients()
        return max(1, round(fixed / per_token))

    def _make_room(self, seq: Sequence, new_length: int, scheduled: list[ScheduledSeq]) -> bool:
        """Grow ``seq``'s blocks to ``new_length``, preempting the newest sequences not yet scheduled this step if
        needed. False if ``seq`` itself had to be preempted."""
        taken = None  # built only when someone must be preempted: per sequence it would make a step O(batch^2)
        while not self.block_manager.try_grow(seq.seq_id, new_length):
            if taken is None:
                taken = {s.seq.seq_id for s in scheduled}
            victim = next(s for s in reversed(self.running) if s.seq_id not in taken)
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def cache_computed(self, seq: Sequence) -> None:
        """Offer the sequence's full blocks of computed, accepted tokens to the prefix cache (not those of a prompt
        given as embeddings: their K/V are not a function of the token ids the cache is keyed by)."""
        if seq.prompt_embeds is not None:
            return
        self.block_manager.cache_blocks(seq.seq_id, seq.token_ids, min(seq.num_computed_tokens, seq.num_tokens))

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.stats.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.cache_computed(seq)  # what it computed stays reusable: a recompute after preemption starts from it
        self.block_manager.free(seq.seq_id)
        for hook in self.release_hooks:
            hook(seq.seq_id)
