"""The serving load test's workloads (sessions of chat requests) and its report."""

import pytest

from benchmarks.bench_serve import RequestResult, configurations, markdown_table, parse_args, summarize_run
from benchmarks.serve_workloads import build_sessions, system_prompt_text


def test_multiturn_sessions_replay_conversations_turn_by_turn():
    sessions, source = build_sessions("multiturn", 6, seed=0, max_turn_chars=2000, max_turns=3)
    assert len(sessions) == 6 and len({s.id for s in sessions}) == 6
    for session in sessions:
        for turn, messages in enumerate(session.requests):
            assert [m["role"] for m in messages] == ["user", "assistant"] * turn + ["user"]
            if turn:  # each turn repeats the previous one as its prefix
                assert messages[: 2 * turn - 1] == session.requests[turn - 1]
        assert 1 <= len(session.requests) <= 3
    if source.startswith("ShareGPT"):
        assert any(len(s.requests) > 1 for s in sessions)


def test_multiturn_sessions_send_back_the_answers_received():
    # A chat client sends its own conversation back: the server's answers, not the recorded replies.
    sessions, _ = build_sessions("multiturn", 6, seed=0, max_turn_chars=2000, max_turns=3)
    session = max(sessions, key=lambda s: len(s.requests))
    turns = len(session.requests)
    answers = [f"answer {k}" for k in range(turns - 1)]
    for turn in range(turns):
        messages = session.messages(turn, answers)
        assert [m["content"] for m in messages if m["role"] == "assistant"] == answers[:turn]
        users = [m for m in session.requests[turn] if m["role"] == "user"]
        assert [m for m in messages if m["role"] == "user"] == users
        assert session.messages(turn) == session.requests[turn]  # recorded replies without answers
    assert session.requests[-1][-1]["role"] == "user"  # the session's own messages are left as they were
    if turns > 1:
        assert session.requests[1][1]["content"] != "answer 0"
        with pytest.raises(ValueError, match="answers"):
            session.messages(turns - 1, [])


def test_system_prompt_sessions_share_one_system_prompt():
    sessions, _ = build_sessions("system-prompt", 5, seed=1, max_turn_chars=1200, system_prompt="be brief")
    assert all(len(s.requests) == 1 for s in sessions)
    assert {s.requests[0][0]["content"] for s in sessions} == {"be brief"}
    assert len({s.requests[0][1]["content"] for s in sessions}) > 1


def test_system_prompt_text_reaches_the_token_count():
    def count(text: str) -> int:  # a tokenizer of about 3.7 characters a token
        return round(len(text) / 3.7)

    assert abs(count(system_prompt_text(1000, count)) - 1000) <= 5
    with pytest.raises(ValueError, match="workload"):
        build_sessions("nonsense", 1, 0, 100)


def test_configurations_cover_speculation_replicas_and_prefix_caching():
    args = parse_args(["--prompt-lookup", "3", "--replicas", "1", "2"])
    assert configurations(args) == [("plain", []), ("plain, 2 replicas", ["--replicas", "2"]),
                                    ("prompt-lookup 3", ["--prompt-lookup", "3"]),
                                    ("prompt-lookup 3, 2 replicas", ["--prompt-lookup", "3", "--replicas", "2"])]
    args = parse_args(["--replicas", "2", "--prefix-caching", "on", "off"])
    assert configurations(args) == [("plain, 2 replicas", ["--replicas", "2"]),
                                    ("plain, 2 replicas, no prefix cache", ["--replicas", "2", "--no-prefix-caching"])]


def test_summary_reports_the_prefix_cache_hit_rate():
    results = [RequestResult(True, 0.1, 0.5, 5, 100), RequestResult(False, error="x"),
               RequestResult(True, 0.02, 0.3, 5, 140, cached_tokens=96, turn=1),
               RequestResult(True, 0.04, 0.3, 5, 180, cached_tokens=128, turn=2)]
    before = {"cospec_prefix_cache_queries_total": 50, "cospec_prefix_cache_hits_total": 10}
    after = {"cospec_prefix_cache_queries_total": 250, "cospec_prefix_cache_hits_total": 160}
    row = summarize_run("plain", "1 sessions/s", results, 2.0, before, after)
    assert row["prefix_cache_hit_rate"] == 0.75 and row["completed"] == 3 and row["failed"] == 1
    assert row["mean_prompt_tokens"] == 140 and row["mean_cached_prompt_tokens"] == 224 / 3
    assert row["ttft_p50_first_turns_ms"] == 100 and abs(row["ttft_p50_later_turns_ms"] - 30) < 1e-9
    assert "| 100 / 30 |" in markdown_table([row]).splitlines()[-1]
    assert markdown_table([row]).splitlines()[-1].endswith("| 0.75 |")


def test_each_load_replays_sessions_of_its_own():
    # One server runs the loads in turn: a later load must not find an earlier one's prompts in the prefix cache.
    import argparse

    from benchmarks.bench_serve import sessions_for_loads

    args = argparse.Namespace(workload="multiturn", num_requests=4, seed=0, max_prompt_chars=2000, max_turns=3)
    per_load, _ = sessions_for_loads(args, 2, None)
    assert [len(sessions) for sessions in per_load] == [4, 4]
    first_turns = [[s.requests[0][0]["content"] for s in sessions] for sessions in per_load]
    assert not set(first_turns[0]) & set(first_turns[1])
    assert sessions_for_loads(args, 2, None)[0] == per_load  # the same sessions for every configuration
