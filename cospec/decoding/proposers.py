"""Draft proposers: where the k tokens that the target verifies come from.

- ``ModelDraftProposer``: a smaller causal LM with the target's vocabulary (or the target's own first layers, for
  self-speculation), run through a ``Runner`` over its own paged KV cache. It catches up on the tokens it has not
  seen, then drafts autoregressively, batched over all requests. Rejected drafts are rolled back by lowering the
  sequence's draft length; the pages are shared with the target's block table.
- ``PromptLookupProposer`` (``cospec.decoding.prompt_lookup``): copies the continuation of an earlier n-gram match.
"""

from __future__ import annotations

import torch

from cospec.decoding.prompt_lookup import PromptLookupProposer
from cospec.decoding.protocols import Draft, DraftRequest, ForwardItem, Runner, embeds_rows, stacked
from cospec.decoding.sampling import sample_draft_tokens

__all__ = ["ModelDraftProposer", "PromptLookupProposer", "check_same_vocabulary"]


def check_same_vocabulary(target, draft, target_tokenizer=None, draft_tokenizer=None) -> None:
    """Raise ValueError unless target and draft models share a vocabulary (and a device)."""
    t_vocab = target.get_output_embeddings().weight.shape[0]
    d_vocab = draft.get_output_embeddings().weight.shape[0]
    if t_vocab != d_vocab:
        raise ValueError(f"the draft model's vocabulary ({d_vocab} tokens) differs from the target's ({t_vocab}); "
                         "speculative decoding needs one shared vocabulary")
    if target_tokenizer is not None and draft_tokenizer is not None and target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise ValueError("the draft tokenizer's vocabulary differs from the target's")
    t_device = next(target.parameters()).device
    d_device = next(draft.parameters()).device
    if t_device != d_device:
        raise ValueError(f"the draft model is on {d_device} but the target is on {t_device}; put both on one device")


class ModelDraftProposer:
    is_deterministic = False
    keeps_no_state = False

    def __init__(self, runner: Runner, min_confidence: float = 0.0, keep_unconfident: bool = True) -> None:
        self.runner = runner
        self.min_confidence = min_confidence  # stop a draft where the draft model's top probability is lower
        # Speculation keeps the token drafted at that point (the target verifies it anyway); deferral drops it, since
        # the small model emits only tokens it is confident about.
        self.keep_unconfident = keep_unconfident
        self.num_cached: dict[int, int] = {}  # seq_id -> tokens whose K/V are in the draft cache

    def release(self, seq_id: int) -> None:
        self.num_cached.pop(seq_id, None)

    def mark_cached(self, seq_id: int, num_tokens: int) -> None:
        """The draft model's cache holds the sequence's first ``num_tokens`` tokens (it ran as a fusion member)."""
        self.num_cached[seq_id] = num_tokens

    def rollback(self, seq_id: int, num_valid_tokens: int) -> None:
        """After verification only the first ``num_valid_tokens`` tokens of the sequence are known good."""
        if seq_id in self.num_cached:
            self.num_cached[seq_id] = min(self.num_cached[seq_id], num_valid_tokens)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = [Draft([], [] if r.seed is not None and not r.coupled else None) for r in requests]
        active = [i for i, r in enumerate(requests) if r.num_draft_tokens > 0]
        # First pass: feed everything the draft has not seen (at least the last token); then one token per pass.
        feeds = {}
        for i in active:
            r = requests[i]
            start = self.num_cached.get(r.seq_id, 0)
            feeds[i] = (r.token_ids[start:], start)
        while active:
            items = [ForwardItem(requests[i].seq_id, feeds[i][0], feeds[i][1], 1,
                                 embeds_rows(requests[i].prompt_embeds, feeds[i][1], len(feeds[i][0]))) for i in active]
            logits = self.runner.forward(items)  # [len(active), vocab]
            tokens, probs = sample_draft_tokens(logits, [requests[i] for i in active],
                                                [drafts[i].token_ids for i in active])
            confident = ((torch.softmax(logits.float(), dim=-1).amax(dim=-1) >= self.min_confidence).tolist()
                         if self.min_confidence > 0 else [True] * len(active))
            still = []
            for row, i in enumerate(active):
                r, (fed, start) = requests[i], feeds[i]
                self.num_cached[r.seq_id] = start + len(fed)
                if not confident[row] and not self.keep_unconfident:
                    continue
                drafts[i].token_ids.append(tokens[row])
                if drafts[i].probs is not None:
                    drafts[i].probs.append(probs[row])
                if len(drafts[i].token_ids) < r.num_draft_tokens and confident[row]:
                    feeds[i] = ([tokens[row]], start + len(fed))
                    still.append(i)
            active = still
        return stacked(drafts)
