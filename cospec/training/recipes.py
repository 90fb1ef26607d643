"""The default training data of ``cospec train-draft`` (no ``--data``): available offline, benchmarks left out.

ShareGPT conversations (their first user turn; the target writes the answers) and Python standard-library source,
a seeded sample of each. MT-Bench and HumanEval, where ``cospec bench`` measures, are filtered out by the trainer.
"""

from __future__ import annotations

import random

from cospec.decoding.ngram_model import stdlib_files
from cospec.training.corpora import complete_array_items, sharegpt_path
from cospec.training.data import messages_of

MAX_MINUTES = 30.0
"""Wall-clock budget of ``cospec train-draft`` with the default recipe (data, regeneration and training)."""
EPOCHS = 8
"""Passes over the default data at most: the time budget ends the run first (one pass takes about 8 minutes on 2
cores; later passes reuse the target's states and take about half that)."""
NUM_CONVERSATIONS = 480
"""ShareGPT conversations whose first answer the target regenerates (the target's own answers are what it will be
asked to verify; about 18 minutes of the budget for SmolLM2 on 2 cores, measured on 2026-11-30)."""
MAX_PROMPT_CHARS = 1500
STDLIB_CHARS = 240_000
"""Characters of standard-library source (about 60 k tokens): with the answers, about what 2 CPU cores train on in
the rest of the budget."""


def default_sources(model: str, seed: int = 0, num_conversations: int = NUM_CONVERSATIONS,
                    stdlib_chars: int = STDLIB_CHARS) -> tuple[list[list[dict]], list[str]]:
    """(conversations, texts): first user turns of ShareGPT conversations (with their original answers, which the
    trainer replaces by the target's) and standard-library files."""
    rng = random.Random(seed)
    with open(sharegpt_path()) as f:
        records = list(complete_array_items(f.read()))
    firsts = []
    for record in records:
        messages = messages_of(record)
        if messages and 16 <= len(messages[0]["content"]) <= MAX_PROMPT_CHARS and messages[0]["role"] == "user":
            firsts.append(messages[:2])
    conversations = rng.sample(firsts, min(num_conversations, len(firsts)))
    texts, total = [], 0
    for path in rng.sample(stdlib_files(), len(stdlib_files())):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text[: stdlib_chars - total])
        total += len(texts[-1])
        if total >= stdlib_chars:
            break
    return conversations, texts
