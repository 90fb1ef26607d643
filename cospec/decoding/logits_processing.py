"""Logits processing before sampling: penalties, biases, bans and user processors, one place for target and draft.

Every row of logits that a token is chosen from (each position of a verify window, each draft step) goes through
``process_logits`` with the tokens that precede that position, so a draft is processed exactly like the target
position that verifies it and speculation stays exact. Steps, in this order (Hugging Face's order for its own):

1. ``sequence_bias`` (HF) and ``logit_bias`` (OpenAI): additive biases; a multi-token sequence's bias applies to its
   last token when the tokens before it end the context.
2. ``repetition_penalty`` (HF, CTRL): a token already in the context (prompt and output) has its logit divided by
   the penalty when positive, multiplied when negative.
3. ``presence_penalty`` / ``frequency_penalty`` (OpenAI): ``logit -= presence * [count > 0] + frequency * count``,
   counting the token in the output so far.
4. ``no_repeat_ngram_size`` (HF): a token that would repeat an n-gram of the context is banned.
5. ``bad_words_ids`` (HF): a token that would complete a banned sequence is banned.
6. ``min_tokens``: stop tokens are banned until the output has that many tokens.
7. ``logits_processors``: the user's HF-style processors, called as ``processor(input_ids [1, L], scores [1, V])``.

Terms: the *context* of a row is what HF's processors see as ``input_ids``: ``context_prefix`` (what HF would also
have in ``input_ids``; the engine puts there the prompt as HF's ``input_ids`` holds it when that differs from what
the model reads, e.g. with ``generate()``'s padding, and then gives only the output as ``token_ids``), the prompt,
the output so far, and the drafts before the row's position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class RowContext:
    """One row of logits to process: the request's settings and the tokens before the row's position."""

    params: object  # SamplingParams-like: the fields used below
    token_ids: list[int]  # the request's tokens so far (prompt + output); shared by the rows of one window
    num_prompt_tokens: int
    extra_token_ids: list[int] = field(default_factory=list)  # drafts between token_ids and this row
    stop_token_ids: tuple[int, ...] = ()  # banned while the output is shorter than params.min_tokens
    context_prefix: list[int] = field(default_factory=list)
    state: ProcessorState | None = None  # the request's HF processor objects (made on first use)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) + len(self.extra_token_ids) - self.num_prompt_tokens

    def context(self) -> list[int]:
        return self.context_prefix + self.token_ids + self.extra_token_ids


class ProcessorState:
    """Per-request Hugging Face processor objects (they cache their prepared tensors across calls)."""

    def __init__(self, params) -> None:
        from transformers.generation.logits_process import (NoBadWordsLogitsProcessor, NoRepeatNGramLogitsProcessor,
                                                            SequenceBiasLogitsProcessor)

        biases = dict(params.sequence_bias or {})
        self.sequence_bias = SequenceBiasLogitsProcessor([[list(k), v] for k, v in biases.items()]) if biases else None
        self.no_repeat_ngram = (NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size)
                                if params.no_repeat_ngram_size else None)
        self.bad_words = NoBadWordsLogitsProcessor(params.bad_words_ids, None) if params.bad_words_ids else None


def needs_processing(params, stop_token_ids=()) -> bool:
    """Whether rows of a request with these settings are changed by ``process_logits`` at all."""
    return bool(params.sequence_bias or params.logit_bias or params.repetition_penalty != 1.0
                or params.presence_penalty or params.frequency_penalty or params.no_repeat_ngram_size
                or params.bad_words_ids or params.logits_processors or (params.min_tokens and stop_token_ids))


def process_logits(
    logits: torch.Tensor,  # [num_rows, vocab_size]
    rows: list[RowContext | None],  # per row; None: nothing to do for that row
) -> torch.Tensor:  # [num_rows, vocab_size], a new tensor when anything changed
    """Apply steps 1-7 of the module docstring to each row with a context."""
    todo = [i for i, row in enumerate(rows) if row is not None and needs_processing(row.params, row.stop_token_ids)]
    if not todo:
        return logits
    logits = logits.clone()
    for i in todo:
        if rows[i].state is None:
            rows[i].state = ProcessorState(rows[i].params)
    vocab_size = logits.shape[-1]
    _hf_step(logits, rows, [i for i in todo if rows[i].state.sequence_bias], "sequence_bias", suffix_only=True)
    _logit_bias(logits, rows, [i for i in todo if rows[i].params.logit_bias])
    _repetition_penalty(logits, rows, [i for i in todo if rows[i].params.repetition_penalty != 1.0], vocab_size)
    _presence_frequency(logits, rows, [i for i in todo if rows[i].params.presence_penalty
                                       or rows[i].params.frequency_penalty], vocab_size)
    _hf_step(logits, rows, [i for i in todo if rows[i].state.no_repeat_ngram], "no_repeat_ngram", suffix_only=False)
    _hf_step(logits, rows, [i for i in todo if rows[i].state.bad_words], "bad_words", suffix_only=True)
    for i in todo:
        row = rows[i]
        if row.num_output_tokens < row.params.min_tokens and row.stop_token_ids:
            logits[i, list(row.stop_token_ids)] = float("-inf")
    for i in todo:
        for processor in rows[i].params.logits_processors or ():
            context = torch.tensor([rows[i].context()], dtype=torch.int64, device=logits.device)
            logits[i] = processor(context, logits[i: i + 1])[0]
    return logits


def _hf_step(logits: torch.Tensor, rows: list[RowContext], todo: list[int], name: str, suffix_only: bool) -> None:
    """Run one HF processor on each row (biases and bans read only the end of the context: it is cut to the longest
    biased sequence)."""
    for i in todo:
        processor = getattr(rows[i].state, name)
        if suffix_only:
            context = rows[i].context()[-_longest_sequence(processor):]
        else:
            context = rows[i].context()
        input_ids = torch.tensor([context], dtype=torch.int64, device=logits.device)
        logits[i] = processor(input_ids, logits[i: i + 1])[0]


def _longest_sequence(processor) -> int:
    return max(len(k) for k in processor.sequence_bias)


def _logit_bias(logits: torch.Tensor, rows: list[RowContext], todo: list[int]) -> None:
    for i in todo:
        bias = rows[i].params.logit_bias
        ids = torch.tensor(list(bias.keys()), dtype=torch.int64, device=logits.device)
        logits[i].index_add_(0, ids, torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device))


def _token_counts(rows: list[RowContext], todo: list[int], vocab_size: int, device, outputs_only: bool) -> torch.Tensor:
    """``[len(todo), vocab_size]`` int64 counts of each token in each row's context (or in its output only)."""
    counts = torch.zeros(len(todo), vocab_size, dtype=torch.int64, device=device)
    for j, i in enumerate(todo):
        row = rows[i]
        tokens = (row.token_ids[row.num_prompt_tokens:] if outputs_only else row.context_prefix + row.token_ids)
        tokens = torch.tensor(tokens + row.extra_token_ids, dtype=torch.int64, device=device)
        counts[j].index_add_(0, tokens, torch.ones_like(tokens))
    return counts


def _repetition_penalty(logits: torch.Tensor, rows: list[RowContext], todo: list[int], vocab_size: int) -> None:
    if not todo:
        return
    index = torch.tensor(todo, device=logits.device)
    seen = _token_counts(rows, todo, vocab_size, logits.device, outputs_only=False) > 0
    penalty = torch.tensor([rows[i].params.repetition_penalty for i in todo], dtype=logits.dtype,
                           device=logits.device)[:, None]
    sub = logits[index]
    penalized = torch.where(sub < 0, sub * penalty, sub / penalty)
    logits[index] = torch.where(seen, penalized, sub)


def _presence_frequency(logits: torch.Tensor, rows: list[RowContext], todo: list[int], vocab_size: int) -> None:
    if not todo:
        return
    index = torch.tensor(todo, device=logits.device)
    counts = _token_counts(rows, todo, vocab_size, logits.device, outputs_only=True).to(logits.dtype)
    presence = torch.tensor([rows[i].params.presence_penalty for i in todo], dtype=logits.dtype, device=logits.device)
    frequency = torch.tensor([rows[i].params.frequency_penalty for i in todo], dtype=logits.dtype, device=logits.device)
    logits[index] -= presence[:, None] * (counts > 0) + frequency[:, None] * counts
