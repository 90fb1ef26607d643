"""Counter-based noise: Exp(1) variates that are a pure function of (row key, vocabulary index).

Sampling in cospec never draws from a stateful generator. Each row of a sampling step has a 64-bit key derived from
(the request's seed, the output position, a stream id) (``cospec.decoding.sampling.noise_keys``), and the noise
for token ``v`` of that row is computed from the key and ``v`` alone. So a request's random numbers at output
position ``j`` are the same whatever the batch, the order of arrival, the draft lengths or the device.

Math, in uint32 arithmetic (wrapping), with ``lo, hi`` the key's halves and ``fmix`` MurmurHash3's finalizer:
``x = fmix(fmix(v * 0x9E3779B9 ^ lo) ^ hi)``; ``u = ((x >> 9) + 0.5) / 2^23`` in (0, 1) (23 random bits: ``2 (x >> 9) + 1``
fits float32's mantissa, so ``u`` is exact in every dtype); ``noise = -log(u)`` (never 0, at most 16.7).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some platforms; the reference still works
    triton = None

_GOLDEN = 0x9E3779B9
_FMIX_1 = 0x85EBCA6B
_FMIX_2 = 0xC2B2AE35
_MASK32 = 0xFFFFFFFF
_SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _as_int32(value: int) -> int:
    """The signed int32 with the same bits as the uint32 ``value`` (torch int32 tensors wrap like uint32)."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int32 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shift_right(x, 16)
    x = x * _as_int32(_FMIX_1)
    x = x ^ _shift_right(x, 13)
    x = x * _as_int32(_FMIX_2)
    return x ^ _shift_right(x, 16)


def _check(keys: torch.Tensor, vocab_size: int, dtype: torch.dtype, op: str) -> None:
    if keys.dim() != 1 or keys.dtype != torch.int64:
        raise ValueError(f"{op}: keys must be 1-D int64, got {keys.dtype} {tuple(keys.shape)}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"{op}: vocab_size must be an int >= 1, got {vocab_size!r}")
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{op}: dtype must be float32 or float64, got {dtype}")


def keyed_exponential_ref(
    keys: torch.Tensor,  # [num_rows] int64
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [num_rows, vocab_size] ~ Exp(1)
    _check(keys, vocab_size, dtype, "keyed_exponential")
    lo = (keys & _MASK32).to(torch.int32)  # bit patterns: int32 wraps like uint32
    hi = ((keys >> 32) & _MASK32).to(torch.int32)
    v = torch.arange(vocab_size, dtype=torch.int32, device=keys.device) * _as_int32(_GOLDEN)
    x = _fmix32(v[None, :] ^ lo[:, None])
    x = _fmix32(x ^ hi[:, None])
    u = (_shift_right(x, 9).to(dtype) + 0.5) * (1.0 / (1 << 23))
    return u.log_().neg_()


if triton is not None:

    @triton.jit
    def _fmix32_tl(x):
        x = x ^ (x >> 16)
        x = x * 0x85EBCA6B
        x = x ^ (x >> 13)
        x = x * 0xC2B2AE35
        return x ^ (x >> 16)

    @triton.jit
    def _keyed_exponential_kernel(
        out_ptr,
        keys_ptr,
        vocab_size,
        out_stride,
        BLOCK_V: tl.constexpr,
    ):
        # One program per (row, block of BLOCK_V vocabulary entries).
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        key = tl.load(keys_ptr + row)
        lo = (key & 0xFFFFFFFF).to(tl.uint32)
        hi = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
        x = _fmix32_tl((offs.to(tl.uint32) * 0x9E3779B9) ^ lo)
        x = _fmix32_tl(x ^ hi)
        u = ((x >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # exact in float32 (see the module docstring)
        u = u.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * out_stride + offs, -tl.log(u), mask=offs < vocab_size)


def keyed_exponential(
    keys: torch.Tensor,  # [num_rows] int64
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [num_rows, vocab_size] ~ Exp(1)
    """Launcher of the Triton kernel (same values as ``keyed_exponential_ref`` up to the rounding of ``log``)."""
    _check(keys, vocab_size, dtype, "keyed_exponential")
    if not keys.is_contiguous():
        raise ValueError("keyed_exponential: keys must be contiguous")
    out = torch.empty(keys.numel(), vocab_size, dtype=dtype, device=keys.device)
    if keys.numel():
        block_v = 1024
        _keyed_exponential_kernel[(keys.numel(), triton.cdiv(vocab_size, block_v))](
            out, keys, vocab_size, out.stride(0), BLOCK_V=block_v)
    return out
