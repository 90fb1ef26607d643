"""Prefix caching in the engine: outputs are the same with and without it, and it really skips work.

Every comparison replays the same chat-like traffic on two engines, with and without prefix caching: requests that
share a system prompt, an exact repeat, a second turn that starts with the first turn's prompt and answer, and a
partial overlap, added one per step so that later requests find the blocks of earlier ones. The outputs must be
equal token for token (float64 tiny models), and the caching engine must have reused cached tokens.
"""

from __future__ import annotations

import collections

import pytest
import torch
from _tiny_models import one_thread, random_prompt, tiny_model  # noqa: F401 (fixture)

from cospec import EngineConfig, FusionConfig, FusionSpec, LLMEngine, SamplingParams, SpeculativeConfig
from cospec.decoding.prompt_lookup import PromptLookupProposer

VOCAB = 128
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=VOCAB)


def _params(mode: str, i: int, max_tokens: int = 12) -> SamplingParams:
    if mode == "greedy":
        return SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return SamplingParams(max_tokens=max_tokens, temperature=0.9, top_k=40, seed=100 + i)


def _first_wave(mode: str) -> list[tuple[str, list[int], SamplingParams]]:
    system = random_prompt(23, VOCAB, seed=1)  # not a whole number of blocks
    return [("z", random_prompt(17, VOCAB, seed=7), _params(mode, 6, max_tokens=1)),  # finishes in its prefill
            ("a", system + random_prompt(7, VOCAB, seed=2), _params(mode, 0)),
            ("b", system + random_prompt(9, VOCAB, seed=3), _params(mode, 1)),
            ("c", system + random_prompt(7, VOCAB, seed=2), _params(mode, 2)),  # a's prompt again
            ("d", system[:13] + random_prompt(20, VOCAB, seed=4), _params(mode, 3))]


def _second_wave(mode: str, done: dict) -> list[tuple[str, list[int], SamplingParams]]:
    a = done["a"]  # the next turn of a's conversation: its prompt, its answer, a new message
    return [("a2", a.prompt_token_ids + a.output_token_ids + random_prompt(6, VOCAB, seed=5), _params(mode, 4)),
            ("b2", done["b"].prompt_token_ids + random_prompt(3, VOCAB, seed=6), _params(mode, 5)),
            # z's blocks were computed by the target only: a draft model must compute its own copy
            ("z2", done["z"].prompt_token_ids + random_prompt(5, VOCAB, seed=8), _params(mode, 7))]


def replay(engine: LLMEngine, mode: str) -> dict:
    """Both waves, each request added one step after the previous one; the final output of each request."""
    done = {}
    for wave in (lambda: _first_wave(mode), lambda: _second_wave(mode, done)):
        pending = wave()
        while pending or engine.has_unfinished_requests():
            if pending:
                engine.add_request(*pending.pop(0))
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # nothing leaked
    return done


def assert_same_with_and_without_caching(make_engine, mode: str = "greedy",
                                         ample_memory: bool = True) -> tuple[dict, LLMEngine]:
    cached_engine, plain_engine = make_engine(True), make_engine(False)
    cached, plain = replay(cached_engine, mode), replay(plain_engine, mode)
    assert set(cached) == set(plain) == {"z", "a", "b", "c", "d", "a2", "b2", "z2"}
    for request_id in plain:
        assert cached[request_id].output_token_ids == plain[request_id].output_token_ids, request_id
    bm = cached_engine.block_manager
    assert bm.num_prefix_hit_tokens > 0 and plain_engine.block_manager.num_prefix_hit_tokens == 0
    if ample_memory:  # nothing was evicted: the second turn reused all of the first turn in full blocks
        a = cached["a"]
        computed_by_a = len(a.prompt_token_ids) + len(a.output_token_ids) - 1  # the last token is never fed
        assert cached["a2"].stats.num_cached_prompt_tokens == computed_by_a // bm.block_size * bm.block_size
        assert cached["c"].stats.num_cached_prompt_tokens > 0
    return cached, cached_engine


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_same_output_with_and_without_prefix_caching(model, mode):
    assert_same_with_and_without_caching(
        lambda caching: LLMEngine(model, EngineConfig(block_size=4, enable_prefix_caching=caching)), mode)


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_same_output_under_preemption(model, mode):
    """A KV budget far below what the traffic needs: sequences are preempted, and their recompute starts from
    whatever of their blocks is still cached."""
    cached, _ = assert_same_with_and_without_caching(
        lambda caching: LLMEngine(model, EngineConfig(block_size=4, num_kv_blocks=18, max_num_batched_tokens=16,
                                                      enable_prefix_caching=caching)), mode, ample_memory=False)
    assert any(out.stats.num_preemptions for out in cached.values())


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
@pytest.mark.parametrize("method", ["prompt_lookup", "draft", "draft_is_target", "self_spec"])
def test_same_output_with_speculation(model, method, mode):
    """Rejected drafts never enter a shared block; a draft model's own cache is caught up from the start of every
    new sequence (rewriting its copy of shared blocks with the same values), so drafts stay as good as without
    caching: with the target as its own draft every draft is still accepted (seeded drafts are coupled to the
    target's sample by the same noise)."""
    draft = {"draft": tiny_model("llama", vocab_size=VOCAB, seed=1, num_hidden_layers=1),
             "draft_is_target": model}.get(method)

    def make_engine(caching: bool) -> LLMEngine:
        if method == "prompt_lookup":
            speculative = SpeculativeConfig("prompt_lookup", num_draft_tokens=4, adaptive=False)
        elif method == "self_spec":
            speculative = SpeculativeConfig("self_spec", num_draft_tokens=3, self_spec_layers=1, adaptive=False)
        else:
            speculative = SpeculativeConfig("draft", num_draft_tokens=4, draft_model=draft, adaptive=False)
        return LLMEngine(model, EngineConfig(block_size=4, enable_prefix_caching=caching), speculative=speculative)

    cached, _ = assert_same_with_and_without_caching(make_engine, mode)
    if method != "prompt_lookup":
        assert sum(out.stats.num_drafted_tokens for out in cached.values()) > 0
    if method == "draft_is_target":
        for request_id, out in cached.items():
            assert out.stats.num_accepted_tokens == out.stats.num_drafted_tokens, request_id


def test_same_output_with_a_fusion_group_whose_small_member_drafts(model):
    """Fusion members run over every token with the target, so their pools hold the shared blocks too; the member
    that drafts knows its cache is as far as the target's."""
    small = tiny_model("llama", vocab_size=VOCAB, seed=2, num_hidden_layers=1)
    spec = FusionSpec.mixture([0.7, 0.3])
    assert_same_with_and_without_caching(lambda caching: LLMEngine(
        model, EngineConfig(block_size=4, enable_prefix_caching=caching), fusion=FusionConfig([small], spec),
        speculative=SpeculativeConfig("draft", num_draft_tokens=3, draft_model=small, adaptive=False)))


def test_same_output_with_sliding_window_layers():
    """Gemma3 mixes sliding-window (8 tokens) and full layers; the pool keeps every token, so a cached block is
    valid for both kinds of layer."""
    gemma = tiny_model("gemma3", vocab_size=VOCAB)
    cached, _ = assert_same_with_and_without_caching(
        lambda caching: LLMEngine(gemma, EngineConfig(block_size=4, enable_prefix_caching=caching)))
    prompt = cached["a2"].prompt_token_ids
    expected = gemma.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
    assert cached["a2"].output_token_ids == expected.tolist()


# ---- work skipped --------------------------------------------------------------------------------------------


def count_target_tokens(engine: LLMEngine) -> collections.Counter:
    """Tokens the target runs, per sequence id, from now on."""
    counts: collections.Counter = collections.Counter()
    forward = engine.runner.forward

    def counting_forward(items):
        for item in items:
            counts[item.seq_id] += len(item.token_ids)
        return forward(items)

    forward_decode = engine.runner.forward_decode

    def counting_forward_decode(seq_ids, token_ids, positions):  # a plain decoding step: one token each
        counts.update(seq_ids)
        return forward_decode(seq_ids, token_ids, positions)

    engine.runner.forward = counting_forward
    engine.runner.forward_decode = counting_forward_decode
    return counts


def run_one(engine: LLMEngine, request_id: str, prompt: list[int], max_tokens: int = 3):
    engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                return out


@pytest.mark.parametrize("caching", [True, False])
def test_a_request_sharing_a_prefix_computes_only_its_new_tokens(model, caching):
    engine = LLMEngine(model, EngineConfig(block_size=4, enable_prefix_caching=caching))
    counts = count_target_tokens(engine)
    prompt = random_prompt(40, VOCAB, seed=11)
    first = run_one(engine, "first", prompt)  # 40 prompt tokens + 2 fed back (the last token is never fed)
    shared = run_one(engine, "shared", prompt[:36] + random_prompt(10, VOCAB, seed=12))  # 9 blocks in common
    repeat = run_one(engine, "repeat", prompt)  # all of it cached, but the last token runs to give logits
    next_turn = run_one(engine, "next-turn", prompt + first.output_token_ids + [5, 6])  # + first's output
    sizes = [counts[seq_id] for seq_id in range(4)]
    if caching:
        assert sizes == [42, 10 + 2, 4 + 2, (45 - 40) + 2]  # next turn: tokens 40, 41 were never a full block
        assert [o.stats.num_cached_prompt_tokens for o in (first, shared, repeat, next_turn)] == [0, 36, 36, 40]
        bm = engine.block_manager
        assert bm.num_prefix_hit_tokens == 36 + 36 + 40
        assert bm.num_prefix_query_tokens == 40 + 46 + 40 + 45
    else:
        assert sizes == [42, 46 + 2, 40 + 2, 45 + 2]
        assert all(o.stats.num_cached_prompt_tokens == 0 for o in (first, shared, repeat, next_turn))
    assert repeat.output_token_ids == first.output_token_ids


def test_a_proposer_can_cap_the_reused_prefix(model, monkeypatch):
    """A proposer with ``max_reusable_prefix`` (a draft head that needs the target's hidden states of positions it
    has not seen) limits how much of a cached prefix a new sequence starts on."""
    asked = []

    def max_reusable_prefix(self, num_matched_tokens: int) -> int:
        asked.append(num_matched_tokens)
        return num_matched_tokens - 6  # not a whole number of blocks: whole blocks only are reused

    monkeypatch.setattr(PromptLookupProposer, "max_reusable_prefix", max_reusable_prefix, raising=False)
    engine = LLMEngine(model, EngineConfig(block_size=4),
                       speculative=SpeculativeConfig("prompt_lookup", num_draft_tokens=2, adaptive=False))
    counts = count_target_tokens(engine)
    prompt = random_prompt(40, VOCAB, seed=13)
    run_one(engine, "first", prompt, max_tokens=1)
    second = run_one(engine, "second", prompt, max_tokens=1)
    assert set(asked) == {36}
    assert second.stats.num_cached_prompt_tokens == 28 and counts[1] == 40 - 28


def test_a_request_waits_for_a_shared_prefix_that_is_being_computed(model):
    """Two requests with one system prompt, at once: the second waits while the first prefills the shared blocks
    (in chunks of 16 tokens), then starts on them, instead of computing them again beside it."""
    engine = LLMEngine(model, EngineConfig(block_size=4, max_num_batched_tokens=16))
    counts = count_target_tokens(engine)
    system = random_prompt(40, VOCAB, seed=14)
    greedy = SamplingParams(max_tokens=3, temperature=0.0)
    engine.add_request("a", system + [5, 6, 7], greedy)
    engine.add_request("b", system + [8, 9], greedy)
    done = {}
    while engine.has_unfinished_requests():
        done.update({out.request_id: out for out in engine.step() if out.finished})
    assert done["b"].stats.num_cached_prompt_tokens == 40
    assert [counts[0], counts[1]] == [43 + 2, 2 + 2]
