"""Fusion groups in the engine: fused decoding against a direct computation, fused speculation, deferral."""

import pytest
import torch

from cospec import EngineConfig, FusionConfig, FusionSpec, LLMEngine, SamplingParams, SpeculativeConfig
from cospec.decoding.fusion import fuse_logits
from cospec.decoding.ngram_model import NgramLM

from _stats import assert_chi_square_fits
from test_speculative import SMALL_VOCAB, _prompts, _run, _sharpened, _tiny_llama

EOS = 3


@pytest.fixture(scope="module")
def models():
    return _tiny_llama(), _tiny_llama(layers=1, seed=1), _tiny_llama(layers=1, seed=2)


def _direct_greedy(members, spec, prompt, max_tokens, ngram=None):
    """Fused greedy decoding computed directly from full HF forwards (no cache, no engine)."""
    ids = list(prompt)
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = [m(torch.tensor([ids])).logits[0, -1:] for m in members]
        if ngram is not None:
            logits.append(ngram.next_token_logprobs([ids]).double())
        token = int(fuse_logits(logits, spec).argmax())
        ids.append(token)
        if token == EOS:
            break
    return ids[len(prompt):]


@pytest.mark.parametrize("spec", [FusionSpec.proxy_tuning(0.8), FusionSpec.contrastive(0.5, 0.1),
                                  FusionSpec.mixture([0.6, 0.25, 0.15])])
def test_fused_greedy_decoding_equals_direct_computation(models, spec):
    target, *smalls = models
    smalls = smalls[: spec.num_members - 1]
    prompts = _prompts(4)
    engine = LLMEngine(target, EngineConfig(block_size=4), fusion=FusionConfig(smalls, spec))
    outs = _run(engine, prompts, [SamplingParams(max_tokens=10, temperature=0)] * len(prompts))
    for prompt, out in zip(prompts, outs):
        assert out.output_token_ids == _direct_greedy([target, *smalls], spec, prompt, 10)


def test_ngram_member_fuses_like_a_model(models):
    target = models[0]
    corpus = [_prompts(8, seed=s)[-1] * 3 for s in range(5)]
    ngram = NgramLM.build(corpus, vocab_size=target.config.vocab_size, order=3)
    spec = FusionSpec.mixture([0.7, 0.3])
    prompts = _prompts(3, seed=9)
    outs = _run(LLMEngine(target, EngineConfig(block_size=4), fusion=FusionConfig([ngram], spec)), prompts,
                [SamplingParams(max_tokens=8, temperature=0)] * len(prompts))
    for prompt, out in zip(prompts, outs):
        assert out.output_token_ids == _direct_greedy([target], spec, prompt, 8, ngram=ngram)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_greedy_fused_speculation_equals_greedy_fused_decoding(models, k):
    target, small_a, small_b = models
    spec = FusionSpec.proxy_tuning(0.8)
    prompts = _prompts()
    params = [SamplingParams(max_tokens=6 + 3 * i, temperature=0) for i in range(len(prompts))]
    plain = _run(LLMEngine(target, EngineConfig(block_size=4), fusion=FusionConfig([small_a, small_b], spec)),
                 prompts, params)
    speculative = SpeculativeConfig("draft", num_draft_tokens=k, draft_model=small_a, adaptive=False)
    engine = LLMEngine(target, EngineConfig(block_size=4), fusion=FusionConfig([small_a, small_b], spec),
                       speculative=speculative)
    fast = _run(engine, prompts, params)
    assert [o.output_token_ids for o in fast] == [o.output_token_ids for o in plain]
    assert sum(o.stats.num_drafted_tokens for o in fast) > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("seeded", [True, False], ids=["coupled", "rejection"])
def test_sampled_fused_speculation_preserves_the_fused_distribution(seeded):
    """10^4 samples of (t2, t3) from fused speculative decoding against the exact fused law (chi-square)."""
    target = _sharpened(_tiny_llama(vocab=SMALL_VOCAB), 4.0)
    small = _sharpened(_tiny_llama(layers=1, seed=1, vocab=SMALL_VOCAB), 4.0)
    spec = FusionSpec.log_linear([1.0, 0.5])
    prompt = [5, 6, 7, 8]
    v, num_samples = SMALL_VOCAB, 10_000
    engine = LLMEngine(target, EngineConfig(block_size=16, max_num_seqs=num_samples, max_num_batched_tokens=10**6,
                                            num_kv_blocks=2 * num_samples),
                       fusion=FusionConfig([small], spec),
                       speculative=SpeculativeConfig("draft", num_draft_tokens=2, draft_model=small, adaptive=False))
    torch.manual_seed(0)  # unseeded requests draw their seeds from torch's generator
    outs = _run(engine, [prompt] * num_samples, [SamplingParams(max_tokens=3, temperature=1.0, seed=i if seeded else None,
                                                                ignore_eos=True) for i in range(num_samples)])
    assert sum(o.stats.num_drafted_tokens for o in outs) > 0.5 * num_samples

    def fused_probs(contexts):
        with torch.no_grad():
            z = [m(torch.tensor(contexts)).logits[:, -1] for m in (target, small)]
        return fuse_logits(z, spec).exp()

    p1 = fused_probs([prompt])[0]
    p2 = fused_probs([prompt + [a] for a in range(v)])
    p3 = fused_probs([prompt + [a, b] for a in range(v) for b in range(v)]).view(v, v, v)
    expected = torch.einsum("a,ab,abc->bc", p1, p2, p3) * num_samples
    counts = torch.zeros(v, v, dtype=torch.float64)
    for o in outs:
        counts[o.output_token_ids[1], o.output_token_ids[2]] += 1
    assert_chi_square_fits(counts, expected)


def test_deferral_never_confident_is_the_target_alone(models):
    target, small, _ = models
    prompts = _prompts(4)
    params = [SamplingParams(max_tokens=10, temperature=0)] * len(prompts)
    alone = _run(LLMEngine(target, EngineConfig(block_size=4)), prompts, params)
    deferred = _run(LLMEngine(target, EngineConfig(block_size=4), speculative=SpeculativeConfig(
        "draft", num_draft_tokens=8, draft_model=small, deferral_threshold=1.0)), prompts, params)
    assert [o.output_token_ids for o in deferred] == [o.output_token_ids for o in alone]
    assert all(o.stats.num_drafted_tokens == 0 for o in deferred)


def test_deferral_lets_a_confident_small_model_decide_and_rollback_restores_the_target(models):
    target = models[0]
    small = _sharpened(models[1], 50.0)  # nearly always confident
    prompts = _prompts(4)
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)] * len(prompts)
    deferred = _run(LLMEngine(target, EngineConfig(block_size=4), speculative=SpeculativeConfig(
        "draft", num_draft_tokens=8, draft_model=small, deferral_threshold=0.5)), prompts, params)
    large_fraction = sum(sum(o.stats.acceptance_histogram) for o in deferred) / sum(len(o.output_token_ids) for o in deferred)
    assert large_fraction < 0.5  # the small model emitted most tokens
    # deferral is lossy: where the small model decided, the output leaves the target's own
    alone = _run(LLMEngine(target, EngineConfig(block_size=4)), prompts, params)
    assert any(a.output_token_ids != b.output_token_ids for a, b in zip(deferred, alone))
    # rolling back every token the target gives < 100% probability leaves only the target's own choices
    strict = _run(LLMEngine(target, EngineConfig(block_size=4), speculative=SpeculativeConfig(
        "draft", num_draft_tokens=8, draft_model=small, deferral_threshold=0.5, deferral_rollback=0.999)), prompts, params)
    assert [o.output_token_ids for o in strict] == [o.output_token_ids for o in alone]


def test_bad_fusion_groups_get_clear_errors(models):
    target, small, _ = models
    with pytest.raises(ValueError, match="combines 3 models"):
        FusionConfig([small], FusionSpec.proxy_tuning(1.0))
    with pytest.raises(ValueError, match="at least one member"):
        FusionConfig([], FusionSpec.mixture([1.0]))
    other_vocab = _tiny_llama(layers=1, vocab=57)
    with pytest.raises(ValueError, match="vocabulary"):
        LLMEngine(target, fusion=FusionConfig([other_vocab], FusionSpec.mixture([0.5, 0.5])))
    with pytest.raises(ValueError, match="vocabulary"):
        LLMEngine(target, fusion=FusionConfig([NgramLM.build([[1, 2, 3]], vocab_size=57)], FusionSpec.mixture([0.5, 0.5])))
    engine = LLMEngine(target, fusion=FusionConfig([small], FusionSpec.mixture([0.5, 0.5])))
    with pytest.raises(ValueError, match="combines 3 models"):
        engine.add_request("a", [5, 6], SamplingParams(fusion=FusionSpec.proxy_tuning(1.0)))
    plain = LLMEngine(target)
    with pytest.raises(ValueError, match="no fusion group"):
        plain.add_request("a", [5, 6], SamplingParams(fusion=FusionSpec.mixture([0.5, 0.5])))
    with pytest.raises(ValueError, match="deferral"):
        SpeculativeConfig("prompt_lookup", deferral_threshold=0.5)
