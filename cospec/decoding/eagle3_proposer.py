"""Speculation with an EAGLE-3 head (``cospec.decoding.eagle3``), batched over sequences.

The engine captures the target's aux hidden states in its own forward (prefill chunks and verify windows, no
second target pass) and hands over those of the positions it keeps (``add_target_states``); they wait, mixed by
fc into one state per position, until the sequence drafts again. Drafting first catches the head's paged cache up
on the waiting positions (position p pairs the target's state at p with token p + 1), in one ragged forward over
all sequences; its last row gives the first draft. Each further draft feeds the head's own output state and the
previous draft one position on. Draft positions never count as cached, so the next catch-up overwrites them: that
is the head's rollback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cospec.decoding.eagle3 import Eagle3Head
from cospec.decoding.protocols import Draft, DraftRequest, ForwardItem, StateRunner, stacked
from cospec.decoding.sampling import sample_draft_tokens


@dataclass(slots=True)
class _HeadState:
    num_cached: int = 0
    """Head positions 0..num_cached-1 have K/V in the head's cache, computed from the target's states."""
    pending: torch.Tensor | None = None
    """[num_pending, H] fc output for positions num_cached.. (the target has computed them; the head has not)."""

    @property
    def num_pending(self) -> int:
        return 0 if self.pending is None else len(self.pending)


class Eagle3Proposer:
    is_deterministic = False
    keeps_no_state = False

    def __init__(self, runner: StateRunner, head: Eagle3Head) -> None:
        self.runner = runner
        self.head = head
        self._states: dict[int, _HeadState] = {}

    def release(self, seq_id: int) -> None:
        self._states.pop(seq_id, None)

    def max_reusable_prefix(self, num_matched_tokens: int) -> int:
        """None of a cached prefix: the head needs the target's hidden states of every position, which a prefix
        served from the cache never computed (so a sequence under a head prefills in full)."""
        return 0

    @torch.inference_mode()
    def add_target_states(
        self,
        seq_ids: list[int],
        start_positions: list[int],  # position of each sequence's first row
        aux_hidden_states: torch.Tensor,  # [sum(counts), len(aux) * H_target], sequence by sequence
        counts: list[int],
    ) -> None:
        """The target's aux hidden states of positions ``start .. start + count - 1`` of each sequence."""
        states = self.head.combine(aux_hidden_states.to(self.head.fc.weight.dtype))
        for seq_id, start, chunk in zip(seq_ids, start_positions, states.split(counts)):
            state = self._states.setdefault(seq_id, _HeadState())
            if start < state.num_cached:  # recomputed positions (cannot happen without a release; be safe)
                state.num_cached, state.pending = start, None
            known = start - state.num_cached
            if known > state.num_pending:
                raise RuntimeError(f"sequence {seq_id}: target states from position {start}, but the head has "
                                   f"states up to {state.num_cached + state.num_pending}")
            kept = state.pending[:known] if state.pending is not None else chunk[:0]
            state.pending = torch.cat([kept, chunk])

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        # Draft distributions are kept only where rejection sampling will judge them (unseeded sampled requests).
        drafts = [Draft([], [] if r.seed is not None and not r.coupled else None) for r in requests]
        active, items, inputs = [], [], []
        for i, r in enumerate(requests):
            state = self._states.get(r.seq_id)
            # The target has computed every token but the last; the head catches up on those it has not seen.
            if r.num_draft_tokens <= 0 or state is None or state.num_pending == 0 or \
                    state.num_cached + state.num_pending != len(r.token_ids) - 1:
                continue
            start = state.num_cached
            items.append(ForwardItem(r.seq_id, r.token_ids[start + 1:], start, 1))
            inputs.append(state.pending)
            state.num_cached, state.pending = len(r.token_ids) - 1, None
            active.append(i)
        positions = {i: len(requests[i].token_ids) - 1 for i in active}  # where each next draft step runs
        while active:
            logits, out_states = self.runner.forward(items, torch.cat(inputs))
            # Over the full vocabulary (-inf outside the head's): processed and sampled like the target's position.
            tokens, probs = sample_draft_tokens(self.head.target_logits(logits), [requests[i] for i in active],
                                                [drafts[i].token_ids for i in active])
            items, inputs, still = [], [], []
            for row, i in enumerate(active):
                r = requests[i]
                drafts[i].token_ids.append(tokens[row])
                if drafts[i].probs is not None:
                    drafts[i].probs.append(probs[row])
                if len(drafts[i].token_ids) < r.num_draft_tokens:
                    items.append(ForwardItem(r.seq_id, [tokens[row]], positions[i], 1))
                    inputs.append(out_states[row:row + 1])
                    positions[i] += 1
                    still.append(i)
            active = still
        return stacked(drafts)
