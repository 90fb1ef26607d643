"""From Hugging Face ``generate()`` inputs to engine prompts: ``input_ids``, ``inputs_embeds`` or neither (the BOS
token), with the attention mask and position ids.

HF's decoder-only ``generate()`` takes position ids from the attention mask (its cumulative sum - 1) and never
attends to a masked token. For a row whose last token is attended, that is the model run on the attended tokens
alone at positions ``0..n-1``: what cospec runs (ragged batches, no padding inside the model). Logits processors
and stopping criteria see HF's ``input_ids`` row as it is: its padding and masked tokens included, and nothing for
a prompt given only as embeddings (HF's ``input_ids`` then starts empty).

Refused with ``UnsupportedArgumentError``, because HF's result there is not the attended tokens' result: a row
whose last token is masked (right padding: HF predicts from a pad token), position ids other than the mask's, and a
masked token inside a row of a sliding-window model when the row outlasts the window (HF's window also counts the
masked token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedArgumentError(ValueError):
    """A generate() argument (or generation-config setting) that cospec does not implement."""


@dataclass(slots=True)
class PromptRow:
    """One prompt of the batch, as the engine takes it."""

    token_ids: list[int] | None  # the attended tokens, what the model reads (None: a prompt given as embeddings only)
    embeds: torch.Tensor | None  # [num_tokens, hidden_size] the attended rows of inputs_embeds (None: none given)
    processor_prompt: list[int]  # HF's input_ids row, what processors and stopping criteria see
    num_positions: int  # HF's positions from the first attended token to the end of the row (masked ones included)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) if self.token_ids is not None else self.embeds.shape[0]


def prompt_rows(model: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, bos_token_id: int | None,
                pad_token_id: int | None, eos_token_ids: list[int]) -> tuple[torch.Tensor, list[PromptRow]]:
    """``(input_ids [batch, L], rows)``: what HF's result starts with (the prompts; L = 0 for a prompt given only as
    embeddings, a BOS column when there are no inputs) and each row as an engine prompt. Malformed inputs raise
    ValueError; inputs whose HF result is not what cospec computes raise UnsupportedArgumentError."""
    if input_ids is None and inputs_embeds is None:
        if attention_mask is not None or position_ids is not None:
            raise ValueError("attention_mask and position_ids need input_ids or inputs_embeds")
        if bos_token_id is None:
            raise ValueError("bos_token_id has to be defined when no input_ids are provided (as in HF)")
        input_ids = torch.tensor([[int(bos_token_id)]], device=next(model.parameters()).device)
    if input_ids is not None and (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2
                                  or input_ids.is_floating_point()):
        raise ValueError("input_ids must be a 2-D tensor of token ids [batch, length]")
    if inputs_embeds is not None:
        _check_embeds(model, inputs_embeds, input_ids)
    inputs = input_ids if input_ids is not None else inputs_embeds
    batch, width = inputs.shape[:2]
    if width == 0:
        raise ValueError("the inputs are empty (length 0)")
    if attention_mask is None:
        attention_mask = torch.ones(batch, width, dtype=torch.int64, device=inputs.device)
        if input_ids is not None and pad_token_id is not None and pad_token_id not in eos_token_ids:
            attention_mask = (input_ids != pad_token_id).long()  # as HF infers it from padding
    elif not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, width):
        raise ValueError(f"attention_mask {_shape(attention_mask)} does not match the inputs ({batch}, {width})")
    attended = attention_mask.bool().cpu()  # [batch, width]
    unattended_last = (~attended[:, -1]).nonzero().flatten().tolist()
    if unattended_last:
        raise UnsupportedArgumentError(
            f"attention_mask masks the last token of row(s) {unattended_last} (right padding, or a row with no token): "
            "cospec needs each row's last token attended; pad on the left (tokenizer.padding_side = 'left')")
    if position_ids is not None:
        _check_position_ids(position_ids, attended)
    first = attended.int().argmax(dim=1).tolist()  # first attended column of each row
    # Rows as lists (one conversion for the batch: a masked index per row costs ~10 us); a row attended from its
    # first attended column on (left padding, the common case) is a slice of its list.
    id_rows = None if input_ids is None else input_ids.tolist()
    num_attended = attended.sum(dim=1).tolist()
    rows = []
    for i in range(batch):
        if id_rows is None:
            token_ids = None
        elif num_attended[i] == width - first[i]:
            token_ids = id_rows[i][first[i]:]
        else:
            token_ids = [t for t, attend in zip(id_rows[i], attended[i].tolist()) if attend]
        rows.append(PromptRow(
            token_ids=token_ids,
            embeds=None if inputs_embeds is None else inputs_embeds[i][attended[i].to(inputs.device)],
            processor_prompt=[] if id_rows is None else id_rows[i],
            num_positions=width - first[i]))
    if input_ids is None:
        input_ids = torch.zeros(batch, 0, dtype=torch.int64, device=inputs.device)
    return input_ids, rows


def check_sliding_window(model: nn.Module, rows: list[PromptRow], max_new_tokens: int) -> None:
    """Refuse a masked token inside a row that a sliding window cuts (see the module docstring)."""
    window = _sliding_window(model)
    if window is None:
        return
    cut = [i for i, row in enumerate(rows) if row.num_positions > row.num_tokens
           and row.num_positions + max_new_tokens > window]
    if cut:
        raise UnsupportedArgumentError(
            f"attention_mask masks tokens inside row(s) {cut}, and the model's sliding window ({window} tokens) is "
            "shorter than those rows: Hugging Face's window counts the masked tokens, cospec's does not; remove "
            "them from the inputs instead of masking them")


def _check_embeds(model: nn.Module, inputs_embeds, input_ids: torch.Tensor | None) -> None:
    hidden_size = model.get_input_embeddings().weight.shape[1]
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 \
            or inputs_embeds.shape[2] != hidden_size or not inputs_embeds.is_floating_point():
        raise ValueError(f"inputs_embeds must be a float tensor [batch, length, {hidden_size}], got "
                         f"{_shape(inputs_embeds)}")
    if input_ids is not None and tuple(input_ids.shape) != tuple(inputs_embeds.shape[:2]):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} must "
                         "have the same batch size and length (the embeddings are the model's input for input_ids)")


def _check_position_ids(position_ids, attended: torch.Tensor) -> None:
    """Position ids must be what HF derives from the mask at every attended token (padding positions are free)."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 \
            or position_ids.shape[1] != attended.shape[1] or position_ids.shape[0] not in (1, attended.shape[0]):
        raise ValueError(f"position_ids {_shape(position_ids)} do not match the inputs {tuple(attended.shape)}")
    expected = attended.long().cumsum(dim=1) - 1
    differs = (position_ids.cpu().expand_as(expected) != expected) & attended
    if bool(differs.any()):
        rows = sorted(set(differs.nonzero()[:, 0].tolist()))
        raise UnsupportedArgumentError(
            f"position_ids of row(s) {rows} differ from the attention mask's (attended tokens at 0, 1, 2, ...): cospec "
            "takes positions from the mask; other position_ids are not supported")


def _shape(value) -> object:
    """A tensor's shape, or the type name of something that is not a tensor (for error messages)."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _sliding_window(model: nn.Module) -> int | None:
    """The model's sliding-window length, if any of its layers uses one."""
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)
