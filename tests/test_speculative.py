"""Speculative decoding: exact greedy equivalence, distribution preservation when sampling, bad drafts."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import cospec
from cospec import EngineConfig, LLMEngine, SamplingParams, SpeculativeConfig
from cospec.decoding.ngram_model import NgramLM

from _stats import assert_chi_square_fits
from _tiny_models import run_to_completion

VOCAB = 40


def _tiny_llama(layers=3, seed=0, vocab=VOCAB, eos=3):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=eos, pad_token_id=0)
    return LlamaForCausalLM(config).to(torch.float64).eval()


@pytest.fixture(scope="module")
def target():
    return _tiny_llama()


@pytest.fixture(scope="module")
def draft():
    return _tiny_llama(layers=1, seed=1)


def _run(engine: LLMEngine, prompts, params):
    return run_to_completion(engine, list(zip(prompts, params)))


def _prompts(n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(n):
        # repeated chunks give prompt lookup something to copy
        chunk = torch.randint(4, VOCAB, (3 + i % 4,), generator=gen).tolist()
        prompts.append((chunk * (1 + i % 3))[: 2 + 5 * i])
    return prompts


def _speculative(method, k, target, draft):
    if method == "draft":
        return SpeculativeConfig("draft", num_draft_tokens=k, draft_model=draft)
    if method == "draft_is_target":  # every draft accepted: windows end on max_tokens / eos exactly
        return SpeculativeConfig("draft", num_draft_tokens=k, draft_model=target, adaptive=False)
    if method == "prompt_lookup":
        return SpeculativeConfig("prompt_lookup", num_draft_tokens=k, adaptive=False)
    if method == "ngram":  # retrieval drafting from an n-gram model of the prompts
        corpus = [p * 3 for p in _prompts()]
        return SpeculativeConfig("ngram", num_draft_tokens=k, adaptive=False,
                                 ngram_model=NgramLM.build(corpus, vocab_size=VOCAB, order=3))
    return SpeculativeConfig("self_spec", num_draft_tokens=k, self_spec_layers=2, adaptive=False)


@pytest.mark.parametrize("method", ["draft", "draft_is_target", "prompt_lookup", "self_spec", "ngram"])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_greedy_speculation_equals_plain_greedy(target, draft, method, k):
    prompts = _prompts()
    params = [SamplingParams(max_tokens=7 + 5 * i, temperature=0) for i in range(len(prompts))]
    plain = _run(LLMEngine(target, EngineConfig(block_size=4)), prompts, params)
    spec_engine = LLMEngine(target, EngineConfig(block_size=4), speculative=_speculative(method, k, target, draft))
    spec = _run(spec_engine, prompts, params)
    for a, b in zip(plain, spec):
        assert a.output_token_ids == b.output_token_ids
        assert a.finish_reason == b.finish_reason
    assert {o.finish_reason for o in plain} == {"stop", "length"}  # eos and max_tokens both land somewhere
    drafted = sum(o.stats.num_drafted_tokens for o in spec)
    accepted = sum(o.stats.num_accepted_tokens for o in spec)
    assert drafted > 0 and 0 <= accepted <= drafted
    if method == "draft_is_target":
        assert accepted == drafted  # the target agrees with itself: nothing is rejected
    for o in spec:
        hist = o.stats.acceptance_histogram
        assert sum(m * c for m, c in enumerate(hist)) == o.stats.num_accepted_tokens
    assert spec_engine.block_manager.num_free_blocks == spec_engine.block_manager.num_blocks


def test_drop_in_generate_with_each_proposer_batch_4(target, draft):
    ids = torch.zeros(4, 20, dtype=torch.long)
    mask = torch.zeros(4, 20, dtype=torch.long)
    gen = torch.Generator().manual_seed(3)
    for i, n in enumerate([3, 9, 17, 20]):
        ids[i, 20 - n:] = torch.randint(4, VOCAB, (n,), generator=gen)
        mask[i, 20 - n:] = 1
    reference = target.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    for kwargs in [dict(prompt_lookup_num_tokens=5), dict(assistant_model=draft), dict(assistant_early_exit=1)]:
        out = cospec.generate(target, ids, attention_mask=mask, max_new_tokens=30, do_sample=False, **kwargs)
        assert torch.equal(out, reference), kwargs


SMALL_VOCAB = 16


def _exact_second_third_token_distribution(model, prompt, temperature):
    """P(t2, t3) when sampling three tokens from ``model`` after ``prompt`` (t1 summed out): [vocab, vocab]."""
    v = SMALL_VOCAB
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)  # [V]
        p2 = torch.softmax(model(torch.tensor([prompt + [a] for a in range(v)])).logits[:, -1] / temperature, -1)
        pairs = torch.tensor([prompt + [a, b] for a in range(v) for b in range(v)])
        p3 = torch.softmax(model(pairs).logits[:, -1] / temperature, -1).view(v, v, v)
    return torch.einsum("a,ab,abc->bc", p1, p2, p3)


def _sharpened(model, factor):
    """A copy whose next-token distributions are far from uniform (random tiny models are nearly flat)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    return model


@pytest.mark.parametrize("method, seeded", [("draft", True), ("draft", False), ("prompt_lookup", True)],
                         ids=["draft-coupled", "draft-rejection", "prompt_lookup-coupled"])
def test_sampled_speculation_preserves_the_target_distribution(method, seeded):
    """10^4 three-token samples; the first token comes from the prefill, the next two from one verify window.
    Chi-square of (t2, t3) against the target's exact law. Seeded requests are verified by coupled races; unseeded
    ones with model drafts by rejection sampling."""
    target = _sharpened(_tiny_llama(vocab=SMALL_VOCAB), 6.0)
    draft = _sharpened(_tiny_llama(layers=1, seed=1, vocab=SMALL_VOCAB), 6.0)
    # Every ordinary token occurs in the prompt, so prompt lookup finds a continuation after any sampled token.
    prompt = torch.randperm(SMALL_VOCAB - 4, generator=torch.Generator().manual_seed(0)).add(4).tolist() + [5, 6, 7]
    temperature = 1.0
    num_samples = 10_000
    speculative = _speculative(method, 3, target, draft)
    speculative.adaptive = False
    engine = LLMEngine(target, EngineConfig(block_size=16, max_num_seqs=num_samples, max_num_batched_tokens=10 ** 6,
                                            num_kv_blocks=2 * num_samples), speculative=speculative)
    torch.manual_seed(0)  # unseeded requests draw their seeds from torch's generator
    params = [SamplingParams(max_tokens=3, temperature=temperature, seed=i if seeded else None, ignore_eos=True)
              for i in range(num_samples)]
    outs = _run(engine, [prompt] * num_samples, params)
    counts = torch.zeros(SMALL_VOCAB, SMALL_VOCAB, dtype=torch.float64)
    for o in outs:
        counts[o.output_token_ids[1], o.output_token_ids[2]] += 1
    assert sum(o.stats.num_drafted_tokens for o in outs) > 0.5 * num_samples  # speculation actually ran
    expected = _exact_second_third_token_distribution(target, prompt, temperature) * num_samples
    assert_chi_square_fits(counts, expected)
    # and the draft really differs from the target (otherwise the test would prove little)
    if method == "draft":
        with torch.no_grad():
            p = torch.softmax(target(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
            q = torch.softmax(draft(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        assert 0.5 * (p - q).abs().sum() > 0.2


def test_draft_with_another_vocabulary_is_rejected(target):
    other = _tiny_llama(layers=1, vocab=VOCAB + 7)
    with pytest.raises(ValueError, match="vocabulary"):
        LLMEngine(target, speculative=SpeculativeConfig("draft", draft_model=other))
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="vocabulary"):
        cospec.generate(target, ids, max_new_tokens=4, assistant_model=other)


def test_ngram_drafter_with_another_vocabulary_is_rejected(target):
    with pytest.raises(ValueError, match="vocabulary"):
        LLMEngine(target, speculative=SpeculativeConfig("ngram", ngram_model=NgramLM.build([[1, 2, 3]], vocab_size=VOCAB + 7)))


def test_draft_on_another_device_is_rejected(target):
    on_meta = copy.deepcopy(target).to("meta")
    with pytest.raises(ValueError, match="device"):
        LLMEngine(target, speculative=SpeculativeConfig("draft", draft_model=on_meta))


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="medusa"), "unknown speculation method"),
    (dict(method="draft"), "draft_model"),
    (dict(method="self_spec"), "self_spec_layers"),
    (dict(method="prompt_lookup", num_draft_tokens=0), "num_draft_tokens"),
])
def test_bad_speculative_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig(**kwargs)


def test_self_spec_layers_must_be_shallower_than_the_model(target):
    with pytest.raises(ValueError, match="layers"):
        LLMEngine(target, speculative=SpeculativeConfig("self_spec", self_spec_layers=3))
