"""Kernels: one file per op, each with a Triton kernel, a checking launcher and a pure-torch reference.

This module is the single device seam of cospec: the public functions below run the Triton kernel on CUDA
tensors (when Triton is importable) and the torch reference everywhere else. Set ``COSPEC_DISABLE_TRITON=1``
to force the references on a GPU as well (useful when bisecting a numerical difference).
"""

from __future__ import annotations

import importlib.util
import os

import torch

# Imported here, not per call: the dispatch functions run once per layer and step.
from cospec.kernels import (fuse_sample_kernel, keyed_noise_kernel, paged_attention_kernel, rejection_sample_kernel,
                            row_max_cpu, store_kv_kernel, verify_greedy_kernel)
from cospec.kernels.paged_attention_ref import GatherLayout
from cospec.kernels.verify_greedy_kernel import pack_drafts, unpad_rows

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_on(device_type: str) -> bool:
    return device_type == "cuda" and HAS_TRITON and os.environ.get("COSPEC_DISABLE_TRITON", "0") != "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """True when ``tensor``'s op should run as a Triton kernel rather than its torch reference."""
    return tensor.is_cuda and _triton_on("cuda")


def backend_name(device: torch.device | str = "cuda") -> str:
    """Which implementation kernels take on ``device``: 'triton' or 'torch-reference'."""
    return "triton" if _triton_on(torch.device(device).type) else "torch-reference"


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64
    has_padding: bool | None = None,
    checked: bool = False,
) -> None:
    """Write each token's key and value into its cache slot (in place); a negative slot is a padding token, not
    stored. ``has_padding=False`` when the caller knows there is none (the reference then skips looking);
    ``checked=True`` when the caller passed tensors of the same shapes, dtypes and devices before (another layer of
    the step: the reference skips its checks)."""
    if use_triton(key):
        store_kv_kernel.store_kv(key, value, k_cache, v_cache, slot_mapping)
    else:
        store_kv_kernel.store_kv_ref(key, value, k_cache, v_cache, slot_mapping, has_padding, checked)


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], packed by sequence
    k_pool: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, cached tokens after this step's tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    block_size: int,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    max_kv_len: int | None = None,
    layout: GatherLayout | None = None,
    checked: bool = False,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new queries over its cached keys, read through its block table (sliding
    window and soft-capping optional, GQA). The Triton kernel reads the pages in place (float16/bfloat16/float32);
    the reference gathers them, reusing ``layout`` (this batch's gather indices) when the caller keeps one.
    ``checked=True``: the caller passed inputs of the same shapes, dtypes, devices and variant with this layout
    before (another layer of the step: the reference skips its checks)."""
    args = (query, k_pool, v_pool, block_tables, seq_lens, query_start_loc, block_size, scale, sliding_window, softcap)
    if use_triton(query) and query.dtype in paged_attention_kernel.KERNEL_DTYPES:
        return paged_attention_kernel.paged_attention(*args, max_kv_len=max_kv_len)
    return paged_attention_kernel.paged_attention_ref(*args, layout=layout, checked=checked)


def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # ([num_rows], [num_rows] int64)
    """Each row's maximum and the lowest index holding it (``torch.max(x, dim=-1)``; NaN counts as the maximum).
    On the CPU in two passes over chunks (torch's index reductions do not vectorize there); elsewhere torch's."""
    if x.device.type == "cpu":
        return row_max_cpu.row_max_chunked(x)
    return row_max_cpu.row_max_ref(x)


def row_argmax(x: torch.Tensor) -> torch.Tensor:  # [num_rows] int64
    """``x.argmax(dim=-1)`` for a 2-D ``x`` (see ``row_max``)."""
    return row_max(x)[1]


def verify_greedy(
    target_argmax: torch.Tensor,  # [num_drafts_total + batch] int64
    draft_token_ids: torch.Tensor,  # [num_drafts_total] int64
    cu_num_draft_tokens: torch.Tensor,  # [batch + 1] int64
    max_k: int,
) -> torch.Tensor:  # [batch, max_k + 1] int64, padded with -1
    """Accept drafts while they equal the target's argmax, then emit the target's token (recovered or bonus)."""
    if use_triton(target_argmax):
        return verify_greedy_kernel.verify_greedy(target_argmax, draft_token_ids, cu_num_draft_tokens, max_k)
    return verify_greedy_kernel.verify_greedy_ref(target_argmax, draft_token_ids, cu_num_draft_tokens, max_k)


def verify_greedy_windows(
    target_argmax: torch.Tensor,  # [num_drafts_total + batch] int64
    drafts: list[list[int]],  # per window, its drafts
) -> list[list[int]]:  # per window: the accepted drafts, then the target's token
    """``verify_greedy`` for drafts given as lists, each window's tokens returned as a list: the kernel on CUDA,
    a walk over the windows in Python elsewhere (cheaper there than the reference's tensor operations)."""
    if use_triton(target_argmax):
        return unpad_rows(verify_greedy_kernel.verify_greedy(target_argmax, *pack_drafts(drafts, target_argmax.device)))
    return verify_greedy_kernel.verify_greedy_lists(target_argmax.tolist(), drafts)


def rejection_sample(
    target_probs: torch.Tensor,  # [num_drafts_total + batch, vocab_size]
    draft_probs: torch.Tensor | None,  # [num_drafts_total, vocab_size], None for a deterministic proposer
    draft_token_ids: torch.Tensor,  # [num_drafts_total] int64
    cu_num_draft_tokens: torch.Tensor,  # [batch + 1] int64
    uniform: torch.Tensor,  # [num_drafts_total] in [0, 1)
    exp_noise: torch.Tensor,  # [num_drafts_total + batch, vocab_size] ~ Exp(1)
    max_k: int,
) -> torch.Tensor:  # [batch, max_k + 1] int64, padded with -1
    """Speculative rejection sampling: accepted drafts, then a recovered or bonus token distributed as the target's."""
    args = (target_probs, draft_probs, draft_token_ids, cu_num_draft_tokens, uniform, exp_noise, max_k)
    if use_triton(target_probs):
        return rejection_sample_kernel.rejection_sample(*args)
    return rejection_sample_kernel.rejection_sample_ref(*args)


def fuse_sample(
    member_logits: torch.Tensor,  # [num_members, num_rows, vocab_size]
    weights: torch.Tensor,  # [num_rows, num_members] log-linear or mixture weights
    temperature: torch.Tensor,  # [num_rows] >= 0, 0 = greedy
    exp_noise: torch.Tensor,  # [num_rows, vocab_size] ~ Exp(1)
    plausibility_alpha: torch.Tensor | None = None,  # [num_rows] threshold on member 0, 0 = off
    is_mixture: torch.Tensor | None = None,  # [num_rows] bool
    min_p: torch.Tensor | None = None,  # [num_rows], 0 = off
) -> torch.Tensor:  # [num_rows] int64
    """Fuse the members' logits per row (log-linear, contrastive or mixture) and sample one token: temperature
    and min-p in the kernel; rows that need top-k or top-p go through fusion.fuse_logits + process_probs."""
    args = (member_logits, weights, temperature, exp_noise, plausibility_alpha, is_mixture, min_p)
    if use_triton(member_logits):
        return fuse_sample_kernel.fuse_sample(*args)
    return fuse_sample_kernel.fuse_sample_ref(*args)


def keyed_exponential(
    keys: torch.Tensor,  # [num_rows] int64: one noise key per row (cospec.decoding.sampling.noise_keys)
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [num_rows, vocab_size] ~ Exp(1), a pure function of (key, token id)
    """Counter-based Exp(1) noise: the same key gives the same noise on every device, in every batch."""
    if use_triton(keys):
        return keyed_noise_kernel.keyed_exponential(keys, vocab_size, dtype)
    return keyed_noise_kernel.keyed_exponential_ref(keys, vocab_size, dtype)
