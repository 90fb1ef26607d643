"""Token-level fusion: several models on one vocabulary combined into one next-token distribution at each step.

Terms:
- member: one model of a fusion group; ``member_logits[i]`` is its next-token logits ``z_i``, ``[num_rows, vocab]``.
  The order of members is part of a spec's meaning (e.g. proxy-tuning is [large, small_domain, small_base]).
- log_linear (product of experts): ``fused = sum_i w_i * log_softmax(z_i)``. Proxy-tuning / EFT (Liu et al. 2024,
  Mitchell et al. 2024) is [large, small_tuned, small_base] with ``w = [1, a, -a]``; DExperts (Liu et al. 2021) is
  [base, expert, anti_expert] with the same weights.
- contrastive (Li et al. 2023): ``fused = log_softmax(z_L) - beta * log_softmax(z_S)`` on the plausibility set
  ``{v : p_L(v) >= alpha * max p_L}``, ``-inf`` elsewhere; members are [large (expert), small (amateur)].
- mixture: ``fused = log(sum_i l_i * softmax(z_i))`` with ``l_i >= 0``, ``sum l_i = 1`` (a linear interpolation
  of the members' distributions, e.g. a language model with a domain n-gram model).

The fused result is a row of log-probabilities (normalized; ``-inf`` for ruled-out tokens). Temperature, top-k,
top-p and min-p are applied afterwards, to the fused distribution, by ``sampling.process_probs`` on these logits.

Infinite log-probabilities: a member with a positive weight that rules a token out (``-inf``) rules it out of the
fusion; a member with weight 0 is ignored; a member with a negative weight (an anti-expert) has its log-probabilities
floored at ``LOGPROB_FLOOR``, so a token it rules out is strongly favoured instead of getting ``+inf`` (NaN after
normalization). Real models' log-probabilities never reach the floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from cospec.kernels.fuse_sample_kernel import LOGPROB_FLOOR

FUSION_MODES = ("log_linear", "contrastive", "mixture")
_SUM_TOLERANCE = 1e-6


@dataclass(frozen=True, slots=True)
class FusionSpec:
    """How to fuse the members' logits. ``weights`` are the log-linear weights or the mixture weights (one per member);
    a contrastive spec has no ``weights`` but ``beta`` (strength) and ``alpha`` (plausibility threshold in (0, 1])."""

    mode: str
    weights: tuple[float, ...] = ()
    beta: float | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in FUSION_MODES:
            raise ValueError(f"unknown fusion mode {self.mode!r}; expected one of {', '.join(FUSION_MODES)}")
        try:
            weights = tuple(float(w) for w in self.weights)
        except (TypeError, ValueError):
            raise ValueError(f"fusion weights must be numbers, got {self.weights!r}") from None
        object.__setattr__(self, "weights", weights)
        if any(not math.isfinite(w) for w in weights):
            raise ValueError(f"fusion weights must be finite, got {weights}")
        if self.mode == "contrastive":
            self._check_contrastive()
            return
        for name in ("beta", "alpha"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name} applies only to mode 'contrastive', not to {self.mode!r}")
        if not weights:
            raise ValueError(f"a {self.mode} fusion needs one weight per member, got none")
        if self.mode == "mixture":
            if any(w < 0 for w in weights):
                raise ValueError(f"mixture weights must be >= 0, got {weights}")
            if abs(sum(weights) - 1.0) > _SUM_TOLERANCE:
                raise ValueError(f"mixture weights must sum to 1, got {weights} (sum {sum(weights):.6g})")
        elif sum(weights) <= 0:
            # Softmax of sum_i w_i log p_i with sum w_i <= 0 favours what the members find unlikely.
            raise ValueError(f"log_linear weights must sum to > 0 to make a distribution, got {weights}")

    def _check_contrastive(self) -> None:
        if self.weights:
            raise ValueError(f"a contrastive fusion takes beta and alpha, not weights (got weights {self.weights})")
        if self.beta is None or not math.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"contrastive beta must be a finite number >= 0, got {self.beta!r}")
        if self.alpha is None or not (0.0 < self.alpha <= 1.0):
            raise ValueError(f"contrastive alpha (plausibility threshold) must be in (0, 1], got {self.alpha!r}")
        object.__setattr__(self, "beta", float(self.beta))
        object.__setattr__(self, "alpha", float(self.alpha))

    @property
    def num_members(self) -> int:
        return 2 if self.mode == "contrastive" else len(self.weights)

    @property
    def member_weights(self) -> tuple[float, ...]:
        """Per-member weights as the fused-sampling kernel takes them: contrastive is log-linear ``(1, -beta)``."""
        return (1.0, -self.beta) if self.mode == "contrastive" else self.weights

    @property
    def plausibility_alpha(self) -> float:
        """The plausibility threshold on member 0; 0 = every token is plausible."""
        return self.alpha if self.mode == "contrastive" else 0.0

    # ---- constructors for the published methods ----

    @classmethod
    def log_linear(cls, weights: Sequence[float]) -> FusionSpec:
        return cls("log_linear", tuple(weights))

    @classmethod
    def proxy_tuning(cls, alpha: float = 1.0) -> FusionSpec:
        """Members [large, small_tuned, small_base]: ``log p_L + alpha * (log p_tuned - log p_base)``."""
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"proxy-tuning strength alpha must be a finite number >= 0, got {alpha!r}")
        return cls("log_linear", (1.0, alpha, -alpha))

    @classmethod
    def dexperts(cls, alpha: float = 1.0) -> FusionSpec:
        """Members [base, expert, anti_expert]: ``log p_base + alpha * (log p_expert - log p_anti)``."""
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"DExperts strength alpha must be a finite number >= 0, got {alpha!r}")
        return cls("log_linear", (1.0, alpha, -alpha))

    @classmethod
    def contrastive(cls, beta: float = 0.5, alpha: float = 0.1) -> FusionSpec:
        """Members [large, small]."""
        return cls("contrastive", beta=beta, alpha=alpha)

    @classmethod
    def mixture(cls, weights: Sequence[float]) -> FusionSpec:
        return cls("mixture", tuple(weights))


_PARSE_HELP = ("expected 'proxy:A', 'dexperts:A', 'contrastive:BETA[,ALPHA]', 'mixture:L1,L2,...' or "
               "'loglinear:W1,W2,...'")


def parse_fusion(text: str) -> FusionSpec:
    """A FusionSpec from a CLI string such as ``proxy:1.0``, ``contrastive:0.5,0.1``, ``mixture:0.7,0.3``,
    ``loglinear:1,0.5,-0.5``."""
    name, sep, args = text.strip().partition(":")
    name = name.strip().lower().replace("-", "_")
    if not sep or not args.strip():
        raise ValueError(f"fusion {text!r} has no parameters; {_PARSE_HELP}")
    try:
        values = [float(v) for v in args.split(",")]
    except ValueError:
        raise ValueError(f"fusion {text!r}: parameters must be comma-separated numbers; {_PARSE_HELP}") from None

    def arity(lo: int, hi: int) -> None:
        if not lo <= len(values) <= hi:
            expected = str(lo) if lo == hi else f"{lo} to {hi}"
            raise ValueError(f"fusion {text!r}: {name} takes {expected} parameter(s), got {len(values)}")

    if name in ("proxy", "proxy_tuning", "eft"):
        arity(1, 1)
        return FusionSpec.proxy_tuning(values[0])
    if name == "dexperts":
        arity(1, 1)
        return FusionSpec.dexperts(values[0])
    if name in ("contrastive", "cd"):
        arity(1, 2)
        return FusionSpec.contrastive(*values)
    if name in ("mixture", "mix"):
        return FusionSpec.mixture(values)
    if name in ("loglinear", "log_linear"):
        return FusionSpec.log_linear(values)
    raise ValueError(f"unknown fusion {name!r} in {text!r}; {_PARSE_HELP}")


# ---- fusing logits ----


def _check_members(member_logits: Sequence[torch.Tensor], num_members: int) -> torch.dtype:
    if len(member_logits) != num_members:
        raise ValueError(f"the fusion expects {num_members} members, got {len(member_logits)} logits tensors")
    first = member_logits[0]
    for i, z in enumerate(member_logits):
        if z.dim() != 2 or not z.is_floating_point():
            raise ValueError(f"member {i} logits must be float [num_rows, vocab_size], got {z.dtype} {tuple(z.shape)}")
        if z.shape[1] != first.shape[1]:
            raise ValueError(f"members must share one vocabulary: member 0 has vocabulary size {first.shape[1]}, "
                             f"member {i} has {z.shape[1]}")
        if z.shape[0] != first.shape[0]:
            raise ValueError(f"members must have the same rows: member 0 has {first.shape[0]}, "
                             f"member {i} has {z.shape[0]}")
        if z.device != first.device:
            raise ValueError(f"members must be on one device: member 0 on {first.device}, member {i} on {z.device}")
    return torch.float64 if any(z.dtype == torch.float64 for z in member_logits) else torch.float32


def _log_linear(logprobs: list[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    fused = torch.zeros_like(logprobs[0])
    for lp, w in zip(logprobs, weights):
        if w > 0:
            fused = fused + w * lp
        elif w < 0:
            fused = fused + w * lp.clamp(min=LOGPROB_FLOOR)
    return fused


def fuse_logits(
    member_logits: Sequence[torch.Tensor],  # num_members x [num_rows, vocab_size]
    spec: FusionSpec,
) -> torch.Tensor:  # [num_rows, vocab_size] fused log-probabilities (float32, or float64 if any member is)
    """Fuse every row with one spec."""
    dtype = _check_members(member_logits, spec.num_members)
    logprobs = [z.to(dtype).log_softmax(dim=-1) for z in member_logits]
    if spec.mode == "mixture":
        weighted = [lp + math.log(w) for lp, w in zip(logprobs, spec.weights) if w > 0]
        return _log_normalize(torch.logsumexp(torch.stack(weighted), dim=0))
    fused = _log_linear(logprobs, spec.member_weights)
    if spec.mode == "contrastive":
        # p_L(v) >= alpha * max p_L  <=>  exp(log p_L(v) - max log p_L) >= alpha
        large = logprobs[0]
        is_plausible = (large - large.max(dim=-1, keepdim=True).values).exp() >= spec.alpha
        fused = fused.masked_fill(~is_plausible, float("-inf"))
    return _log_normalize(fused)


@dataclass(slots=True)
class FusionTensors:
    """Per-row fusion parameters as tensors (the inputs of ``cospec.kernels.fuse_sample``)."""

    weights: torch.Tensor  # [num_rows, num_members] log-linear or mixture weights
    plausibility_alpha: torch.Tensor  # [num_rows] threshold on member 0, 0 = off
    is_mixture: torch.Tensor  # [num_rows] bool
    has_plausibility: bool  # any row with alpha > 0 (known on the host, no device sync)
    has_mixture: bool  # any mixture row


def fusion_tensors(specs: Sequence[FusionSpec], device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> FusionTensors:
    if not specs:
        raise ValueError("fusion_tensors needs at least one spec")
    num_members = {spec.num_members for spec in specs}
    if len(num_members) != 1:
        raise ValueError(f"every row of a fused batch must have the same number of members, got {sorted(num_members)}")
    alphas = [spec.plausibility_alpha for spec in specs]
    is_mixture = [spec.mode == "mixture" for spec in specs]
    return FusionTensors(
        weights=torch.tensor([spec.member_weights for spec in specs], dtype=dtype, device=device),
        plausibility_alpha=torch.tensor(alphas, dtype=dtype, device=device),
        is_mixture=torch.tensor(is_mixture, dtype=torch.bool, device=device),
        has_plausibility=any(a > 0 for a in alphas),
        has_mixture=any(is_mixture),
    )


def fuse_logits_rows(
    member_logits: Sequence[torch.Tensor],  # num_members x [num_rows, vocab_size]
    specs: Sequence[FusionSpec],  # one per row, all with the same number of members
) -> torch.Tensor:  # [num_rows, vocab_size] fused log-probabilities
    """Fuse a batch in which each row has its own spec (vectorized over rows; no device sync)."""
    if len(specs) == 0 or len(specs) != member_logits[0].shape[0]:
        raise ValueError(f"fuse_logits_rows needs one spec per row: {member_logits[0].shape[0]} rows, "
                         f"{len(specs)} specs")
    dtype = _check_members(member_logits, specs[0].num_members)
    params = fusion_tensors(specs, member_logits[0].device, dtype)
    logprobs = torch.stack([z.to(dtype).log_softmax(dim=-1) for z in member_logits])  # [num_members, num_rows, vocab]
    w = params.weights.t()[:, :, None]  # [num_members, num_rows, 1]
    # log-linear: sum_i w_i * log p_i, anti-experts floored, zero-weight members ignored
    floored = torch.where(w < 0, logprobs.clamp(min=LOGPROB_FLOOR), logprobs)
    fused = (w * torch.where(w != 0, floored, 0.0)).sum(dim=0)
    if params.has_mixture:
        # log sum_i l_i p_i, with log(0) = -inf dropping the zero-weight members
        mixed = torch.logsumexp(logprobs + w.clamp(min=0).log(), dim=0)
        fused = torch.where(params.is_mixture[:, None], mixed, fused)
    if params.has_plausibility:
        large = logprobs[0]
        is_plausible = (large - large.max(dim=-1, keepdim=True).values).exp() >= params.plausibility_alpha[:, None]
        fused = fused.masked_fill(~is_plausible, float("-inf"))
    return _log_normalize(fused)


def _log_normalize(fused: torch.Tensor) -> torch.Tensor:
    # A row with nothing left (positive-weight members with disjoint supports) stays all -inf rather than NaN.
    lse = torch.logsumexp(fused, dim=-1, keepdim=True)
    return fused - torch.where(torch.isfinite(lse), lse, 0.0)
