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

The torch reference gathers every sequence's keys into a padded ``[num_seqs, max_kv_len]`` batch and runs SDPA
with a causal (banded for sliding windows) mask; it is also the CPU path of the engine, which builds the gather
layout once per step (``GatherLayout``) and shares it across layers.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

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


def _check_metadata(block_tables, seq_lens, query_start_loc, block_size) -> None:
    """The batch layout: shared by every layer of a step, so the engine checks it once (``GatherLayout``)."""
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [num_seqs, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    num_seqs = block_tables.shape[0]
    if seq_lens.shape != (num_seqs,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32 of shape ({num_seqs},), got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if query_start_loc.shape != (num_seqs + 1,) or query_start_loc.dtype != torch.int32:
        raise ValueError(f"query_start_loc must be int32 of shape ({num_seqs + 1},), got {query_start_loc.dtype} "
                         f"{tuple(query_start_loc.shape)}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if not seq_lens.device == query_start_loc.device == block_tables.device:
        raise ValueError("paged_attention: block_tables, seq_lens and query_start_loc must be on one device")


def _check_inputs(query, k_pool, v_pool, device, block_size, sliding_window, softcap) -> None:
    """Per call: the queries and one layer's pools against each other and the batch layout's device."""
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_dim], got {tuple(query.shape)}")
    if k_pool.dim() != 3 or k_pool.shape != v_pool.shape:
        raise ValueError(f"k_pool and v_pool must both be [num_slots, num_kv_heads, head_dim], got "
                         f"{tuple(k_pool.shape)} and {tuple(v_pool.shape)}")
    num_heads, head_dim = query.shape[1:]
    num_slots, num_kv_heads, pool_head_dim = k_pool.shape
    if pool_head_dim != head_dim:
        raise ValueError(f"query head_dim {head_dim} differs from the pool's {pool_head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if query.dtype != k_pool.dtype or v_pool.dtype != k_pool.dtype:
        raise ValueError(f"dtype mismatch: query {query.dtype}, k_pool {k_pool.dtype}, v_pool {v_pool.dtype}")
    if num_slots % block_size:
        raise ValueError(f"block_size {block_size} does not divide the pool's {num_slots} slots")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be None or positive, got {sliding_window}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be None or positive, got {softcap}")
    if not query.device == k_pool.device == v_pool.device == device:
        raise ValueError("paged_attention: all tensors must be on one device")


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


# ---- torch reference (and the CPU path) -----------------------------------------------------------------------


class _Regions(NamedTuple):
    """Where a batch whose sequences each own a region lies in the pool (``GatherLayout.regions``)."""

    first: int  # the first region the batch spans
    span: int  # how many regions it spans (rows of the strided view)
    seq_rows: torch.Tensor | None  # [num_seqs] int64 row of each sequence; None when row i is sequence i


class GatherLayout:
    """How the reference lays a ragged batch out for SDPA: each sequence's keys gathered from the pool into
    ``[num_seqs, max_kv_len]`` rows, its queries scattered into ``[num_seqs, max_q_len]`` rows, and a causal mask.

    When every sequence's blocks form a region of ``region_blocks`` blocks of its own (``RegionBlockManager``), the
    keys are not gathered: the regions the batch spans are read as one strided view of the pool, a row per region.
    A region between the batch's sequences that none of them owns is a padding row (its outputs are dropped).

    Each index tensor is built on first use and kept: the engine makes one layout per step, and every layer of
    that step's forward (same batch, another pool) reuses them. ``max_q_len``, ``max_kv_len`` and ``num_tokens``
    are read from the tensors unless the caller knows them.
    """

    def __init__(self, block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                 block_size: int, max_q_len: int | None = None, max_kv_len: int | None = None,
                 num_tokens: int | None = None, region_blocks: int | None = None) -> None:
        _check_metadata(block_tables, seq_lens, query_start_loc, block_size)
        self.region_blocks = region_blocks
        self.block_tables = block_tables  # [num_seqs, max_blocks] int32
        self.seq_lens = seq_lens  # [num_seqs] int32
        self.query_start_loc = query_start_loc  # [num_seqs + 1] int32
        self.block_size = block_size
        self.num_seqs = seq_lens.shape[0]
        self.max_q_len = max_q_len if max_q_len is not None else int((query_start_loc[1:] - query_start_loc[:-1]).max())
        self.max_kv_len = max_kv_len if max_kv_len is not None else int(seq_lens.max())
        self.num_tokens = num_tokens if num_tokens is not None else int(query_start_loc[-1])
        self._masks: dict = {}
        self._buffers: list[torch.Tensor | None] = [None, None]

    def gather(self, pool: torch.Tensor, buffer: int) -> torch.Tensor:
        """Each sequence's keys (or values) ``[num_rows, max_kv_len, kv_heads, dim]`` from a pool ``[num_slots,
        kv_heads, dim]``, written into this layout's ``buffer`` (0 for keys, 1 for values), or a view of the pool
        when the sequences' blocks lie in a run (one sequence) or in regions (then the pool must hold finite values
        in slots never written: ``KVCachePool(zeroed=True)``).

        Whole blocks are copied (one index per block, not per slot: several times faster on the CPU), and every
        layer reuses the two buffers (allocating two fresh multi-megabyte tensors per layer costs 10x the copy
        itself on the CPU: the allocator returns them to the OS and faults them back in). Positions past a
        sequence's length are masked, but a masked key still multiplies its value by 0, so they must be finite:
        they are zeroed in the copy (the unused tail of a sequence's last block was never written, or holds another
        request's stale values; block columns past its own blocks repeat its first block, only to index validly)."""
        if self.single_run_start is not None:  # one sequence whose blocks lie in a row: a view, no copy
            return pool[self.single_run_start: self.single_run_start + self.max_kv_len].unsqueeze(0)
        if self.regions is not None:  # each sequence in a region of its own: a strided view, no copy
            first = self.regions.first
            region_slots = self.region_blocks * self.block_size
            rows = pool[first * region_slots: (first + self.num_rows) * region_slots]
            return rows.view(self.num_rows, region_slots, *pool.shape[1:])[:, : self.max_kv_len]
        num_blocks = self.block_gather_index.shape[1]
        shape = (self.num_seqs * num_blocks, self.block_size, *pool.shape[1:])
        out = self._buffers[buffer]
        if out is None or out.shape != shape or out.dtype != pool.dtype or out.device != pool.device:
            out = self._buffers[buffer] = torch.empty(shape, dtype=pool.dtype, device=pool.device)
        blocks = pool.view(-1, self.block_size, *pool.shape[1:])
        torch.index_select(blocks, 0, self.block_gather_index.view(-1), out=out)
        if self.tail_index is not None:
            out.view(-1, *pool.shape[1:]).index_fill_(0, self.tail_index, 0)
        return out.view(self.num_seqs, num_blocks * self.block_size, *pool.shape[1:])[:, : self.max_kv_len]

    @functools.cached_property
    def single_run_start(self) -> int | None:
        """First slot of the keys when the batch is one sequence whose blocks are consecutive in the pool (as a
        lone request's usually are): its keys are then one slice of the pool. None otherwise."""
        if self.num_seqs != 1:
            return None
        blocks = self.block_tables[0, : -(-self.max_kv_len // self.block_size)].tolist()  # (list ops: cheaper here)
        if blocks != list(range(blocks[0], blocks[0] + len(blocks))):
            return None
        return blocks[0] * self.block_size

    @functools.cached_property
    def regions(self) -> _Regions | None:
        """When each sequence's blocks form a region of its own: (the first region the batch spans, how many it
        spans, the row of each sequence in the view that starts there or None when row i is sequence i). None when
        the keys are gathered:
        the pool is not laid out in regions, or the batch's regions are so scattered (more than twice as many
        spanned as there are sequences) that attending over the padding rows would cost more than gathering."""
        if self.region_blocks is None or self.num_seqs == 1:
            return None
        # A region's first block is its block 0. (A list: a few list operations cost less than tensor ops here.)
        regions = [block // self.region_blocks for block in self.block_tables[:, 0].tolist()]
        first, last = min(regions), max(regions)
        span = last - first + 1
        if span > 2 * self.num_seqs:
            return None
        if regions == list(range(first, first + self.num_seqs)):
            return _Regions(first, span, None)
        return _Regions(first, span, torch.tensor([r - first for r in regions], dtype=torch.int64,
                                                  device=self.block_tables.device))

    @property
    def num_rows(self) -> int:
        """Rows of the padded batch SDPA runs on: one per sequence, or one per spanned region."""
        return self.num_seqs if self.regions is None else self.regions.span

    @property
    def seq_rows(self) -> torch.Tensor | None:  # [num_seqs] row of each sequence; None: row i is sequence i
        return None if self.regions is None else self.regions.seq_rows

    @functools.cached_property
    def block_gather_index(self) -> torch.Tensor:  # [num_seqs, ceil(max_kv_len / block_size)] int64
        """Block of each gathered block column: the sequence's own, then its first block again (zeroed in the copy)."""
        num_blocks = -(-self.max_kv_len // self.block_size)
        blocks = self.block_tables[:, :num_blocks].long()
        if self.num_seqs == 1:  # its length is max_kv_len: every column is its own
            return blocks
        own = (self.seq_lens.long() + self.block_size - 1) // self.block_size
        column = torch.arange(num_blocks, device=blocks.device)
        return torch.where(column < own[:, None], blocks, blocks[:, :1])

    @functools.cached_property
    def tail_index(self) -> torch.Tensor | None:
        """Gathered positions (flat, over ``[num_seqs, num_blocks * block_size]``) from each sequence's length up to
        ``max_kv_len`` (None: there are none, as when every sequence is that long)."""
        seq_lens = self.seq_lens.long()
        num_columns = self.block_gather_index.shape[1] * self.block_size
        num_tail = self.max_kv_len - seq_lens  # [num_seqs]
        total = int(num_tail.sum())
        if total == 0:
            return None
        seq = torch.repeat_interleave(torch.arange(self.num_seqs, device=seq_lens.device), num_tail, output_size=total)
        offset = torch.arange(total, device=seq_lens.device) - (num_tail.cumsum(0) - num_tail)[seq]
        return seq * num_columns + seq_lens[seq] + offset

    @functools.cached_property
    def q_unpad_index(self) -> torch.Tensor | None:  # [num_tokens]: padded row of each packed query
        """None when every window is max_q_len long (decode steps, equal verify windows) and row i is sequence i:
        nothing to pad."""
        if self.seq_rows is None and self.num_tokens == self.num_seqs * self.max_q_len:
            return None
        starts = self.query_start_loc.long()
        token_seq = torch.repeat_interleave(starts[1:] - starts[:-1], output_size=self.num_tokens)
        index_in_seq = torch.arange(self.num_tokens, device=starts.device) - starts[token_seq]
        token_row = token_seq if self.seq_rows is None else self.seq_rows[token_seq]
        return token_row * self.max_q_len + index_in_seq

    @functools.cached_property
    def q_pad_index(self) -> torch.Tensor | None:  # [num_rows * max_q_len]: packed row of each padded query
        if self.q_unpad_index is None:
            return None
        index = torch.zeros(self.num_rows * self.max_q_len, dtype=torch.int64, device=self.q_unpad_index.device)
        index[self.q_unpad_index] = torch.arange(self.num_tokens, device=index.device)
        return index  # padding rows repeat query 0; their outputs are dropped

    @functools.cached_property
    def q_positions(self) -> torch.Tensor:  # [num_seqs, max_q_len] absolute position of each query (0: padding)
        # Query j of a window of q_len sits at seq_len - q_len + j; padding rows say 0 (they see key 0 only).
        q_lens = (self.query_start_loc[1:] - self.query_start_loc[:-1]).long()
        offsets = torch.arange(self.max_q_len, device=q_lens.device)
        positions = (self.seq_lens.long() - q_lens)[:, None] + offsets
        return torch.where(offsets < q_lens[:, None], positions, 0)

    def mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """Bool mask [num_rows, 1, max_q_len, max_kv_len] (True = attend), or None when every key is visible."""
        if sliding_window is not None and sliding_window >= self.max_kv_len:
            sliding_window = None  # the window covers everything: plain causal
        if sliding_window not in self._masks:
            is_full = (self.max_q_len == 1 and sliding_window is None
                       and (self.num_seqs == 1 or bool((self.seq_lens == self.max_kv_len).all())))
            if is_full:
                self._masks[sliding_window] = None
            else:
                kv_pos = torch.arange(self.max_kv_len, device=self.seq_lens.device)
                # A decode step's one query per sequence sits at its last position (no padding rows).
                q_pos = ((self.seq_lens.long() - 1)[:, None, None] if self.max_q_len == 1
                         else self.q_positions[:, :, None])
                visible = kv_pos[None, None, :] <= q_pos
                if sliding_window is not None:
                    visible &= kv_pos[None, None, :] > q_pos - sliding_window
                if self.seq_rows is not None:  # padding rows see every key (finite; their outputs are dropped)
                    rows = visible.new_ones(self.num_rows, *visible.shape[1:])
                    visible = rows.index_copy_(0, self.seq_rows, visible)
                self._masks[sliding_window] = visible[:, None]
        return self._masks[sliding_window]


def paged_attention_ref(query, k_pool, v_pool, block_tables, seq_lens, query_start_loc, block_size, scale=None,
                        sliding_window=None, softcap=None, *, layout: GatherLayout | None = None) -> torch.Tensor:
    """Torch reference (and the CPU path): gather, pad, SDPA, unpad. ``layout`` is this batch's ``GatherLayout``
    when the caller keeps one across layers; built here otherwise."""
    if layout is None:  # checks the metadata
        layout = GatherLayout(block_tables, seq_lens, query_start_loc, block_size, num_tokens=query.shape[0])
    _check_inputs(query, k_pool, v_pool, layout.block_tables.device, block_size, sliding_window, softcap)
    num_rows, max_q = layout.num_rows, layout.max_q_len
    num_heads, head_dim = query.shape[1:]
    q = query if layout.q_pad_index is None else query.index_select(0, layout.q_pad_index)
    q = q.reshape(num_rows, max_q, num_heads, head_dim)
    k = layout.gather(k_pool, 0).transpose(1, 2)  # [num_rows, kv_heads, max_kv, dim]
    v = layout.gather(v_pool, 1).transpose(1, 2)
    mask = layout.mask(sliding_window)
    if softcap is None:
        out = _grouped_sdpa(q, k, v, mask, scale)
    else:
        out = _softcapped_attention(q.transpose(1, 2), k, v, mask, scale, softcap).transpose(1, 2)
    out = out.reshape(num_rows * max_q, num_heads, head_dim)  # [num_rows * max_q, heads, dim]
    return out if layout.q_unpad_index is None else out.index_select(0, layout.q_unpad_index)


def _grouped_sdpa(q, k, v, mask, scale):
    """SDPA with the query heads of each KV head folded into its query rows. q: ``[num_seqs, max_q, heads, dim]``,
    k/v: ``[num_seqs, kv_heads, max_kv, dim]``, mask: ``[num_seqs, 1, max_q, max_kv]`` or None; returns ``[num_seqs,
    max_q, heads, dim]``. A GQA group's queries read the same keys under the same mask, so SDPA runs over
    ``kv_heads`` heads of ``groups * max_q`` query rows (as HF's SDPA path does for decoding) rather than over
    ``heads`` heads that each read their KV head: on the CPU that takes about 30 % less time at a decode step."""
    num_seqs, max_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    groups = num_heads // num_kv_heads
    # [num_seqs, kv_heads, groups * max_q, dim]: row g * max_q + i is query i of the group's head g
    folded = q.view(num_seqs, max_q, num_kv_heads, groups, head_dim).permute(0, 2, 3, 1, 4)
    folded = folded.reshape(num_seqs, num_kv_heads, groups * max_q, head_dim)
    if mask is not None and max_q > 1:  # (one query: its mask row broadcasts over the group as it is)
        mask = mask.unsqueeze(2).expand(num_seqs, 1, groups, max_q, mask.shape[-1]).reshape(
            num_seqs, 1, groups * max_q, mask.shape[-1])
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)
    return out.view(num_seqs, num_kv_heads, groups, max_q, head_dim).permute(0, 3, 1, 2, 4)


def _softcapped_attention(q, k, v, mask, scale, softcap):
    """Eager attention with tanh logit soft-capping (Gemma 2 style), for layers that ask for it."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
