"""Sampling, tested three ways: exact (``process_probs`` against Hugging Face's logits warpers), seeded (same seed,
same tokens, whatever the batch), and distributional (the first sampled token over thousands of seeds follows
``softmax(logits / temperature)``, processed as promised)."""

from __future__ import annotations

import math

import pytest
import torch
from _tiny_models import one_thread, random_prompt, tiny_model  # noqa: F401 (fixture)
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from cospec import LLM, EngineConfig, LLMEngine, SamplingParams
from cospec.decoding.sampling import STREAM_TARGET, exponential_noise, noise_keys, process_probs, sample_from_probs

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- exact: process_probs is HF's warpers -------------------------------------------------------------------


def hf_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """HF's sampling distribution: the warpers in the order generate() applies them, then softmax."""
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p > 0.0:
        warpers.append(MinPLogitsWarper(min_p))
    scores = logits[None].clone()
    for warper in warpers:
        scores = warper(None, scores)
    return torch.softmax(scores, dim=-1)[0]


def cospec_probs(logits: torch.Tensor, rows: list[tuple[float, int, float, float]]) -> torch.Tensor:
    temperature, top_k, top_p, min_p = zip(*rows)
    return process_probs(logits, torch.tensor(temperature, dtype=torch.float64), torch.tensor(top_k),
                         torch.tensor(top_p, dtype=torch.float64), torch.tensor(min_p, dtype=torch.float64))


def assert_same_distribution(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(got > 0, expected > 0), f"support differs at {torch.nonzero((got > 0) != (expected > 0))}"
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got.sum(), torch.tensor(1.0, dtype=got.dtype))


_PARAMS = [  # (temperature, top_k, top_p, min_p)
    (1.0, 0, 1.0, 0.0),
    (0.7, 0, 1.0, 0.0),
    (1.3, 10, 1.0, 0.0),
    (1.0, 1, 1.0, 0.0),
    (0.9, 0, 0.8, 0.0),
    (1.0, 0, 1e-6, 0.0),  # top-p keeps the most likely token only
    (1.0, 0, 1.0, 0.1),
    (0.6, 40, 0.9, 0.05),
    (2.0, 2000, 0.5, 0.3),  # k beyond the vocabulary
]


@pytest.mark.parametrize("vocab_size", [37, 1000])  # one odd size
@pytest.mark.parametrize("params", _PARAMS, ids=str)
def test_process_probs_matches_hf_warpers(vocab_size, params):
    logits = 3 * torch.randn(4, vocab_size, generator=torch.Generator().manual_seed(vocab_size), dtype=torch.float64)
    got = cospec_probs(logits, [params] * 4)
    for row in range(4):
        assert_same_distribution(got[row], hf_probs(logits[row], *params))


def test_process_probs_rows_are_independent():
    """One call with different parameters per row equals one call per row (ragged batches mix requests)."""
    logits = 3 * torch.randn(len(_PARAMS), 101, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    batched = cospec_probs(logits, _PARAMS)
    for row, params in enumerate(_PARAMS):
        assert_same_distribution(batched[row], cospec_probs(logits[row:row + 1], [params])[0])
        assert_same_distribution(batched[row], hf_probs(logits[row], *params))


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab_size=st.integers(1, 300),
       temperature=st.floats(0.25, 4.0), top_k=st.integers(0, 310), top_p=st.floats(0.01, 1.0),
       min_p=st.one_of(st.just(0.0), st.floats(0.0, 0.9)))
def test_process_probs_matches_hf_warpers_property(seed, vocab_size, temperature, top_k, top_p, min_p):
    logits = 3 * torch.randn(vocab_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = cospec_probs(logits[None], [(temperature, top_k, top_p, min_p)])[0]
    assert_same_distribution(got, hf_probs(logits, temperature, top_k, top_p, min_p))


def test_exponential_race_is_exact_on_a_point_mass_and_respects_zeros():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]], dtype=torch.float64)
    seen = set()
    for position in range(50):
        keys = noise_keys(torch.tensor([0, 1]), torch.tensor([position, position]), STREAM_TARGET)
        tokens = sample_from_probs(probs, exponential_noise(keys, 3, torch.float64))
        assert tokens[0] == 1 and tokens[1] in (0, 2)
        seen.add(int(tokens[1]))
    assert seen == {0, 2}


# ---- seeded -------------------------------------------------------------------------------------------------

VOCAB = 128


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=VOCAB, logit_scale=20.0)


def test_same_seed_same_tokens_different_seeds_differ(model):
    llm = LLM(model=model, tokenizer=None, num_kv_blocks=64)
    prompt = random_prompt(9, VOCAB, seed=0)

    def sample(seed, **kwargs):
        params = SamplingParams(max_tokens=16, temperature=1.0, seed=seed, **kwargs)
        return llm.generate([prompt], params, use_tqdm=False)[0].output_token_ids

    for kwargs in ({}, dict(top_k=20), dict(top_p=0.9, min_p=0.05)):
        runs = [sample(seed, **kwargs) for seed in (0, 0, 1, 2)]
        assert runs[0] == runs[1]
        assert len({tuple(r) for r in runs}) == 3, runs
    greedy = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0), use_tqdm=False)[0]
    assert sample(0) != greedy.output_token_ids  # sampling really samples


def test_seeded_output_does_not_depend_on_the_batch(model):
    target = (random_prompt(13, VOCAB, seed=1), SamplingParams(max_tokens=20, temperature=0.9, top_k=30, seed=7))
    others = [(random_prompt(n, VOCAB, seed=10 + n), SamplingParams(max_tokens=m, temperature=t, seed=s))
              for n, m, t, s in [(3, 25, 1.0, 1), (40, 10, 0.0, None), (17, 30, 0.5, 2), (1, 5, 1.2, 3)]]

    def run(requests, **config):
        engine = LLMEngine(model, EngineConfig(**config))
        for i, (prompt, params) in enumerate(requests):
            engine.add_request(str(i), prompt, params)
        done = {}
        while engine.has_unfinished_requests():
            done.update({out.request_id: out.output_token_ids for out in engine.step() if out.finished})
        return done

    alone = run([target], num_kv_blocks=16)["0"]
    assert run([target] + others, num_kv_blocks=64)["0"] == alone
    assert run(others + [target], num_kv_blocks=64)[str(len(others))] == alone
    # A cache so small that requests are preempted, with prefills split into 8-token chunks.
    assert run(others[:2] + [target] + others[2:], num_kv_blocks=16, block_size=4,
               max_num_batched_tokens=8)["2"] == alone


# ---- distributional -----------------------------------------------------------------------------------------

SMALL_VOCAB = 32
NUM_SEEDS = 8000


@pytest.fixture(scope="module")
def small_model():
    # Scaled output embedding: a peaked, far-from-uniform next-token distribution.
    return tiny_model("llama", vocab_size=SMALL_VOCAB, logit_scale=12.0, seed=3)


def _first_token_counts(model, prompt: list[int], params: dict) -> torch.Tensor:
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=1024, block_size=16, max_num_seqs=1024,
                                           max_num_batched_tokens=8192))
    for seed in range(NUM_SEEDS):
        engine.add_request(str(seed), prompt, SamplingParams(max_tokens=1, seed=seed, **params))
    counts = torch.zeros(SMALL_VOCAB, dtype=torch.float64)
    num_done = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            counts[out.output_token_ids[0]] += 1
            num_done += 1
    assert num_done == NUM_SEEDS
    return counts


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness-of-fit test; tokens expected fewer than 5 times are pooled into one cell."""
    assert counts[probs == 0].sum() == 0, "sampled a token of probability zero"
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    observed_cells = torch.cat([counts[~small], counts[small].sum()[None]])
    expected_cells = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected_cells > 0
    observed_cells, expected_cells = observed_cells[keep], expected_cells[keep]
    statistic = ((observed_cells - expected_cells) ** 2 / expected_cells).sum()
    dof = observed_cells.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


@pytest.mark.parametrize("params", [dict(temperature=0.8), dict(temperature=1.3, top_k=12, top_p=0.9, min_p=0.02)],
                         ids=["temperature", "top_k_top_p_min_p"])
def test_first_token_follows_the_processed_distribution(small_model, params):
    prompt = random_prompt(4, SMALL_VOCAB, seed=0)
    with torch.no_grad():
        logits = small_model(torch.tensor([prompt])).logits[0, -1]  # [vocab]
    temperature = params["temperature"]
    expected = hf_probs(logits, temperature, params.get("top_k", 0), params.get("top_p", 1.0), params.get("min_p", 0.0))
    assert expected.max() > 0.1 and (expected > 0.005).sum() >= 8  # a distribution worth testing
    counts = _first_token_counts(small_model, prompt, params)
    empirical = counts / counts.sum()
    # E[TV] <= 0.5 * sqrt(vocab / n) = 0.032 (Jensen); its standard deviation is a few thousandths. 0.05 is far out.
    total_variation = 0.5 * float((empirical - expected).abs().sum())
    assert total_variation < 0.05, total_variation
    assert chi_square_p_value(counts, expected) > 1e-3
    # The test has power: the same counts reject the untempered softmax(logits).
    assert chi_square_p_value(counts, torch.softmax(logits, dim=-1)) < 1e-6
    assert 0.5 * math.sqrt(SMALL_VOCAB / NUM_SEEDS) < 0.05
