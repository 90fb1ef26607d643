"""Token-level fusion: spec validation, CLI parsing, the math of each mode, per-row batches, infinities."""

import math

import pytest
import torch

from cospec.decoding.fusion import (FusionSpec, fuse_logits, fuse_logits_rows, fusion_tensors, parse_fusion)

_VOCAB = 37  # not a power of two


def _logits(num_members, num_rows=4, vocab_size=_VOCAB, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [2.0 * torch.randn(num_rows, vocab_size, generator=gen, dtype=dtype) for _ in range(num_members)]


def _assert_normalized(fused):
    assert not torch.isnan(fused).any()
    torch.testing.assert_close(torch.logsumexp(fused, dim=-1), torch.zeros(fused.shape[0], dtype=fused.dtype))


# ---- specs ----


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="product"), "unknown fusion mode 'product'"),
    (dict(mode="mixture", weights=(0.7, -0.3)), "mixture weights must be >= 0"),
    (dict(mode="mixture", weights=(0.7, 0.2)), "mixture weights must sum to 1"),
    (dict(mode="mixture", weights=()), "one weight per member"),
    (dict(mode="log_linear", weights=(1.0, -1.0)), "sum to > 0"),
    (dict(mode="log_linear", weights=(1.0, float("nan"))), "finite"),
    (dict(mode="log_linear", weights=("a", 1.0)), "numbers"),
    (dict(mode="log_linear", weights=(1.0,), alpha=0.1), "alpha applies only to mode 'contrastive'"),
    (dict(mode="contrastive", beta=0.5, alpha=0.0), r"alpha .* must be in \(0, 1\]"),
    (dict(mode="contrastive", beta=0.5, alpha=1.5), r"alpha .* must be in \(0, 1\]"),
    (dict(mode="contrastive", beta=-0.5, alpha=0.1), "beta must be a finite number >= 0"),
    (dict(mode="contrastive", beta=0.5), "alpha"),
    (dict(mode="contrastive", weights=(1.0, -0.5), beta=0.5, alpha=0.1), "not weights"),
])
def test_spec_rejects_what_makes_no_distribution(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusionSpec(**kwargs)


def test_constructors():
    assert FusionSpec.proxy_tuning(0.5) == FusionSpec("log_linear", (1.0, 0.5, -0.5))
    assert FusionSpec.dexperts(2.0).member_weights == (1.0, 2.0, -2.0)
    cd = FusionSpec.contrastive(0.5, 0.1)
    assert (cd.num_members, cd.member_weights, cd.plausibility_alpha) == (2, (1.0, -0.5), 0.1)
    assert FusionSpec.mixture([0.7, 0.3]).num_members == 2
    assert FusionSpec.log_linear([1, 2]).weights == (1.0, 2.0)  # ints become floats
    with pytest.raises(ValueError, match="proxy-tuning strength alpha"):
        FusionSpec.proxy_tuning(-1.0)


@pytest.mark.parametrize("text,expected", [
    ("proxy:1.0", FusionSpec.proxy_tuning(1.0)),
    ("proxy-tuning:0.5", FusionSpec.proxy_tuning(0.5)),
    ("dexperts:2", FusionSpec.dexperts(2.0)),
    ("contrastive:0.5,0.1", FusionSpec.contrastive(0.5, 0.1)),
    ("contrastive:0.5", FusionSpec.contrastive(0.5)),
    ("mixture:0.7,0.3", FusionSpec.mixture([0.7, 0.3])),
    (" loglinear:1,0.5,-0.5 ", FusionSpec.log_linear([1, 0.5, -0.5])),
])
def test_parse_fusion(text, expected):
    assert parse_fusion(text) == expected


@pytest.mark.parametrize("text,match", [
    ("proxy", "no parameters"),
    ("proxy:", "no parameters"),
    ("blend:0.5", "unknown fusion 'blend'"),
    ("mixture:a,b", "comma-separated numbers"),
    ("proxy:1,2", "proxy takes 1 parameter"),
    ("contrastive:0.5,0.1,3", "contrastive takes 1 to 2"),
    ("mixture:0.5,0.6", "sum to 1"),
    ("contrastive:0.5,2", "alpha"),
])
def test_parse_fusion_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_fusion(text)


# ---- the math of each mode ----


def test_log_linear_is_proxy_tuning():
    large, tuned, base = _logits(3)
    fused = fuse_logits([large, tuned, base], FusionSpec.proxy_tuning(0.7))
    lp = [z.log_softmax(-1) for z in (large, tuned, base)]
    expected = (lp[0] + 0.7 * (lp[1] - lp[2])).log_softmax(-1)
    torch.testing.assert_close(fused, expected)
    _assert_normalized(fused)


def test_contrastive_masks_implausible_tokens():
    large, small = _logits(2)
    spec = FusionSpec.contrastive(beta=0.5, alpha=0.1)
    fused = fuse_logits([large, small], spec)
    p_large = large.softmax(-1)
    is_plausible = p_large >= 0.1 * p_large.max(-1, keepdim=True).values
    assert torch.equal(torch.isfinite(fused), is_plausible)
    score = large.log_softmax(-1) - 0.5 * small.log_softmax(-1)
    expected = score.masked_fill(~is_plausible, float("-inf")).log_softmax(-1)
    torch.testing.assert_close(fused, expected)
    _assert_normalized(fused)
    # alpha = 1 keeps only the large model's argmax
    only_top = fuse_logits([large, small], FusionSpec.contrastive(beta=0.5, alpha=1.0))
    assert torch.equal(only_top.argmax(-1), large.argmax(-1)) and bool((torch.isfinite(only_top).sum(-1) == 1).all())


def test_mixture_interpolates_probabilities():
    members = _logits(3, dtype=torch.float32)
    weights = [0.5, 0.3, 0.2]
    fused = fuse_logits(members, FusionSpec.mixture(weights))
    expected = sum(w * z.double().softmax(-1) for w, z in zip(weights, members))
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused.double().exp(), expected, rtol=1e-5, atol=1e-7)
    _assert_normalized(fused.double())
    # one member with all the weight is that member
    torch.testing.assert_close(fuse_logits(members, FusionSpec.mixture([0, 1, 0])), members[1].log_softmax(-1))


def test_member_count_and_vocabulary_are_checked():
    large, small = _logits(2)
    with pytest.raises(ValueError, match="expects 3 members, got 2"):
        fuse_logits([large, small], FusionSpec.proxy_tuning(1.0))
    with pytest.raises(ValueError, match="vocabulary"):
        fuse_logits([large, small[:, :-1]], FusionSpec.mixture([0.5, 0.5]))
    with pytest.raises(ValueError, match="same rows"):
        fuse_logits([large, small[:-1]], FusionSpec.mixture([0.5, 0.5]))
    with pytest.raises(ValueError, match="vocabulary"):
        fuse_logits_rows([large, small[:, :-1]], [FusionSpec.mixture([0.5, 0.5])] * 4)


def test_infinite_log_probabilities():
    # Token 0: ruled out by a positive-weight member -> ruled out; token 1: ruled out by the anti-expert only ->
    # favoured, finite; token 2: ruled out by a zero-weight member -> ignored.
    large = torch.tensor([[float("-inf"), 0.0, 0.0, 0.0]])
    tuned = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    base = torch.tensor([[0.0, float("-inf"), 0.0, 0.0]])
    fused = fuse_logits([large, tuned, base], FusionSpec.proxy_tuning(0.5))
    assert fused[0, 0] == float("-inf") and torch.isfinite(fused[0, 1:]).all() and int(fused.argmax()) == 1
    ignored = fuse_logits([large, tuned, torch.tensor([[0.0, 0.0, float("-inf"), 0.0]])],
                          FusionSpec.log_linear([1.0, 1.0, 0.0]))
    torch.testing.assert_close(ignored[0, 1:].exp(), torch.full((3,), 1 / 3))
    mixed = fuse_logits([large, base], FusionSpec.mixture([0.5, 0.5]))  # each covers what the other rules out
    assert torch.isfinite(mixed).all()
    disjoint = fuse_logits([large, torch.tensor([[0.0, float("-inf"), float("-inf"), float("-inf")]])],
                           FusionSpec.log_linear([1.0, 1.0]))
    assert not torch.isnan(disjoint).any() and not torch.isfinite(disjoint).any()  # no distribution, but no NaN


# ---- per-row batches ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fuse_logits_rows_matches_per_row_specs(dtype):
    two = [FusionSpec.mixture([0.7, 0.3]), FusionSpec.contrastive(0.5, 0.1), FusionSpec.log_linear([1.0, 0.5]),
           FusionSpec.log_linear([1.0, -0.3]), FusionSpec.contrastive(1.0, 0.5), FusionSpec.mixture([1.0, 0.0])]
    three = [FusionSpec.proxy_tuning(1.0), FusionSpec.mixture([0.2, 0.3, 0.5]), FusionSpec.dexperts(0.3)]
    for specs in (two, three):
        members = _logits(specs[0].num_members, num_rows=len(specs), seed=len(specs), dtype=dtype)
        fused = fuse_logits_rows(members, specs)
        for row, spec in enumerate(specs):
            expected = fuse_logits([z[row : row + 1] for z in members], spec)
            torch.testing.assert_close(fused[row : row + 1], expected)
        _assert_normalized(fused)


def test_fuse_logits_rows_checks_specs():
    members = _logits(2, num_rows=2)
    with pytest.raises(ValueError, match="one spec per row"):
        fuse_logits_rows(members, [FusionSpec.mixture([0.5, 0.5])])
    with pytest.raises(ValueError, match="same number of members"):
        fusion_tensors([FusionSpec.mixture([0.5, 0.5]), FusionSpec.proxy_tuning(1.0)])


def test_fusion_tensors():
    params = fusion_tensors([FusionSpec.contrastive(0.5, 0.2), FusionSpec.mixture([0.25, 0.75])])
    torch.testing.assert_close(params.weights, torch.tensor([[1.0, -0.5], [0.25, 0.75]]))
    torch.testing.assert_close(params.plausibility_alpha, torch.tensor([0.2, 0.0]))
    assert params.is_mixture.tolist() == [False, True] and params.has_mixture and params.has_plausibility
    assert not math.isnan(float(params.weights.sum()))
