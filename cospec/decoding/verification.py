"""Verification of verify windows: which drafts the target keeps, and the token it adds.

Each sequence's window is ``[last token, d_1 .. d_k]`` (k may be 0: plain decoding is a window without drafts);
the target's logits at its ``k + 1`` positions decide. Greedy rows keep the longest prefix of drafts equal to the
target's argmax, then add the target's argmax (kernel ``verify_greedy``). Sampled rows run exact rejection
sampling against the processed target distribution (kernel ``rejection_sample``), so their output follows the
target's distribution whatever the drafts were. Randomness comes from each sequence's own generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cospec import kernels
from cospec.decoding.sampling import exponential_noise, process_probs_for, sample_from_probs


@dataclass(slots=True)
class WindowParams:
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    generator: torch.Generator | None  # None: greedy


def verify(
    logits: torch.Tensor,  # [sum(k_i + 1), vocab_size] window logits, sequence by sequence
    drafts: list[list[int]],  # k_i draft tokens per sequence
    draft_probs: list[torch.Tensor | None],  # [k_i, vocab_size] per sequence, or None (deterministic proposer)
    params: list[WindowParams],
) -> list[list[int]]:
    """Tokens each sequence emits this step: its accepted drafts, then one target token."""
    num_rows = [len(d) + 1 for d in drafts]
    starts = [0]
    for n in num_rows:
        starts.append(starts[-1] + n)
    out: list[list[int] | None] = [None] * len(drafts)
    greedy = [i for i, p in enumerate(params) if p.generator is None]
    sampled = [i for i, p in enumerate(params) if p.generator is not None]
    if greedy:
        rows = _rows(starts, greedy, logits.device)
        tokens = _verify_greedy(logits[rows].argmax(dim=-1), [drafts[i] for i in greedy])
        for i, t in zip(greedy, tokens):
            out[i] = t
    if sampled:
        rows = _rows(starts, sampled, logits.device)
        tokens = _verify_sampled(logits[rows], [drafts[i] for i in sampled], [draft_probs[i] for i in sampled],
                                 [params[i] for i in sampled])
        for i, t in zip(sampled, tokens):
            out[i] = t
    return out  # type: ignore[return-value]


def _rows(starts: list[int], members: list[int], device) -> torch.Tensor:
    return torch.cat([torch.arange(starts[i], starts[i + 1]) for i in members]).to(device)


def _offsets(drafts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, int]:
    cu = torch.zeros(len(drafts) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor([len(d) for d in drafts]).cumsum(0)
    flat = torch.tensor([t for d in drafts for t in d], dtype=torch.int64)
    return flat.to(device), cu.to(device), max(len(d) for d in drafts)


def _unpad(output: torch.Tensor) -> list[list[int]]:
    return [[t for t in row if t >= 0] for row in output.tolist()]


def _verify_greedy(target_argmax: torch.Tensor, drafts: list[list[int]]) -> list[list[int]]:
    if all(len(d) == 0 for d in drafts):  # plain decoding: the argmax is the token
        return [[t] for t in target_argmax.tolist()]
    flat, cu, max_k = _offsets(drafts, target_argmax.device)
    return _unpad(kernels.verify_greedy(target_argmax, flat, cu, max_k))


def _verify_sampled(logits, drafts, draft_probs, params) -> list[list[int]]:
    device, vocab_size = logits.device, logits.shape[-1]
    target_probs = process_probs_for(logits, params, repeats=[len(d) + 1 for d in drafts])
    dtype = target_probs.dtype
    # Each sequence draws its acceptance uniforms, then one noise row per window position, from its own generator.
    uniforms, noises = [], []
    for d, p in zip(drafts, params):
        uniforms.append(torch.rand(len(d), generator=p.generator, dtype=dtype))
        noises.append(torch.empty(len(d) + 1, vocab_size, dtype=dtype).exponential_(generator=p.generator))
    flat, cu, max_k = _offsets(drafts, device)
    has_probs = [q is not None for q, d in zip(draft_probs, drafts) if d]
    if any(has_probs) and not all(has_probs):
        raise ValueError("a batch mixes drafts with and without probabilities")
    q = torch.cat([q for q, d in zip(draft_probs, drafts) if d]).to(device, dtype) if any(has_probs) else None
    output = kernels.rejection_sample(target_probs, q, flat, cu, torch.cat(uniforms).to(device),
                                      torch.cat(noises).to(device), max_k)
    return _unpad(output)


def defer(
    logits: torch.Tensor,  # [sum(k_i + 1), vocab_size] the target's window logits
    drafts: list[list[int]],  # the small model's confident tokens per sequence
    params: list[WindowParams],
    rollback_below: float | None,
) -> list[list[int]]:
    """Confidence deferral (lossy by design): keep the small model's tokens, except that with ``rollback_below`` the
    first one the target gives less probability than that (after temperature) is replaced, BiLD style; then add
    the target's own token (argmax, or a sample from its processed distribution)."""
    out, row = [], 0
    for d, p in zip(drafts, params):
        window = logits[row: row + len(d) + 1]
        row += len(d) + 1
        keep = len(d)
        if rollback_below is not None and d:
            temperature = p.temperature if p.generator is not None else 1.0
            probs = torch.softmax(window[: len(d)].double() / temperature, dim=-1)
            too_unlikely = (probs[torch.arange(len(d)), torch.tensor(d)] < rollback_below).nonzero()
            keep = int(too_unlikely[0]) if too_unlikely.numel() else len(d)
        if p.generator is None:
            token = int(window[keep].argmax())
        else:
            probs = process_probs_for(window[keep: keep + 1], [p])
            noise = exponential_noise(window.shape[-1], [p.generator], probs.dtype, probs.device)
            token = int(sample_from_probs(probs, noise)[0])
        out.append(d[:keep] + [token])
    return out
