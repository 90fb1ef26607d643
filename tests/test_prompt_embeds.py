"""Prompts given as embeddings in the engine (``LLMEngine.add_request(prompt_embeds=...)``): the model reads them
in the ragged forward, across chunked prefill and preemption (recompute), with self-speculation (the draft reads
them too) and prompt lookup; what logits processors and stopping criteria see (``processor_prompt``); and the
requests the engine refuses."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import one_thread, random_prompt, tiny_model  # noqa: F401 (fixture)

from cospec import EngineConfig, FusionConfig, FusionSpec, LLMEngine, SamplingParams, SpeculativeConfig

VOCAB = 96
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=VOCAB, logit_scale=3.0)


def _embeds(model, token_ids: list[int], noise: float, seed: int) -> torch.Tensor:
    """``[len, hidden]``: the tokens' embeddings plus noise (0: exactly what the model would look up)."""
    with torch.no_grad():
        base = model.get_input_embeddings()(torch.tensor(token_ids))
    shift = torch.randn(base.shape, generator=torch.Generator().manual_seed(seed), dtype=base.dtype)
    return base + noise * shift


def _requests(model, num: int = 4):
    """(token ids, embeddings) per request: prompts of 5..29 tokens, embeddings that change the output."""
    prompts = [random_prompt(5 + 8 * i, VOCAB, seed=i) for i in range(num)]
    return [(p, _embeds(model, p, noise=0.7, seed=i)) for i, p in enumerate(prompts)]


def _run(model, requests, config: EngineConfig | None = None, speculative=None, ids: str = "none",
         params: SamplingParams | None = None):
    """Outputs of ``requests`` [(token ids, embeddings)]; ``ids``: 'none' (embeddings only), 'both' or 'only'."""
    engine = LLMEngine(model, config or EngineConfig(num_kv_blocks=64), speculative=speculative)
    for i, (prompt, embeds) in enumerate(requests):
        engine.add_request(str(i), None if ids == "none" else prompt,
                           params or SamplingParams(max_tokens=12, temperature=0),
                           prompt_embeds=None if ids == "only" else embeds)
    done = {}
    while engine.has_unfinished_requests():
        done.update({out.request_id: out for out in engine.step() if out.finished})
    return [done[str(i)] for i in range(len(requests))]


def _hf_greedy(model, embeds: torch.Tensor, num_new: int) -> list[int]:
    with torch.no_grad():
        return model.generate(inputs_embeds=embeds[None], max_new_tokens=num_new, do_sample=False)[0].tolist()


def test_embeddings_prompts_equal_hf_and_token_embeddings_equal_tokens(model):
    requests = _requests(model)
    outputs = _run(model, requests)
    for (prompt, embeds), out in zip(requests, outputs):
        assert out.output_token_ids == _hf_greedy(model, embeds, 12)
        assert out.prompt_token_ids == [0] * len(prompt)  # placeholders: the prompt has no token ids
    by_tokens = _run(model, requests, ids="only")
    assert any(a.output_token_ids != b.output_token_ids for a, b in zip(outputs, by_tokens))  # embeddings were read
    exact = [(p, _embeds(model, p, noise=0.0, seed=0)) for p, _ in requests]
    assert [o.output_token_ids for o in _run(model, exact)] == [o.output_token_ids for o in by_tokens]


def test_a_soft_prompt_before_tokens(model):
    """Embeddings for the first k prompt positions only; the rest of the prompt is read as tokens."""
    prompt = random_prompt(12, VOCAB, seed=9)
    soft = _embeds(model, prompt[:5], noise=1.0, seed=3)
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=8))
    engine.add_request("0", prompt, SamplingParams(max_tokens=10, temperature=0), prompt_embeds=soft)
    out = []
    while engine.has_unfinished_requests():
        out += [o for o in engine.step() if o.finished]
    full = torch.cat([soft, _embeds(model, prompt[5:], noise=0.0, seed=0)])
    assert out[0].output_token_ids == _hf_greedy(model, full, 10)


def test_chunked_prefill_and_preemption_recompute_from_the_embeddings(model):
    requests = _requests(model)
    expected = [o.output_token_ids for o in _run(model, requests)]
    chunked = _run(model, requests, EngineConfig(num_kv_blocks=64, max_num_batched_tokens=7))
    assert [o.output_token_ids for o in chunked] == expected
    crowded = _run(model, requests, EngineConfig(num_kv_blocks=7, block_size=8))
    assert [o.output_token_ids for o in crowded] == expected
    assert sum(o.stats.num_preemptions for o in crowded) > 0


@pytest.mark.parametrize("method", ["self_spec", "prompt_lookup"])
@pytest.mark.parametrize("ids", ["none", "both"])
def test_speculation_with_embeddings_prompts_equals_plain_decoding(model, method, ids):
    requests = _requests(model)
    speculative = (SpeculativeConfig("self_spec", num_draft_tokens=4, self_spec_layers=1, adaptive=False)
                   if method == "self_spec" else
                   SpeculativeConfig("prompt_lookup", num_draft_tokens=4, max_ngram_size=2, adaptive=False))
    for params in (SamplingParams(max_tokens=16, temperature=0),
                   SamplingParams(max_tokens=16, temperature=0.8, seed=5)):
        plain = _run(model, requests, ids=ids, params=params)
        fast = _run(model, requests, speculative=speculative, ids=ids, params=params)
        assert [o.output_token_ids for o in fast] == [o.output_token_ids for o in plain]
        assert sum(o.stats.num_drafted_tokens for o in fast) > 0


def test_self_speculation_drafts_from_the_embeddings(model):
    """The draft (the target's first layer) reads the embeddings too: its drafts are accepted about as often as
    with a token prompt (a draft that read the placeholder ids instead is accepted far less here: 0.15 vs 0.62)."""
    requests = _requests(model, num=6)
    speculative = SpeculativeConfig("self_spec", num_draft_tokens=3, self_spec_layers=1, adaptive=False)
    with_embeds = _run(model, requests, speculative=speculative)
    with_tokens = _run(model, requests, speculative=speculative, ids="only")
    rate = [sum(o.stats.num_accepted_tokens for o in outs) / sum(o.stats.num_drafted_tokens for o in outs)
            for outs in (with_embeds, with_tokens)]
    assert rate[0] > 0.5 * rate[1] > 0


class _Recorder:
    """A logits processor, or a stopping criterion that never stops, recording the input_ids it gets."""

    def __init__(self, is_criterion: bool) -> None:
        self.is_criterion = is_criterion
        self.seen: list[list[int]] = []

    def __call__(self, input_ids, scores):
        self.seen.append(input_ids[0].tolist())
        return torch.tensor([False]) if self.is_criterion else scores


def test_processors_and_criteria_see_the_processor_prompt(model):
    prompt, embeds = _requests(model, num=1)[0]
    processor, criterion = _Recorder(is_criterion=False), _Recorder(is_criterion=True)
    params = SamplingParams(max_tokens=3, temperature=0, logits_processors=[processor], stopping_criteria=[criterion])
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=8))
    engine.add_request("masked", prompt, params, processor_prompt=[7, 7] + prompt)
    engine.add_request("embeds", None, params, prompt_embeds=embeds)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o.output_token_ids for o in engine.step() if o.finished})
    assert [7, 7] + prompt + outputs["masked"] in criterion.seen
    assert [7, 7] + prompt + outputs["masked"][:2] in processor.seen
    assert outputs["embeds"] in criterion.seen and outputs["embeds"][:2] in processor.seen  # no prompt: as in HF
    assert [] in processor.seen


def test_bad_prompt_embeds_are_refused(model):
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=8))
    hidden = model.config.hidden_size
    params = SamplingParams(max_tokens=2)
    for prompt, embeds, match in [([1, 2], torch.zeros(2, hidden + 1), "hidden size"),
                                  ([1, 2], torch.zeros(2 * hidden), "hidden size"),
                                  ([1, 2], torch.zeros(3, hidden), "rows"),
                                  (None, torch.zeros(0, hidden), "rows"),
                                  ([1, 2], torch.zeros(2, hidden, dtype=torch.int64), "float"),
                                  (None, None, "prompt_token_ids, prompt_embeds or both")]:
        with pytest.raises(ValueError, match=match):
            engine.add_request("x", prompt, params, prompt_embeds=embeds)
    draft = tiny_model("llama", vocab_size=VOCAB, seed=2, num_hidden_layers=1)
    drafting = LLMEngine(model, EngineConfig(num_kv_blocks=8),
                         speculative=SpeculativeConfig("draft", draft_model=draft))
    with pytest.raises(ValueError, match="draft model cannot read"):
        drafting.add_request("x", None, params, prompt_embeds=torch.zeros(2, hidden))
    drafting.add_request("y", [1, 2], params, prompt_embeds=torch.zeros(2, hidden))  # the draft reads the tokens
    fused = LLMEngine(model, EngineConfig(num_kv_blocks=8),
                      fusion=FusionConfig([draft], FusionSpec.mixture([0.5, 0.5])))
    with pytest.raises(ValueError, match="fusion"):
        fused.add_request("x", [1, 2], params, prompt_embeds=torch.zeros(2, hidden))


def test_prompts_given_as_embeddings_never_share_prefix_cache_blocks(model):
    """Same token ids, different embeddings: with prefix caching on, each request still reads its own embeddings,
    and a later request given the plain token ids does not reuse their blocks."""
    prompt = random_prompt(40, VOCAB, seed=3)  # several full blocks
    requests = [(prompt, _embeds(model, prompt, noise=0.7, seed=s)) for s in (1, 2)]
    alone = [_run(model, [r], ids="both")[0].output_token_ids for r in requests]
    plain = _run(model, [(prompt, None)], ids="only")[0].output_token_ids
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=64, block_size=8))
    assert engine.block_manager.enable_prefix_caching
    outputs = {}
    for i, (ids, embeds) in enumerate(requests + [(prompt, None)]):  # one after another: caching would hit
        engine.add_request(str(i), ids, SamplingParams(max_tokens=12, temperature=0), prompt_embeds=embeds)
        while engine.has_unfinished_requests():
            outputs.update({out.request_id: out for out in engine.step() if out.finished})
    assert [outputs[str(i)].output_token_ids for i in range(3)] == alone + [plain]
    assert len({tuple(o) for o in alone + [plain]}) == 3  # the embeddings matter: the test has power
    assert outputs["2"].stats.num_cached_prompt_tokens == 0
