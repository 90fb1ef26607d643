"""Write new keys and values into the paged KV pool.

Math: for every token t, ``k_cache[slot_mapping[t]] = key[t]`` and ``v_cache[slot_mapping[t]] = value[t]``.
A slot is ``block_id * block_size + offset``; the pool of one layer is ``[num_slots, num_kv_heads, head_dim]``.
A negative slot means "do not store" (a padding token).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some platforms; the reference still works
    triton = None


if triton is not None:

    @triton.jit
    def _store_kv_kernel(
        key_ptr,
        value_ptr,
        k_cache_ptr,
        v_cache_ptr,
        slot_mapping_ptr,
        key_stride,
        value_stride,
        cache_stride,
        ROW_SIZE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program per token: copy its [num_kv_heads * head_dim] row of K and of V.
        token = tl.program_id(0)
        slot = tl.load(slot_mapping_ptr + token)
        if slot < 0:
            return
        for start in range(0, ROW_SIZE, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < ROW_SIZE
            k = tl.load(key_ptr + token * key_stride + offs, mask=mask)
            v = tl.load(value_ptr + token * value_stride + offs, mask=mask)
            tl.store(k_cache_ptr + slot * cache_stride + offs, k, mask=mask)
            tl.store(v_cache_ptr + slot * cache_stride + offs, v, mask=mask)


def _check(key, value, k_cache, v_cache, slot_mapping) -> None:
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key and value must both be [num_tokens, heads, dim], got {tuple(key.shape)} and {tuple(value.shape)}")
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape or k_cache.shape[1:] != key.shape[1:]:
        raise ValueError(f"caches must be [num_slots, {key.shape[1]}, {key.shape[2]}], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if slot_mapping.shape != (key.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64 of shape ({key.shape[0]},), got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if key.dtype != k_cache.dtype or value.dtype != v_cache.dtype:
        raise ValueError(f"dtype mismatch: key {key.dtype}, cache {k_cache.dtype}")
    if len({t.device for t in (key, value, k_cache, v_cache, slot_mapping)}) != 1:
        raise ValueError("store_kv: all tensors must be on one device")


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Triton launcher: checks shapes, dtypes and strides, then launches one program per token."""
    _check(key, value, k_cache, v_cache, slot_mapping)
    if triton is None:
        raise RuntimeError("triton is not installed")
    # Rows must be dense ([heads, dim] contiguous) so that a token's K/V is one run of memory.
    key = key if key[0:1].is_contiguous() else key.contiguous()
    value = value if value[0:1].is_contiguous() else value.contiguous()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("store_kv: caches must be contiguous")
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    row = key.shape[1] * key.shape[2]
    block = min(1024, triton.next_power_of_2(row))
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), value.stride(0), k_cache.stride(0),
        ROW_SIZE=row, BLOCK=block,
    )


def store_kv_ref(key, value, k_cache, v_cache, slot_mapping, has_padding: bool | None = None,
                 checked: bool = False) -> None:
    """Torch reference (and the CPU path). ``has_padding=False``: the caller knows that no slot is negative, which
    spares a reduction and a sync per call (as much time as the copy itself at a decoding step). ``checked``: the
    caller checked tensors of these shapes, dtypes and devices before (another layer of the same step)."""
    if not checked:
        _check(key, value, k_cache, v_cache, slot_mapping)
    if has_padding is None:
        has_padding = bool((slot_mapping < 0).any())
    if has_padding:
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    k_cache.index_copy_(0, slot_mapping, key)
    v_cache.index_copy_(0, slot_mapping, value)
