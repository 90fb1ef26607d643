"""How many drafts each sequence gets per step, from its acceptance history and measured step costs.

Model: a window of k drafts whose tokens are each accepted with probability ``alpha`` (until the first rejection)
emits ``E(k) = (1 - alpha^(k+1)) / (1 - alpha)`` tokens. A step that runs ``T`` target tokens costs about
``a + b * T`` seconds (fitted online from measured forwards), and each draft token costs ``d`` more (measured
proposer time per draft token). The batch's throughput ``R = sum_i E(k_i) / cost`` gains from the k-th draft of
sequence i iff ``alpha_i^k > R * (b + d)``; we solve that fixed point in a few iterations. So drafting grows
when a step is dominated by its fixed cost (small batches, accurate drafts) and shrinks to zero when the batch is
big enough that extra verified tokens are no longer nearly free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class AcceptanceStats:
    """Decayed counts of accepted drafts and of draft trials (a Beta(1, 1) prior keeps alpha in (0, 1))."""

    accepted: float = 0.0
    trials: float = 0.0
    steps_without_drafts: int = 0

    @property
    def alpha(self) -> float:
        return (self.accepted + 1.0) / (self.trials + 2.0)


@dataclass
class CostModel:
    """Online least-squares fit of step time = a + b * num_tokens, with exponential forgetting."""

    decay: float = 0.95
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # n, x, y, xx, xy
    draft_cost_per_token: float = 0.0

    def observe_forward(self, num_tokens: int, seconds: float) -> None:
        s = [v * self.decay for v in self._sums]
        s[0] += 1
        s[1] += num_tokens
        s[2] += seconds
        s[3] += num_tokens * num_tokens
        s[4] += num_tokens * seconds
        self._sums = s

    def observe_drafting(self, num_draft_tokens: int, seconds: float) -> None:
        if num_draft_tokens > 0:
            per_token = seconds / num_draft_tokens
            self.draft_cost_per_token = 0.8 * self.draft_cost_per_token + 0.2 * per_token if self.draft_cost_per_token else per_token

    def coefficients(self) -> tuple[float, float]:
        """(a, b); before enough spread in the data, b defaults to a tenth of the mean step time per token."""
        n, x, y, xx, xy = self._sums
        if n < 1e-9:
            return 1.0, 0.05
        variance = xx / n - (x / n) ** 2
        if variance < 1.0:  # all steps had about the same size: slope unknown
            mean_y, mean_x = y / n, max(x / n, 1.0)
            return 0.9 * mean_y, 0.1 * mean_y / mean_x
        b = max((xy / n - (x / n) * (y / n)) / variance, 1e-6)
        a = max(y / n - b * x / n, b)
        return a, b


class DraftLengthPolicy:
    def __init__(self, max_draft_tokens: int, adaptive: bool = True, probe_interval: int = 8, decay: float = 0.9):
        if max_draft_tokens < 0:
            raise ValueError(f"max_draft_tokens must be >= 0, got {max_draft_tokens}")
        self.max_draft_tokens = max_draft_tokens
        self.adaptive = adaptive
        self.probe_interval = probe_interval
        self.decay = decay
        self.stats: dict[int, AcceptanceStats] = {}
        self.costs = CostModel()

    def release(self, seq_id: int) -> None:
        self.stats.pop(seq_id, None)

    def record(self, seq_id: int, num_drafted: int, num_accepted: int) -> None:
        stats = self.stats.setdefault(seq_id, AcceptanceStats())
        if num_drafted == 0:
            stats.steps_without_drafts += 1
            return
        stats.steps_without_drafts = 0
        stats.accepted = stats.accepted * self.decay + num_accepted
        stats.trials = stats.trials * self.decay + num_accepted + (1 if num_accepted < num_drafted else 0)

    def choose(self, seq_ids: list[int], num_other_tokens: int = 0) -> dict[int, int]:
        """Drafts per decoding sequence this step; ``num_other_tokens``: prefill tokens sharing the forward."""
        if not seq_ids or self.max_draft_tokens == 0:
            return {s: 0 for s in seq_ids}
        if not self.adaptive:
            return {s: self.max_draft_tokens for s in seq_ids}
        a, b = self.costs.coefficients()
        marginal_cost = b + self.costs.draft_cost_per_token
        alphas = {s: min(self.stats.get(s, AcceptanceStats()).alpha, 0.999) for s in seq_ids}
        k = {s: 0 for s in seq_ids}
        for _ in range(4):  # fixed point of: k_i = #{j >= 1 : alpha_i^j > R * marginal_cost}
            emitted = sum((1 - alphas[s] ** (k[s] + 1)) / (1 - alphas[s]) for s in seq_ids)
            cost = a + b * (num_other_tokens + len(seq_ids) + sum(k.values())) + self.costs.draft_cost_per_token * sum(k.values())
            threshold = emitted / cost * marginal_cost
            for s in seq_ids:
                if threshold >= 1.0:
                    k[s] = 0
                elif threshold <= 0.0:
                    k[s] = self.max_draft_tokens
                else:
                    k[s] = max(0, min(self.max_draft_tokens, math.ceil(math.log(threshold) / math.log(alphas[s])) - 1))
        for s in seq_ids:  # re-test sequences that drafting was switched off for, now and then
            stats = self.stats.get(s)
            if k[s] == 0 and stats is not None and stats.steps_without_drafts >= self.probe_interval:
                k[s] = 1
        return k
