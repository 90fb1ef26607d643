"""Verification of verify windows: which drafts the target keeps, and the token it adds.

Each sequence's window is ``[last token, d_1 .. d_k]`` (k may be 0: plain decoding is a window without drafts);
the target's logits at its ``k + 1`` positions, processed (``logits_processing``) with the tokens before each
position, decide. Three ways to decide, all exact (the output follows the processed target distribution):

- greedy: keep the longest prefix of drafts equal to the target's argmax, then add the target's argmax at the first
  mismatch (recovered) or after the last draft (bonus). Kernel ``verify_greedy``.
- coupled sampling: at each position ``j`` the target's token is its exponential race ``argmax p / E(seed, j)``
  with noise keyed by (seed, output position); drafts are kept while they equal it. The emitted tokens are then
  exactly the tokens plain sampling with the same seed emits, whatever the drafts were: a seed reproduces a request
  under every proposer and every draft length. A model draft sampled with the same keyed noise matches the target
  whenever both races pick the same token. Used for seeded requests and deterministic proposers (where it accepts
  a draft exactly as often as rejection sampling: with probability ``p(d)``). Kernel ``verify_greedy`` on the races.
- rejection sampling (Leviathan et al. 2023): for unseeded requests whose drafts come with their distribution ``q``;
  it maximizes acceptance, and its randomness is keyed by (seed, position) too. Kernel ``rejection_sample``.

A row whose logits hold NaN or +inf, or whose processing leaves no token, fails its request (``errors``) without
touching the other requests.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch

from cospec import kernels
from cospec.decoding.logits_processing import RowContext, process_logits
from cospec.decoding.sampling import (STREAM_ACCEPT, STREAM_TARGET, exponential_noise, noise_keys, process_probs_for,
                                      sample_from_probs, sampling_dtype, uniform_noise, warp_logits_for)


@dataclass(slots=True)
class Window:
    """One sequence's verify window."""

    draft_token_ids: list[int]
    params: object  # SamplingParams-like: temperature, top_k, top_p, min_p (+ the processing fields)
    seed: int | None = None  # None: greedy
    num_output_tokens: int = 0  # output position of the window's first row
    draft_probs: torch.Tensor | None = None  # [k, vocab_size]: rejection sampling; None: greedy or coupled
    context: RowContext | None = None  # processing context of the first row (None: no processing)

    @property
    def num_rows(self) -> int:
        return len(self.draft_token_ids) + 1  # [last token, drafts]


@dataclass(slots=True)
class Verified:
    tokens: list[list[int]]  # per window: accepted drafts, then one target token ([] on error)
    errors: list[str | None]  # per window
    scores: torch.Tensor | None = None  # [num_rows, vocab_size] the logits each row's token was chosen from
    # (processed; warped for sampled rows), when asked for
    row_starts: list[int] = field(default_factory=list)  # first row of each window


def row_contexts(windows: list[Window]) -> list[RowContext | None]:
    """The processing context of every row: the window's context with the drafts before the row."""
    rows = []
    for w in windows:
        if w.context is None:
            rows += [None] * w.num_rows
        else:
            rows += [w.context] + [replace(w.context, extra_token_ids=w.draft_token_ids[:i])
                                   for i in range(1, w.num_rows)]
    return rows


def verify(
    logits: torch.Tensor,  # [sum(k_i + 1), vocab_size] window logits, window by window
    windows: list[Window],
    want_scores: bool = False,
) -> Verified:
    """Tokens each window emits this step: its accepted drafts, then one target token."""
    device, vocab_size = logits.device, logits.shape[-1]
    num_rows = [w.num_rows for w in windows]
    starts = _row_starts(num_rows)
    has_context = any(w.context is not None for w in windows)
    processed = process_logits(logits, row_contexts(windows)) if has_context else logits
    scores = processed.to(sampling_dtype(logits), copy=True) if want_scores else None
    # max propagates NaN and +inf from the model; -inf means processing left no token.
    best, target_tokens = kernels.row_max(processed)  # the greedy rows' tokens; sampled rows' are replaced below
    is_bad_row = ~torch.isfinite(best)

    sampled = [i for i, w in enumerate(windows) if w.seed is not None]
    sampled_probs = {}  # window -> [k + 1, vocab_size] processed probabilities
    if sampled:
        rows = _rows(starts, sampled, device)
        warped = warp_logits_for(processed[rows], [windows[i].params for i in sampled], [num_rows[i] for i in sampled])
        if scores is not None:
            scores[rows] = warped
        probs = warped.softmax(dim=-1)
        seeds, positions = _row_seeds_and_positions([windows[i] for i in sampled])
        noise = exponential_noise(noise_keys(seeds, positions, STREAM_TARGET).to(device), vocab_size, probs.dtype)
        target_tokens[rows] = sample_from_probs(probs, noise)
        is_bad_row[rows] |= ~torch.isfinite(probs.sum(dim=-1))
        sampled_probs = dict(zip(sampled, probs.split([num_rows[i] for i in sampled])))

    bad = set()
    if bool(is_bad_row.any()):
        window_of_row = torch.repeat_interleave(torch.arange(len(windows)), torch.tensor(num_rows))
        bad = set(window_of_row[is_bad_row.cpu()].tolist())
    errors = [_error_message(processed[starts[i]: starts[i + 1]]) if i in bad else None for i in range(len(windows))]
    rejection = [i for i in sampled if i not in bad and windows[i].draft_probs is not None
                 and windows[i].draft_token_ids]
    if not bad and not rejection:  # every window by race (the common case: no per-window selection)
        tokens = _verify_greedy(target_tokens, [w.draft_token_ids for w in windows])
        return Verified(tokens, errors, scores, starts[:-1])
    tokens: list[list[int]] = [[] for _ in windows]
    skipped = bad | set(rejection)
    by_race = [i for i in range(len(windows)) if i not in skipped]
    if by_race:
        rows = _rows(starts, by_race, device)
        for i, emitted in zip(by_race, _verify_greedy(target_tokens[rows], [windows[i].draft_token_ids
                                                                           for i in by_race])):
            tokens[i] = emitted
    if rejection:
        target_probs = torch.cat([sampled_probs[i] for i in rejection])
        for i, emitted in zip(rejection, _rejection_sample(target_probs, [windows[i] for i in rejection])):
            tokens[i] = emitted
    return Verified(tokens, errors, scores, starts[:-1])


def verify_plain_greedy(logits: torch.Tensor, drafts: list[list[int]]) -> Verified:
    """``verify`` for windows whose requests are greedy with no logits processing and no scores asked for: the
    longest prefix of each window's ``drafts`` that equals the target's argmax, then the target's token, without
    building per-window state. A step with NaN or +inf logits goes through ``verify`` (it names each failure)."""
    best, target_tokens = kernels.row_max(logits)  # (max propagates NaN and +inf, as in verify)
    if not _all_finite(best):
        return verify(logits, [Window(d, None) for d in drafts])
    starts = _row_starts(len(d) + 1 for d in drafts)
    return Verified(_verify_greedy(target_tokens, drafts), [None] * len(drafts), None, starts[:-1])


def greedy_tokens(logits: torch.Tensor) -> list[int] | None:
    """Each row's argmax (a plain decoding step of greedy requests without logits processing), or None when a
    row's maximum is NaN or +inf (``verify`` then names the failure)."""
    best, tokens = kernels.row_max(logits)
    return tokens.tolist() if _all_finite(best) else None


def _all_finite(row_max: torch.Tensor) -> bool:
    # One sum instead of isfinite + all: it is finite iff every row's max is (an overflow of huge finite logits
    # only sends the step the slow way, which gives the same tokens).
    return math.isfinite(row_max.sum().item())


def _row_starts(num_rows: Iterable[int]) -> list[int]:
    """First row of each window (given its number of rows), then the total number of rows."""
    return [0, *itertools.accumulate(num_rows)]


def _row_seeds_and_positions(windows: list[Window]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[sum(k_i + 1)]`` int64 seeds and output positions of the windows' rows."""
    num_rows = torch.tensor([w.num_rows for w in windows])
    seeds = torch.repeat_interleave(torch.tensor([w.seed for w in windows], dtype=torch.int64), num_rows)
    first = torch.repeat_interleave(torch.tensor([w.num_output_tokens for w in windows], dtype=torch.int64), num_rows)
    offsets = torch.arange(int(num_rows.sum())) - torch.repeat_interleave(num_rows.cumsum(0) - num_rows, num_rows)
    return seeds, first + offsets


def _error_message(window_logits: torch.Tensor) -> str:
    """Why a window's (processed) logits cannot be sampled from."""
    if bool(torch.isnan(window_logits).any()):
        return "the logits for this request are NaN (from the model or a logits processor)"
    if bool(torch.isposinf(window_logits).any()):
        return "the logits for this request hold +inf (from the model or a logits processor)"
    return "no token can be chosen: logits processing (penalties, biases, bans) ruled out every token"


def _rows(starts: list[int], members: list[int], device) -> torch.Tensor:
    """``[sum of the members' rows]`` int64: the rows of the windows ``members`` (ascending), in window order."""
    if starts[-1] == len(starts) - 1:  # one row per window (plain decoding)
        return torch.tensor(members, dtype=torch.int64, device=device)
    num_rows = torch.tensor(starts).diff()
    is_member = torch.zeros(len(num_rows), dtype=torch.bool)
    is_member[members] = True
    return is_member.repeat_interleave(num_rows).nonzero().squeeze(1).to(device)


def _verify_greedy(target_tokens: torch.Tensor, drafts: list[list[int]]) -> list[list[int]]:
    if not any(drafts):  # plain decoding: the target's token is the token
        return [[t] for t in target_tokens.tolist()]
    return kernels.verify_greedy_windows(target_tokens, drafts)


def _rejection_sample(target_probs: torch.Tensor, windows: list[Window]) -> list[list[int]]:
    """Rejection sampling for windows whose drafts carry their distribution; uniforms and noise keyed by (seed,
    output position), from streams of their own."""
    device, dtype, vocab_size = target_probs.device, target_probs.dtype, target_probs.shape[-1]
    seeds, positions = _row_seeds_and_positions(windows)
    is_draft_row = torch.cat([torch.arange(w.num_rows) < len(w.draft_token_ids) for w in windows])
    uniform = uniform_noise(noise_keys(seeds[is_draft_row], positions[is_draft_row], STREAM_ACCEPT).to(device), dtype)
    noise = exponential_noise(noise_keys(seeds, positions, STREAM_TARGET).to(device), vocab_size, dtype)
    flat, cu, max_k = kernels.pack_drafts([w.draft_token_ids for w in windows], device)
    q = torch.cat([w.draft_probs for w in windows]).to(device, dtype)
    return kernels.unpad_rows(kernels.rejection_sample(target_probs, q, flat, cu, uniform, noise, max_k))


def defer(
    logits: torch.Tensor,  # [sum(k_i + 1), vocab_size] the target's window logits
    windows: list[Window],  # the small model's confident tokens as drafts
    rollback_below: float | None,
) -> Verified:
    """Confidence deferral (lossy by design): keep the small model's tokens, except that with ``rollback_below`` the
    first one the target gives less probability than that (after temperature) is replaced, BiLD style; then add
    the target's own token (argmax, or a sample from its processed distribution with keyed noise)."""
    out, starts = [], _row_starts(w.num_rows for w in windows)
    for w, row in zip(windows, starts):
        d = w.draft_token_ids
        window = logits[row: row + len(d) + 1]
        keep = len(d)
        if rollback_below is not None and d:
            temperature = w.params.temperature if w.seed is not None else 1.0
            probs = torch.softmax(window[: len(d)].double() / temperature, dim=-1)
            too_unlikely = (probs[torch.arange(len(d)), torch.tensor(d)] < rollback_below).nonzero()
            keep = int(too_unlikely[0]) if too_unlikely.numel() else len(d)
        if w.seed is None:
            token = int(window[keep].argmax())
        else:
            probs = process_probs_for(window[keep: keep + 1], [w.params])
            key = noise_keys(torch.tensor([w.seed]), torch.tensor([w.num_output_tokens + keep]), STREAM_TARGET)
            token = int(sample_from_probs(probs, exponential_noise(key.to(probs.device), probs.shape[-1], probs.dtype))[0])
        out.append(d[:keep] + [token])
    return Verified(out, [None] * len(windows), row_starts=starts[:-1])
