"""Turning next-token logits into tokens: greedy, temperature, top-k, top-p, min-p.

Terms:
- processed probabilities: softmax(logits / temperature) restricted to the top-k tokens, then to the smallest set
  whose mass reaches top-p, then to tokens with at least ``min_p * max_prob`` (the order Hugging Face applies its
  warpers in), renormalized. Speculative verification applies the same processing to target and draft.
- exponential race: ``argmax_v p_v / E_v`` with ``E_v ~ Exp(1)`` i.i.d. is an exact sample from ``p``; drawing ``E``
  from each request's own generator makes a request's samples independent of the batch it runs in.
"""

from __future__ import annotations

import torch


def process_probs(
    logits: torch.Tensor,  # [num_rows, vocab_size]
    temperature: torch.Tensor,  # [num_rows] > 0
    top_k: torch.Tensor,  # [num_rows] int64, 0 = off
    top_p: torch.Tensor,  # [num_rows] in (0, 1]
    min_p: torch.Tensor,  # [num_rows] in [0, 1]
) -> torch.Tensor:  # [num_rows, vocab_size] probabilities
    logits = logits / temperature[:, None].to(logits.dtype)
    vocab_size = logits.shape[-1]
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
        kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # [num_rows, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if bool((top_p < 1.0).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before > top_p[:, None].to(probs.dtype)  # keeps at least the most likely token
        probs = probs.masked_fill(drop_sorted.scatter(1, order, drop_sorted), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if bool((min_p > 0.0).any()):
        threshold = min_p[:, None].to(probs.dtype) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sampling_dtype(logits: torch.Tensor) -> torch.dtype:
    """Probabilities are computed in float64 for float64 models (exact tests), in float32 otherwise."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def process_probs_for(
    logits: torch.Tensor,  # [num_rows, vocab_size]
    settings: list,  # per group of rows: an object with temperature, top_k, top_p and min_p
    repeats: list[int] | None = None,  # rows per group (default: one row each)
) -> torch.Tensor:  # [num_rows, vocab_size] probabilities, in sampling_dtype(logits)
    """``process_probs`` with each row's parameters taken from its settings object."""

    def column(name: str, dtype: torch.dtype) -> torch.Tensor:
        # float64 parameters: a float32 0.8 would shift a float64 model's temperature
        values = torch.tensor([getattr(s, name) for s in settings], dtype=dtype)
        if repeats is not None:
            values = torch.repeat_interleave(values, torch.tensor(repeats))
        return values.to(logits.device)

    return process_probs(logits.to(sampling_dtype(logits)), column("temperature", torch.float64),
                         column("top_k", torch.int64), column("top_p", torch.float64), column("min_p", torch.float64))


def exponential_noise(vocab_size: int, generators: list[torch.Generator], dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """One row of Exp(1) noise per generator: ``[len(generators), vocab_size]``, each drawn from its own generator."""
    noise = torch.empty(len(generators), vocab_size, dtype=dtype)
    for row, generator in zip(noise, generators):
        row.exponential_(generator=generator)
    return noise.to(device)


def sample_from_probs(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Exponential race: an exact sample from each row of ``probs`` given its ``noise`` row. ``[num_rows]`` int64."""
    return (probs / noise).argmax(dim=-1)
