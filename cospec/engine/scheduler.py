"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget (``max_num_batched_tokens``). Running sequences that decode go first, then running
sequences still prefilling, then new admissions from the waiting queue, each prefill cut into chunks that fit what
is left of the budget. A sequence that needs a KV block when none is free preempts the most recently admitted
running sequence, which drops its cache and is recomputed later (its generated tokens are kept).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from cospec.engine.block_manager import BlockManager
from cospec.engine.config import EngineConfig
from cospec.engine.sequence import Sequence, SequenceStatus


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

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, num_draft_tokens: dict[int, int] | None = None) -> list[ScheduledSeq]:
        """Pick this step's work. ``num_draft_tokens[seq_id]`` asks for room for that many drafts after a decode."""
        num_draft_tokens = num_draft_tokens or {}
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        # Decoding sequences first, then those still prefilling; each in admission order.
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1):
            if seq.status != SequenceStatus.RUNNING or budget <= 0:
                continue
            remaining = seq.num_tokens - seq.num_computed_tokens
            drafts = num_draft_tokens.get(seq.seq_id, 0) if remaining == 1 else 0
            drafts = max(0, min(drafts, budget - 1))
            num_new = min(remaining, budget)
            if not self._make_room(seq, seq.num_computed_tokens + num_new + drafts, scheduled):
                continue  # seq itself was preempted
            scheduled.append(ScheduledSeq(seq, num_new, drafts))
            budget -= num_new + drafts
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.can_grow(seq.seq_id, seq.num_computed_tokens + num_new):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.stats.first_scheduled_time is None:
                seq.stats.first_scheduled_time = time.perf_counter()
            self.running.append(seq)
            self.block_manager.grow(seq.seq_id, seq.num_computed_tokens + num_new)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return scheduled

    def _make_room(self, seq: Sequence, new_length: int, scheduled: list[ScheduledSeq]) -> bool:
        """Grow ``seq``'s blocks to ``new_length``, preempting the newest sequences not yet scheduled this step if
        needed. False if ``seq`` itself had to be preempted."""
        taken = {s.seq.seq_id for s in scheduled}
        while not self.block_manager.can_grow(seq.seq_id, new_length):
            victim = next(s for s in reversed(self.running) if s.seq_id not in taken)
            self.preempt(victim)
            if victim is seq:
                return False
        self.block_manager.grow(seq.seq_id, new_length)
        return True

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
        self.block_manager.free(seq.seq_id)
        for hook in self.release_hooks:
            hook(seq.seq_id)
