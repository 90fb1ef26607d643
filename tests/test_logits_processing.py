"""Logits processing (penalties, biases, bans, user processors): each step against a direct computation and
against Hugging Face's processors; end to end against HF generate (greedy, float64); speculation with each
processor equals plain decoding with it, for every proposer (greedy and seeded sampling)."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import left_padded_batch, one_thread, random_prompt, tiny_model  # noqa: F401 (fixture)
from transformers.generation.logits_process import (LogitsProcessor, NoBadWordsLogitsProcessor,
                                                    NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                                                    SequenceBiasLogitsProcessor)

import cospec
from cospec import EngineConfig, LLMEngine, SamplingParams, SpeculativeConfig
from cospec.decoding.logits_processing import RowContext, process_logits
from cospec.decoding.ngram_model import NgramLM

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64


def _context(params: SamplingParams, token_ids, num_prompt, extra=(), stop=(), prefix=()) -> RowContext:
    return RowContext(params, list(token_ids), num_prompt, list(extra), tuple(stop), list(prefix))


def _logits(rows=1, seed=0) -> torch.Tensor:
    return 3 * torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- each step against a direct computation and against HF's processor ------------------------------------------

def test_repetition_penalty_matches_the_formula_and_hf():
    logits = _logits()
    tokens, extra = [3, 9, 9, 20], [41]
    got = process_logits(logits, [_context(SamplingParams(repetition_penalty=1.5), tokens, 2, extra)])
    expected = logits.clone()
    for t in {3, 9, 20, 41}:
        expected[0, t] = expected[0, t] / 1.5 if expected[0, t] > 0 else expected[0, t] * 1.5
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    hf = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([tokens + extra]), logits.clone())
    torch.testing.assert_close(got, hf, rtol=0, atol=0)


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = _logits()
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = process_logits(logits, [_context(params, [7, 7, 8, 8, 8], 2, extra=[8, 11])])  # prompt [7, 7]
    expected = logits.clone()
    expected[0, 8] -= 0.5 + 0.25 * 4
    expected[0, 11] -= 0.5 + 0.25
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)  # token 7 (prompt only) untouched


def test_logit_bias_and_sequence_bias():
    logits = _logits()
    params = SamplingParams(logit_bias={5: -2.0, 6: 1.5}, sequence_bias={(13,): 3.0, (1, 2, 14): -4.0, (9, 15): 2.0})
    got = process_logits(logits, [_context(params, [4, 1, 2], 3)])
    expected = logits.clone()
    expected[0, 5] -= 2.0
    expected[0, 6] += 1.5
    expected[0, 13] += 3.0
    expected[0, 14] -= 4.0  # [1, 2] ends the context; [9] does not, so 15 is not biased
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
    hf_bias = SequenceBiasLogitsProcessor([[[13], 3.0], [[1, 2, 14], -4.0], [[9, 15], 2.0]])
    torch.testing.assert_close(got[:, 7:], hf_bias(torch.tensor([[4, 1, 2]]), logits.clone())[:, 7:], rtol=0, atol=0)


def test_no_repeat_ngram_and_bad_words_match_hf():
    logits = _logits(seed=1)
    context = [5, 6, 7, 5, 6, 9, 12, 5]  # bigrams starting with 5: (5, 6) twice -> 6 banned after the final 5
    params = SamplingParams(no_repeat_ngram_size=2, bad_words_ids=[[33], [12, 5, 40], [1, 41]])
    got = process_logits(logits, [_context(params, context, 3)])
    banned = {6, 33, 40}  # 40 completes [12, 5, 40]; [1, 41] does not apply
    assert {int(t) for t in torch.nonzero(torch.isinf(got[0]))} == banned
    expected = NoRepeatNGramLogitsProcessor(2)(torch.tensor([context]), logits.clone())
    expected = NoBadWordsLogitsProcessor([[33], [12, 5, 40], [1, 41]])(torch.tensor([context]), expected)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_min_tokens_bans_stop_tokens_until_reached_and_user_processors_run_last():
    seen = []

    class AddContextLength(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(input_ids[0].tolist())
            return scores + input_ids.shape[1]

    params = SamplingParams(min_tokens=2, logits_processors=[AddContextLength()])
    logits = _logits(2)
    rows = [_context(params, [4, 5], 2, stop=(3,), prefix=[0]),  # no output yet: stop token 3 banned
            _context(params, [4, 5, 6], 2, extra=[7], stop=(3,))]  # 2 output tokens (one a draft): no ban
    got = process_logits(logits, rows)
    assert seen == [[0, 4, 5], [4, 5, 6, 7]]  # the prefix, the prompt, the output and the drafts before the row
    assert got[0, 3] == float("-inf")
    torch.testing.assert_close(got[0, 4:], logits[0, 4:] + 3, rtol=0, atol=0)
    torch.testing.assert_close(got[1], logits[1] + 4, rtol=0, atol=0)


def test_rows_without_processing_are_untouched():
    logits = _logits(3)
    assert process_logits(logits, [None, None, None]) is logits
    got = process_logits(logits, [None, _context(SamplingParams(logit_bias={0: 1.0}), [1], 1), None])
    torch.testing.assert_close(got[[0, 2]], logits[[0, 2]], rtol=0, atol=0)


def test_processing_parameters_are_checked():
    for kwargs, match in [(dict(repetition_penalty=0.0), "repetition_penalty"),
                          (dict(presence_penalty=float("nan")), "presence_penalty"),
                          (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
                          (dict(bad_words_ids=[[]]), "bad_words_ids"), (dict(logit_bias={-3: 1.0}), "logit_bias"),
                          (dict(logit_bias={3: "x"}), "logit_bias"), (dict(logits_processors=[1]), "logits_processors"),
                          (dict(logprobs=-1), "logprobs")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kwargs)


# ---- end to end ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=VOCAB, eos_token_id=2, pad_token_id=0, logit_scale=3.0)


@pytest.fixture(scope="module")
def draft():
    return tiny_model("llama", vocab_size=VOCAB, seed=5, num_hidden_layers=1, eos_token_id=2, pad_token_id=0)


class _PreferEven(LogitsProcessor):
    """A user processor that depends on the context: favours even tokens after an odd last token."""

    def __call__(self, input_ids, scores):
        bonus = torch.zeros_like(scores)
        bonus[:, ::2] = 2.0 * (input_ids[:, -1:] % 2)
        return scores + bonus


_HF_PROCESSING = {  # generate() arguments -> the same processing
    "repetition_penalty": dict(repetition_penalty=1.8),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "bad_words_ids": dict(bad_words_ids=[[33], [36, 12], [2]]),
    "sequence_bias": dict(sequence_bias={(13,): 4.0, (5, 14): 6.0}),
    "logits_processor": dict(logits_processor=[_PreferEven()]),
    "min_new_tokens": dict(min_new_tokens=6, eos_token_id=33),
}


@pytest.mark.parametrize("name", list(_HF_PROCESSING))
def test_greedy_generate_with_each_processor_equals_hf(model, name):
    input_ids, mask = left_padded_batch([5, 9, 3], VOCAB, seed=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, **_HF_PROCESSING[name])
    with torch.no_grad():
        expected = model.generate(input_ids, **kwargs)
        plain = model.generate(input_ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert not torch.equal(expected, plain)  # the processor changes the output: the test has power
    assert torch.equal(cospec.generate(model, input_ids, **kwargs), expected)


_ENGINE_PROCESSING = {
    "repetition_penalty": dict(repetition_penalty=1.8),
    "presence_frequency": dict(presence_penalty=1.0, frequency_penalty=0.7),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "bad_words_ids": dict(bad_words_ids=[[52], [59, 11]]),
    "logit_bias": dict(logit_bias={13: 3.0, 61: -5.0}),
    "sequence_bias": dict(sequence_bias={(61, 33): -6.0}),
    "logits_processors": dict(logits_processors=[_PreferEven()]),
}
_PROPOSERS = ["prompt_lookup", "draft", "self_spec", "ngram"]


def _prompts():
    # Repeats give prompt lookup and the n-gram model something to copy.
    return [(random_prompt(4 + i, VOCAB, seed=i) * 3)[: 6 + 4 * i] for i in range(4)]


def _speculative(method, model, draft):
    if method == "draft":
        return SpeculativeConfig("draft", num_draft_tokens=4, draft_model=draft, adaptive=False)
    if method == "self_spec":
        return SpeculativeConfig("self_spec", num_draft_tokens=4, self_spec_layers=1, adaptive=False)
    if method == "ngram":
        corpus = [p * 2 for p in _prompts()]
        return SpeculativeConfig("ngram", num_draft_tokens=4, adaptive=False,
                                 ngram_model=NgramLM.build(corpus, vocab_size=VOCAB, order=3))
    return SpeculativeConfig("prompt_lookup", num_draft_tokens=4, max_ngram_size=2, adaptive=False)


def _generate(model, params_list, speculative=None):
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=64), speculative=speculative)
    for i, (prompt, params) in enumerate(zip(_prompts(), params_list)):
        engine.add_request(str(i), prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({out.request_id: out for out in engine.step() if out.finished})
    return [done[str(i)] for i in range(len(params_list))]


@pytest.mark.parametrize("name", list(_ENGINE_PROCESSING))
@pytest.mark.parametrize("method", _PROPOSERS)
def test_speculation_with_each_processor_equals_plain_decoding(model, draft, name, method):
    processing = _ENGINE_PROCESSING[name]
    params = [SamplingParams(max_tokens=14, temperature=0.0, **processing),
              SamplingParams(max_tokens=14, temperature=0.9, seed=3, **processing),
              SamplingParams(max_tokens=10, temperature=0.0),  # a request without processing in the same batch
              SamplingParams(max_tokens=12, temperature=1.1, top_k=8, seed=4, **processing)]
    plain = _generate(model, params)
    fast = _generate(model, params, _speculative(method, model, draft))
    assert [o.output_token_ids for o in fast] == [o.output_token_ids for o in plain]
    assert sum(o.stats.num_drafted_tokens for o in fast) > 0
    unprocessed = _generate(model, [SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k,
                                                   seed=p.seed) for p in params])
    assert any(a.output_token_ids != b.output_token_ids for a, b in zip(plain, unprocessed))  # the test has power
