"""Verification kernels: exact greedy cases, Triton (interpreter) against the torch reference token for token,
and a distributional test that rejection sampling emits tokens distributed as the target's."""

from unittest import mock

import pytest
import torch

from cospec import kernels
from cospec.kernels import rejection_sample_kernel as rs_mod
from cospec.kernels import verify_greedy_kernel as greedy_mod

triton = pytest.importorskip("triton")

_NUM_DRAFTS_PARAMS = [  # (k_b per request, max_k); max_k may exceed every k_b (a configured speculation length)
    ((4,), 4),
    ((16,), 16),
    ((0,), 0),
    ((1, 4, 0, 8, 16), 16),
    ((8, 0, 0, 1, 4), 10),
]
_VOCAB_PARAMS = [50, 1000, 4099]  # none a power of two; 4099 spans five 1024-wide chunks
_DTYPE_PARAMS = [torch.float32, torch.float64]


def _cu(num_draft_tokens) -> torch.Tensor:
    return torch.tensor([0, *num_draft_tokens], dtype=torch.int64).cumsum(0)


def _greedy_inputs(num_draft_tokens, vocab_size, gen):
    cu = _cu(num_draft_tokens)
    batch, num_drafts_total = len(num_draft_tokens), int(cu[-1])
    target_argmax = torch.randint(vocab_size, (num_drafts_total + batch,), generator=gen)
    # Each draft copies the target's argmax with probability 0.8, else it is a token one off.
    req = torch.repeat_interleave(torch.arange(batch), torch.tensor(num_draft_tokens, dtype=torch.int64))
    draft_token_ids = target_argmax[torch.arange(num_drafts_total) + req].clone()
    is_wrong = torch.rand(num_drafts_total, generator=gen) < 0.2
    is_wrong[: num_draft_tokens[0]] = False  # request 0 accepts all its drafts and takes the bonus token
    draft_token_ids[is_wrong] = (draft_token_ids[is_wrong] + 1) % vocab_size
    return target_argmax, draft_token_ids, cu


def _probs(rows, vocab_size, dtype, gen, top_k=None):
    logits = 3.0 * torch.randn(rows, vocab_size, generator=gen, dtype=torch.float64)
    if top_k is not None:  # processed probabilities carry exact zeros
        logits[logits < logits.topk(top_k, dim=1).values[:, -1:]] = float("-inf")
    return logits.softmax(dim=1).to(dtype)


def _sampling_inputs(num_draft_tokens, vocab_size, dtype, gen, has_draft_probs=True):
    cu = _cu(num_draft_tokens)
    batch, num_drafts_total = len(num_draft_tokens), int(cu[-1])
    target_probs = _probs(num_drafts_total + batch, vocab_size, dtype, gen, top_k=min(20, vocab_size))
    draft_probs = _probs(num_drafts_total, vocab_size, dtype, gen)
    # A drafter close to the target: mostly its distribution, mixed with its own.
    req = torch.repeat_interleave(torch.arange(batch), torch.tensor(num_draft_tokens, dtype=torch.int64))
    draft_probs = 0.7 * target_probs[torch.arange(num_drafts_total) + req] + 0.3 * draft_probs
    if num_drafts_total:
        draft_token_ids = torch.multinomial(draft_probs.double(), 1, generator=gen).squeeze(1)
    else:
        draft_token_ids = torch.empty(0, dtype=torch.int64)
    uniform = torch.rand(num_drafts_total, generator=gen, dtype=dtype)
    uniform[: num_draft_tokens[0]] = 0.0  # request 0 accepts every draft the target gives mass to
    exp_noise = torch.empty(num_drafts_total + batch, vocab_size, dtype=dtype).exponential_(generator=gen)
    return target_probs, (draft_probs if has_draft_probs else None), draft_token_ids, cu, uniform, exp_noise


def _assert_rows_well_formed(output, num_draft_tokens, max_k):
    assert output.shape == (len(num_draft_tokens), max_k + 1) and output.dtype == torch.int64
    num_emitted = (output >= 0).sum(dim=1)
    for b, k in enumerate(num_draft_tokens):
        assert 1 <= int(num_emitted[b]) <= k + 1
        assert bool((output[b, : num_emitted[b]] >= 0).all()) and bool((output[b, num_emitted[b] :] == -1).all())


# ---- greedy: exact cases ----


def test_verify_greedy_exact_cases():
    # request 0: all 3 accepted -> bonus 7; request 1: k=0 -> its only target token 5;
    # request 2: first draft rejected -> recovered 9; request 3: second rejected -> [4, 8]
    num_draft_tokens = (3, 0, 2, 2)
    draft_token_ids = torch.tensor([1, 2, 3, 6, 6, 4, 5])
    target_argmax = torch.tensor([1, 2, 3, 7, 5, 9, 6, 6, 4, 8, 0])
    expected = torch.tensor([[1, 2, 3, 7], [5, -1, -1, -1], [9, -1, -1, -1], [4, 8, -1, -1]])
    cu = _cu(num_draft_tokens)
    for fn in (greedy_mod.verify_greedy_ref, greedy_mod.verify_greedy):
        assert torch.equal(fn(target_argmax, draft_token_ids, cu, 3), expected)


def test_verify_greedy_later_match_after_mismatch_is_not_accepted():
    # Draft 2 matches but draft 1 did not: acceptance stops at the first mismatch.
    target_argmax, draft_token_ids, cu = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 9, 3]), _cu((3,))
    for fn in (greedy_mod.verify_greedy_ref, greedy_mod.verify_greedy):
        assert torch.equal(fn(target_argmax, draft_token_ids, cu, 5), torch.tensor([[1, 2, -1, -1, -1, -1]]))


@pytest.mark.parametrize("num_draft_tokens,max_k", _NUM_DRAFTS_PARAMS)
@pytest.mark.parametrize("vocab_size", _VOCAB_PARAMS)
def test_verify_greedy_matches_reference(num_draft_tokens, max_k, vocab_size):
    gen = torch.Generator().manual_seed(sum(num_draft_tokens) * 31 + vocab_size)
    target_argmax, draft_token_ids, cu = _greedy_inputs(num_draft_tokens, vocab_size, gen)
    expected = greedy_mod.verify_greedy_ref(target_argmax, draft_token_ids, cu, max_k)
    actual = greedy_mod.verify_greedy(target_argmax, draft_token_ids, cu, max_k)
    assert torch.equal(actual, expected), f"triton\n{actual}\nreference\n{expected}"
    _assert_rows_well_formed(expected, num_draft_tokens, max_k)
    assert int((expected[0] >= 0).sum()) == num_draft_tokens[0] + 1  # request 0 took the bonus token
    # Drafts given as lists (kernels.verify_greedy_windows): the CPU walk, and the kernel path it takes on CUDA.
    drafts = [draft_token_ids[cu[b]: cu[b + 1]].tolist() for b in range(len(num_draft_tokens))]
    rows = [[t for t in row if t >= 0] for row in expected.tolist()]
    assert greedy_mod.verify_greedy_lists(target_argmax.tolist(), drafts) == rows
    assert kernels.verify_greedy_windows(target_argmax, drafts) == rows
    with mock.patch.object(kernels, "use_triton", return_value=True):
        assert kernels.verify_greedy_windows(target_argmax, drafts) == rows


# ---- rejection sampling: exact cases ----


def test_rejection_sample_exact_cases():
    vocab_size = 6
    # Request 0 (k=2): draft 0 accepted (u*q = 0.1 < p = 0.5), draft 1 rejected (u*q = 0.27 >= p = 0.2);
    # the residual at position 1 is max(p - q, 0) = [0, 0, 0, 0, 0, 0.1] -> recovered token 5, although the
    # noise favours token 4 (a race on p, or on a mis-scaled residual, would pick 4).
    # Request 1 (k=1): accepted -> bonus from p at its last row; the race picks id 2 (0.4 / 0.1 beats 0.6 / 1).
    # Request 2 (k=1): draft 3 has p = q = 0 -> rejected; p == q so the residual is empty and p is sampled: id 1.
    target_probs = torch.tensor([
        [0.5, 0.0, 0.0, 0.0, 0.5, 0.0],
        [0.0, 0.0, 0.2, 0.0, 0.5, 0.3],
        [0.2, 0.0, 0.3, 0.0, 0.0, 0.5],  # request 0 bonus row, unused
        [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        [0.6, 0.0, 0.4, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
        [0.1] * 5 + [0.5],  # request 2 bonus row, unused
    ], dtype=torch.float64)
    draft_probs = torch.tensor([
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.3, 0.0, 0.5, 0.2],
        [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
    ], dtype=torch.float64)
    draft_token_ids = torch.tensor([0, 2, 2, 3])
    uniform = torch.tensor([0.1, 0.9, 0.5, 0.0], dtype=torch.float64)
    exp_noise = torch.ones(7, vocab_size, dtype=torch.float64)
    exp_noise[1, 4] = 0.1
    exp_noise[4, 2] = 0.1
    exp_noise[5, 1] = 0.5
    cu = _cu((2, 1, 1))
    expected = torch.tensor([[0, 5, -1], [2, 2, -1], [1, -1, -1]])
    for fn in (rs_mod.rejection_sample_ref, rs_mod.rejection_sample):
        out = fn(target_probs, draft_probs, draft_token_ids, cu, uniform, exp_noise, 2)
        assert torch.equal(out, expected), f"{fn.__name__}\n{out}"


def test_rejection_sample_deterministic_proposer_exact():
    # q is one-hot on the draft: accept iff u < p(d); the recovered token is drawn from p with d removed.
    target_probs = torch.tensor([[0.3, 0.7, 0.0], [0.5, 0.2, 0.3], [0.0, 0.0, 1.0]])
    draft_token_ids = torch.tensor([1, 0])
    exp_noise = torch.ones(3, 3)
    exp_noise[1, 0] = 0.01  # would win the race if the rejected draft 0 were not removed from the residual
    cu = _cu((2,))
    for fn in (rs_mod.rejection_sample_ref, rs_mod.rejection_sample):
        accept_both = fn(target_probs, None, draft_token_ids, cu, torch.tensor([0.69, 0.49]), exp_noise, 2)
        assert torch.equal(accept_both, torch.tensor([[1, 0, 2]]))
        reject_second = fn(target_probs, None, draft_token_ids, cu, torch.tensor([0.69, 0.5]), exp_noise, 2)
        assert torch.equal(reject_second, torch.tensor([[1, 2, -1]]))  # residual [0, .2, .3]: 0.3 beats 0.2


@pytest.mark.parametrize("num_draft_tokens,max_k", _NUM_DRAFTS_PARAMS)
@pytest.mark.parametrize("vocab_size", _VOCAB_PARAMS)
@pytest.mark.parametrize("dtype", _DTYPE_PARAMS)
@pytest.mark.parametrize("has_draft_probs", [True, False], ids=["draft_probs", "deterministic"])
def test_rejection_sample_matches_reference(num_draft_tokens, max_k, vocab_size, dtype, has_draft_probs):
    gen = torch.Generator().manual_seed(sum(num_draft_tokens) * 17 + vocab_size)
    inputs = _sampling_inputs(num_draft_tokens, vocab_size, dtype, gen, has_draft_probs)
    expected = rs_mod.rejection_sample_ref(*inputs, max_k)
    actual = rs_mod.rejection_sample(*inputs, max_k)
    assert torch.equal(actual, expected), f"triton\n{actual}\nreference\n{expected}"
    _assert_rows_well_formed(expected, num_draft_tokens, max_k)
    if has_draft_probs:  # u = 0 and p(d) > 0 for every draft of request 0 (drawn from q, which covers p's support)
        target_probs, _, draft_token_ids, cu = inputs[:4]
        if bool((target_probs[torch.arange(num_draft_tokens[0]), draft_token_ids[: num_draft_tokens[0]]] > 0).all()):
            assert int((expected[0] >= 0).sum()) == num_draft_tokens[0] + 1


def test_rejection_sample_strided_inputs():
    gen = torch.Generator().manual_seed(7)
    target_probs, draft_probs, draft_token_ids, cu, uniform, exp_noise = _sampling_inputs((3, 0, 2), 77, torch.float32, gen)
    wide = torch.zeros(target_probs.shape[0], 90)
    wide[:, :77] = target_probs
    noise_t = exp_noise.t().contiguous().t()  # column-major: last-dim stride is not 1
    args = (wide[:, :77], draft_probs, draft_token_ids, cu, uniform, noise_t, 3)
    assert torch.equal(rs_mod.rejection_sample(*args), rs_mod.rejection_sample_ref(*args))


# ---- rejection sampling: distribution ----

_P = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.07, 0.03], dtype=torch.float64)
_Q = torch.tensor([0.05, 0.10, 0.15, 0.20, 0.20, 0.30], dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("has_draft_probs", [True, False], ids=["draft_probs", "deterministic"])
def test_rejection_sample_reference_matches_target_distribution(k, has_draft_probs):
    # n independent requests of k drafts each; p is the same at every position, so every emitted token,
    # at every window position, must be distributed as p (whatever was accepted before it).
    n, vocab_size = 40_000, _P.numel()
    gen = torch.Generator().manual_seed(1234 + k)
    target_probs = _P.expand(n * (k + 1), vocab_size).contiguous()
    if has_draft_probs:
        draft_probs = _Q.expand(n * k, vocab_size).contiguous()
        draft_token_ids = torch.multinomial(_Q, n * k, replacement=True, generator=gen)
        acceptance = float(torch.minimum(_P, _Q).sum())  # P(accept) = sum_v min(p_v, q_v)
    else:
        draft_probs = None
        draft_token_ids = torch.full((n * k,), 3)  # always proposes token 3
        acceptance = float(_P[3])
    uniform = torch.rand(n * k, generator=gen, dtype=torch.float64)
    exp_noise = torch.empty(n * (k + 1), vocab_size, dtype=torch.float64).exponential_(generator=gen)
    cu = torch.arange(0, n * k + 1, k)
    output = rs_mod.rejection_sample_ref(target_probs, draft_probs, draft_token_ids, cu, uniform, exp_noise, k)

    _assert_rows_well_formed(output[:100], [k] * 100, k)
    assert abs(float((output[:, 1] >= 0).double().mean()) - acceptance) < 0.01
    for pos in range(k + 1):
        emitted = output[:, pos][output[:, pos] >= 0]
        if emitted.numel() < 5_000:
            continue
        hist = torch.bincount(emitted, minlength=vocab_size).double() / emitted.numel()
        tv = 0.5 * float((hist - _P).abs().sum())
        assert tv < 0.02, f"position {pos}: {emitted.numel()} tokens, TV {tv:.4f}, histogram {hist.tolist()}"


# ---- input validation ----


def test_verify_greedy_rejects_bad_inputs():
    cu, drafts = _cu((2, 1)), torch.tensor([1, 2, 3])
    for fn in (greedy_mod.verify_greedy_ref, greedy_mod.verify_greedy):
        with pytest.raises(ValueError, match="target_argmax"):
            fn(torch.zeros(4, dtype=torch.int64), drafts, cu, 2)  # needs 3 + 2 rows
        with pytest.raises(ValueError, match="cu_num_draft_tokens"):
            fn(torch.zeros(5, dtype=torch.int64), drafts, cu.int(), 2)
        with pytest.raises(ValueError, match="draft_token_ids"):
            fn(torch.zeros(5, dtype=torch.int64), drafts.float(), cu, 2)
        with pytest.raises(ValueError, match="one device"):
            fn(torch.zeros(5, dtype=torch.int64), drafts.to("meta"), cu, 2)
    with pytest.raises(ValueError, match="max_k"):
        greedy_mod.verify_greedy_ref(torch.zeros(5, dtype=torch.int64), drafts, cu, 1)  # request 0 has 2 drafts
    with pytest.raises(ValueError, match="target tokens"):
        greedy_mod.verify_greedy_lists([0, 0, 0, 0], [[1, 2], [3]])  # needs 3 + 2


def test_rejection_sample_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(0)
    target_probs, draft_probs, drafts, cu, uniform, noise = _sampling_inputs((2, 1), 10, torch.float32, gen)
    for fn in (rs_mod.rejection_sample_ref, rs_mod.rejection_sample):
        with pytest.raises(ValueError, match="target_probs"):
            fn(target_probs[:-1], draft_probs, drafts, cu, uniform, noise[:-1], 2)
        with pytest.raises(ValueError, match="target_probs"):
            fn(target_probs.long(), draft_probs, drafts, cu, uniform, noise, 2)
        with pytest.raises(ValueError, match="draft_probs"):
            fn(target_probs, draft_probs[:, :9], drafts, cu, uniform, noise, 2)
        with pytest.raises(ValueError, match="uniform"):
            fn(target_probs, draft_probs, drafts, cu, uniform[:2], noise, 2)
        with pytest.raises(ValueError, match="exp_noise"):
            fn(target_probs, draft_probs, drafts, cu, uniform, noise.t(), 2)
        with pytest.raises(ValueError, match="cu_num_draft_tokens"):
            fn(target_probs, draft_probs, drafts, cu[None], uniform, noise, 2)
    with pytest.raises(ValueError, match="cu_num_draft_tokens must run"):
        rs_mod.rejection_sample_ref(target_probs, draft_probs, drafts, cu - 1, uniform, noise, 2)
