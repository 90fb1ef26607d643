"""Training examples for a draft head: token ids plus the mask of tokens it learns to predict.

- text (files or directories of code and prose): cut into chunks of at most ``max_len`` tokens; every token counts.
- conversations (ShareGPT JSON/JSONL: ``{"conversations": [{"from": "human"|"gpt", "value": ...}]}``, or OpenAI-style
  ``{"messages": [{"role", "content"}]}``): the tokenizer's chat template is applied and only the assistant turns
  (with their end-of-turn tokens) count.
- ``regenerate``: the target writes the assistant turns itself (greedy, with cospec's engine), so that the head
  learns the target's own continuations (self-distillation).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from cospec.training.corpora import BenchmarkFilter, complete_array_items

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
          "bard": "assistant", "bing": "assistant", "system": "system"}
_CONVERSATION_SUFFIXES = (".json", ".jsonl")


@dataclass(slots=True)
class Example:
    token_ids: list[int]
    loss_mask: list[bool]
    """True for the tokens the head learns to predict."""

    @property
    def num_trained_tokens(self) -> int:
        return sum(self.loss_mask)


def messages_of(record: dict) -> list[dict] | None:
    """The ``[{"role", "content"}]`` turns of a ShareGPT or OpenAI-style record: user and assistant alternating,
    starting with a user turn (after an optional system turn; a leading assistant turn is dropped). None if it has
    no user turn followed by an assistant turn."""
    if "messages" in record:
        turns = [(m.get("role"), m.get("content")) for m in record["messages"]]
    else:
        turns = [(_ROLES.get(t.get("from")), t.get("value")) for t in record.get("conversations") or []]
    messages = []
    for role, content in turns:
        if role is None or not isinstance(content, str):
            return None
        if role == "system":
            if messages:
                return None
        elif role == "assistant" and not any(m["role"] == "user" for m in messages):
            continue  # a conversation that opens with the assistant: start at the first user turn
        elif role != ("assistant" if messages and messages[-1]["role"] == "user" else "user"):
            return None  # two user (or assistant) turns in a row
        messages.append({"role": role, "content": content})
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return messages if any(m["role"] == "assistant" for m in messages) else None


def chat_example(tokenizer, messages: list[dict], max_len: int) -> Example | None:
    """The templated conversation, cut to ``max_len`` tokens, with the assistant turns masked in. None if no
    assistant token fits."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []  # character spans of the assistant turns (content and end-of-turn marker)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
            spans.append((start, end))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"][:max_len]
    mask = [any(start <= begin < end for start, end in spans) for begin, _ in encoded["offset_mapping"][:max_len]]
    return Example(ids, mask) if any(mask) else None


def text_examples(tokenizer, text: str, max_len: int) -> list[Example]:
    """Chunks of at most ``max_len`` tokens; all of their tokens count."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return [Example(ids[i:i + max_len], [True] * len(ids[i:i + max_len])) for i in range(0, len(ids), max_len)
            if len(ids[i:i + max_len]) > 1]


def read_conversations(path: Path) -> list[list[dict]]:
    """The usable conversations of a ShareGPT-style .json (array, possibly cut off at the end) or .jsonl file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = list(complete_array_items(text)) if text.lstrip().startswith("[") else [json.loads(text)]
    return [m for m in map(messages_of, records) if m is not None]


def read_sources(paths: list[str | Path]) -> tuple[list[list[dict]], list[str]]:
    """(conversations, texts) from files and directories: .json/.jsonl files are conversations, every other UTF-8
    file is text (binary files are skipped)."""
    conversations, texts = [], []
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"training data {path} does not exist")
    for file in files:
        if file.suffix in _CONVERSATION_SUFFIXES:
            conversations += read_conversations(file)
            continue
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return conversations, texts


def without_benchmarks(conversations: list[list[dict]], texts: list[str],
                       benchmark_filter: BenchmarkFilter) -> tuple[list[list[dict]], list[str]]:
    """Drop every conversation and text that contains a benchmark item."""
    kept = [c for c in conversations if not any(benchmark_filter.matches(m["content"]) for m in c)]
    return kept, [t for t in texts if not benchmark_filter.matches(t)]


def regenerate(llm, conversations: list[list[dict]], max_new_tokens: int, max_turns: int | None = None,
               batch_size: int = 64) -> list[list[dict]]:
    """The conversations with every assistant turn replaced by the target's own greedy answer (turn by turn:
    each answer sees the earlier regenerated ones). Keeps at most ``max_turns`` user turns per conversation."""
    from cospec.engine.sampling_params import SamplingParams

    users = [[m for m in c if m["role"] == "user"][:max_turns] for c in conversations]
    results = [[m for m in c if m["role"] == "system"] for c in conversations]
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    tokenizer = llm.tokenizer
    with tqdm(total=sum(map(len, users)), desc="regenerating answers", unit="answer") as bar:
        for turn in range(max(map(len, users), default=0)):
            active = [i for i, u in enumerate(users) if turn < len(u)]
            for start in range(0, len(active), batch_size):
                batch = active[start:start + batch_size]
                prompts = []
                for i in batch:
                    results[i].append(users[i][turn])
                    ids = tokenizer.apply_chat_template(results[i], add_generation_prompt=True, tokenize=True)
                    prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
                for i, out in zip(batch, llm.generate(prompts, params, use_tqdm=False)):
                    results[i].append({"role": "assistant", "content": out.text})
                bar.update(len(batch))
    return results


def shuffled(items: list, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items
