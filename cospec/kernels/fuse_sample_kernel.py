"""Fused sampling: combine the members' next-token logits row by row and sample one token, in one kernel.

For row r (one sequence's next-token position) with member logits ``z_m`` (``m = 0 .. M-1``) and per-row weights
``w_m``:

    lp_m   = z_m - logsumexp(z_m)                                   member log-probabilities
    f      = sum_{m: w_m != 0} w_m * lp_m'                          log-linear (lp_m' = max(lp_m, FLOOR) if w_m < 0)
    f      = log(sum_m w_m * exp(lp_m))                             instead, on rows with is_mixture
    f      = -inf where exp(z_0 - max z_0) < alpha                  plausibility on member 0 (alpha = 0: off)
    token  = argmax_v f_v                                           greedy rows (temperature == 0)
    r_v    = exp((f_v - max f) / T),  r_v = 0 where r_v < min_p     temperature, min-p (p_v / p_max = r_v)
    token  = argmax_v r_v / E_v                                     exponential race, E_v ~ Exp(1)

Contrastive decoding is the log-linear case ``w = [1, -beta]`` with ``alpha > 0``; proxy-tuning and DExperts are
``w = [1, a, -a]``; a mixture is ``w = [l_0, .., l_{M-1}]`` with ``is_mixture``.

The kernel makes three passes over the vocabulary per row: (1) each member's online max and sum of exponentials
(the members are the rows of one ``[BLOCK_M, BLOCK_V]`` tile), (2) the fused logits' max and argmax, (3) the race.
Top-k and top-p need a sort or a selection over the fused row and are not in the kernel: rows that use them go
through ``fuse_logits`` + ``process_probs`` (the reference path). Min-p is in the kernel.

Exactness: the reference computes the same formulas in torch; the two agree token for token except where two
candidates are within rounding of each other (``exp``/``log`` and the order of the reductions differ in the last
bits), which random tests in float64 never hit.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some platforms; the reference still works
    triton = None

LOGPROB_FLOOR = -1.0e4
"""Anti-expert (negative-weight) log-probabilities are floored here, so a token they rule out is not +inf."""


if triton is not None:
    from cospec.kernels.rejection_sample_kernel import _race_key  # r / noise, IEEE-rounded in float32

    _FLOOR: tl.constexpr = tl.constexpr(LOGPROB_FLOOR)

    @triton.jit
    def _fused_chunk(
        logits_ptr, row_offset, member_stride, offs_m, is_member, offs_v, in_vocab,
        w, lse, max0, alpha, is_mixture,
        HAS_PLAUSIBILITY: tl.constexpr, HAS_MIXTURE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    ):
        # f for one [BLOCK_V] chunk of a row; -inf outside the vocabulary.
        z = tl.load(logits_ptr + row_offset + offs_m[:, None] * member_stride + offs_v[None, :],
                    mask=is_member[:, None] & in_vocab[None, :], other=float("-inf")).to(COMPUTE_DTYPE)
        lp = z - lse[:, None]  # [BLOCK_M, BLOCK_V]; padded members have w = 0 and lse = 0
        ww = w[:, None]
        floored = tl.where(ww < 0, tl.maximum(lp, _FLOOR), lp)
        f = tl.sum(ww * tl.where(ww != 0, floored, 0.0), axis=0)
        if HAS_MIXTURE:
            p = tl.sum(tl.where(ww != 0, ww * tl.exp(lp), 0.0), axis=0)
            f_mix = tl.where(p > 0, tl.log(tl.where(p > 0, p, 1.0)), float("-inf"))
            f = tl.where(is_mixture, f_mix, f)
        if HAS_PLAUSIBILITY:
            z0 = tl.load(logits_ptr + row_offset + offs_v, mask=in_vocab, other=float("-inf")).to(COMPUTE_DTYPE)
            f = tl.where(tl.exp(z0 - max0) >= alpha, f, float("-inf"))
        return tl.where(in_vocab, f, float("-inf"))

    @triton.jit
    def _fuse_sample_kernel(
        output_ptr,
        logits_ptr,
        weights_ptr,
        temperature_ptr,
        exp_noise_ptr,
        alpha_ptr,
        is_mixture_ptr,
        min_p_ptr,
        member_stride,
        row_stride,
        weights_stride,
        noise_stride,
        num_members,
        vocab_size,
        HAS_PLAUSIBILITY: tl.constexpr,
        HAS_MIXTURE: tl.constexpr,
        HAS_MIN_P: tl.constexpr,
        COMPUTE_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        # One program per row.
        row = tl.program_id(0).to(tl.int64)
        row_offset = row * row_stride
        offs_m = tl.arange(0, BLOCK_M)
        is_member = offs_m < num_members
        w = tl.load(weights_ptr + row * weights_stride + offs_m, mask=is_member, other=0).to(COMPUTE_DTYPE)

        # Pass 1: per-member running max and sum of exp(z - max) -> logsumexp.
        m_max = tl.full([BLOCK_M], float("-inf"), COMPUTE_DTYPE)
        m_sum = tl.zeros([BLOCK_M], COMPUTE_DTYPE)
        for start in range(0, vocab_size, BLOCK_V):
            offs_v = start + tl.arange(0, BLOCK_V)
            z = tl.load(logits_ptr + row_offset + offs_m[:, None] * member_stride + offs_v[None, :],
                        mask=is_member[:, None] & (offs_v < vocab_size)[None, :], other=float("-inf"))
            z = z.to(COMPUTE_DTYPE)
            new_max = tl.maximum(m_max, tl.max(z, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no (-inf) - (-inf)
            m_sum = m_sum * tl.exp(m_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
            m_max = new_max
        shift = tl.where(m_max == float("-inf"), 0.0, m_max)
        lse = tl.where(is_member, shift + tl.log(tl.where(is_member, m_sum, 1.0)), 0.0)
        max0 = tl.sum(tl.where(offs_m == 0, m_max, 0.0), axis=0)

        if HAS_PLAUSIBILITY:
            alpha = tl.load(alpha_ptr + row).to(COMPUTE_DTYPE)
        else:
            alpha = tl.full([], 0.0, COMPUTE_DTYPE)
        if HAS_MIXTURE:
            is_mixture = tl.load(is_mixture_ptr + row) != 0
        else:
            is_mixture = tl.full([], 0, tl.int1)

        # Pass 2: max and argmax of the fused logits (ties keep the lowest id, as torch.argmax does).
        f_max = tl.full([], float("-inf"), COMPUTE_DTYPE)
        f_argmax = tl.full([], 0, tl.int32)
        for start in range(0, vocab_size, BLOCK_V):
            offs_v = start + tl.arange(0, BLOCK_V)
            f = _fused_chunk(logits_ptr, row_offset, member_stride, offs_m, is_member, offs_v, offs_v < vocab_size,
                             w, lse, max0, alpha, is_mixture, HAS_PLAUSIBILITY, HAS_MIXTURE, COMPUTE_DTYPE)
            chunk_max, chunk_id = tl.max(f, axis=0, return_indices=True)
            f_argmax = tl.where(chunk_max > f_max, start + chunk_id, f_argmax)
            f_max = tl.maximum(f_max, chunk_max)

        # Pass 3 (sampled rows): exponential race on r = exp((f - max f) / T), min-p applied as r >= min_p.
        temperature = tl.load(temperature_ptr + row).to(COMPUTE_DTYPE)
        token_id = f_argmax
        if temperature > 0:
            if HAS_MIN_P:
                min_p = tl.load(min_p_ptr + row).to(COMPUTE_DTYPE)
            else:
                min_p = tl.full([], 0.0, COMPUTE_DTYPE)
            g_max = f_max / temperature
            best = tl.full([], -1.0, COMPUTE_DTYPE)
            best_id = tl.full([], 0, tl.int32)
            for start in range(0, vocab_size, BLOCK_V):
                offs_v = start + tl.arange(0, BLOCK_V)
                in_vocab = offs_v < vocab_size
                f = _fused_chunk(logits_ptr, row_offset, member_stride, offs_m, is_member, offs_v, in_vocab,
                                 w, lse, max0, alpha, is_mixture, HAS_PLAUSIBILITY, HAS_MIXTURE, COMPUTE_DTYPE)
                r = tl.exp(f / temperature - g_max)
                r = tl.where(r >= min_p, r, 0.0)
                noise = tl.load(exp_noise_ptr + row * noise_stride + offs_v, mask=in_vocab, other=1.0)
                key = tl.where(in_vocab, _race_key(r, noise.to(COMPUTE_DTYPE), COMPUTE_DTYPE), -1.0)
                race, race_id = tl.max(key, axis=0, return_indices=True)
                best_id = tl.where(race > best, start + race_id, best_id)
                best = tl.maximum(best, race)
            token_id = best_id
        tl.store(output_ptr + row, token_id.to(tl.int64))


def _check(member_logits, weights, temperature, exp_noise, plausibility_alpha, is_mixture, min_p) -> None:
    op = "fuse_sample"
    if member_logits.dim() != 3 or not member_logits.is_floating_point() or member_logits.shape[0] == 0:
        raise ValueError(f"{op}: member_logits must be float [num_members >= 1, num_rows, vocab_size], "
                         f"got {member_logits.dtype} {tuple(member_logits.shape)}")
    num_members, num_rows, vocab_size = member_logits.shape
    if vocab_size == 0:
        raise ValueError(f"{op}: member_logits has an empty vocabulary")
    if weights.shape != (num_rows, num_members) or not weights.is_floating_point():
        raise ValueError(f"{op}: weights must be float [num_rows, num_members] = [{num_rows}, {num_members}], "
                         f"got {weights.dtype} {tuple(weights.shape)}")
    if temperature.shape != (num_rows,) or not temperature.is_floating_point():
        raise ValueError(f"{op}: temperature must be float of shape ({num_rows},), "
                         f"got {temperature.dtype} {tuple(temperature.shape)}")
    if exp_noise.shape != (num_rows, vocab_size) or not exp_noise.is_floating_point():
        raise ValueError(f"{op}: exp_noise must be float [num_rows, vocab_size] = [{num_rows}, {vocab_size}], "
                         f"got {exp_noise.dtype} {tuple(exp_noise.shape)}")
    for name, t in (("plausibility_alpha", plausibility_alpha), ("min_p", min_p)):
        if t is not None and (t.shape != (num_rows,) or not t.is_floating_point()):
            raise ValueError(f"{op}: {name} must be None or float of shape ({num_rows},), "
                             f"got {t.dtype} {tuple(t.shape)}")
    if is_mixture is not None and (is_mixture.shape != (num_rows,) or is_mixture.dtype != torch.bool):
        raise ValueError(f"{op}: is_mixture must be None or bool of shape ({num_rows},), "
                         f"got {is_mixture.dtype} {tuple(is_mixture.shape)}")
    tensors = [t for t in (member_logits, weights, temperature, exp_noise, plausibility_alpha, is_mixture, min_p)
               if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"{op}: all tensors must be on one device")


def _compute_dtype(member_logits: torch.Tensor) -> torch.dtype:
    # Half-precision logits are fused and raced in float32; float64 stays float64.
    return torch.float64 if member_logits.dtype == torch.float64 else torch.float32


def fuse_sample(
    member_logits: torch.Tensor,  # [num_members, num_rows, vocab_size]
    weights: torch.Tensor,  # [num_rows, num_members] log-linear or mixture weights
    temperature: torch.Tensor,  # [num_rows] >= 0, 0 = greedy
    exp_noise: torch.Tensor,  # [num_rows, vocab_size] ~ Exp(1), > 0
    plausibility_alpha: torch.Tensor | None = None,  # [num_rows] in [0, 1], 0 = off
    is_mixture: torch.Tensor | None = None,  # [num_rows] bool
    min_p: torch.Tensor | None = None,  # [num_rows] in [0, 1], 0 = off
) -> torch.Tensor:  # [num_rows] int64
    """Triton launcher: one program per row. Reads nothing on the host (no device sync)."""
    _check(member_logits, weights, temperature, exp_noise, plausibility_alpha, is_mixture, min_p)
    if triton is None:
        raise RuntimeError("triton is not installed")
    num_members, num_rows, vocab_size = member_logits.shape
    output = torch.empty(num_rows, dtype=torch.int64, device=member_logits.device)
    if num_rows == 0:
        return output
    if member_logits.stride(-1) != 1:
        member_logits = member_logits.contiguous()
    if exp_noise.stride(-1) != 1:
        exp_noise = exp_noise.contiguous()
    weights = weights if weights.stride(-1) == 1 else weights.contiguous()
    # Absent optional tensors are never read; any tensor on the device will do as their pointer.
    _fuse_sample_kernel[(num_rows,)](
        output, member_logits, weights, temperature.contiguous(), exp_noise,
        temperature if plausibility_alpha is None else plausibility_alpha.contiguous(),
        temperature if is_mixture is None else is_mixture.contiguous(),
        temperature if min_p is None else min_p.contiguous(),
        member_logits.stride(0), member_logits.stride(1), weights.stride(0), exp_noise.stride(0),
        num_members, vocab_size,
        HAS_PLAUSIBILITY=plausibility_alpha is not None,
        HAS_MIXTURE=is_mixture is not None,
        HAS_MIN_P=min_p is not None,
        COMPUTE_DTYPE=tl.float64 if _compute_dtype(member_logits) == torch.float64 else tl.float32,
        BLOCK_M=triton.next_power_of_2(num_members),
        BLOCK_V=min(1024 if num_members <= 4 else 512, triton.next_power_of_2(vocab_size)),
    )
    return output


def fused_logits_ref(
    member_logits: torch.Tensor,  # [num_members, num_rows, vocab_size]
    weights: torch.Tensor,  # [num_rows, num_members]
    plausibility_alpha: torch.Tensor | None = None,  # [num_rows]
    is_mixture: torch.Tensor | None = None,  # [num_rows] bool
) -> torch.Tensor:  # [num_rows, vocab_size] unnormalized fused logits f, in the compute dtype
    """The kernel's ``f`` in torch (see the module docstring)."""
    dtype = _compute_dtype(member_logits)
    z = member_logits.to(dtype)
    lp = z - torch.logsumexp(z, dim=-1, keepdim=True)  # [num_members, num_rows, vocab_size]
    w = weights.to(dtype).t()[:, :, None]  # [num_members, num_rows, 1]
    floored = torch.where(w < 0, lp.clamp(min=LOGPROB_FLOOR), lp)
    fused = (w * torch.where(w != 0, floored, 0.0)).sum(dim=0)
    if is_mixture is not None:
        p = torch.where(w != 0, w * lp.exp(), 0.0).sum(dim=0)
        fused = torch.where(is_mixture[:, None], p.log(), fused)
    if plausibility_alpha is not None:
        z0 = z[0]
        is_plausible = (z0 - z0.max(dim=-1, keepdim=True).values).exp() >= plausibility_alpha.to(dtype)[:, None]
        fused = fused.masked_fill(~is_plausible, float("-inf"))
    return fused


def fuse_sample_ref(
    member_logits: torch.Tensor,  # [num_members, num_rows, vocab_size]
    weights: torch.Tensor,  # [num_rows, num_members] log-linear or mixture weights
    temperature: torch.Tensor,  # [num_rows] >= 0, 0 = greedy
    exp_noise: torch.Tensor,  # [num_rows, vocab_size] ~ Exp(1), > 0
    plausibility_alpha: torch.Tensor | None = None,  # [num_rows] in [0, 1], 0 = off
    is_mixture: torch.Tensor | None = None,  # [num_rows] bool
    min_p: torch.Tensor | None = None,  # [num_rows] in [0, 1], 0 = off
) -> torch.Tensor:  # [num_rows] int64
    """Torch reference (and the CPU path)."""
    _check(member_logits, weights, temperature, exp_noise, plausibility_alpha, is_mixture, min_p)
    dtype = _compute_dtype(member_logits)
    f = fused_logits_ref(member_logits, weights, plausibility_alpha, is_mixture)  # [num_rows, vocab_size]
    greedy = f.argmax(dim=-1)
    t = temperature.to(dtype)[:, None]
    is_sampled = t > 0
    t = torch.where(is_sampled, t, 1.0)
    r = torch.exp(f / t - f.max(dim=-1, keepdim=True).values / t)
    if min_p is not None:
        r = torch.where(r >= min_p.to(dtype)[:, None], r, 0.0)
    sampled = (r / exp_noise.to(dtype)).argmax(dim=-1)
    return torch.where(is_sampled[:, 0], sampled, greedy)
