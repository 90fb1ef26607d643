"""Attention of a ragged batch of query windows, reading keys and values in place from the paged KV pool.

Math, per sequence ``s`` with ``q_len`` new tokens (packed at ``query_start_loc[s]..``) and ``seq_len`` cached
tokens after this step (its window included), per query head ``h`` and its KV head ``h // (num_heads //
num_kv_heads)`` (GQA): query ``i`` sits at position ``p = seq_len - q_len + i`` and attends to the keys at positions
``j <= p`` (causal), and ``p - j < sliding_window`` when a window is set:

    s_j = scale * q . k_j            (soft-capped: s_j = softcap * tanh(s_j / softcap), Gemma 2 style)
    out = sum_j softmax(s)_j * v_j

Key ``j`` of sequence ``s`` lives in slot ``block_tables[s, j // block_size] * block_size + j % block_size`` of
the pool (``[num_slots, num_kv_heads, head_dim]`` per layer, as ``cospec.engine.kv_cache`` stores it).

The Triton kernel is flash-decoding style: a program takes ``BLOCK_Q`` queries of one sequence times the query
heads of one KV head (``BLOCK_M`` rows, so a KV tile is loaded once for the whole GQA group), walks its keys tile by
tile with an online softmax, and skips tiles that the causal mask or the sliding window hide. When there are too
few programs to fill the GPU (decode at small batch over long contexts) the key range is split into ``num_splits``
parts that run in parallel (split-K); each writes its unnormalised output, running max and sum, and a second
kernel merges them: ``out = sum_i e^(m_i - m) acc_i / sum_i e^(m_i - m) l_i`` with ``m = max_i m_i``.

The torch reference, which is also the engine's CPU path, lives in ``cospec.kernels.paged_attention_ref``.
"""

from __future__ import annotations

import functools
import math

import torch

# Every kernel module offers its torch reference as ``<name>_ref`` beside the launcher (tests, benchmarks).
from cospec.kernels.paged_attention_ref import _check_inputs, _check_metadata, paged_attention_ref  # noqa: F401

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some platforms; the reference still works
    triton = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TILE_N = 32  # keys per inner iteration (tl.dot needs >= 16)
MAX_SPLITS = 16
MIN_TILES_PER_SPLIT = 4  # a split reads at least 128 keys: fewer would cost more in the merge than it gains


if triton is not None:

    @triton.jit
    def _tanh(x):
        # tanh from exp, stable for large |x| (tl has no portable tanh across backends and the interpreter).
        t = tl.exp(-2.0 * tl.abs(x))
        y = (1.0 - t) / (1.0 + t)
        return tl.where(x >= 0, y, -y)

    @triton.jit
    def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
        # Sequence s owns the q blocks [qsl[s] // BLOCK_Q + s, qsl[s + 1] // BLOCK_Q + s + 1): an upper bound on
        # its ceil(q_len / BLOCK_Q) blocks that needs no prefix sum over the batch. Binary search for the last s
        # whose first block is <= q_block.
        lo = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
            if first_block <= q_block:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    @triton.jit
    def _paged_attention_kernel(
        out_ptr,  # [num_tokens, num_heads, head_dim] (not IS_SPLIT)
        split_acc_ptr,  # [num_tokens, num_heads, num_splits, HEAD_DIM_PADDED] float32 (IS_SPLIT)
        split_max_ptr,  # [num_tokens, num_heads, num_splits] float32
        split_sum_ptr,  # [num_tokens, num_heads, num_splits] float32
        query_ptr,  # [num_tokens, num_heads, head_dim]
        k_pool_ptr,  # [num_slots, num_kv_heads, head_dim]
        v_pool_ptr,  # [num_slots, num_kv_heads, head_dim]
        block_tables_ptr,  # [num_seqs, max_blocks] int32
        seq_lens_ptr,  # [num_seqs] int32
        query_start_loc_ptr,  # [num_seqs + 1] int32
        scale,
        softcap,
        sliding_window,
        num_seqs,
        num_splits,
        query_stride_token,
        query_stride_head,
        out_stride_token,
        out_stride_head,
        k_stride_slot,
        k_stride_head,
        v_stride_slot,
        v_stride_head,
        block_table_stride,
        NUM_HEADS: tl.constexpr,
        GROUP: tl.constexpr,  # query heads per KV head
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PADDED: tl.constexpr,  # power of two >= 16; lanes past HEAD_DIM are masked
        BLOCK_SIZE: tl.constexpr,  # tokens per KV block
        BLOCK_Q: tl.constexpr,  # queries per program
        BLOCK_M: tl.constexpr,  # rows per program: BLOCK_Q queries x GROUP heads, padded to a power of two >= 16
        TILE_N: tl.constexpr,
        USE_SLIDING_WINDOW: tl.constexpr,
        USE_SOFTCAP: tl.constexpr,
        IS_SPLIT: tl.constexpr,  # num_splits > 1: write partial results for _merge_splits_kernel
        DOT_PRECISION: tl.constexpr,
    ):
        q_block_global = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)

        seq = _find_seq(query_start_loc_ptr, q_block_global, num_seqs, BLOCK_Q)
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        q_block = q_block_global - (q_start // BLOCK_Q + seq)
        if q_block * BLOCK_Q >= q_len:
            return  # a spare block of the upper bound
        seq_len = tl.load(seq_lens_ptr + seq)
        context_len = seq_len - q_len  # cached tokens before this step's window

        # Row r: query q_block * BLOCK_Q + r // GROUP, head kv_head * GROUP + r % GROUP.
        rows = tl.arange(0, BLOCK_M)
        q_local = q_block * BLOCK_Q + rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_valid = (rows // GROUP < BLOCK_Q) & (q_local < q_len)
        q_pos = context_len + q_local  # [BLOCK_M] absolute position of each row's query
        dims = tl.arange(0, HEAD_DIM_PADDED)
        dim_valid = dims < HEAD_DIM

        q_token = (q_start + q_local).to(tl.int64)
        q_offsets = q_token[:, None] * query_stride_token + head[:, None] * query_stride_head + dims[None, :]
        # q: [BLOCK_M, HEAD_DIM_PADDED]
        q = tl.load(query_ptr + q_offsets, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

        # Keys any row of this block can see: [kv_lo, kv_hi).
        last_q = tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len) - 1
        kv_hi = context_len + last_q + 1
        kv_lo = 0
        if USE_SLIDING_WINDOW:
            kv_lo = tl.maximum(context_len + q_block * BLOCK_Q - sliding_window + 1, 0)
        tile_lo = kv_lo // TILE_N
        tile_hi = tl.cdiv(kv_hi, TILE_N)
        tiles_per_split = tl.cdiv(tile_hi - tile_lo, num_splits)
        split_lo = tile_lo + split * tiles_per_split
        split_hi = tl.minimum(split_lo + tiles_per_split, tile_hi)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the scores
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(score - m_i)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
        block_table_row = block_tables_ptr + seq.to(tl.int64) * block_table_stride
        for tile in range(split_lo, split_hi):
            kv_pos = tile * TILE_N + tl.arange(0, TILE_N)
            kv_valid = kv_pos < kv_hi
            block = tl.load(block_table_row + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0).to(tl.int64)
            slot = block * BLOCK_SIZE + kv_pos % BLOCK_SIZE
            k = tl.load(k_pool_ptr + slot[None, :] * k_stride_slot + kv_head * k_stride_head + dims[:, None],
                        mask=dim_valid[:, None] & kv_valid[None, :], other=0.0)  # [HEAD_DIM_PADDED, TILE_N]
            v = tl.load(v_pool_ptr + slot[:, None] * v_stride_slot + kv_head * v_stride_head + dims[None, :],
                        mask=kv_valid[:, None] & dim_valid[None, :], other=0.0)  # [TILE_N, HEAD_DIM_PADDED]

            s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale  # [BLOCK_M, TILE_N] float32
            if USE_SOFTCAP:
                s = softcap * _tanh(s / softcap)
            visible = kv_pos[None, :] <= q_pos[:, None]
            if USE_SLIDING_WINDOW:
                visible = visible & (q_pos[:, None] - kv_pos[None, :] < sliding_window)
            s = tl.where(visible, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row that has seen no visible key yet (a window's first tiles, padding rows) keeps m = -inf;
            # subtracting 0 instead keeps exp() at 0 rather than NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        if not IS_SPLIT:
            out = acc / l_i[:, None]
            tl.store(out_ptr + q_token[:, None] * out_stride_token + head[:, None] * out_stride_head + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])
        else:
            part = (q_token * NUM_HEADS + head) * num_splits + split  # [BLOCK_M] index into the split buffers
            tl.store(split_acc_ptr + part[:, None] * HEAD_DIM_PADDED + dims[None, :], acc, mask=row_valid[:, None])
            tl.store(split_max_ptr + part, m_i, mask=row_valid)
            tl.store(split_sum_ptr + part, l_i, mask=row_valid)

    @triton.jit
    def _merge_splits_kernel(
        out_ptr,  # [num_tokens, num_heads, head_dim]
        split_acc_ptr,  # [num_tokens, num_heads, num_splits, HEAD_DIM_PADDED] float32
        split_max_ptr,  # [num_tokens, num_heads, num_splits] float32
        split_sum_ptr,  # [num_tokens, num_heads, num_splits] float32
        num_splits,
        out_stride_token,
        out_stride_head,
        NUM_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PADDED: tl.constexpr,
        SPLITS_PADDED: tl.constexpr,  # num_splits rounded up to a power of two
    ):
        # One program per (token, head): rescale each split to the overall max and normalise once.
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        splits = tl.arange(0, SPLITS_PADDED)
        split_valid = splits < num_splits
        dims = tl.arange(0, HEAD_DIM_PADDED)
        part = (token * NUM_HEADS + head) * num_splits + splits
        m = tl.load(split_max_ptr + part, mask=split_valid, other=float("-inf"))
        l = tl.load(split_sum_ptr + part, mask=split_valid, other=0.0)
        acc = tl.load(split_acc_ptr + part[:, None] * HEAD_DIM_PADDED + dims[None, :], mask=split_valid[:, None],
                      other=0.0)
        m_all = tl.max(m, axis=0)  # finite: every query sees at least its own key
        weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))  # splits with no visible key weigh 0
        out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
        tl.store(out_ptr + token * out_stride_token + head * out_stride_head + dims, out.to(out_ptr.dtype.element_ty),
                 mask=dims < HEAD_DIM)


def _check(query, k_pool, v_pool, block_tables, seq_lens, query_start_loc, block_size, sliding_window, softcap) -> None:
    _check_metadata(block_tables, seq_lens, query_start_loc, block_size)
    _check_inputs(query, k_pool, v_pool, block_tables.device, block_size, sliding_window, softcap)


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], packed by sequence
    k_pool: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: cached tokens per sequence after this step's tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: offsets of each sequence's queries in ``query``
    block_size: int,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    max_kv_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Triton launcher: checks shapes, strides and dtypes, then runs the kernel (and the split merge).

    ``max_kv_len`` (the largest ``seq_lens``, known on the host to the engine) saves a device sync; ``num_splits``
    overrides the split-K choice (tests).
    """
    _check(query, k_pool, v_pool, block_tables, seq_lens, query_start_loc, block_size, sliding_window, softcap)
    if triton is None:
        raise RuntimeError("triton is not installed")
    if query.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the paged_attention kernel takes {', '.join(map(str, KERNEL_DTYPES))}, got {query.dtype}")
    # Unit stride along head_dim: a head's vector is one run of memory (the pools are laid out that way already).
    query = query if query.stride(2) == 1 else query.contiguous()
    if k_pool.stride(2) != 1 or v_pool.stride(2) != 1 or block_tables.stride(1) != 1:
        raise ValueError("paged_attention: k_pool, v_pool and block_tables need a unit stride in their last dimension")
    num_tokens, num_heads, head_dim = query.shape
    num_seqs, num_kv_heads = block_tables.shape[0], k_pool.shape[1]
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_kv_len is None:
        max_kv_len = int(seq_lens.max())
    if block_tables.shape[1] * block_size < max_kv_len:
        raise ValueError(f"block_tables has {block_tables.shape[1]} blocks per sequence; {max_kv_len} tokens need "
                         f"{-(-max_kv_len // block_size)}")
    group = num_heads // num_kv_heads
    block_m = max(16, triton.next_power_of_2(group))
    block_q = block_m // group
    num_q_blocks = num_tokens // block_q + num_seqs  # upper bound on sum_s ceil(q_len_s / block_q)
    if num_splits is None:
        num_splits = _num_splits(num_q_blocks * num_kv_heads, max_kv_len, query.device)
    head_dim_padded = max(16, triton.next_power_of_2(head_dim))
    if num_splits > 1:
        split_acc = torch.empty(num_tokens, num_heads, num_splits, head_dim_padded, dtype=torch.float32,
                                device=query.device)
        split_max = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=query.device)
        split_sum = torch.empty_like(split_max)
    else:
        split_acc = split_max = split_sum = out  # unused
    _paged_attention_kernel[(num_q_blocks, num_kv_heads, num_splits)](
        out, split_acc, split_max, split_sum, query, k_pool, v_pool, block_tables, seq_lens, query_start_loc,
        scale if scale is not None else 1.0 / math.sqrt(head_dim), softcap or 0.0, sliding_window or 0, num_seqs,
        num_splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1), block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, BLOCK_SIZE=block_size,
        BLOCK_Q=block_q, BLOCK_M=block_m, TILE_N=TILE_N, USE_SLIDING_WINDOW=sliding_window is not None,
        USE_SOFTCAP=softcap is not None, IS_SPLIT=num_splits > 1,
        # float32 pools: full-precision products, as the reference computes them (no TF32).
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, split_acc, split_max, split_sum, num_splits, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded,
            SPLITS_PADDED=triton.next_power_of_2(num_splits),
        )
    return out


def _num_splits(num_programs: int, max_kv_len: int, device: torch.device) -> int:
    """Split the key range when the programs would not fill the GPU twice over, and each split keeps enough keys."""
    if device.type != "cuda":
        return 1
    wanted = -(-2 * _num_sms(device) // num_programs)
    return max(1, min(wanted, -(-max_kv_len // TILE_N) // MIN_TILES_PER_SPLIT, MAX_SPLITS))


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
