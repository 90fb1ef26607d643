"""LLMEngine: a request's output does not depend on the batch, on preemption, on prefill chunking or on the page
size; bad requests are refused with a clear error while the engine keeps serving; abort frees blocks at once.

"Alone" means the same request on a fresh engine with a cache big enough for it, no other request present.
"""

from __future__ import annotations

import pytest
import torch
from _tiny_models import one_thread, random_prompt, tiny_model  # noqa: F401 (fixture)

from cospec import EngineConfig, LLMEngine, SamplingParams, SpeculativeConfig
from cospec.engine.model_runner import _reads_unwritten_slots

VOCAB = 128
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=VOCAB)  # no eos: requests run to max_tokens unless told otherwise


def run_all(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]], max_steps: int = 10_000):
    """Add every request, step until the engine is idle; the final RequestOutput of each."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    return drain(engine, max_steps)


def drain(engine: LLMEngine, max_steps: int = 10_000) -> dict:
    done = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            assert out.request_id not in done, f"{out.request_id} produced tokens after it finished"
            if out.finished:
                done[out.request_id] = out
    assert not engine.has_unfinished_requests(), "the engine did not finish within max_steps"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # nothing leaked
    return done


_alone_cache: dict = {}


def alone(model, prompt: list[int], params: SamplingParams) -> list[int]:
    key = (id(model), tuple(prompt), repr(params))
    if key not in _alone_cache:
        engine = LLMEngine(model, EngineConfig(num_kv_blocks=64, block_size=16))
        _alone_cache[key] = run_all(engine, {"r": (prompt, params)})["r"].output_token_ids
    return _alone_cache[key]


# ---- (a) preemption ------------------------------------------------------------------------------------------

PROMPT_LENGTHS = [1, 60, 7, 33, 2, 45, 16, 17, 58, 3, 25, 40, 9, 51, 12, 30]
MAX_TOKENS = [20, 5, 24, 10, 1, 16, 8, 24, 3, 12, 20, 6, 24, 2, 18, 14]


def _params(mode: str, i: int, max_tokens: int) -> SamplingParams:
    if mode == "greedy":
        return SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=20, seed=i)


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_preemption_keeps_every_output_as_if_alone(model, mode):
    requests = {f"r{i}": (random_prompt(n, VOCAB, seed=i), _params(mode, i, m))
                for i, (n, m) in enumerate(zip(PROMPT_LENGTHS, MAX_TOKENS))}
    # 20 blocks of 4 tokens: every request fits alone (at most 65 tokens), far from all of them at once.
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=20, block_size=4, max_num_batched_tokens=32))
    done = run_all(engine, requests)
    assert set(done) == set(requests)
    assert any(out.stats.num_preemptions > 0 for out in done.values())
    for request_id, (prompt, params) in requests.items():
        out = done[request_id]
        assert out.finish_reason == "length" and len(out.output_token_ids) == params.max_tokens
        assert out.prompt_token_ids == prompt
        assert out.output_token_ids == alone(model, prompt, params), request_id


# ---- (b) chunked prefill, (c) page size ----------------------------------------------------------------------


def test_chunked_prefill_gives_the_same_output(model):
    long_prompt = random_prompt(100, VOCAB, seed=100)
    short_prompt = random_prompt(5, VOCAB, seed=101)
    requests = {"long": (long_prompt, SamplingParams(max_tokens=12, temperature=0.0)),
                "long-sampled": (long_prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=3)),
                "short": (short_prompt, SamplingParams(max_tokens=30, temperature=0.0))}
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=64, block_size=16, max_num_batched_tokens=16))
    done = run_all(engine, requests)
    for request_id, (prompt, params) in requests.items():
        assert done[request_id].output_token_ids == alone(model, prompt, params), request_id
    # The 100-token prompt really went through in chunks of at most 16 tokens (plus one step per new token).
    assert done["long"].stats.num_steps >= 100 // 16 + 12


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_chunked_prefill_with_sliding_window_equals_hf(family):
    """Prefill chunks of 6 tokens and pages of 4 against an 8-token sliding window: chunks start mid-window and
    the window spans pages; greedy output equals HF's."""
    sliding = tiny_model(family, vocab_size=VOCAB)
    prompts = [random_prompt(n, VOCAB, seed=700 + n) for n in (30, 13, 1)]
    requests = {str(i): (p, SamplingParams(max_tokens=25, temperature=0.0)) for i, p in enumerate(prompts)}
    engine = LLMEngine(sliding, EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=6))
    done = run_all(engine, requests)
    for i, prompt in enumerate(prompts):
        expected = sliding.generate(torch.tensor([prompt]), max_new_tokens=25, do_sample=False)[0, len(prompt):]
        assert done[str(i)].output_token_ids == expected.tolist(), (family, i)


@pytest.mark.parametrize("block_size", [1, 3, 7, 32])
def test_block_size_does_not_change_the_output(model, block_size):
    requests = {f"r{i}": (random_prompt(n, VOCAB, seed=200 + i), _params(mode, i, 15))
                for i, (n, mode) in enumerate([(1, "greedy"), (20, "seeded"), (37, "greedy"), (9, "seeded")])}
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=-(-4 * 52 // block_size), block_size=block_size))
    done = run_all(engine, requests)
    for request_id, (prompt, params) in requests.items():
        assert done[request_id].output_token_ids == alone(model, prompt, params), request_id


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding-window layers
@pytest.mark.parametrize("speculate", [False, True])
def test_kv_regions_give_the_same_outputs(model, family, speculate):
    """Each sequence's K/V in a region of its own, read in place: the same tokens as one shared pool, for ragged
    prompts, greedy and seeded sampling, verify windows, sequences finishing at different times (regions between
    running ones fall free: padding rows) and later requests taking over freed regions."""
    net = model if family == "llama" else tiny_model(family, vocab_size=VOCAB)
    lengths, max_tokens = [5, 40, 17, 1, 33, 8], [20, 6, 24, 12, 3, 16]
    # Prompts that repeat themselves, so that prompt lookup drafts.
    requests = {f"r{i}": ((random_prompt(n // 2 + 1, VOCAB, seed=300 + i) * 2)[:n],
                          _params("greedy" if i % 2 else "seeded", i, m))
                for i, (n, m) in enumerate(zip(lengths, max_tokens))}
    spec = SpeculativeConfig(method="prompt_lookup", num_draft_tokens=4, adaptive=False) if speculate else None
    shared = run_all(LLMEngine(net, EngineConfig(num_kv_blocks=64, block_size=4), speculative=spec), requests)
    engine = LLMEngine(net, EngineConfig(kv_region_tokens=50, block_size=4, max_num_seqs=4), speculative=spec)
    assert engine.block_manager.region_blocks == 13 and engine.block_manager.num_blocks == 52
    in_regions = run_all(engine, requests)
    for request_id in requests:
        assert in_regions[request_id].output_token_ids == shared[request_id].output_token_ids, request_id


@pytest.mark.parametrize("method", [None, "prompt_lookup", "self_spec"])
def test_a_lone_region_is_left_unzeroed_and_never_read_past_what_was_written(model, method):
    """One region (``generate()`` at batch 1) is not zeroed: its sequence is read only as far as it was written.
    Filled with NaN first (the draft's own pool too), it gives the tokens and acceptances of a shared pool; with
    several regions the pool starts at zeros."""
    prompt = (random_prompt(9, VOCAB, seed=41) * 3)[:25]  # repeats itself: prompt lookup drafts
    params = _params("greedy", 0, 20)
    spec = None if method is None else SpeculativeConfig(method=method, num_draft_tokens=4, adaptive=False,
                                                         self_spec_layers=1)
    shared = run_all(LLMEngine(model, EngineConfig(num_kv_blocks=16, block_size=4), speculative=spec),
                     {"r": (prompt, params)})["r"]
    engine = LLMEngine(model, EngineConfig(kv_region_tokens=48, block_size=4, max_num_seqs=1), speculative=spec)
    runners = [engine.runner] + ([engine.proposer.runner] if method == "self_spec" else [])
    for runner in runners:
        runner.pool._k.fill_(float("nan"))
        runner.pool._v.fill_(float("nan"))
    lone = run_all(engine, {"r": (prompt, params)})["r"]
    assert lone.output_token_ids == shared.output_token_ids
    assert lone.stats.acceptance_histogram == shared.stats.acceptance_histogram
    several = LLMEngine(model, EngineConfig(kv_region_tokens=48, block_size=4, max_num_seqs=2))
    assert _reads_unwritten_slots(several.block_manager) and not _reads_unwritten_slots(engine.block_manager)


def test_kv_regions_refuse_a_request_longer_than_a_region_and_conflicting_sizes(model):
    engine = LLMEngine(model, EngineConfig(kv_region_tokens=16, block_size=4, max_num_seqs=2))
    with pytest.raises(ValueError, match="region holds only 4.*kv_region_tokens"):
        engine.add_request("long", random_prompt(10, VOCAB, seed=1), SamplingParams(max_tokens=7))
    engine.add_request("fits", random_prompt(10, VOCAB, seed=1), SamplingParams(max_tokens=6))
    assert len(drain(engine)["fits"].output_token_ids) == 6
    for sizes in [dict(num_kv_blocks=8), dict(kv_cache_memory_bytes=1 << 20)]:
        with pytest.raises(ValueError, match="kv_region_tokens sizes the KV pool"):
            EngineConfig(kv_region_tokens=16, **sizes)
    with pytest.raises(ValueError, match="kv_region_tokens must be positive"):
        EngineConfig(kv_region_tokens=0)


# ---- (d) bad input -------------------------------------------------------------------------------------------


def test_bad_requests_are_refused_and_the_engine_keeps_serving(model):
    # 12 blocks of 4 = 48 cached tokens; the context is 64 tokens.
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=12, block_size=4, max_model_len=64))
    good = (random_prompt(10, VOCAB, seed=300), SamplingParams(max_tokens=8, temperature=0.0))
    later = (random_prompt(6, VOCAB, seed=301), SamplingParams(max_tokens=8, temperature=0.7, seed=5))
    engine.add_request("good-before", *good)
    engine.step()
    engine.step()
    bad = [
        ("empty", [], ValueError, "empty"),
        ("too-big-id", [5, VOCAB], ValueError, "vocabulary"),
        ("negative-id", [5, -1], ValueError, "vocabulary"),
        ("float-ids", [5, 1.5], TypeError, "ints"),
        ("bool-ids", [True, 5], TypeError, "ints"),
        ("string", "hello", TypeError, "list of ints"),
        ("float-tensor", torch.tensor([1.0, 2.0]), TypeError, "ints"),
        ("over-context", random_prompt(50, VOCAB, seed=0), ValueError, "context"),  # 50 + 16 > 64
        ("over-pool", random_prompt(40, VOCAB, seed=0), ValueError, "KV blocks"),  # 40 + 16 fits 64, not 48
        ("good-before", random_prompt(3, VOCAB, seed=0), ValueError, "already in use"),
    ]
    for request_id, prompt, error, message in bad:
        with pytest.raises(error, match=message):
            engine.add_request(request_id, prompt, SamplingParams(max_tokens=16))
        assert engine.num_unfinished_requests == 1, request_id
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.add_request("dict-params", [5], {"max_tokens": 4})
    for kwargs, message in [(dict(max_tokens=0), "max_tokens"), (dict(top_p=0.0), "top_p"),
                            (dict(temperature=-0.5), "temperature"), (dict(max_tokens=3, min_tokens=5), "min_tokens"),
                            (dict(top_k=-1), "top_k"), (dict(min_p=1.5), "min_p"),
                            (dict(temperature=float("nan")), "temperature")]:
        with pytest.raises(ValueError, match=message):
            SamplingParams(**kwargs)
    engine.add_request("empty", [7], SamplingParams(max_tokens=2))  # a refused id is not reserved
    engine.add_request("good-after", *later)
    done = drain(engine)
    assert set(done) == {"good-before", "good-after", "empty"}
    assert done["good-before"].output_token_ids == alone(model, *good)
    assert done["good-after"].output_token_ids == alone(model, *later)


# ---- (e) abort -----------------------------------------------------------------------------------------------


def test_abort_frees_blocks_at_once_and_others_continue(model):
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=40, block_size=4, max_num_batched_tokens=24))
    bm = engine.block_manager
    requests = {f"r{i}": (random_prompt(n, VOCAB, seed=400 + i), _params("seeded" if i % 2 else "greedy", i, 10))
                for i, n in enumerate([30, 8, 3, 20, 12])}
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    engine.step()  # r0 prefills its first chunk of 24 tokens; the others wait
    seq = engine._requests["r0"][0]  # its only sample
    assert seq.num_computed_tokens == 24 and len(bm.block_tables[seq.seq_id]) == 6
    free_before = bm.num_free_blocks
    engine.abort("r0")  # mid-prefill
    assert seq.seq_id not in bm.block_tables and bm.num_free_blocks == free_before + 6
    for _ in range(4):
        engine.step()
    seq = engine._requests["r1"][0]
    held = len(bm.block_tables[seq.seq_id])
    assert held > 0
    free_before = bm.num_free_blocks
    engine.abort("r1")  # while decoding
    assert bm.num_free_blocks == free_before + held
    engine.abort("r1")  # twice, and unknown ids: no-ops
    engine.abort("no-such-request")
    done = drain(engine)
    assert set(done) == {"r2", "r3", "r4"}
    for request_id in done:
        assert done[request_id].output_token_ids == alone(model, *requests[request_id]), request_id
    # Aborting everything returns the whole pool at once.
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    engine.step()
    engine.step()
    assert bm.num_free_blocks < bm.num_blocks
    for request_id in requests:
        engine.abort(request_id)
    assert bm.num_free_blocks == bm.num_blocks and not bm.block_tables
    assert not engine.has_unfinished_requests() and engine.step() == []


# ---- (f) stopping --------------------------------------------------------------------------------------------


def test_stop_tokens_eos_ignore_eos_and_max_tokens(model):
    prompt = random_prompt(11, VOCAB, seed=500)
    free = alone(model, prompt, SamplingParams(max_tokens=20, temperature=0.0))
    assert len(free) == 20
    index = next(i for i in range(3, 20) if free[i] not in free[:i])  # a token first produced at step >= 3
    stop = free[index]

    def one(m, params):
        return run_all(LLMEngine(m, EngineConfig(num_kv_blocks=16)), {"r": (prompt, params)})["r"]

    out = one(model, SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[stop]))
    assert out.output_token_ids == free[:index + 1] and out.finish_reason == "stop" and out.finished
    out = one(model, SamplingParams(max_tokens=index, temperature=0.0, stop_token_ids=[stop]))
    assert out.output_token_ids == free[:index] and out.finish_reason == "length"
    # min_tokens masks the stop token until that many tokens exist.
    out = one(model, SamplingParams(max_tokens=20, min_tokens=index + 1, temperature=0.0, stop_token_ids=[stop]))
    assert out.output_token_ids[:index] == free[:index] and stop not in out.output_token_ids[:index + 1]
    # The model's eos (from its generation config) stops a request unless ignore_eos is set.
    with_eos = tiny_model("llama", vocab_size=VOCAB, eos_token_id=stop)
    out = one(with_eos, SamplingParams(max_tokens=20, temperature=0.0))
    assert out.output_token_ids == free[:index + 1] and out.finish_reason == "stop"
    out = one(with_eos, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    assert out.output_token_ids == free and out.finish_reason == "length"
    out = one(with_eos, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[stop]))
    assert out.finish_reason == "stop"  # explicit stop tokens still apply
    out = one(model, SamplingParams(max_tokens=1, temperature=0.0))
    assert out.output_token_ids == free[:1] and out.finish_reason == "length"


# ---- stop tokens and seeds are validated up front ------------------------------------------------------------


def test_out_of_vocabulary_stop_token_is_refused(model):
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=16))
    good = (random_prompt(6, VOCAB, seed=600), SamplingParams(max_tokens=6, temperature=0.0))
    engine.add_request("good", *good)
    for stop in (VOCAB + 5, -1):
        with pytest.raises(ValueError, match="stop"):
            engine.add_request(f"bad{stop}", [5, 6], SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[stop]))
    done = drain(engine)
    assert done["good"].output_token_ids == alone(model, *good)


def test_bad_seed_is_refused_naming_it():
    for seed in (1.5, 2**70, "7"):
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=seed)


# ---- (g) plain decoding steps ----------------------------------------------------------------------------------
# A step in which every running sequence decodes one token without drafts runs from lists (LLMEngine._decode_step);
# it must leave exactly what the general step leaves.


class _PoisonFrom:
    """A logits processor that makes the row NaN from output position ``start`` on (a failure mid-decoding)."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.prompt_len = None

    def __call__(self, input_ids, scores):
        self.prompt_len = self.prompt_len or input_ids.shape[1]
        if input_ids.shape[1] - self.prompt_len >= self.start:
            scores = scores.clone()
            scores[:, 3] = float("nan")
        return scores


def _general_steps_only(engine: LLMEngine) -> LLMEngine:
    engine._plain_decoding = lambda: False
    return engine


def _count_decode_steps(engine: LLMEngine) -> list[int]:
    calls = []
    forward_decode = engine.runner.forward_decode

    def counting(seq_ids, token_ids, positions):
        calls.append(len(seq_ids))
        return forward_decode(seq_ids, token_ids, positions)

    engine.runner.forward_decode = counting
    return calls


def _summary(done: dict) -> dict:
    return {rid: (out.output_token_ids, out.finish_reason, out.error, out.stats.num_steps,
                  out.stats.num_drafted_tokens, out.stats.num_accepted_tokens, out.stats.acceptance_histogram)
            for rid, out in done.items()}


@pytest.mark.parametrize("speculative", [None, SpeculativeConfig(method="prompt_lookup", num_draft_tokens=3)],
                         ids=["plain", "prompt_lookup"])
def test_plain_decoding_steps_leave_what_the_general_step_leaves(model, speculative):
    prompts = [random_prompt(n, VOCAB, seed=700 + n) for n in (5, 23, 40, 9)]
    prompts[2] = prompts[2][:20] * 2  # a repeat for prompt lookup to find
    free = alone(model, prompts[0], SamplingParams(max_tokens=24, temperature=0.0))
    stop = next(t for i, t in enumerate(free[6:], 6) if t not in free[:i])  # first produced at output position >= 6
    requests = {
        "greedy": (prompts[0], SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop])),
        "seeded": (prompts[1], SamplingParams(max_tokens=30, temperature=0.9, top_k=30, seed=7)),
        "long": (prompts[2], SamplingParams(max_tokens=33, temperature=0.0)),
        "penalty": (prompts[3], SamplingParams(max_tokens=17, temperature=0.0, repetition_penalty=1.3)),
        "fails": (prompts[3], SamplingParams(max_tokens=20, temperature=0.0, logits_processors=[_PoisonFrom(5)])),
    }

    def run(general: bool):
        engine = LLMEngine(model, EngineConfig(num_kv_blocks=64, block_size=4), speculative=speculative)
        if general:
            _general_steps_only(engine)
        if engine.draft_policy is not None:  # draft lengths from measured step times: make the times a function
            policy, costs = engine.draft_policy, engine.draft_policy.costs
            observe_step, observe_drafting = policy.observe_step, costs.observe_drafting
            policy.observe_step = lambda num_tokens, seconds, num_draft_tokens=0: observe_step(
                num_tokens, 1e-4 + 1e-3 * num_tokens, num_draft_tokens)
            costs.observe_drafting = lambda num_tokens, seconds: observe_drafting(num_tokens, 1e-6 * num_tokens)
        calls = _count_decode_steps(engine)
        requests["fails"][1].logits_processors[0].prompt_len = None
        return run_all(engine, requests), calls

    fast, fast_calls = run(general=False)
    general, general_calls = run(general=True)
    assert _summary(fast) == _summary(general)
    assert general_calls == [] and len(fast_calls) > 10  # the list path ran, down to a lone sequence
    assert max(fast_calls) == len(requests) and (speculative is not None or fast_calls[-1] == 1)
    assert fast["greedy"].finish_reason == "stop" and fast["greedy"].output_token_ids[-1] == stop
    assert fast["fails"].finish_reason == "error" and "NaN" in fast["fails"].error
    assert len(fast["fails"].output_token_ids) == 5
    assert fast["long"].output_token_ids == alone(model, *requests["long"])
    if speculative is not None:  # probes drafted, and some were accepted (the repeat in "long")
        assert fast["long"].stats.num_accepted_tokens > 0 and 0 < len(fast_calls) < fast["long"].stats.num_steps


def test_a_plain_decoding_step_without_room_falls_back_to_preemption(model):
    """Three sequences decode in a pool that cannot hold them all to the end: the step that needs a block the pool
    lacks goes through the general step, which preempts; outputs stay as if alone."""
    requests = {f"r{i}": (random_prompt(6, VOCAB, seed=800 + i), SamplingParams(max_tokens=26, temperature=0.0))
                for i in range(3)}
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=17, block_size=4))
    calls = _count_decode_steps(engine)
    fallbacks = []
    decode_step = engine._decode_step
    engine._decode_step = lambda start: fallbacks.append(None) if (out := decode_step(start)) is None else out
    done = run_all(engine, requests)
    assert fallbacks and calls and any(out.stats.num_preemptions for out in done.values())
    for request_id, (prompt, params) in requests.items():
        assert done[request_id].output_token_ids == alone(model, prompt, params), request_id


def test_the_engine_puts_a_model_in_training_mode_into_eval_mode():
    model = tiny_model("llama", vocab_size=VOCAB)
    model.eval()
    model.model.layers[0].train()  # one module left in training mode is enough to need eval()
    LLMEngine(model, EngineConfig(num_kv_blocks=8, block_size=4))
    assert not any(m.training for m in model.modules())
