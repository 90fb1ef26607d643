"""A request as the engine tracks it, and what it hands back."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

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
    """When the scheduler first gave the request a slot (its queue time ends there)."""
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
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    """'stop' (eos or a stop token), 'length' (max_tokens or the context), 'abort', or None while running."""
    text: str | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    index: int = 0
    """Which of the request's samples this is (SamplingParams.n > 1)."""


class Sequence:
    """One request: its tokens, how many of them have K/V in the cache, and its own random generator."""

    def __init__(self, seq_id: int, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: tuple[int, ...]) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.finish_reason: str | None = None
        self.stats = RequestStats(num_prompt_tokens=len(prompt_token_ids), arrival_time=time.perf_counter())
        self.generator: torch.Generator | None = None
        if not params.is_greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.generator = torch.Generator().manual_seed(seed)
        self.num_new_since_output = 0

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
                             self.finish_reason, stats=self.stats)
