"""Greedy verification of speculative drafts in a ragged batch.

Terms: request b proposes ``k_b >= 0`` draft tokens, stored flat at ``draft_token_ids[cu[b]:cu[b+1]]``.
Its verify window scores ``k_b + 1`` target positions, stored at rows ``cu[b] + b .. cu[b+1] + b``.
A draft is *accepted* while it equals the target's argmax at its position; the first mismatch ends the window.
The window then emits one target token: the *recovered* token (the target's argmax at the mismatch) or, when
all ``k_b`` drafts were accepted, the *bonus* token (the argmax at the last position).

Math: ``n_b = min{i : i == k_b or draft[cu[b] + i] != target_argmax[cu[b] + b + i]}`` and
``output[b, i] = target_argmax[cu[b] + b + i]`` for ``i <= n_b``, ``-1`` after. (Accepted drafts equal the
target's argmax, so the whole emitted row can be read from the target.)
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some platforms; the reference still works
    triton = None

PLACEHOLDER_TOKEN_ID = -1


if triton is not None:

    @triton.jit
    def _verify_greedy_kernel(
        output_ptr,
        target_argmax_ptr,
        draft_token_ids_ptr,
        cu_num_draft_tokens_ptr,
        output_stride,
        MAX_K: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # One program per request; BLOCK_K >= MAX_K + 1 covers every draft and the emitted target token.
        req = tl.program_id(0)
        draft_start = tl.load(cu_num_draft_tokens_ptr + req)
        # Clamped so that a malformed offset can never write past the row.
        num_drafts = tl.minimum(tl.load(cu_num_draft_tokens_ptr + req + 1) - draft_start, MAX_K)
        offs = tl.arange(0, BLOCK_K)
        target_ids = tl.load(target_argmax_ptr + draft_start + req + offs, mask=offs <= num_drafts, other=-1)
        draft_ids = tl.load(draft_token_ids_ptr + draft_start + offs, mask=offs < num_drafts, other=-1)
        is_rejected = (draft_ids != target_ids) | (offs >= num_drafts)
        num_accepted = tl.min(tl.where(is_rejected, offs, BLOCK_K), axis=0)
        out = tl.where(offs <= num_accepted, target_ids, -1)  # -1: PLACEHOLDER_TOKEN_ID
        tl.store(output_ptr + req * output_stride + offs, out, mask=offs <= MAX_K)


def _check_offsets_shape(draft_token_ids, cu_num_draft_tokens, max_k, op: str) -> int:
    """Checks the ragged draft layout shared by the verify kernels; returns the batch size."""
    if draft_token_ids.dim() != 1 or draft_token_ids.dtype != torch.int64:
        raise ValueError(f"{op}: draft_token_ids must be 1-D int64, got {draft_token_ids.dtype} {tuple(draft_token_ids.shape)}")
    if cu_num_draft_tokens.dim() != 1 or cu_num_draft_tokens.numel() < 1 or cu_num_draft_tokens.dtype != torch.int64:
        raise ValueError(
            f"{op}: cu_num_draft_tokens must be 1-D int64 of length batch + 1, "
            f"got {cu_num_draft_tokens.dtype} {tuple(cu_num_draft_tokens.shape)}"
        )
    if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 0:
        raise ValueError(f"{op}: max_k must be an int >= 0, got {max_k!r}")
    return cu_num_draft_tokens.numel() - 1


def _check_offsets_values(cu_num_draft_tokens, num_drafts_total: int, max_k: int, op: str) -> torch.Tensor:
    """Value checks (they read the offsets, so only the references run them); returns k_b per request."""
    num_draft_tokens = cu_num_draft_tokens.diff()
    if int(cu_num_draft_tokens[0]) != 0 or int(cu_num_draft_tokens[-1]) != num_drafts_total:
        raise ValueError(f"{op}: cu_num_draft_tokens must run from 0 to {num_drafts_total}, got {cu_num_draft_tokens.tolist()}")
    if num_draft_tokens.numel() and int(num_draft_tokens.min()) < 0:
        raise ValueError(f"{op}: cu_num_draft_tokens must be non-decreasing, got {cu_num_draft_tokens.tolist()}")
    if num_draft_tokens.numel() and int(num_draft_tokens.max()) > max_k:
        raise ValueError(f"{op}: a request has {int(num_draft_tokens.max())} drafts, more than max_k={max_k}")
    return num_draft_tokens


def _first_rejection(is_accepted, cu_num_draft_tokens, max_k: int) -> torch.Tensor:
    """[batch] number of accepted drafts: the index of the first rejection, or k_b when none is rejected."""
    # is_accepted: [num_drafts_total] bool
    device = is_accepted.device
    batch = cu_num_draft_tokens.numel() - 1
    num_draft_tokens = cu_num_draft_tokens.diff()
    req = torch.repeat_interleave(torch.arange(batch, device=device), num_draft_tokens)
    pos = torch.arange(is_accepted.numel(), device=device) - cu_num_draft_tokens[req]
    # Column k_b (and every padding column) counts as a rejection, so the minimum below is at most k_b.
    is_rejected = torch.ones(batch, max_k + 1, dtype=torch.bool, device=device)
    is_rejected[req, pos] = ~is_accepted
    col = torch.arange(max_k + 1, device=device)
    return torch.where(is_rejected, col, max_k + 1).amin(dim=1)


def _gather_rows(flat, row_start, row_len, width: int) -> torch.Tensor:
    """[batch, width]: ``flat[row_start[b] + i]`` for ``i < row_len[b]``, PLACEHOLDER_TOKEN_ID elsewhere."""
    col = torch.arange(width, device=flat.device)
    is_valid = col[None, :] < row_len[:, None]
    out = torch.full((row_start.numel(), width), PLACEHOLDER_TOKEN_ID, dtype=flat.dtype, device=flat.device)
    if flat.numel() == 0:
        return out
    idx = torch.where(is_valid, row_start[:, None] + col[None, :], 0)
    return torch.where(is_valid, flat[idx], out)


def _check(target_argmax, draft_token_ids, cu_num_draft_tokens, max_k) -> int:
    batch = _check_offsets_shape(draft_token_ids, cu_num_draft_tokens, max_k, "verify_greedy")
    num_rows = draft_token_ids.numel() + batch
    if target_argmax.dim() != 1 or target_argmax.dtype != torch.int64 or target_argmax.numel() != num_rows:
        raise ValueError(
            f"verify_greedy: target_argmax must be int64 of shape ({num_rows},) = num_drafts_total + batch, "
            f"got {target_argmax.dtype} {tuple(target_argmax.shape)}"
        )
    if len({t.device for t in (target_argmax, draft_token_ids, cu_num_draft_tokens)}) != 1:
        raise ValueError("verify_greedy: all tensors must be on one device")
    return batch


def verify_greedy(
    target_argmax: torch.Tensor,  # [num_drafts_total + batch] int64
    draft_token_ids: torch.Tensor,  # [num_drafts_total] int64
    cu_num_draft_tokens: torch.Tensor,  # [batch + 1] int64
    max_k: int,
) -> torch.Tensor:  # [batch, max_k + 1] int64, padded with -1
    """Triton launcher: one program per request. Offsets are not read on the host (no device sync)."""
    batch = _check(target_argmax, draft_token_ids, cu_num_draft_tokens, max_k)
    if triton is None:
        raise RuntimeError("triton is not installed")
    output = torch.empty(batch, max_k + 1, dtype=torch.int64, device=target_argmax.device)
    if batch == 0:
        return output
    _verify_greedy_kernel[(batch,)](
        output, target_argmax.contiguous(), draft_token_ids.contiguous(), cu_num_draft_tokens.contiguous(),
        output.stride(0),
        MAX_K=max_k, BLOCK_K=triton.next_power_of_2(max_k + 1),
    )
    return output


def verify_greedy_ref(
    target_argmax: torch.Tensor,  # [num_drafts_total + batch] int64
    draft_token_ids: torch.Tensor,  # [num_drafts_total] int64
    cu_num_draft_tokens: torch.Tensor,  # [batch + 1] int64
    max_k: int,
) -> torch.Tensor:  # [batch, max_k + 1] int64, padded with -1
    """Torch reference (and the CPU path)."""
    batch = _check(target_argmax, draft_token_ids, cu_num_draft_tokens, max_k)
    _check_offsets_values(cu_num_draft_tokens, draft_token_ids.numel(), max_k, "verify_greedy")
    device = target_argmax.device
    req = torch.repeat_interleave(torch.arange(batch, device=device), cu_num_draft_tokens.diff())
    # Draft j of request b is checked against the target at row j + b (the window has one extra row per request).
    is_accepted = draft_token_ids == target_argmax[torch.arange(draft_token_ids.numel(), device=device) + req]
    num_accepted = _first_rejection(is_accepted, cu_num_draft_tokens, max_k)
    window_start = cu_num_draft_tokens[:-1] + torch.arange(batch, device=device)
    return _gather_rows(target_argmax, window_start, num_accepted + 1, max_k + 1)


def pack_drafts(drafts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The kernels' draft inputs for per-window lists: flat ids ``[num_drafts_total]`` int64, ``cu_num_draft_tokens``
    ``[batch + 1]`` int64 and ``max_k``."""
    cu = torch.zeros(len(drafts) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor([len(d) for d in drafts]).cumsum(0)
    flat = torch.tensor([t for d in drafts for t in d], dtype=torch.int64)
    return flat.to(device), cu.to(device), max(len(d) for d in drafts)


def unpad_rows(output: torch.Tensor) -> list[list[int]]:
    """Each row of a kernel's ``[batch, max_k + 1]`` output without its PLACEHOLDER_TOKEN_ID padding."""
    return [[t for t in row if t >= 0] for row in output.tolist()]


def verify_greedy_lists(target_argmax: list[int], drafts: list[list[int]]) -> list[list[int]]:
    """``verify_greedy`` on Python lists: each window's emitted tokens (its accepted drafts, then the target's
    token), unpadded. The CPU path: for a step's few hundred ints a walk over the windows costs less than the
    reference's twenty-odd tensor operations."""
    if len(target_argmax) != sum(len(d) for d in drafts) + len(drafts):
        raise ValueError(f"verify_greedy: {len(target_argmax)} target tokens for {len(drafts)} windows of "
                         f"{sum(len(d) for d in drafts)} drafts (want one per draft and one per window)")
    emitted, row = [], 0
    for draft in drafts:
        num_accepted = 0
        for token in draft:
            if token != target_argmax[row + num_accepted]:
                break
            num_accepted += 1
        emitted.append(target_argmax[row: row + num_accepted + 1])
        row += len(draft) + 1
    return emitted

