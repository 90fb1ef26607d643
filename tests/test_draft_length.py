"""The adaptive draft length: acceptance model, measured step costs, padded rows, allocation across sequences."""

import pytest
import torch

from cospec.decoding.draft_length import AcceptanceStats, CostModel, DraftLengthPolicy


def _policy(max_draft_tokens=10, costs=(), padded_tokens=None, **kwargs) -> DraftLengthPolicy:
    policy = DraftLengthPolicy(max_draft_tokens, padded_tokens=padded_tokens, **kwargs)
    for num_tokens, seconds in costs:
        for _ in range(3):
            policy.observe_step(num_tokens, seconds)
    return policy


def _record(policy, seq_id, windows):
    for drafted, accepted in windows:
        policy.record(seq_id, drafted, accepted)


def test_acceptance_stats_separate_first_and_next_rates():
    stats = AcceptanceStats()
    for _ in range(20):  # bursty: a window is accepted whole or rejected at its first token
        stats.update(8, 8, decay=1.0)
        stats.update(8, 0, decay=1.0)
    assert stats.first_rate() == pytest.approx(21 / 42)
    assert stats.next_rate() == pytest.approx((20 * 7 + 1) / (20 * 7 + 2))  # every token after an accepted one
    assert stats.first_rate(prior=0.0) == pytest.approx(20 / 42)
    stats = AcceptanceStats()
    stats.update(4, 2, decay=1.0)  # tokens 2 (accepted) and 3 (rejected) came after accepted ones
    assert (stats.first_accepted, stats.first_trials, stats.next_accepted, stats.next_trials) == (1, 1, 1, 2)


def test_cost_model_prefers_measured_sizes_over_the_fit():
    costs = CostModel()
    for num_tokens, seconds in [(1, 0.04), (4, 0.05), (16, 0.09), (32, 0.15)]:
        costs.observe_forward(num_tokens, seconds)
    assert costs.step_seconds(16) == pytest.approx(0.09)
    assert costs.step_seconds(24) == pytest.approx(0.12)  # between close measured sizes: interpolated
    a, b = costs.coefficients()
    assert costs.step_seconds(8) == pytest.approx(0.05 + max(b, 0.01 / 3) * 4)  # 16 is too far: extended from 4
    assert costs.step_seconds(64) == pytest.approx(0.15 + 0.06 / 16 * 32)  # the slope between 16 and 32
    costs.observe_forward(16, 0.19)  # a running mean, not the last value
    assert 0.09 < costs.step_seconds(16) < 0.19


def test_decode_sizes_are_not_predicted_from_prefill_steps():
    # Prefill chunks cost ~1 ms per token; at decode sizes each token costs ~14 ms. A few more tokens than the
    # batch must look as expensive as the decode sizes measured below them, not as cheap as a prefill token.
    costs = CostModel()
    for num_tokens, seconds in [(173, 0.251), (3, 0.060), (4, 0.074)] * 5:
        costs.observe_forward(num_tokens, seconds)
    a, b = costs.coefficients()
    assert b < 0.002
    assert costs.step_seconds(6) == pytest.approx(0.074 + 2 * 0.014)
    assert costs.step_seconds(2) == pytest.approx(a + 2 * b)  # below every measured size: the fit


def test_cheap_verification_and_accurate_drafts_draft_the_maximum():
    policy = _policy(costs=[(1, 0.05), (6, 0.0501), (11, 0.0502)])
    _record(policy, 0, [(10, 10)] * 10)
    assert policy.choose([0]) == {0: 10}


def test_expensive_verification_or_bad_drafts_switch_drafting_off():
    expensive = _policy(costs=[(1, 0.05), (6, 0.30), (11, 0.55)])
    _record(expensive, 0, [(10, 10)] * 10)
    assert expensive.choose([0]) == {0: 0}
    bad = _policy(costs=[(1, 0.05), (6, 0.10), (11, 0.15)])
    _record(bad, 0, [(5, 0)] * 30)
    assert bad.choose([0]) == {0: 0}


def test_rows_that_padding_adds_are_filled_for_free():
    # A 9-token step runs as 16 rows and costs what 16 costs; 8 rows are cheaper than 16.
    padded = lambda n: torch.where((n >= 9) & (n <= 16), 16, n) if isinstance(n, torch.Tensor) else (  # noqa: E731
        16 if 9 <= n <= 16 else n)
    policy = _policy(max_draft_tokens=15, costs=[(1, 0.04), (8, 0.06), (16, 0.09)], padded_tokens=padded)
    _record(policy, 0, [(8, 8), (8, 0)] * 10)  # p ~ 0.5, c ~ 1
    k = policy.choose([0])[0]
    assert k in (7, 15)  # 8 or 16 rows, never a size that pays for 16 rows and uses fewer
    assert policy.costs.step_seconds(16) == pytest.approx(0.09)
    policy.observe_step(11, 0.12)  # observed as the padded size
    assert policy.costs.step_seconds(16) > 0.09


def test_drafts_go_to_the_sequences_most_likely_to_accept_them():
    policy = _policy(costs=[(2, 0.05), (5, 0.07), (8, 0.09), (12, 0.12), (22, 0.2)])
    _record(policy, 0, [(10, 10)] * 20)
    _record(policy, 1, [(10, 0)] * 20)
    k = policy.choose([0, 1])
    assert k[0] > 0 and k[1] == 0


def test_prefill_in_the_same_step_makes_drafts_relatively_cheaper():
    costs = [(1, 0.04), (4, 0.05), (11, 0.09), (201, 0.9), (205, 0.905), (211, 0.91)]
    policy = _policy(costs=costs)
    _record(policy, 0, [(10, 3)] * 20)
    alone, with_prefill = policy.choose([0])[0], policy.choose([0], num_other_tokens=200)[0]
    assert with_prefill > alone


def test_switched_off_sequences_are_probed_again():
    policy = _policy(costs=[(1, 0.05), (6, 0.1)], probe_interval=3)  # drafts that are always accepted would pay
    _record(policy, 0, [(4, 0)] * 5)
    assert policy.choose([0]) == {0: 0}
    _record(policy, 0, [(0, 0)] * 3)
    assert policy.choose([0]) == {0: 1}
    _record(policy, 0, [(1, 0)])  # a failed probe: the next one waits twice as long
    _record(policy, 0, [(0, 0)] * 5)
    assert policy.choose([0]) == {0: 0}
    _record(policy, 0, [(0, 0)])
    assert policy.choose([0]) == {0: 1}
    _record(policy, 0, [(1, 0)])  # failed again: 12 steps now
    policy.release(0)
    _record(policy, 1, [(0, 0)] * 11)  # a new request waits as long as the last one did
    assert policy.choose([1]) == {1: 0}
    _record(policy, 1, [(0, 0)])
    assert policy.choose([1]) == {1: 1}
    _record(policy, 1, [(1, 1)])  # a successful probe resets the wait
    assert policy.stats[1].probe_interval == 3


def test_fixed_and_zero_draft_lengths():
    assert _policy(max_draft_tokens=0).choose([1, 2]) == {1: 0, 2: 0}
    assert _policy(max_draft_tokens=7, adaptive=False).choose([1, 2]) == {1: 7, 2: 7}
    assert _policy().choose([]) == {}
    with pytest.raises(ValueError, match="max_draft_tokens"):
        DraftLengthPolicy(-1)


def test_new_requests_start_from_the_pooled_acceptance():
    costs = [(1, 0.05), (6, 0.06), (11, 0.07)]
    fresh = _policy(costs=costs)
    assert fresh.choose([7])[7] > 0  # nothing known yet: the Beta(1, 1) prior drafts
    hopeless = _policy(costs=costs)
    for seq_id in range(20):  # earlier requests whose drafts were never accepted
        _record(hopeless, seq_id, [(5, 0)] * 5)
        hopeless.release(seq_id)
    assert hopeless.choose([99]) == {99: 0}
    accurate = _policy(costs=costs)
    for seq_id in range(20):
        _record(accurate, seq_id, [(10, 10)] * 5)
        accurate.release(seq_id)
    assert accurate.choose([99]) == {99: 10}


def _greedy_loop_drafts(policy: DraftLengthPolicy, rates: dict, base_tokens: int) -> dict[int, int]:
    """The policy's choice written as the draft-by-draft loop it stands for: a heap hands each next draft to the
    sequence whose next draft adds the most (ties to the lower id), keeping the total with the best throughput."""
    import heapq

    step_seconds = policy.costs.step_seconds
    emitted = float(len(rates))
    best_rate, best_total = emitted / step_seconds(policy.padded_tokens(base_tokens)), 0
    heap = [(-first, s, 1) for s, (first, _) in rates.items()]
    heapq.heapify(heap)
    order = []
    while heap:
        neg_gain, s, k = heapq.heappop(heap)
        if -neg_gain < 1e-3:
            break
        order.append(s)
        emitted += -neg_gain
        total = len(order)
        rate = emitted / (step_seconds(policy.padded_tokens(base_tokens + total))
                          + policy.costs.draft_cost_per_token * total)
        if rate > best_rate:
            best_rate, best_total = rate, total
        if k < policy.max_draft_tokens:
            heapq.heappush(heap, (neg_gain * rates[s][1], s, k + 1))
    k = dict.fromkeys(rates, 0)
    for s in order[:best_total]:
        k[s] += 1
    return k


@pytest.mark.parametrize("seed", range(6))
def test_draft_choice_equals_the_draft_by_draft_greedy_loop(seed):
    import random

    rng = random.Random(seed)
    policy = DraftLengthPolicy(max_draft_tokens=rng.choice([1, 3, 5]), padded_tokens=lambda n: -(-n // 4) * 4)
    for num_tokens in (1, 7, 16, 40, 90):  # a step cost that grows with the padded size
        policy.costs.observe_forward(-(-num_tokens // 4) * 4, 0.01 + 0.0004 * num_tokens * rng.uniform(0.5, 2.0))
    policy.costs.observe_drafting(10, 0.001 * rng.random())
    # Shuffled ids, repeated rates (ties), rates near the floor and high ones.
    ids = rng.sample(range(1000), 40)
    shared = (rng.random(), min(rng.random(), 0.999))
    rates = {s: shared if rng.random() < 0.4 else (rng.choice([0.0005, rng.random(), 0.99]), min(rng.random(), 0.999))
             for s in ids}
    for base_tokens in (40, 41, 120):
        assert policy._best_drafts(rates, base_tokens) == _greedy_loop_drafts(policy, rates, base_tokens)


def test_steps_with_drafts_are_priced_apart():
    """A step with drafts that costs far more than its token count says (the engine's slower path around a small
    model's forward) switches drafting off for drafts accepted half the time; priced like a step without drafts,
    the same drafts pay."""
    plain = [(64, 0.0024), (65, 0.00241), (80, 0.0025), (96, 0.0026), (128, 0.0028)]
    cheap = _policy(max_draft_tokens=4, costs=plain)
    expensive = _policy(max_draft_tokens=4, costs=plain)
    for num_tokens, seconds in [(65, 0.0045), (80, 0.0047), (96, 0.0049), (128, 0.0052)] * 3:
        expensive.observe_step(num_tokens, seconds, num_draft_tokens=num_tokens - 64)
    assert expensive.costs.step_seconds(80) == pytest.approx(0.0025)  # steps without drafts keep their price
    seq_ids = list(range(64))
    for policy in (cheap, expensive):
        for s in seq_ids:
            _record(policy, s, [(1, 1), (1, 0)] * 10)
    assert sum(cheap.choose(seq_ids).values()) > 0
    assert sum(expensive.choose(seq_ids).values()) == 0


def test_probes_wait_while_even_accepted_drafts_would_not_pay_then_remeasure():
    from cospec.decoding.draft_length import _REMEASURE_STEPS

    policy = _policy(max_draft_tokens=4, costs=[(2, 0.002), (6, 0.0021)], probe_interval=3)
    for num_tokens in (3, 4, 6):
        policy.observe_step(num_tokens, 0.01, num_draft_tokens=num_tokens - 2)  # 5x a step without drafts
    _record(policy, 0, [(4, 0)] * 5)
    _record(policy, 1, [(4, 0)] * 5)
    chosen = []
    for _ in range(_REMEASURE_STEPS + 1):
        chosen.append(policy.choose([0, 1]))
        for s, k in chosen[-1].items():
            policy.record(s, k, 0)
    assert all(k == {0: 0, 1: 0} for k in chosen[:_REMEASURE_STEPS])  # no probe: nothing could make it pay
    assert chosen[-1] == {0: 1, 1: 1}  # the price is old: probe (and measure it again)


def test_probes_share_steps():
    """When one sequence is due for a probe, those halfway to theirs probe in the same step."""
    policy = _policy(costs=[(1, 0.05), (6, 0.1)], probe_interval=4)
    for s in (0, 1, 2):
        _record(policy, s, [(4, 0)] * 5)
    _record(policy, 0, [(0, 0)] * 4)  # due
    _record(policy, 1, [(0, 0)] * 2)  # halfway
    _record(policy, 2, [(0, 0)] * 1)  # not yet
    assert policy.choose([0, 1, 2]) == {0: 1, 1: 1, 2: 0}
    _record(policy, 1, [(0, 0)])  # nobody due: a sequence halfway waits
    assert policy.choose([1, 2]) == {1: 0, 2: 0}

