"""Verification's plain-greedy path against the general one."""

import torch

from cospec.decoding.verification import Window, verify, verify_plain_greedy
from cospec.engine.sampling_params import SamplingParams


def test_plain_greedy_verification_equals_the_general_path_with_bad_rows():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    logits[1, 7] = float("nan")  # a NaN row and a +inf row fail their window only
    logits[4, 3] = float("inf")
    logits[2, :] = logits[2, 0]  # a tie: the first index wins in both
    windows = [Window([], SamplingParams(temperature=0.0)) for _ in range(6)]
    general, plain = verify(logits, windows), verify_plain_greedy(logits)
    assert plain.tokens == general.tokens and plain.errors == general.errors and plain.row_starts == general.row_starts
    assert plain.tokens[1] == [] and "NaN" in plain.errors[1] and "+inf" in plain.errors[4]
    assert plain.tokens[2] == [0] and plain.scores is None
