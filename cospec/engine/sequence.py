"""A request as the engine tracks it, and what it hands back."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from cospec.decoding.logits_processing import ProcessorState, RowContext, needs_processing
from cospec.decoding.protocols import embeds_rows
from cospec.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class RequestStats:
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    """When the request first ran (its first prefill chunk was scheduled)."""
    first_token_time: float | None = None
    finish_time: float | None = None
    num_steps: int = 0
    """Engine steps (target forwards) this request took part in."""
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0
    """Prompt tokens found in the prefix cache when the request started (not computed)."""
    num_drafted_tokens: int = 0
    num_accepted_tokens: int = 0
    acceptance_histogram: list[int] = field(default_factory=list)
    """acceptance_histogram[m]: how many verify windows accepted exactly m drafts."""

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify window (accepted drafts + the target's own token)."""
        windows = sum(self.acceptance_histogram)
        return (self.num_accepted_tokens + windows) / windows if windows else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_drafted_tokens if self.num_drafted_tokens else 0.0

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass(slots=True)
class TokenLogprob:
    """An output token's log-probability, and the most likely tokens' at its position (most likely first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    """'stop' (eos, a stop token or a stopping criterion), 'length' (max_tokens or the context), 'abort', 'error'
    (see ``error``), or None while running."""
    text: str | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    index: int = 0
    """Sample index among the ``n`` samples of the request's prompt."""
    logprobs: list[TokenLogprob] | None = None
    """Per output token, when ``SamplingParams.logprobs`` is set."""
    scores: list[torch.Tensor] | None = None
    """Per output token ``[vocab_size]``, when ``SamplingParams.output_scores``: the logits it was chosen from."""
    logits: list[torch.Tensor] | None = None
    """Per output token ``[vocab_size]``, when ``SamplingParams.output_logits``: the model's raw logits."""
    error: str | None = None
    """Why the request failed (finish reason 'error'), e.g. the model produced NaN logits for it."""


class Sequence:
    """One request: its tokens, how many of them have K/V in the cache, and what keys its random numbers."""

    def __init__(self, seq_id: int, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: tuple[int, ...], processor_prompt: list[int] | None = None,
                 prompt_embeds: torch.Tensor | None = None, index: int = 0) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index  # sample index among the request's n samples
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.max_num_tokens = self.num_prompt_tokens + params.max_tokens  # the engine caps it at the context
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.stats = RequestStats(num_prompt_tokens=len(prompt_token_ids), arrival_time=time.perf_counter())
        # Sampled requests always have a seed: drawn from torch's global generator when not given (so that
        # torch.manual_seed reproduces generate(), as in Hugging Face). Unseeded requests are not coupled: their
        # model drafts are judged by rejection sampling, which accepts more (see cospec.decoding.verification).
        self.seed: int | None = None
        self.is_coupled = params.seed is not None
        if not params.is_greedy:
            self.seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        # The prompt as logits processors and stopping criteria see it, when it is not the prompt itself (generate():
        # Hugging Face's input_ids row, with its padding and masked tokens; empty for a prompt given as embeddings).
        self.processor_prompt = None if processor_prompt is None else list(processor_prompt)
        self.prompt_embeds = prompt_embeds  # [k, hidden_size]: the model's input at the first k prompt positions
        self.processor_state = (ProcessorState(params) if needs_processing(params, tuple(self.stop_ids)) else None)
        self.logprobs: list | None = [] if params.logprobs is not None else None
        self.scores: list | None = [] if params.output_scores else None
        self.logits: list | None = [] if params.output_logits else None
        self.num_new_since_output = 0
        # Greedy with nothing that reads or changes the logits: verification takes the argmax and nothing else.
        self.is_plain_greedy = (self.seed is None and self.processor_state is None and params.logprobs is None
                                and not params.output_scores and not params.stopping_criteria)
        # Nothing to record per token but the token (no logprobs, scores, logits or stopping criteria to call).
        self.reports_tokens_only = (self.logprobs is None and self.scores is None and self.logits is None
                                    and not params.stopping_criteria)

    def row_context(self) -> RowContext | None:
        """The logits-processing context of this sequence's next position (None: no processing)."""
        if self.processor_state is None:
            return None
        if self.processor_prompt is None:
            return RowContext(self.params, self.token_ids, self.num_prompt_tokens, [], tuple(self.stop_ids),
                              state=self.processor_state)
        return RowContext(self.params, self.output_token_ids, 0, [], tuple(self.stop_ids), self.processor_prompt,
                          self.processor_state)

    def processor_token_ids(self) -> list[int]:
        """What logits processors and stopping criteria see as the sequence's tokens (HF's ``input_ids`` row)."""
        if self.processor_prompt is None:
            return self.token_ids
        return self.processor_prompt + self.output_token_ids

    def prompt_embeds_for(self, start: int, num_tokens: int) -> torch.Tensor | None:
        """``[<= num_tokens, hidden_size]``: the prompt embeddings of positions ``start..start + num_tokens - 1`` that
        have them (None if none do)."""
        return embeds_rows(self.prompt_embeds, start, num_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def to_output(self) -> RequestOutput:
        self.stats.num_output_tokens = self.num_output_tokens
        return RequestOutput(self.request_id, self.prompt_token_ids, self.output_token_ids, self.is_finished,
                             self.finish_reason, stats=self.stats, logprobs=_copy(self.logprobs),
                             scores=_copy(self.scores), logits=_copy(self.logits), error=self.error, index=self.index)


def _copy(values: list | None) -> list | None:
    return None if values is None else list(values)
