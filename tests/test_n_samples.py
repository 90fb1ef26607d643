"""``SamplingParams.n``: n samples of one prompt under one request id, sharing the prompt's cached blocks."""

from __future__ import annotations

import pytest
from _tiny_models import one_thread, random_prompt, tiny_model  # noqa: F401 (fixture)
from test_prefix_caching import count_target_tokens

from cospec import LLM, EngineConfig, LLMEngine, SamplingParams
from cospec.engine.sampling_params import sample_seed

VOCAB = 128
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=VOCAB)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[tuple[str, int], list[int]]:
    """Every request at once; the output tokens of each (request id, sample index)."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert (out.request_id, out.index) not in done
                done[out.request_id, out.index] = out
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return done


def test_samples_share_the_prompt_blocks_and_greedy_samples_are_duplicates(model):
    engine = LLMEngine(model, EngineConfig(block_size=4))
    counts = count_target_tokens(engine)
    prompt = random_prompt(30, VOCAB, seed=1)
    done = run(engine, {"r": (prompt, SamplingParams(n=3, max_tokens=8, temperature=0.0))})
    assert sorted(done) == [("r", 0), ("r", 1), ("r", 2)]
    outputs = [done["r", i].output_token_ids for i in range(3)]
    alone = run(LLMEngine(model, EngineConfig(block_size=4)), {"x": (prompt, SamplingParams(max_tokens=8, temperature=0))})
    assert outputs == [alone["x", 0].output_token_ids] * 3
    # The first sample computed the prompt; the others started on its 7 full blocks (28 tokens).
    assert [done["r", i].stats.num_cached_prompt_tokens for i in range(3)] == [0, 28, 28]
    assert [counts[seq_id] for seq_id in range(3)] == [30 + 7, 2 + 7, 2 + 7]


def test_seeded_samples_are_distinct_and_reproducible(model):
    prompt = random_prompt(10, VOCAB, seed=2)
    params = SamplingParams(n=4, max_tokens=10, temperature=1.0, seed=1234)
    first = run(LLMEngine(model, EngineConfig(block_size=4)), {"r": (prompt, params)})
    # Again, with other requests around and another page size.
    other = {"other": (random_prompt(25, VOCAB, seed=3), SamplingParams(max_tokens=5, temperature=1.0, seed=5))}
    second = run(LLMEngine(model, EngineConfig(block_size=16)), {**other, "r": (prompt, params)})
    samples = [first["r", i].output_token_ids for i in range(4)]
    assert samples == [second["r", i].output_token_ids for i in range(4)]
    assert len({tuple(s) for s in samples}) == 4
    # Sample i is the single request seeded with sample_seed(seed, i); sample 0 keeps the seed itself.
    assert sample_seed(1234, 0) == 1234
    singles = run(LLMEngine(model, EngineConfig(block_size=4)),
                  {str(i): (prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=sample_seed(1234, i)))
                   for i in range(4)})
    assert samples == [singles[str(i), 0].output_token_ids for i in range(4)]


def test_sample_seeds_are_a_stable_function_in_range():
    seeds = [sample_seed(s, i) for s in (0, 1, 2**63 - 1) for i in range(1, 50)]
    assert all(0 <= s < 2**63 for s in seeds) and len(set(seeds)) == len(seeds)
    assert sample_seed(7, 3) == 6622938940130725384  # pinned: the same in every process and version


def test_unseeded_samples_differ(model):
    done = run(LLMEngine(model, EngineConfig(block_size=4)),
               {"r": (random_prompt(6, VOCAB, seed=4), SamplingParams(n=3, max_tokens=10, temperature=1.0))})
    assert len({tuple(done["r", i].output_token_ids) for i in range(3)}) == 3


def test_abort_stops_every_sample(model):
    engine = LLMEngine(model, EngineConfig(block_size=4))
    engine.add_request("r", random_prompt(20, VOCAB, seed=5), SamplingParams(n=3, max_tokens=50, temperature=1.0))
    engine.step()  # the first sample prefills; the other two wait for its blocks
    assert engine.num_unfinished_requests == 3
    engine.step()
    engine.abort("r")
    assert not engine.has_unfinished_requests() and engine.num_unfinished_requests == 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.step() == []


def test_samples_do_not_wait_for_each_other_without_prefix_caching(model):
    engine = LLMEngine(model, EngineConfig(block_size=4, enable_prefix_caching=False))
    engine.add_request("r", random_prompt(20, VOCAB, seed=6), SamplingParams(n=3, max_tokens=4, temperature=0))
    assert len(engine.step()) == 3  # all three prefilled together


def test_llm_generate_returns_each_sample_grouped_by_prompt(model):
    llm = LLM(model)
    prompts = [random_prompt(8, VOCAB, seed=7), random_prompt(5, VOCAB, seed=8)]
    outputs = llm.generate(prompts, [SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=1),
                                     SamplingParams(max_tokens=4, temperature=0.0)], use_tqdm=False)
    assert [(o.prompt_token_ids, o.index) for o in outputs] == [(prompts[0], 0), (prompts[0], 1), (prompts[1], 0)]
    assert outputs[0].request_id == outputs[1].request_id != outputs[2].request_id


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_bad_n_is_refused_naming_it(n):
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=n)
