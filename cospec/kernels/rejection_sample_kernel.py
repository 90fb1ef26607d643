"""Speculative rejection sampling of drafts in a ragged batch (Leviathan et al. 2023; Chen et al. 2023).

Terms: request b proposes ``k_b >= 0`` draft tokens ``d_i``, stored flat at ``draft_token_ids[cu[b]:cu[b+1]]``,
drawn from the proposer's distribution ``q_i``. Its verify window gives the target's distributions ``p_0 .. p_{k_b}``
at rows ``cu[b] + b .. cu[b+1] + b`` of ``target_probs`` (and of ``exp_noise``).

- accepted: draft i is accepted iff ``u_i * q_i(d_i) < p_i(d_i)``, i.e. ``u_i < min(1, p_i(d_i) / q_i(d_i))``
  without a division; drafts are accepted up to the first rejection.
- recovered: at the first rejected position i the window emits a token drawn from ``max(p_i - q_i, 0)``
  (normalisation is implicit), or from ``p_i`` when that residual is all zero.
- bonus: when all ``k_b`` drafts are accepted the window emits a token drawn from ``p_{k_b}``.
- deterministic proposer (``draft_probs is None``): ``q_i`` is one-hot on ``d_i``.

Every emitted token is distributed as the target's own sample would be. Sampling uses the exponential race:
with ``E_v ~ Exp(1)`` i.i.d., ``argmax_v r_v / E_v`` is distributed as ``r / sum(r)``, so a noise row per window
position makes the kernel deterministic and lets the reference reproduce it token for token.
"""

from __future__ import annotations

import torch

from cospec.kernels.verify_greedy_kernel import (
    _check_offsets_shape,
    _check_offsets_values,
    _first_rejection,
    _gather_rows,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some platforms; the reference still works
    triton = None


if triton is not None:

    @triton.jit
    def _race_key(r, noise, COMPUTE_DTYPE: tl.constexpr):
        # r / noise rounded as IEEE (and torch) round it; a plain fp32 `/` in Triton may be approximate on GPU,
        # which would let the kernel and the reference disagree on near-ties.
        if COMPUTE_DTYPE == tl.float32:
            return tl.math.div_rn(r, noise)
        else:
            return r / noise

    @triton.jit
    def _rejection_sample_kernel(
        output_ptr,
        target_probs_ptr,
        draft_probs_ptr,
        draft_token_ids_ptr,
        cu_num_draft_tokens_ptr,
        uniform_ptr,
        exp_noise_ptr,
        output_stride,
        target_stride,
        draft_stride,
        noise_stride,
        vocab_size,
        MAX_K: tl.constexpr,
        HAS_DRAFT_PROBS: tl.constexpr,
        COMPUTE_DTYPE: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        # One program per request; BLOCK_K >= MAX_K + 1 covers every draft and the emitted target token.
        req = tl.program_id(0)
        draft_start = tl.load(cu_num_draft_tokens_ptr + req)
        num_drafts = tl.minimum(tl.load(cu_num_draft_tokens_ptr + req + 1) - draft_start, MAX_K)
        target_start = draft_start + req

        # Accept/reject all drafts at once; the first rejection (or k_b) ends the window.
        offs_k = tl.arange(0, BLOCK_K)
        is_draft = offs_k < num_drafts
        draft_ids = tl.load(draft_token_ids_ptr + draft_start + offs_k, mask=is_draft, other=0)
        p_draft = tl.load(target_probs_ptr + (target_start + offs_k) * target_stride + draft_ids, mask=is_draft, other=0)
        if HAS_DRAFT_PROBS:
            q_draft = tl.load(draft_probs_ptr + (draft_start + offs_k) * draft_stride + draft_ids, mask=is_draft, other=0)
            q_draft = q_draft.to(COMPUTE_DTYPE)
        else:
            q_draft = tl.full([BLOCK_K], 1.0, COMPUTE_DTYPE)
        u = tl.load(uniform_ptr + draft_start + offs_k, mask=is_draft, other=1).to(COMPUTE_DTYPE)
        is_accepted = (u * q_draft < p_draft.to(COMPUTE_DTYPE)) & is_draft
        num_accepted = tl.min(tl.where(is_accepted, BLOCK_K, offs_k), axis=0)

        # Recovered or bonus token at window position num_accepted: exponential race over the vocabulary, run
        # on the residual max(p - q, 0) and on p side by side (p wins only when the residual is all zero).
        # A bonus position has no draft, so its q is zero and the residual is p itself.
        row = target_start + num_accepted
        is_recovered = num_accepted < num_drafts
        draft_row = draft_start + num_accepted
        draft_id = tl.load(draft_token_ids_ptr + draft_row, mask=is_recovered, other=-1)
        # q's row is read as empty at a bonus position. (A vector mask, not `in_vocab & scalar_bool`: the Triton
        # interpreter broadcasts a scalar comparison as an integer array and rejects the combined mask.)
        q_len = tl.where(is_recovered, vocab_size, 0)
        best_residual = tl.full([], -1.0, COMPUTE_DTYPE)
        best_residual_id = tl.full([], 0, tl.int32)
        best_p = tl.full([], -1.0, COMPUTE_DTYPE)
        best_p_id = tl.full([], 0, tl.int32)
        max_residual = tl.full([], 0.0, COMPUTE_DTYPE)
        for start in range(0, vocab_size, BLOCK_V):
            offs_v = start + tl.arange(0, BLOCK_V)
            in_vocab = offs_v < vocab_size
            p = tl.load(target_probs_ptr + row * target_stride + offs_v, mask=in_vocab, other=0).to(COMPUTE_DTYPE)
            noise = tl.load(exp_noise_ptr + row * noise_stride + offs_v, mask=in_vocab, other=1).to(COMPUTE_DTYPE)
            if HAS_DRAFT_PROBS:
                q = tl.load(draft_probs_ptr + draft_row * draft_stride + offs_v, mask=offs_v < q_len, other=0)
                q = q.to(COMPUTE_DTYPE)
            else:
                q = tl.where(offs_v == draft_id, 1.0, 0.0).to(COMPUTE_DTYPE)
            residual = tl.maximum(p - q, 0.0)
            max_residual = tl.maximum(max_residual, tl.max(residual, axis=0))
            # Ties keep the lowest id (strict > across chunks, tie_break_left within), as torch.argmax does.
            key = tl.where(in_vocab, _race_key(residual, noise, COMPUTE_DTYPE), -1.0)
            race, race_id = tl.max(key, axis=0, return_indices=True)
            best_residual_id = tl.where(race > best_residual, start + race_id, best_residual_id)
            best_residual = tl.maximum(best_residual, race)
            key = tl.where(in_vocab, _race_key(p, noise, COMPUTE_DTYPE), -1.0)
            race, race_id = tl.max(key, axis=0, return_indices=True)
            best_p_id = tl.where(race > best_p, start + race_id, best_p_id)
            best_p = tl.maximum(best_p, race)
        token_id = tl.where(max_residual > 0, best_residual_id, best_p_id).to(tl.int64)

        out = tl.where(offs_k < num_accepted, draft_ids, -1)  # -1: PLACEHOLDER_TOKEN_ID
        out = tl.where(offs_k == num_accepted, token_id, out)
        tl.store(output_ptr + req * output_stride + offs_k, out, mask=offs_k <= MAX_K)


def _check(target_probs, draft_probs, draft_token_ids, cu_num_draft_tokens, uniform, exp_noise, max_k) -> int:
    op = "rejection_sample"
    batch = _check_offsets_shape(draft_token_ids, cu_num_draft_tokens, max_k, op)
    num_drafts_total = draft_token_ids.numel()
    if target_probs.dim() != 2 or not target_probs.is_floating_point() or target_probs.shape[0] != num_drafts_total + batch:
        raise ValueError(
            f"{op}: target_probs must be float [num_drafts_total + batch = {num_drafts_total + batch}, vocab], "
            f"got {target_probs.dtype} {tuple(target_probs.shape)}"
        )
    vocab_size = target_probs.shape[1]
    if draft_probs is not None and (
        draft_probs.shape != (num_drafts_total, vocab_size) or not draft_probs.is_floating_point()
    ):
        raise ValueError(
            f"{op}: draft_probs must be None or float [{num_drafts_total}, {vocab_size}], "
            f"got {draft_probs.dtype} {tuple(draft_probs.shape)}"
        )
    if uniform.shape != (num_drafts_total,) or not uniform.is_floating_point():
        raise ValueError(f"{op}: uniform must be float of shape ({num_drafts_total},), got {uniform.dtype} {tuple(uniform.shape)}")
    if exp_noise.shape != target_probs.shape or not exp_noise.is_floating_point():
        raise ValueError(
            f"{op}: exp_noise must be float of target_probs' shape {tuple(target_probs.shape)}, "
            f"got {exp_noise.dtype} {tuple(exp_noise.shape)}"
        )
    tensors = [target_probs, draft_token_ids, cu_num_draft_tokens, uniform, exp_noise]
    if draft_probs is not None:
        tensors.append(draft_probs)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"{op}: all tensors must be on one device")
    return batch


def _compute_dtype(target_probs: torch.Tensor) -> torch.dtype:
    # Half-precision probabilities are compared and raced in float32; float64 stays float64.
    return torch.float64 if target_probs.dtype == torch.float64 else torch.float32


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rejection_sample(
    target_probs: torch.Tensor,  # [num_drafts_total + batch, vocab_size]
    draft_probs: torch.Tensor | None,  # [num_drafts_total, vocab_size], None for a deterministic proposer
    draft_token_ids: torch.Tensor,  # [num_drafts_total] int64
    cu_num_draft_tokens: torch.Tensor,  # [batch + 1] int64
    uniform: torch.Tensor,  # [num_drafts_total] in [0, 1)
    exp_noise: torch.Tensor,  # [num_drafts_total + batch, vocab_size] ~ Exp(1), > 0
    max_k: int,
) -> torch.Tensor:  # [batch, max_k + 1] int64, padded with -1
    """Triton launcher: one program per request. Offsets are not read on the host (no device sync)."""
    batch = _check(target_probs, draft_probs, draft_token_ids, cu_num_draft_tokens, uniform, exp_noise, max_k)
    if triton is None:
        raise RuntimeError("triton is not installed")
    output = torch.empty(batch, max_k + 1, dtype=torch.int64, device=target_probs.device)
    if batch == 0:
        return output
    target_probs, exp_noise = _rows_contiguous(target_probs), _rows_contiguous(exp_noise)
    has_draft_probs = draft_probs is not None
    # Without draft probabilities the pointer is never read; any tensor on the device will do.
    draft_probs = _rows_contiguous(draft_probs) if has_draft_probs else target_probs
    vocab_size = target_probs.shape[1]
    _rejection_sample_kernel[(batch,)](
        output, target_probs, draft_probs, draft_token_ids.contiguous(), cu_num_draft_tokens.contiguous(),
        uniform.contiguous(), exp_noise,
        output.stride(0), target_probs.stride(0), draft_probs.stride(0) if has_draft_probs else 0, exp_noise.stride(0),
        vocab_size,
        MAX_K=max_k,
        HAS_DRAFT_PROBS=has_draft_probs,
        COMPUTE_DTYPE=tl.float64 if _compute_dtype(target_probs) == torch.float64 else tl.float32,
        BLOCK_K=triton.next_power_of_2(max_k + 1),
        BLOCK_V=min(1024, triton.next_power_of_2(vocab_size)),
    )
    return output


def rejection_sample_ref(
    target_probs: torch.Tensor,  # [num_drafts_total + batch, vocab_size]
    draft_probs: torch.Tensor | None,  # [num_drafts_total, vocab_size], None for a deterministic proposer
    draft_token_ids: torch.Tensor,  # [num_drafts_total] int64
    cu_num_draft_tokens: torch.Tensor,  # [batch + 1] int64
    uniform: torch.Tensor,  # [num_drafts_total] in [0, 1)
    exp_noise: torch.Tensor,  # [num_drafts_total + batch, vocab_size] ~ Exp(1), > 0
    max_k: int,
) -> torch.Tensor:  # [batch, max_k + 1] int64, padded with -1
    """Torch reference (and the CPU path)."""
    batch = _check(target_probs, draft_probs, draft_token_ids, cu_num_draft_tokens, uniform, exp_noise, max_k)
    num_draft_tokens = _check_offsets_values(cu_num_draft_tokens, draft_token_ids.numel(), max_k, "rejection_sample")
    device, dtype = target_probs.device, _compute_dtype(target_probs)
    num_drafts_total = draft_token_ids.numel()
    arange_batch = torch.arange(batch, device=device)

    # Draft j of request b is scored by the target at row j + b.
    draft_index = torch.arange(num_drafts_total, device=device)
    target_row = draft_index + torch.repeat_interleave(arange_batch, num_draft_tokens)
    p_draft = target_probs[target_row, draft_token_ids].to(dtype)
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs[draft_index, draft_token_ids].to(dtype)
    is_accepted = uniform.to(dtype) * q_draft < p_draft
    num_accepted = _first_rejection(is_accepted, cu_num_draft_tokens, max_k)  # [batch]

    # The emitted target token sits at window position num_accepted; its q is zero at a bonus position.
    row = cu_num_draft_tokens[:-1] + arange_batch + num_accepted
    is_bonus = num_accepted == num_draft_tokens
    draft_row = (cu_num_draft_tokens[:-1] + num_accepted).clamp(max=max(num_drafts_total - 1, 0))
    p = target_probs[row].to(dtype)  # [batch, vocab_size]
    q = torch.zeros_like(p)
    if num_drafts_total > 0:
        if draft_probs is None:
            q.scatter_(1, draft_token_ids[draft_row][:, None], 1.0)
        else:
            q.copy_(draft_probs[draft_row])
        q[is_bonus] = 0.0
    residual = (p - q).clamp_min(0.0)
    r = torch.where((residual > 0).any(dim=1, keepdim=True), residual, p)
    token_id = (r / exp_noise[row].to(dtype)).argmax(dim=1)  # exponential race

    output = _gather_rows(draft_token_ids, cu_num_draft_tokens[:-1], num_accepted, max_k + 1)
    output.scatter_(1, num_accepted[:, None], token_id[:, None])
    return output
