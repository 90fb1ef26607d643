"""Prompt lookup: a model-free draft proposer that copies text the sequence has already seen.

When the output repeats its input (code edits, quotes, summaries), the tokens after an earlier occurrence of the last
few tokens are a good guess for what comes next. This is Hugging Face's ``prompt_lookup_num_tokens``
(``PromptLookupCandidateGenerator``), vectorized over the context: one comparison per n-gram size, no Python loop over
positions.

Glossary:
    context      the 1-D ``token_ids`` seen so far: prompt plus generated tokens.
    pattern      the last ``n`` tokens of the context, the n-gram to look up.
    match        a start index ``i`` with ``token_ids[i:i+n] == pattern``; the trailing pattern itself never counts,
                 since nothing follows it.
    continuation the up to ``num_draft_tokens`` tokens after a match, cut at the end of the context.
    draft        the continuation returned; empty when no n-gram of any allowed size matches.

Choice (as HF): the longest n-gram size with a match wins; among its matches, the first (leftmost) one.
A match may overlap the pattern, so a run like ``a a a a`` drafts more ``a`` tokens.
"""

from __future__ import annotations

import array
import itertools

import torch

from cospec.decoding.protocols import Draft, DraftRequest


def find_ngram_draft(
    token_ids: torch.Tensor,  # [num_tokens] int64
    num_draft_tokens: int,
    max_ngram_size: int = 3,
    min_ngram_size: int = 1,
) -> torch.Tensor:  # [<= num_draft_tokens] int64
    """Return the tokens that followed the first earlier occurrence of the longest matching suffix n-gram."""
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if num_draft_tokens < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
    num_tokens = token_ids.shape[0]
    empty = token_ids.new_empty(0)
    if num_draft_tokens == 0:
        return empty
    # Candidate windows all start before the last n tokens, i.e. lie in token_ids[:-1]: exactly the windows
    # that have at least one token after them (HF skips the others as empty continuations).
    head = token_ids[:-1]  # [num_tokens - 1]
    for ngram_size in range(min(max_ngram_size, num_tokens - 1), min_ngram_size - 1, -1):
        start = _first_match(head, token_ids[-ngram_size:])
        if start >= 0:
            begin = start + ngram_size
            return token_ids[begin : min(begin + num_draft_tokens, num_tokens)].clone()
    return empty


def _first_match(
    head: torch.Tensor,  # [num_tokens - 1]
    pattern: torch.Tensor,  # [ngram_size]
) -> int:
    """Leftmost i with head[i:i+n] == pattern, or -1."""
    windows = head.unfold(0, pattern.shape[0], 1)  # [num_windows, ngram_size], a view
    is_match = (windows == pattern).all(dim=1)  # [num_windows]
    # argmax returns the first maximal index; check it is a real match (all False -> index 0).
    first = int(torch.argmax(is_match.to(torch.uint8)))
    return first if bool(is_match[first]) else -1


class PromptLookupProposer:
    """Proposes drafts by n-gram lookup in each sequence's own context.

    Deterministic: a draft has no probabilities, so the verifier treats each draft token as proposed with
    probability one (greedy acceptance against the target).
    """

    is_deterministic = True
    keeps_no_state = True

    def __init__(self, max_ngram_size: int = 3, min_ngram_size: int = 1):
        if not isinstance(min_ngram_size, int) or min_ngram_size < 1:
            raise ValueError(f"min_ngram_size must be an int >= 1, got {min_ngram_size!r}")
        if not isinstance(max_ngram_size, int) or max_ngram_size < min_ngram_size:
            raise ValueError(
                f"max_ngram_size must be an int >= min_ngram_size ({min_ngram_size}), got {max_ngram_size!r}"
            )
        self.max_ngram_size = max_ngram_size
        self.min_ngram_size = min_ngram_size

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """The ``Proposer`` interface: one draft (possibly shorter than asked, or empty) per request."""
        return [Draft(d) for d in batched_ngram_drafts([r.token_ids for r in requests],
                                                       [r.num_draft_tokens for r in requests],
                                                       self.max_ngram_size, self.min_ngram_size)]

    def release(self, seq_id: int) -> None:
        """Stateless: nothing to forget."""

    def propose_tensors(
        self,
        sequences: list[torch.Tensor],  # each [num_tokens_i] int64
        num_draft_tokens: list[int],
    ) -> list[torch.Tensor]:  # each [<= num_draft_tokens[i]] int64
        if len(sequences) != len(num_draft_tokens):
            raise ValueError(f"num_draft_tokens has {len(num_draft_tokens)} entries for {len(sequences)} sequences")
        drafts = batched_ngram_drafts([s.tolist() for s in sequences], num_draft_tokens, self.max_ngram_size,
                                      self.min_ngram_size)
        return [torch.tensor(d, dtype=torch.int64) for d in drafts]


def batched_ngram_drafts(
    sequences: list[list[int]],
    num_draft_tokens: list[int],
    max_ngram_size: int = 3,
    min_ngram_size: int = 1,
) -> list[list[int]]:
    """``find_ngram_draft`` for a batch at once: the sequences padded into one ``[batch, max_len]`` tensor, every
    n-gram size matched for all of them in a few tensor ops (no per-sequence tensor work)."""
    wanted = [i for i, k in enumerate(num_draft_tokens) if k > 0 and len(sequences[i]) > 1]
    drafts: list[list[int]] = [[] for _ in sequences]
    if not wanted:
        return drafts
    lengths = torch.tensor([len(sequences[i]) for i in wanted])  # [batch]
    batch, width = len(wanted), int(lengths.max())
    flat = torch.frombuffer(array.array("q", itertools.chain.from_iterable(sequences[i] for i in wanted)),
                            dtype=torch.int64)
    row = torch.repeat_interleave(torch.arange(batch), lengths)
    column = torch.arange(flat.numel()) - (lengths.cumsum(0) - lengths)[row]
    ids = torch.full((batch, width), -1, dtype=torch.int64)
    ids[row, column] = flat
    best_start = torch.full((batch,), -1, dtype=torch.int64)  # where the draft begins, for the longest n-gram found
    for ngram_size in range(min(max_ngram_size, width - 1), min_ngram_size - 1, -1):
        # Suffix n-gram of each row, and its windows in token_ids[:-1] (start i <= length - 1 - ngram_size).
        suffix = ids.gather(1, (lengths - ngram_size).clamp(min=0)[:, None] + torch.arange(ngram_size))
        num_windows = width - ngram_size
        is_match = torch.ones(batch, num_windows, dtype=torch.bool)
        for j in range(ngram_size):
            is_match &= ids[:, j: j + num_windows] == suffix[:, j: j + 1]
        is_match &= torch.arange(num_windows) < (lengths - ngram_size)[:, None]
        first = is_match.to(torch.uint8).argmax(dim=1)  # the first maximal index
        found = is_match.gather(1, first[:, None])[:, 0] & (best_start < 0) & (lengths > ngram_size)
        best_start = torch.where(found, first + ngram_size, best_start)
    for i, start, length in zip(wanted, best_start.tolist(), lengths.tolist()):
        if start >= 0:
            drafts[i] = sequences[i][start: min(start + num_draft_tokens[i], length)]
    return drafts
