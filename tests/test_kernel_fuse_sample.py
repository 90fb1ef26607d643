"""Fused sampling kernel: exact greedy cases, Triton (interpreter) against the torch reference token for token,
agreement of the reference with fuse_logits + process_probs + sample_from_probs, and the sampled distribution."""

import pytest
import torch

import cospec.kernels
from cospec.decoding.fusion import FusionSpec, fuse_logits_rows, fusion_tensors
from cospec.decoding.sampling import process_probs, sample_from_probs
from cospec.kernels import fuse_sample_kernel as fs_mod

triton = pytest.importorskip("triton")

_VOCAB_PARAMS = [1000, 4099]  # not powers of two; 4099 spans five 1024-wide chunks
_NUM_ROWS_PARAMS = [1, 6, 13]
_DTYPE_PARAMS = [torch.float32, torch.float64]

# Rows cycle through these: (spec, temperature, min_p); all have three members.
_ROW_SETTINGS = [
    (FusionSpec.proxy_tuning(1.0), 0.0, 0.0),
    (FusionSpec.mixture([0.6, 0.3, 0.1]), 1.0, 0.0),
    (FusionSpec.dexperts(0.5), 0.7, 0.05),
    (FusionSpec.log_linear([1.0, 0.0, -0.4]), 1.3, 0.0),
    (FusionSpec.mixture([0.2, 0.0, 0.8]), 0.0, 0.0),
    (FusionSpec.log_linear([0.5, 0.5, 0.5]), 0.5, 0.2),
]


def _inputs(num_rows, vocab_size, dtype, seed, num_members=3, settings=_ROW_SETTINGS):
    gen = torch.Generator().manual_seed(seed)
    member_logits = 3.0 * torch.randn(num_members, num_rows, vocab_size, generator=gen, dtype=torch.float64)
    member_logits[1] = 0.5 * member_logits[0] + member_logits[1]  # members that roughly agree, as models do
    member_logits = member_logits.to(dtype)
    rows = [settings[i % len(settings)] for i in range(num_rows)]
    params = fusion_tensors([spec for spec, _, _ in rows], dtype=dtype)
    temperature = torch.tensor([t for _, t, _ in rows], dtype=dtype)
    min_p = torch.tensor([m for _, _, m in rows], dtype=dtype)
    exp_noise = torch.empty(num_rows, vocab_size, dtype=dtype).exponential_(generator=gen)
    return member_logits, params, temperature, exp_noise, min_p, [spec for spec, _, _ in rows]


# ---- exact cases ----


def test_fuse_sample_exact_greedy_cases():
    # Row 0 (proxy-tuning): the large model prefers token 0, the tuned/base difference moves the argmax to token 2.
    # Row 1 (contrastive, alpha 0.5): p_L / p_S is highest for token 3 (5 against 4 for token 1), but the large
    # model gives it p_L(3) < 0.5 max p_L, so the plausibility set {0, 1} decides: token 1 (4 against 0.56).
    # Row 2 (mixture 0.5/0.5): p = [.305, .3, .07, .325] -> token 3 (the product of the two would pick token 1).
    def log(rows):
        return torch.tensor(rows, dtype=torch.float64).log()

    large = log([[0.4, 0.3, 0.2, 0.1], [0.45, 0.4, 0.1, 0.05], [0.6, 0.3, 0.05, 0.05]])
    second = log([[0.1, 0.1, 0.7, 0.1], [0.8, 0.1, 0.09, 0.01], [0.01, 0.3, 0.09, 0.6]])
    third = log([[0.25] * 4, [0.25] * 4, [0.25] * 4])
    member_logits = torch.stack([large, second, third])
    weights = torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    alpha = torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64)
    is_mixture = torch.tensor([False, False, True])
    temperature = torch.zeros(3, dtype=torch.float64)
    noise = torch.ones(3, 4, dtype=torch.float64)
    for fn in (fs_mod.fuse_sample_ref, fs_mod.fuse_sample):
        assert fn(member_logits, weights, temperature, noise, alpha, is_mixture).tolist() == [2, 1, 3], fn.__name__


def test_fuse_sample_exact_race_and_min_p():
    # One member, p = [0.5, 0.3, 0.2]. The noise makes token 2 win the race (0.2 / 0.1 > 0.5 / 1); min-p 0.5
    # removes tokens below 0.25 (token 2), and token 1 wins (0.3 / 0.5 > 0.5 / 1).
    member_logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]], dtype=torch.float64))
    noise = torch.tensor([[1.0, 0.5, 0.1]], dtype=torch.float64)
    args = (member_logits, torch.ones(1, 1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), noise)
    for fn in (fs_mod.fuse_sample_ref, fs_mod.fuse_sample):
        assert fn(*args).tolist() == [2]
        assert fn(*args, min_p=torch.tensor([0.5], dtype=torch.float64)).tolist() == [1]


# ---- Triton against the reference ----


@pytest.mark.parametrize("vocab_size", _VOCAB_PARAMS)
@pytest.mark.parametrize("num_rows", _NUM_ROWS_PARAMS)
@pytest.mark.parametrize("dtype", _DTYPE_PARAMS)
def test_fuse_sample_matches_reference(vocab_size, num_rows, dtype):
    seed = vocab_size + num_rows
    member_logits, params, temperature, exp_noise, min_p, _ = _inputs(num_rows, vocab_size, dtype, seed)
    args = (member_logits, params.weights, temperature, exp_noise, params.plausibility_alpha, params.is_mixture, min_p)
    expected = fs_mod.fuse_sample_ref(*args)
    actual = fs_mod.fuse_sample(*args)
    assert torch.equal(actual, expected), f"triton {actual.tolist()}\nreference {expected.tolist()}"


@pytest.mark.parametrize("num_members", [1, 2, 5])
def test_fuse_sample_member_counts_without_optional_inputs(num_members):
    gen = torch.Generator().manual_seed(num_members)
    num_rows, vocab_size = 4, 1000
    member_logits = 3.0 * torch.randn(num_members, num_rows, vocab_size, generator=gen)
    weights = torch.rand(num_rows, num_members, generator=gen) - 0.2
    weights[:, 0] = 1.0
    temperature = torch.tensor([0.0, 1.0, 0.6, 2.0])
    exp_noise = torch.empty(num_rows, vocab_size).exponential_(generator=gen)
    args = (member_logits, weights, temperature, exp_noise)
    assert torch.equal(fs_mod.fuse_sample(*args), fs_mod.fuse_sample_ref(*args))


def test_fuse_sample_contrastive_rows():
    settings = [(FusionSpec.contrastive(0.5, 0.1), 0.0, 0.0), (FusionSpec.contrastive(1.0, 0.01), 1.0, 0.0),
                (FusionSpec.mixture([0.9, 0.1]), 0.8, 0.1)]
    member_logits, params, temperature, exp_noise, min_p, _ = _inputs(6, 1000, torch.float32, 5, 2, settings)
    args = (member_logits, params.weights, temperature, exp_noise, params.plausibility_alpha, params.is_mixture, min_p)
    assert torch.equal(fs_mod.fuse_sample(*args), fs_mod.fuse_sample_ref(*args))


def test_fuse_sample_strided_inputs():
    member_logits, params, temperature, exp_noise, min_p, _ = _inputs(5, 77, torch.float32, 3)
    wide = torch.zeros(3, 5, 90)
    wide[:, :, :77] = member_logits
    noise_t = exp_noise.t().contiguous().t()  # column-major: last-dim stride is not 1
    args = (wide[:, :, :77], params.weights, temperature, noise_t, params.plausibility_alpha, params.is_mixture, min_p)
    assert torch.equal(fs_mod.fuse_sample(*args), fs_mod.fuse_sample_ref(*args))


# ---- the reference is fusion + processing + the exponential race ----


@pytest.mark.parametrize("num_members", [2, 3])
def test_reference_agrees_with_fuse_logits_and_process_probs(num_members):
    if num_members == 2:
        settings = [(FusionSpec.contrastive(0.5, 0.1), 0.9, 0.0), (FusionSpec.mixture([0.3, 0.7]), 1.0, 0.1),
                    (FusionSpec.log_linear([1.0, -0.5]), 0.0, 0.0), (FusionSpec.contrastive(1.0, 0.05), 0.0, 0.0)]
    else:
        settings = _ROW_SETTINGS
    num_rows, vocab_size = 64, 4099
    member_logits, params, temperature, exp_noise, min_p, specs = _inputs(
        num_rows, vocab_size, torch.float64, 11, num_members, settings)
    tokens = fs_mod.fuse_sample_ref(member_logits, params.weights, temperature, exp_noise,
                                    params.plausibility_alpha, params.is_mixture, min_p)

    fused = fuse_logits_rows(list(member_logits), specs)
    is_sampled = temperature > 0
    num_sampled = int(is_sampled.sum())
    probs = process_probs(fused[is_sampled], temperature[is_sampled], torch.zeros(num_sampled, dtype=torch.int64),
                          torch.ones(num_sampled, dtype=torch.float64), min_p[is_sampled])
    expected = fused.argmax(dim=-1)
    expected[is_sampled] = sample_from_probs(probs, exp_noise[is_sampled])
    assert torch.equal(tokens, expected)
    assert torch.equal(cospec.kernels.fuse_sample(member_logits, params.weights, temperature, exp_noise,
                                                  params.plausibility_alpha, params.is_mixture, min_p), tokens)


def test_reference_samples_the_fused_distribution():
    # Proxy-tuning at temperature 0.8 with min-p 0.05 over 8 tokens: the histogram of 40k samples must match
    # process_probs(fused) within total variation 0.015.
    n, vocab_size = 40_000, 8
    gen = torch.Generator().manual_seed(99)
    base = torch.randn(3, 1, vocab_size, generator=gen, dtype=torch.float64)
    member_logits = base.expand(3, n, vocab_size)
    spec = FusionSpec.proxy_tuning(0.8)
    weights = torch.tensor([spec.member_weights], dtype=torch.float64).expand(n, 3)
    temperature = torch.full((n,), 0.8, dtype=torch.float64)
    min_p = torch.full((n,), 0.05, dtype=torch.float64)
    exp_noise = torch.empty(n, vocab_size, dtype=torch.float64).exponential_(generator=gen)
    tokens = fs_mod.fuse_sample_ref(member_logits, weights, temperature, exp_noise, min_p=min_p)
    fused = fuse_logits_rows(list(base), [spec])
    expected = process_probs(fused, temperature[:1], torch.zeros(1, dtype=torch.int64),
                             torch.ones(1, dtype=torch.float64), min_p[:1])[0]
    hist = torch.bincount(tokens, minlength=vocab_size).double() / n
    assert hist[expected == 0].sum() == 0
    tv = 0.5 * float((hist - expected).abs().sum())
    assert tv < 0.015, f"TV {tv:.4f}\nhistogram {hist.tolist()}\nexpected {expected.tolist()}"


# ---- input validation ----


def test_fuse_sample_rejects_bad_inputs():
    member_logits, params, temperature, exp_noise, min_p, _ = _inputs(3, 50, torch.float32, 0)
    w, alpha, mix = params.weights, params.plausibility_alpha, params.is_mixture
    for fn in (fs_mod.fuse_sample_ref, fs_mod.fuse_sample):
        with pytest.raises(ValueError, match="member_logits"):
            fn(member_logits[0], w, temperature, exp_noise)
        with pytest.raises(ValueError, match="member_logits"):
            fn(member_logits.long(), w, temperature, exp_noise)
        with pytest.raises(ValueError, match="weights"):
            fn(member_logits, w[:, :2], temperature, exp_noise)
        with pytest.raises(ValueError, match="temperature"):
            fn(member_logits, w, temperature[:2], exp_noise)
        with pytest.raises(ValueError, match="exp_noise"):
            fn(member_logits, w, temperature, exp_noise[:, :49])
        with pytest.raises(ValueError, match="plausibility_alpha"):
            fn(member_logits, w, temperature, exp_noise, alpha[:, None])
        with pytest.raises(ValueError, match="is_mixture"):
            fn(member_logits, w, temperature, exp_noise, alpha, mix.float())
        with pytest.raises(ValueError, match="min_p"):
            fn(member_logits, w, temperature, exp_noise, alpha, mix, min_p.long())
        with pytest.raises(ValueError, match="one device"):
            fn(member_logits, w, temperature, exp_noise.to("meta"))
