"""How many drafts each sequence gets per step, from its acceptance history and measured step costs.

Acceptance model: drafts are accepted up to the first rejection, and acceptance is bursty (a prompt-lookup draft
inside copied text is accepted whole, one after an edit is rejected at once), so each sequence has two rates: ``p``,
that its first draft token is accepted, and ``c``, that a draft token is accepted after an accepted one. The j-th
draft then adds ``p * c^(j - 1)`` expected tokens, and a window of k drafts emits
``E(k) = 1 + p * (1 + c + ... + c^(k-1))`` tokens. Both rates are decayed counts with a Beta(1, 1) prior.

A step whose forward runs ``T`` tokens costs ``cost(T)`` seconds and each draft token ``d`` more (the proposer's
measured time per draft token). The policy maximizes the step's throughput ``sum_i E(k_i) / (cost(T) + d * sum k_i)``:
it hands out drafts one at a time, each to the sequence whose next draft adds the most expected tokens (which
maximizes the expected tokens for every total), and keeps the total that gave the best throughput.

``cost(T)`` is measured, not assumed: the mean time of recent steps of that size, where the engine has run one (the
whole step but the drafting, which ``d`` prices). Steps with drafts are priced apart from steps without: where
the engine's work around the forward is a large share of a step (a small model at a large batch), a step with
drafts takes a slower path than plain decoding (windows to build, verify and roll back) and costs more than its
token count says, so a few drafts are worth it only if they win back that difference.
Other sizes are filled in from the measured sizes around them (``CostModel.predict``); only where nothing near
is measured does a linear fit ``a + b * T`` over all forwards answer, since prefill chunks of hundreds of tokens
dominate that fit and make a few more tokens look nearly free where, at decode sizes, each costs far more (on the
CPU here ~10 ms per token from 4 tokens on, against ~1 ms per token of a prefill). On the CPU a forward runs as
``padded_tokens(T) >= T`` rows (``cospec.engine.cpu_linear.RowPlan``: MKL is faster at 16 rows than at 11), so costs
are kept per padded size, and drafts that only fill rows the padding adds are free. So drafting grows where a step is
dominated by its fixed cost (small batches, accurate drafts) and shrinks to zero where the batch is big enough that
extra verified tokens are no longer nearly free.

A request whose drafting is switched off is probed with one draft after ``probe_interval`` steps without drafts; a
failed probe doubles the interval (up to 256 steps), a successful one resets it, and a new request starts with the
interval the last finished request ended with (a draft model that is never right then costs almost nothing: each
probe makes it catch up on every token since it last ran). A step that drafts anyway (a probe or a chosen draft)
also probes every sequence at least halfway to its probe: probes of many sequences then share steps instead of
making every step a step with drafts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

# A draft whose acceptance probability is below this is never worth its verification.
_MIN_ACCEPTANCE = 1e-3
# The longest wait, in steps, between probes of a sequence that drafting was switched off for.
_MAX_PROBE_INTERVAL = 256
# Steps without drafts after which the price of a step with drafts is measured again (by probes) even if it says
# that drafts do not pay.
_REMEASURE_STEPS = 64
# Decay of the acceptance counts pooled over all requests (per window): about the last 200 windows count.
_POOLED_DECAY = 0.995


@dataclass(slots=True)
class AcceptanceStats:
    """Decayed counts for a sequence's two acceptance rates (see the module docstring)."""

    first_accepted: float = 0.0
    first_trials: float = 0.0
    next_accepted: float = 0.0
    next_trials: float = 0.0
    steps_without_drafts: int = 0
    probe_interval: int = 0  # steps without drafts before the next probe; 0 = the policy's base interval

    def first_rate(self, prior: float = 0.5) -> float:
        """p: the first draft token is accepted (two pseudo-trials at rate ``prior``)."""
        return (self.first_accepted + 2.0 * prior) / (self.first_trials + 2.0)

    def next_rate(self, prior: float = 0.5) -> float:
        """c: a draft token is accepted after an accepted one (two pseudo-trials at rate ``prior``)."""
        return (self.next_accepted + 2.0 * prior) / (self.next_trials + 2.0)

    def update(self, num_drafted: int, num_accepted: int, decay: float) -> None:
        self.first_trials = self.first_trials * decay + 1
        self.first_accepted = self.first_accepted * decay + (num_accepted > 0)
        # Tokens 2..num_drafted were judged while every token before them was accepted, up to the first rejection.
        self.next_trials = self.next_trials * decay + min(num_accepted, num_drafted - 1)
        self.next_accepted = self.next_accepted * decay + max(num_accepted - 1, 0)


@dataclass
class CostModel:
    """Step time by number of forward tokens: a per-size running mean where measured, else an online least-squares
    fit ``a + b * num_tokens`` (both forget old measurements exponentially)."""

    decay: float = 0.95
    size_weight: float = 0.3  # weight of a new measurement in its size's running mean
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # n, x, y, xx, xy
    _by_size: dict[int, float] = field(default_factory=dict)
    draft_cost_per_token: float = 0.0

    def observe_forward(self, num_tokens: int, seconds: float) -> None:
        s = [v * self.decay for v in self._sums]
        s[0] += 1
        s[1] += num_tokens
        s[2] += seconds
        s[3] += num_tokens * num_tokens
        s[4] += num_tokens * seconds
        self._sums = s
        previous = self._by_size.get(num_tokens)
        self._by_size[num_tokens] = seconds if previous is None else (
            (1 - self.size_weight) * previous + self.size_weight * seconds)

    @property
    def is_measured(self) -> bool:
        return bool(self._by_size)

    def observe_drafting(self, num_draft_tokens: int, seconds: float) -> None:
        if num_draft_tokens > 0:
            per_token = seconds / num_draft_tokens
            self.draft_cost_per_token = 0.8 * self.draft_cost_per_token + 0.2 * per_token if self.draft_cost_per_token else per_token

    def coefficients(self) -> tuple[float, float]:
        """(a, b) of the linear fit; before enough spread in the data, b defaults to a tenth of the mean step time
        per token."""
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

    def step_seconds(self, num_tokens: int) -> float:
        """Predicted time of a forward over ``num_tokens`` tokens."""
        return float(self.predict([num_tokens])[0])

    def predict(self, sizes) -> np.ndarray:
        """Predicted times (float64) of forwards over ``sizes`` tokens (ints: a tensor, an array or a list), all in
        a few array operations (the policy prices every candidate draft total of a step: hundreds at large
        batches; NumPy, since on arrays this small each torch operation costs several times more).

        A measured size takes its running mean. A size not measured is read off the measured sizes around it:
        interpolated between its measured neighbours when the one above is at most twice the one below, else
        extended from the one below along the steeper of the fit's slope and the slope between the two measured
        sizes below it (the cost per token at decode sizes, not the far lower one of a prefill). Below every
        measured size, the fit. (Branches not taken may divide by zero; ``torch.where`` drops them.)"""
        a, b = self.coefficients()
        x = np.asarray(sizes, dtype=np.float64)
        fit = a + b * x
        if not self._by_size:
            return fit
        measured = sorted(self._by_size)
        known = np.array(measured, dtype=np.float64)
        cost = np.array([self._by_size[size] for size in measured], dtype=np.float64)
        last = len(measured) - 1
        i = np.searchsorted(known, x)  # known[i - 1] < x <= known[i]
        above, below, second = np.minimum(i, last), np.maximum(i - 1, 0), np.maximum(i - 2, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            interpolated = cost[below] + (cost[above] - cost[below]) * (x - known[below]) / (known[above] - known[below])
            local = (cost[below] - cost[second]) / (known[below] - known[second])
        slope = np.where(i >= 2, np.maximum(local, b), b)
        extended = cost[below] + slope * (x - known[below])
        out = np.where((i >= 1) & (i <= last) & (known[above] <= 2 * known[below]), interpolated, extended)
        out = np.where(i == 0, fit, out)
        return np.where((i <= last) & (known[above] == x), cost[above], out)


class DraftLengthPolicy:
    def __init__(self, max_draft_tokens: int, adaptive: bool = True, probe_interval: int = 8, decay: float = 0.9,
                 padded_tokens: Callable | None = None):
        """``padded_tokens``: the rows a forward of so many tokens runs (the CPU row plan pads some counts), for an
        int or elementwise for an int64 tensor; None: no padding."""
        if max_draft_tokens < 0:
            raise ValueError(f"max_draft_tokens must be >= 0, got {max_draft_tokens}")
        self.max_draft_tokens = max_draft_tokens
        self.adaptive = adaptive
        self.probe_interval = probe_interval
        self.decay = decay
        self.stats: dict[int, AcceptanceStats] = {}
        self.pooled = AcceptanceStats()  # every request's windows, forgotten more slowly
        self._initial_probe_interval = 0  # 0: the base interval
        self._steps_without_drafts = 0  # steps (choose calls) since the last that drafted
        self.costs = CostModel()  # steps without drafts
        self.drafting_costs = CostModel()  # steps with drafts
        self.padded_tokens = padded_tokens or (lambda num_tokens: num_tokens)

    def observe_step(self, num_tokens: int, seconds: float, num_draft_tokens: int = 0) -> None:
        """The measured time of an engine step over ``num_tokens`` tokens (``num_draft_tokens`` of them drafts),
        everything but the drafting (which ``costs.observe_drafting`` prices per draft token): the forward and the
        work around it (scheduling, verification, bookkeeping)."""
        costs = self.drafting_costs if num_draft_tokens else self.costs
        costs.observe_forward(self.padded_tokens(num_tokens), seconds)

    def release(self, seq_id: int) -> None:
        stats = self.stats.pop(seq_id, None)
        if stats is not None:  # the next request starts probing where this one left off
            self._initial_probe_interval = self._probe_interval(stats)

    def record(self, seq_id: int, num_drafted: int, num_accepted: int) -> None:
        stats = self.stats.get(seq_id)
        if stats is None:
            stats = self.stats[seq_id] = AcceptanceStats(probe_interval=self._initial_probe_interval)
        if num_drafted == 0:
            stats.steps_without_drafts += 1
            return
        if stats.steps_without_drafts >= self._probe_interval(stats):  # this window was a probe
            # A failed probe doubles the wait before the next one (a draft that never matches costs less and
            # less); a successful one resets it.
            stats.probe_interval = self.probe_interval if num_accepted else min(2 * self._probe_interval(stats),
                                                                                _MAX_PROBE_INTERVAL)
        stats.steps_without_drafts = 0
        stats.update(num_drafted, num_accepted, self.decay)
        self.pooled.update(num_drafted, num_accepted, _POOLED_DECAY)

    def _probe_interval(self, stats: AcceptanceStats) -> int:
        return stats.probe_interval or self.probe_interval

    def choose(self, seq_ids: list[int], num_other_tokens: int = 0) -> dict[int, int]:
        """Drafts per decoding sequence this step; ``num_other_tokens``: prefill tokens sharing the forward."""
        if not seq_ids or self.max_draft_tokens == 0:
            return {s: 0 for s in seq_ids}
        if not self.adaptive:
            return {s: self.max_draft_tokens for s in seq_ids}
        first_prior, next_prior = self.pooled.first_rate(), self.pooled.next_rate()
        rates = {}
        for s in seq_ids:
            stats = self.stats.get(s) or AcceptanceStats()
            rates[s] = (stats.first_rate(first_prior), min(stats.next_rate(next_prior), 0.999))
        k = self._best_drafts(rates, num_other_tokens + len(seq_ids))
        # Re-test sequences that drafting was switched off for, now and then; when this step drafts anyway, those
        # halfway to their probe too (probes then share steps). Probes are pointless where even drafts that are
        # always accepted would not pay for a step with drafts, unless that price is old (_REMEASURE_STEPS).
        waits = [(s, stats.steps_without_drafts, self._probe_interval(stats)) for s in seq_ids
                 if k[s] == 0 and (stats := self.stats.get(s)) is not None]
        if any(k.values()) or (any(wait >= interval for _, wait, interval in waits)
                               and (self._steps_without_drafts >= _REMEASURE_STEPS
                                    or self._perfect_drafts_pay(len(seq_ids), num_other_tokens + len(seq_ids)))):
            for s, wait, interval in waits:
                if 2 * wait >= interval:
                    k[s] = 1
        self._steps_without_drafts = 0 if any(k.values()) else self._steps_without_drafts + 1
        return k

    def _perfect_drafts_pay(self, num_seqs: int, base_tokens: int) -> bool:
        """Whether a step in which one sequence drafts the maximum and every draft is accepted would emit tokens
        faster than the step without drafts."""
        num_drafts = self.max_draft_tokens
        plain = self.costs.step_seconds(self.padded_tokens(base_tokens))
        drafting_costs = self.drafting_costs if self.drafting_costs.is_measured else self.costs
        drafting = (drafting_costs.step_seconds(self.padded_tokens(base_tokens + num_drafts))
                    + self.costs.draft_cost_per_token * num_drafts)
        return (num_seqs + num_drafts) / drafting > num_seqs / plain

    def _best_drafts(self, rates: dict[int, tuple[float, float]], base_tokens: int) -> dict[int, int]:
        """Per-sequence draft lengths: the greedy drafts up to the total that maximizes the step's expected
        throughput.

        The greedy order hands each next draft to the sequence whose next draft adds the most (``p_i * c_i^j``);
        since a sequence's gains only fall, that is every (sequence, draft) sorted by gain, ties to the lower
        sequence id, then the earlier draft. Sorted once here, in float64, multiplied and summed in the order a
        draft-by-draft loop would (the same choices to the last bit), instead of a heap walked in Python."""
        draft_cost = self.costs.draft_cost_per_token
        seq_ids = sorted(rates)
        factors = np.empty((len(seq_ids), self.max_draft_tokens), dtype=np.float64)
        factors[:, 0] = [rates[s][0] for s in seq_ids]
        factors[:, 1:] = np.array([rates[s][1] for s in seq_ids], dtype=np.float64)[:, None]
        gains = np.cumprod(factors, axis=1).ravel()  # [n * max_draft_tokens]
        order = np.argsort(-gains, kind="stable")  # descending; equal gains keep their order
        gains = gains[order]
        num = int((gains >= _MIN_ACCEPTANCE).sum())  # a draft below it is never worth its verification
        # Expected tokens and cost of the step with the first `total` drafts, total = 0..num.
        emitted = np.concatenate([[float(len(rates))], gains[:num]]).cumsum()
        totals = np.arange(num + 1)
        sizes = np.asarray(self.padded_tokens(torch.from_numpy(base_tokens + totals)))
        seconds = self.costs.predict(sizes)
        if num and self.drafting_costs.is_measured:  # (until a step with drafts has run, priced as one without)
            seconds[1:] = self.drafting_costs.predict(sizes[1:])
        seconds += draft_cost * totals
        best_total = int((emitted / seconds).argmax())  # (the first of equal throughputs: the fewest drafts)
        counts = np.bincount(order[:best_total] // self.max_draft_tokens, minlength=len(seq_ids))
        k = dict.fromkeys(rates, 0)
        k.update(zip(seq_ids, counts.tolist()))
        return k
