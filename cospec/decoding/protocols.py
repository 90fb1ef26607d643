"""The small interfaces through which decoding strategies reach models, without importing the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from cospec.decoding.logits_processing import RowContext


@dataclass(slots=True)
class ForwardItem:
    """One sequence's part of a ragged forward: feed ``token_ids`` at positions ``start_pos..``; return logits of
    the last ``num_logits`` of them."""

    seq_id: int
    token_ids: list[int]
    start_pos: int
    num_logits: int
    embeds: torch.Tensor | None = None
    """``[m, hidden_size]``, m <= len(token_ids): the model's input for the first m tokens instead of their token
    embeddings (a prompt given as embeddings, Hugging Face's ``inputs_embeds``)."""


def embeds_rows(prompt_embeds: torch.Tensor | None, start: int, num_tokens: int) -> torch.Tensor | None:
    """The rows of ``prompt_embeds`` (``[k, hidden_size]``, positions 0..k-1) among positions ``start..start +
    num_tokens - 1``, for ``ForwardItem.embeds``; None if there are none."""
    if prompt_embeds is None or start >= prompt_embeds.shape[0]:
        return None
    return prompt_embeds[start: start + num_tokens]


class Runner(Protocol):
    """Runs a model over the engine's paged cache (the engine's ``ModelRunner`` is one)."""

    vocab_size: int

    def forward(self, items: list[ForwardItem]) -> torch.Tensor:  # [sum(num_logits), vocab_size]
        ...


class StateRunner(Protocol):
    """Runs a draft head over the engine's paged cache (the engine's ``HeadRunner`` is one): each token comes with
    an input state, and the states at the returned rows come back with their logits."""

    def forward(self, items: list[ForwardItem], states: torch.Tensor  # [sum(len(token_ids)), hidden_size]
                ) -> tuple[torch.Tensor, torch.Tensor]:  # [sum(num_logits), head vocab], [sum(num_logits), hidden_size]
        ...


@dataclass(slots=True)
class DraftRequest:
    """What a proposer gets for one sequence: all its tokens so far (the last one not yet in any cache) and how many
    drafts to propose, with what a sampling draft must follow: the request's settings, its seed (None: greedy), the
    output position of the first draft, whether drafts are coupled to the target's noise (see
    ``cospec.decoding.verification``) and the logits-processing context of the first draft position."""

    seq_id: int
    token_ids: list[int]
    num_draft_tokens: int
    params: object = None  # SamplingParams-like (temperature, top_k, top_p, min_p, processing fields)
    seed: int | None = None
    num_output_tokens: int = 0
    coupled: bool = True
    context: RowContext | None = None
    prompt_embeds: torch.Tensor | None = None  # [k, hidden_size]: the first k positions' input, for a draft that
    # shares the target's embeddings (self-speculation); None: the draft reads token_ids


@dataclass(slots=True)
class Draft:
    token_ids: list[int]
    probs: torch.Tensor | None = None  # [len(token_ids), vocab_size] the distribution each draft was sampled from
    # (only for rejection sampling: requests that are not coupled)


def stacked(drafts: list[Draft]) -> list[Draft]:
    """The drafts with the per-step distributions a model proposer collected in a list stacked into one tensor."""
    for d in drafts:
        if isinstance(d.probs, list):
            d.probs = torch.stack(d.probs) if d.probs else None
    return drafts


class Proposer(Protocol):
    is_deterministic: bool
    """True when drafts carry no probabilities (q is one-hot on the draft token)."""
    keeps_no_state: bool
    """True when drafts come from the sequences' tokens alone (no cache or states of their own to keep up to date):
    a step in which no sequence drafts needs nothing from the proposer."""

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        ...

    def release(self, seq_id: int) -> None:
        """Forget a sequence (finished or preempted): its draft cache, if any, is gone."""
        ...
