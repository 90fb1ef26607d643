"""Turning next-token logits into tokens: greedy, temperature, top-k, top-p, min-p, with keyed randomness.

Terms:
- warped logits: logits after temperature, top-k, top-p and min-p, computed exactly as Hugging Face's warpers do
  (in that order, ``-inf`` for removed tokens); what ``generate(output_scores=True)`` reports for sampled tokens.
- processed probabilities: the softmax of the warped logits. Speculative verification applies the same processing
  to target and draft.
- noise key: a 64-bit number per sampled row, a pure function of (the request's seed, the output position the row
  samples, a stream id). The row's noise is a pure function of its key (kernel ``keyed_exponential``), so a request's
  random numbers at output position ``j`` never depend on the batch, on arrival order, or on how many draws came
  before: a seed reproduces a request whatever else happens.
- streams: ``STREAM_TARGET`` is the noise of the token emitted at a position (also used by a draft that is coupled to
  the target, see ``verification``); ``STREAM_DRAFT`` samples drafts for rejection sampling; ``STREAM_ACCEPT`` gives
  rejection sampling's acceptance uniforms. Distinct streams are independent.
- exponential race: ``argmax_v p_v / E_v`` with ``E_v ~ Exp(1)`` i.i.d. is an exact sample from ``p``.
"""

from __future__ import annotations

import torch

from cospec import kernels

STREAM_TARGET, STREAM_DRAFT, STREAM_ACCEPT = 0, 1, 2

# Below this temperature, logits / T can overflow float32 (or T itself underflows it).
_TINY_TEMPERATURE = 1e-20


def warp_logits(
    logits: torch.Tensor,  # [num_rows, vocab_size]
    temperature: torch.Tensor,  # [num_rows] float64 > 0
    top_k: torch.Tensor,  # [num_rows] int64, 0 = off
    top_p: torch.Tensor,  # [num_rows] float64 in (0, 1]
    min_p: torch.Tensor,  # [num_rows] float64 in [0, 1]
) -> torch.Tensor:  # [num_rows, vocab_size] warped logits, -inf for removed tokens
    """Hugging Face's TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper and MinPLogitsWarper per row."""
    scaled = logits / temperature[:, None].to(logits.dtype)
    # A temperature so small that logits / T overflows (or T underflows the dtype): divide the logits minus their
    # maximum, in float64, instead; same softmax, and finite where it matters (0 at the top).
    tiny = (temperature < _TINY_TEMPERATURE).nonzero().squeeze(1)
    if tiny.numel():
        top = logits[tiny].double()
        top = (top - top.amax(dim=-1, keepdim=True)) / temperature[tiny, None]
        scaled[tiny] = top.to(scaled.dtype)
    logits = scaled
    vocab_size = logits.shape[-1]
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
        kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # [num_rows, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1.0 - top_p)[:, None].to(cumulative.dtype)
        drop_sorted[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    if bool((min_p > 0.0).any()):
        probs = logits.softmax(dim=-1)
        drop = probs < min_p[:, None].to(probs.dtype) * probs.amax(dim=-1, keepdim=True)
        drop.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def process_probs(logits, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """Processed probabilities ``[num_rows, vocab_size]``: the softmax of ``warp_logits`` (same arguments)."""
    return warp_logits(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)


def sampling_dtype(logits: torch.Tensor) -> torch.dtype:
    """Probabilities are computed in float64 for float64 models (exact tests), in float32 otherwise."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _columns(settings: list, repeats: list[int] | None, device) -> tuple[torch.Tensor, ...]:
    """(temperature, top_k, top_p, min_p) per row from per-group settings objects; float64 parameters: a float32
    0.8 would shift a float64 model's temperature."""

    def column(name: str, dtype: torch.dtype) -> torch.Tensor:
        values = torch.tensor([getattr(s, name) for s in settings], dtype=dtype)
        if repeats is not None:
            values = torch.repeat_interleave(values, torch.tensor(repeats))
        return values.to(device)

    return (column("temperature", torch.float64), column("top_k", torch.int64), column("top_p", torch.float64),
            column("min_p", torch.float64))


def warp_logits_for(
    logits: torch.Tensor,  # [num_rows, vocab_size]
    settings: list,  # per group of rows: an object with temperature, top_k, top_p and min_p
    repeats: list[int] | None = None,  # rows per group (default: one row each)
) -> torch.Tensor:  # [num_rows, vocab_size] in sampling_dtype(logits)
    """``warp_logits`` with each row's parameters taken from its settings object."""
    return warp_logits(logits.to(sampling_dtype(logits)), *_columns(settings, repeats, logits.device))


def process_probs_for(logits: torch.Tensor, settings: list, repeats: list[int] | None = None) -> torch.Tensor:
    """``process_probs`` with each row's parameters taken from its settings object."""
    return warp_logits_for(logits, settings, repeats).softmax(dim=-1)


# ---- keyed randomness ----------------------------------------------------------------------------------------


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 bit patterns (multiplication wraps modulo 2^64)."""
    x = x + _as_int64(0x9E3779B97F4A7C15)
    x = (x ^ _shift_right(x, 30)) * _as_int64(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _as_int64(0x94D049BB133111EB)
    return x ^ _shift_right(x, 31)


def noise_keys(
    seeds: torch.Tensor,  # [num_rows] int64 in [0, 2**63)
    positions: torch.Tensor,  # [num_rows] int64: the output position each row samples (0 = first new token)
    stream: int,
) -> torch.Tensor:  # [num_rows] int64
    """One noise key per row: a hash of (seed, position, stream)."""
    return _splitmix64(_splitmix64(_splitmix64(seeds) ^ positions) ^ stream)


def exponential_noise(keys: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``[len(keys), vocab_size]`` Exp(1) noise, a pure function of each row's key."""
    return kernels.keyed_exponential(keys, vocab_size, dtype)


def uniform_noise(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[len(keys)]`` uniforms in (0, 1), a pure function of each key (``exp(-E)`` of the key's first variate)."""
    return kernels.keyed_exponential(keys, 1, dtype)[:, 0].neg().exp()


def sample_from_probs(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Exponential race: an exact sample from each row of ``probs`` given its ``noise`` row. ``[num_rows]`` int64."""
    return kernels.row_argmax(probs / noise)


def derive_seed(seed: int, index: int) -> int:
    """A seed for sample ``index`` of a request seeded ``seed`` (n > 1): a stable hash, in [0, 2**63)."""
    key = _splitmix64(torch.tensor([seed], dtype=torch.int64) ^ _splitmix64(torch.tensor([index], dtype=torch.int64)))
    return int(key) & ((1 << 63) - 1)


def sample_draft_tokens(
    logits: torch.Tensor,  # [num_rows, vocab_size] a draft model's next-token logits, one row per request
    requests: list,  # DraftRequest per row
    drafted: list[list[int]],  # the drafts each request already has: this row drafts the next one
) -> tuple[list[int], torch.Tensor | None]:
    """The next draft token of each request, processed like the target position that will verify it: greedy rows
    take the argmax; sampled rows race with noise keyed by (seed, output position), from the target's stream when
    the request is coupled (so the draft picks what the target will pick wherever their distributions agree), from
    the draft stream otherwise. Also ``[num_rows, vocab_size]`` probabilities for rows that rejection sampling will
    judge (zeros in the other rows), or None when no row needs them."""
    from dataclasses import replace

    from cospec.decoding.logits_processing import process_logits

    contexts = [None if r.context is None else replace(r.context, extra_token_ids=d) for r, d in zip(requests, drafted)]
    logits = process_logits(logits, contexts)
    tokens = kernels.row_argmax(logits)
    sampled = [i for i, r in enumerate(requests) if r.seed is not None]
    if not sampled:
        return tokens.tolist(), None
    rows = torch.tensor(sampled, device=logits.device)
    sub = [requests[i] for i in sampled]
    probs = process_probs_for(logits[rows], [r.params for r in sub])
    seeds = torch.tensor([r.seed for r in sub], dtype=torch.int64)
    positions = torch.tensor([r.num_output_tokens + len(drafted[i]) for i, r in zip(sampled, sub)], dtype=torch.int64)
    coupled = torch.tensor([r.coupled for r in sub])
    keys = torch.where(coupled, noise_keys(seeds, positions, STREAM_TARGET), noise_keys(seeds, positions, STREAM_DRAFT))
    tokens[rows] = sample_from_probs(probs, exponential_noise(keys.to(logits.device), logits.shape[-1], probs.dtype))
    if bool(coupled.all()):
        return tokens.tolist(), None
    all_probs = torch.zeros(len(requests), logits.shape[-1], dtype=probs.dtype, device=logits.device)
    all_probs[rows] = probs
    return tokens.tolist(), all_probs
