"""The draft head's training objective: the frozen target's states and next-token distributions for a batch
(``target_outputs``, with ``TargetStateCache`` to keep them across epochs) and the head's unrolled loss against
them (``ttt_loss``; see ``cospec.training.train_draft`` for the terms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cospec.decoding.eagle3 import Eagle3Head, capture_aux_hidden_states, causal_mask, unrolled_states
from cospec.training.data import Example

@dataclass(slots=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] padded with 0
    lengths: torch.Tensor  # [B]
    loss_mask: torch.Tensor  # [B, T] bool: tokens the head learns to predict


@dataclass(slots=True)
class Targets:
    """What the frozen target says about a batch."""

    aux_hidden_states: torch.Tensor  # [B, T, len(aux) * H_target]
    rows: torch.Tensor  # [B, T] int64: row of ``probs`` for the distribution at position p (of token p + 1), or -1
    probs: torch.Tensor  # [num_rows, draft_vocab_size] the target's next-token distribution on the draft vocabulary
    top: torch.Tensor  # [num_rows] the target's top token (a draft-vocabulary id)


def make_batch(examples: list[Example], device) -> Batch:
    width = max(len(e.token_ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.int64)
    mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for row, e in enumerate(examples):
        ids[row, : len(e.token_ids)] = torch.tensor(e.token_ids)
        mask[row, : len(e.token_ids)] = torch.tensor(e.loss_mask)
    lengths = torch.tensor([len(e.token_ids) for e in examples])
    return Batch(ids.to(device), lengths.to(device), mask.to(device))


@torch.no_grad()
def target_states(model, head: Eagle3Head, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of the target: (aux hidden states ``[B, T, len(aux) * H]``, final hidden state ``[B, T, H]``)."""
    with capture_aux_hidden_states(model, head.aux_layer_ids) as captured:
        hidden = model.get_decoder()(input_ids=batch.input_ids).last_hidden_state  # [B, T, H] after the final norm
    return torch.cat(captured, dim=-1), hidden


class TargetStateCache:
    """The target's states of each training example (keyed by its ``id``: the examples live as long as the run),
    kept while they fit in ``max_bytes``. Examples are padded on the right and attention is causal, so an example's
    states do not depend on the batch it came in: a later epoch rebuilds any batch from them."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def states(self, model, head: Eagle3Head, batch: Batch, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if all(k in self._states for k in keys):
            return self._padded([self._states[k] for k in keys], batch.input_ids.shape[1])
        aux, hidden = target_states(model, head, batch)
        for row, (key, length) in enumerate(zip(keys, batch.lengths.tolist())):
            size = (aux.shape[-1] + hidden.shape[-1]) * length * aux.element_size()
            if key not in self._states and self.num_bytes + size <= self.max_bytes:
                self._states[key] = (aux[row, :length].clone(), hidden[row, :length].clone())
                self.num_bytes += size
        return aux, hidden

    @staticmethod
    def _padded(states: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        aux = states[0][0].new_zeros(len(states), width, states[0][0].shape[-1])
        hidden = states[0][1].new_zeros(len(states), width, states[0][1].shape[-1])
        for row, (a, h) in enumerate(states):
            aux[row, : len(a)] = a
            hidden[row, : len(h)] = h
        return aux, hidden


@torch.no_grad()
def target_outputs(model, head: Eagle3Head, batch: Batch, chunk_rows: int = 1024,
                   states: tuple[torch.Tensor, torch.Tensor] | None = None) -> Targets:
    """The target's aux hidden states everywhere, and its distribution over the draft vocabulary at the positions
    whose next token is trained on and whose top token is in the draft vocabulary. ``states``: the target's
    ``target_states`` of the batch when known (one forward of the target otherwise)."""
    aux, hidden = states if states is not None else target_states(model, head, batch)
    predicts_trained = torch.zeros_like(batch.loss_mask)
    predicts_trained[:, :-1] = batch.loss_mask[:, 1:]
    lm_head = model.get_output_embeddings()
    draft_ids = head.to_target_ids(torch.arange(head.draft_vocab_size, device=hidden.device))
    selected = hidden[predicts_trained]  # [n, H]
    in_vocab, probs = [], []
    for start in range(0, len(selected), chunk_rows):  # full-vocabulary logits, a chunk at a time
        logits = lm_head(selected[start:start + chunk_rows]).float()
        in_vocab.append(head.t2d[logits.argmax(dim=-1)])
        probs.append(torch.softmax(logits[:, draft_ids], dim=-1))
    in_vocab = torch.cat(in_vocab) if in_vocab else torch.zeros(0, dtype=torch.bool, device=hidden.device)
    rows = torch.full(batch.input_ids.shape, -1, dtype=torch.int64, device=hidden.device)
    kept = torch.cumsum(in_vocab, 0) - 1
    rows[predicts_trained] = torch.where(in_vocab, kept, -1)
    probs = torch.cat(probs)[in_vocab] if len(probs) else torch.zeros(0, head.draft_vocab_size, device=hidden.device)
    return Targets(aux, rows, probs, probs.argmax(dim=-1))


@dataclass(slots=True)
class StepResult:
    loss: torch.Tensor  # scalar, the decayed sum over steps
    step_losses: list[float]
    agreement: list[float]  # top-1 agreement per unrolled step
    chain_counts: list[int]  # anchors whose drafts 1..s+1 all agree, per step
    num_anchors: int  # anchors valid through the last step


def ttt_loss(head: Eagle3Head, batch: Batch, targets: Targets, num_steps: int, step_decay: float) -> StepResult:
    """The unrolled head's loss on a batch and its agreement with the target (see the module docstring)."""
    num_rows, num_tokens = batch.input_ids.shape
    states = head.combine(targets.aux_hidden_states.to(next(head.parameters()).dtype))
    # Position t is fed token t + 1 + s at step s.
    fed = F.pad(batch.input_ids[:, 1:], (0, num_steps))
    step_states = unrolled_states(head, states, fed, causal_mask(batch.lengths, num_tokens), num_steps)
    rows = F.pad(targets.rows, (0, num_steps + 1), value=-1)
    total = states.new_zeros(())
    losses, agreement, chain = [], [], []
    all_correct = torch.ones(num_rows, num_tokens, dtype=torch.bool, device=states.device)
    all_valid = torch.ones_like(all_correct)
    for step, step_state in enumerate(step_states):
        step_rows = rows[:, 1 + step:1 + step + num_tokens]  # distribution of token t + 2 + step
        valid = step_rows >= 0
        logits = head.compute_logits(step_state[valid]).float()  # [n, draft_vocab]
        q = targets.probs[step_rows[valid]]
        # -sum(q log softmax(z)) = logsumexp(z) - sum(q z), as q sums to 1 (no log-softmax tensor)
        loss = (torch.logsumexp(logits, -1) - (q * logits).sum(-1)).mean() if len(q) else logits.sum() * 0
        total = total + step_decay ** step * loss
        correct = torch.zeros_like(valid)
        correct[valid] = logits.argmax(-1) == targets.top[step_rows[valid]]
        all_correct = all_correct & correct
        all_valid = all_valid & valid
        losses.append(loss.item())
        agreement.append(float(correct.sum()) / max(int(valid.sum()), 1))
        chain.append(all_correct)
    num_anchors = int(all_valid.sum())
    chain_counts = [int((c & all_valid).sum()) for c in chain]
    return StepResult(total, losses, agreement, chain_counts, num_anchors)
