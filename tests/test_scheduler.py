"""Fair admission: a short request is not stuck behind a long prefill, decodes are not slowed much by one, a long
prompt still advances every step, and steps stay full when nobody waits. Counted in steps and tokens, not seconds."""

from __future__ import annotations

import pytest
from _tiny_models import one_thread, random_prompt, tiny_model  # noqa: F401 (fixture)

from cospec import EngineConfig, LLMEngine, SamplingParams
from cospec.engine.block_manager import BlockManager
from cospec.engine.scheduler import Scheduler
from cospec.engine.sequence import Sequence

VOCAB = 128
pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=VOCAB)


def engine_for(model, policy: str, **options) -> LLMEngine:
    config = dict(block_size=4, max_num_batched_tokens=32, scheduling_policy=policy, fair_prefill_tokens=8)
    return LLMEngine(model, EngineConfig(**{**config, **options}))


def record_steps(engine: LLMEngine) -> list[dict[int, int]]:
    """Per forward of the target: tokens run per sequence id."""
    steps = []
    forward = engine.runner.forward

    def recording_forward(items):
        steps.append({item.seq_id: len(item.token_ids) for item in items})
        return forward(items)

    forward_decode = engine.runner.forward_decode

    def recording_forward_decode(seq_ids, token_ids, positions):  # a plain decoding step: one token each
        steps.append(dict.fromkeys(seq_ids, 1))
        return forward_decode(seq_ids, token_ids, positions)

    engine.runner.forward = recording_forward
    engine.runner.forward_decode = recording_forward_decode
    return steps


def steps_until_first_token(engine: LLMEngine, request_id: str, done: dict) -> int:
    for step in range(1, 1000):
        outputs = engine.step()
        for out in outputs:
            if out.finished:
                done[out.request_id] = out
        if any(out.request_id == request_id for out in outputs):
            return step
    raise AssertionError(f"{request_id} got no token")


@pytest.mark.parametrize("policy", ["fair", "fcfs"])
def test_a_short_request_is_not_stuck_behind_a_long_prefill(model, policy):
    engine = engine_for(model, policy)
    steps = record_steps(engine)
    long_prompt, short_prompt = random_prompt(200, VOCAB, seed=1), random_prompt(4, VOCAB, seed=2)
    engine.add_request("long", long_prompt, GREEDY)
    engine.step()  # alone, the long prompt takes the whole budget
    assert steps[-1] == {0: 32}
    engine.add_request("short", short_prompt, GREEDY)
    done = {}
    waited = steps_until_first_token(engine, "short", done)
    if policy == "fair":
        assert waited == 1
        assert steps[-1] == {0: 4 + 8, 1: 4}  # the long prefill leaves room and adds at most its reserve + C
    else:
        assert waited == 6  # the rest of the prompt in chunks of 32 first: 168 = 5 * 32 + 8
    while engine.has_unfinished_requests():
        done.update({out.request_id: out for out in engine.step() if out.finished})
    alone = {}
    for request_id, prompt in (("long", long_prompt), ("short", short_prompt)):
        single = engine_for(model, policy)
        single.add_request(request_id, prompt, GREEDY)
        while single.has_unfinished_requests():
            alone.update({out.request_id: out for out in single.step() if out.finished})
        assert done[request_id].output_token_ids == alone[request_id].output_token_ids


def test_decodes_next_to_a_long_prefill_slow_down_at_most_about_twice(model):
    engine = engine_for(model, "fair")
    steps = record_steps(engine)
    engine.add_request("decoding", random_prompt(5, VOCAB, seed=3), SamplingParams(max_tokens=40, temperature=0))
    engine.step()
    engine.add_request("long", random_prompt(200, VOCAB, seed=4), GREEDY)
    engine.step()  # the long prompt's first chunk takes what the decode leaves of the budget
    assert steps[-1] == {0: 1, 1: 31}
    for _ in range(10):
        engine.step()
        # 1 decode token: the running prefill may add at most that much again plus C = 8 tokens, and always advances
        assert steps[-1] == {0: 1, 1: 1 + 8}


def test_steps_stay_full_when_nobody_waits_for_a_token(model):
    """Two long prompts at once (offline batch work): every step runs the whole budget until one emits a token."""
    engine = engine_for(model, "fair")
    steps = record_steps(engine)
    engine.add_request("a", random_prompt(100, VOCAB, seed=5), GREEDY)
    engine.add_request("b", random_prompt(100, VOCAB, seed=6), GREEDY)
    while not engine.step():
        assert sum(steps[-1].values()) == 32
    assert sum(steps[-1].values()) == 32
    # The waiting prompt got its first chunk (half the budget) next to the running one; then the running one went on
    # alone, as nobody waited for a token.
    assert steps[:4] == [{0: 32}, {0: 16, 1: 16}, {0: 32}, {0: 20, 1: 12}]


def test_the_fair_share_comes_from_measured_step_costs():
    """Without ``fair_prefill_tokens``, C is a / b of the fitted step time a + b * tokens (32 before steps of
    different sizes have been timed)."""
    block_manager = BlockManager(num_blocks=100, block_size=4)
    scheduler = Scheduler(EngineConfig(block_size=4, max_num_batched_tokens=64), block_manager)
    long = Sequence(0, "long", list(range(300)), GREEDY, ())
    scheduler.add(long)

    def schedule() -> dict[str, int]:
        chunks = {s.seq.request_id: s.num_new_tokens for s in scheduler.schedule()}
        for s in scheduler.running:
            s.num_computed_tokens += chunks.get(s.request_id, 0)
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(7)  # its first token
        return chunks

    assert schedule() == {"long": 64}  # alone: the whole budget
    scheduler.observe_step(64, 0.084)  # a = 20 ms, b = 1 ms per token
    scheduler.add(Sequence(1, "short", [1, 2, 3, 4], GREEDY, ()))
    assert schedule() == {"long": 4 + 32, "short": 4}  # one step size timed so far: C = 32
    for num_tokens in (40, 1, 8, 30):
        scheduler.observe_step(num_tokens, 0.020 + 0.001 * num_tokens)
    assert schedule() == {"short": 1, "long": 1 + 20}  # C = a / b = 20 next to the short one's decode


def test_queue_time_is_recorded(model):
    engine = engine_for(model, "fair", max_num_seqs=1)
    engine.add_request("first", random_prompt(10, VOCAB, seed=7), GREEDY)
    engine.add_request("second", random_prompt(10, VOCAB, seed=8), GREEDY)
    done = {}
    while engine.has_unfinished_requests():
        done.update({out.request_id: out for out in engine.step() if out.finished})
    first, second = done["first"].stats, done["second"].stats
    assert first.arrival_time <= first.first_scheduled_time <= first.first_token_time
    assert second.first_scheduled_time >= first.finish_time  # one sequence at a time: it waited for the first
    assert 0 < second.queue_time < second.time_to_first_token


def test_bad_scheduling_options_are_refused():
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineConfig(scheduling_policy="lifo")
    with pytest.raises(ValueError, match="fair_prefill_tokens"):
        EngineConfig(fair_prefill_tokens=0)
