"""Randomness keyed by (seed, output position): a seed gives the same tokens alone or in any batch, with every
proposer and every draft length (the same tokens as plain sampling), through LLM, generate() and the Triton kernels;
numeric edges (tiny temperatures, NaN and inf logits) give correct output or a clear per-request error; logprobs,
scores and raw logits are reported from the distribution each token was chosen from."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import left_padded_batch, one_thread, random_prompt, tiny_model  # noqa: F401 (fixture)
from _tiny_models import run_to_completion as _run

import cospec
from cospec import LLM, EngineConfig, LLMEngine, SamplingParams, SpeculativeConfig
from cospec.decoding.eagle3 import Eagle3Head
from cospec.decoding.ngram_model import NgramLM
from cospec.decoding.sampling import warp_logits_for

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 48


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=VOCAB, logit_scale=4.0, eos_token_id=2)


@pytest.fixture(scope="module")
def draft():
    return tiny_model("llama", vocab_size=VOCAB, seed=7, num_hidden_layers=1, logit_scale=4.0, eos_token_id=2)


def _prompts():
    return [(random_prompt(3 + i, VOCAB, seed=i) * 3)[: 5 + 3 * i] for i in range(4)]


_SEEDED = [SamplingParams(max_tokens=16, temperature=1.0, seed=11),
           SamplingParams(max_tokens=12, temperature=0.7, top_k=10, seed=12),
           SamplingParams(max_tokens=16, temperature=1.2, top_p=0.9, min_p=0.05, seed=2**63 - 1),
           SamplingParams(max_tokens=9, temperature=0.9, seed=0)]


def _speculative(method, k, draft, model=None):
    if method == "draft":
        return SpeculativeConfig("draft", num_draft_tokens=k, draft_model=draft, adaptive=False)
    if method == "self_spec":
        return SpeculativeConfig("self_spec", num_draft_tokens=k, self_spec_layers=1, adaptive=False)
    if method == "eagle3":  # a randomly initialised head (its drafts are rarely accepted, but they are drafted)
        torch.manual_seed(5)
        head = Eagle3Head.for_target(model, list(range(0, VOCAB, 2))).double().eval()
        return SpeculativeConfig("eagle3", num_draft_tokens=k, draft_head=head, adaptive=False)
    if method == "ngram":
        return SpeculativeConfig("ngram", num_draft_tokens=k, adaptive=False,
                                 ngram_model=NgramLM.build([p * 2 for p in _prompts()], vocab_size=VOCAB, order=3))
    return SpeculativeConfig("prompt_lookup", num_draft_tokens=k, max_ngram_size=2, adaptive=False)


@pytest.fixture(scope="module")
def alone(model):
    """Each seeded request run alone with plain decoding."""
    return [_run(LLMEngine(model, EngineConfig(num_kv_blocks=16)), [(p, s)])[0].output_token_ids
            for p, s in zip(_prompts(), _SEEDED)]


@pytest.mark.parametrize("method", ["prompt_lookup", "draft", "self_spec", "ngram", "eagle3"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_seed_gives_the_same_tokens_with_every_proposer_batch_and_draft_length(model, draft, alone, method, k):
    others = [(random_prompt(n, VOCAB, seed=100 + n), SamplingParams(max_tokens=m, temperature=t, seed=None))
              for n, m, t in [(7, 10, 0.0), (12, 14, 1.0), (2, 6, 0.5)]]  # greedy and unseeded neighbours
    requests = list(zip(_prompts(), _SEEDED))
    mixed = [others[0], requests[2], others[1], requests[0], requests[3], others[2], requests[1]]
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=48, block_size=4),
                       speculative=_speculative(method, k, draft, model))
    outs = {id(r): o for r, o in zip(mixed, _run(engine, mixed))}
    got = [outs[id(r)].output_token_ids for r in requests]
    assert got == alone
    assert sum(outs[id(r)].stats.num_drafted_tokens for r in requests) > 0  # speculation ran
    # Preemption (a cache too small for everyone) and another arrival order change nothing either.
    small = LLMEngine(model, EngineConfig(num_kv_blocks=14, block_size=4, max_num_batched_tokens=16),
                      speculative=_speculative(method, k, draft, model))
    assert [o.output_token_ids for o in _run(small, requests[::-1])] == alone[::-1]


def test_a_different_seed_gives_different_tokens(model, alone):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=12)
    assert _run(LLMEngine(model, EngineConfig(num_kv_blocks=16)), [(_prompts()[0], params)])[0].output_token_ids != alone[0]


def test_llm_and_generate_reproduce_seeds_with_speculation(model, draft, alone):
    llm = LLM(model, tokenizer=None, num_kv_blocks=64, draft=draft, num_draft_tokens=3)
    assert [o.output_token_ids for o in llm.generate(_prompts(), _SEEDED, use_tqdm=False)] == alone
    input_ids, mask = left_padded_batch([4, 9, 6], VOCAB, seed=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=12)
    outputs = []
    for assistant in ({}, dict(prompt_lookup_num_tokens=3), dict(assistant_model=draft), dict(assistant_early_exit=1)):
        torch.manual_seed(0)
        outputs.append(cospec.generate(model, input_ids, **kwargs, **assistant))
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])
    torch.manual_seed(1)
    assert not torch.equal(outputs[0], cospec.generate(model, input_ids, **kwargs))


def test_seeded_sampling_through_the_triton_kernels(model, alone, monkeypatch):
    """Every kernel (store_kv, verify_greedy, keyed noise) runs as Triton, in the interpreter, on CPU tensors."""
    pytest.importorskip("triton")
    import cospec.kernels as kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "_triton_on", lambda device_type: True)
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=32), speculative=_speculative("prompt_lookup", 3, None))
    requests = list(zip(_prompts(), _SEEDED))[:2]
    assert [o.output_token_ids for o in _run(engine, requests)] == alone[:2]


def test_unseeded_requests_draw_different_seeds(model):
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=32))
    prompt = _prompts()[0]
    outs = _run(engine, [(prompt, SamplingParams(max_tokens=16, temperature=1.0))] * 3)
    assert len({tuple(o.output_token_ids) for o in outs}) == 3


# ---- numeric edges ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 1e-30, 1e-8])
def test_tiny_temperatures_sample_the_argmax(model, temperature):
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    tiny = SamplingParams(max_tokens=12, temperature=temperature, seed=5, logprobs=2)
    for extra in ({}, dict(top_p=0.5), dict(min_p=0.5), dict(top_k=3)):
        params = SamplingParams(**{**{f: getattr(tiny, f) for f in ("max_tokens", "temperature", "seed", "logprobs")},
                                   **extra})
        engine = LLMEngine(model, EngineConfig(num_kv_blocks=32))
        expected, got = _run(engine, [(_prompts()[1], greedy), (_prompts()[1], params)])
        assert got.output_token_ids == expected.output_token_ids
        assert all(entry.logprob == 0.0 for entry in got.logprobs)  # a point mass, never NaN


def test_extreme_top_p_and_min_p_keep_the_most_likely_token(model):
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    for extra in (dict(top_p=1e-12), dict(min_p=1.0)):
        engine = LLMEngine(model, EngineConfig(num_kv_blocks=32))
        expected, got = _run(engine, [(_prompts()[2], greedy),
                                      (_prompts()[2], SamplingParams(max_tokens=10, temperature=1.5, seed=1, **extra))])
        assert got.output_token_ids == expected.output_token_ids


def test_bad_sampling_values_are_refused():
    for kwargs in (dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=-1e-30),
                   dict(top_p=0.0), dict(top_p=float("nan")), dict(min_p=float("nan")), dict(seed=-1),
                   dict(seed=2**63)):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)


class _Poison:
    """A logits processor that writes ``value`` into every row it sees (one request's logits only)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, 5] = self.value
        return scores


@pytest.mark.parametrize("method", [None, "prompt_lookup", "draft"])
@pytest.mark.parametrize("value, message", [(float("nan"), "NaN"), (float("inf"), r"\+inf")])
def test_nan_or_inf_logits_fail_that_request_only(model, draft, method, value, message):
    healthy = [(_prompts()[0], SamplingParams(max_tokens=10, temperature=0.0)),
               (_prompts()[3], SamplingParams(max_tokens=10, temperature=1.0, seed=3))]
    expected = _run(LLMEngine(model, EngineConfig(num_kv_blocks=32)), healthy)
    for temperature, seed in ((0.0, None), (1.0, 4)):
        poisoned = (_prompts()[1], SamplingParams(max_tokens=10, temperature=temperature, seed=seed,
                                                  logits_processors=[_Poison(value)]))
        speculative = None if method is None else _speculative(method, 3, draft)
        engine = LLMEngine(model, EngineConfig(num_kv_blocks=32), speculative=speculative)
        outs = _run(engine, [healthy[0], poisoned, healthy[1]])
        assert outs[1].finish_reason == "error" and outs[1].output_token_ids == []
        assert outs[1].error is not None and pytest.importorskip("re").search(message, outs[1].error)
        assert [o.output_token_ids for o in (outs[0], outs[2])] == [o.output_token_ids for o in expected]
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_processing_that_rules_out_every_token_fails_the_request(model):
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=32))
    out = _run(engine, [(_prompts()[0], SamplingParams(max_tokens=4, temperature=0.0,
                                                       bad_words_ids=[[t] for t in range(VOCAB)]))])[0]
    assert out.finish_reason == "error" and "ruled out every token" in out.error


# ---- logprobs, scores, logits -------------------------------------------------------------------------------

def _teacher_forced_logits(model, prompt, output) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(output)]  # [len(output), vocab]


@pytest.mark.parametrize("method", [None, "prompt_lookup", "draft"])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.8, top_k=9, seed=21)],
                         ids=["greedy", "sampled"])
def test_logprobs_scores_and_logits_match_a_direct_computation(model, draft, method, sampling):
    params = SamplingParams(max_tokens=12, logprobs=3, output_scores=True, output_logits=True, ignore_eos=True,
                            **sampling)
    speculative = None if method is None else _speculative(method, 3, draft)
    prompt = _prompts()[2]
    out = _run(LLMEngine(model, EngineConfig(num_kv_blocks=32), speculative=speculative), [(prompt, params)])[0]
    raw = _teacher_forced_logits(model, prompt, out.output_token_ids)
    expected_scores = raw if params.is_greedy else warp_logits_for(raw, [params], [len(raw)])
    assert len(out.logprobs) == len(out.scores) == len(out.logits) == len(out.output_token_ids)
    # Reported in float32, as Hugging Face reports them.
    assert out.logits[0].dtype == out.scores[0].dtype == torch.float32
    torch.testing.assert_close(torch.stack(out.logits), raw.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.stack(out.scores), expected_scores.float(), rtol=1e-6, atol=1e-6)
    logprobs = torch.log_softmax(expected_scores, dim=-1)
    for j, (token, entry) in enumerate(zip(out.output_token_ids, out.logprobs)):
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(float(logprobs[j, token]), abs=1e-12)
        top = logprobs[j].topk(3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-12)
    if method is not None:
        assert out.stats.num_drafted_tokens > 0


def test_stopping_criteria_end_the_request_after_the_matching_token(model):
    prompt = _prompts()[0]
    full = _run(LLMEngine(model, EngineConfig(num_kv_blocks=32)),
                [(prompt, SamplingParams(max_tokens=12, temperature=0.0))])[0].output_token_ids
    target = full[4]
    calls = []

    def stop_at_target(input_ids, scores):
        calls.append(scores is not None and scores.shape == (1, VOCAB))
        return input_ids[:, -1] == target

    for speculative in (None, _speculative("prompt_lookup", 4, None)):
        out = _run(LLMEngine(model, EngineConfig(num_kv_blocks=32), speculative=speculative),
                   [(prompt, SamplingParams(max_tokens=12, temperature=0.0, stopping_criteria=[stop_at_target]))])[0]
        assert out.output_token_ids == full[: full.index(target) + 1] and out.finish_reason == "stop"
    assert calls and all(calls)
