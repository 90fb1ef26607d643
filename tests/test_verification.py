"""Verification's plain-greedy path against the general one."""

import pytest
import torch

from cospec.decoding.verification import Window, verify, verify_plain_greedy
from cospec.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("with_drafts", [False, True])
def test_plain_greedy_verification_equals_the_general_path(with_drafts):
    gen = torch.Generator().manual_seed(0)
    drafts = [[3, 9], [], [1], [], [4, 4, 4], []] if with_drafts else [[] for _ in range(6)]
    logits = torch.randn(sum(len(d) + 1 for d in drafts), 50, generator=gen)
    if with_drafts:  # drafts accepted: window 0's first (row 0), window 4's first two (rows 7 and 8)
        logits[0, 3] = logits[7, 4] = logits[8, 4] = 100.0
    logits[2, :] = logits[2, 0]  # a tie: the first index wins in both
    windows = [Window(d, SamplingParams(temperature=0.0)) for d in drafts]
    general, plain = verify(logits, windows), verify_plain_greedy(logits, drafts)
    assert plain.tokens == general.tokens and plain.errors == general.errors and plain.row_starts == general.row_starts
    assert plain.scores is None and all(error is None for error in plain.errors)
    if with_drafts:
        assert plain.tokens[0][0] == 3 and plain.tokens[4][:2] == [4, 4]


def test_plain_greedy_verification_names_nan_and_inf_rows():
    gen = torch.Generator().manual_seed(1)
    drafts = [[], [5], []]
    logits = torch.randn(4, 50, generator=gen)
    logits[0, 7] = float("nan")  # a NaN row and a +inf row fail their window only
    logits[3, 3] = float("inf")
    plain = verify_plain_greedy(logits, drafts)
    assert plain.tokens[0] == [] and "NaN" in plain.errors[0]
    assert plain.tokens[2] == [] and "+inf" in plain.errors[2]
    assert plain.tokens[1] and plain.errors[1] is None
    assert plain.tokens == verify(logits, [Window(d, SamplingParams(temperature=0.0)) for d in drafts]).tokens
