"""Paged attention for HF modeling code, and the per-step metadata it reads.

The model runner packs every scheduled sequence's new tokens into one row of ``num_tokens`` tokens. HF layers
compute q/k/v and rotary embeddings for that row as usual, write k/v through ``PagedCache.update`` and then call
the attention function registered here under ``ATTN_IMPLEMENTATION``, which hands the queries to
``cospec.kernels.paged_attention``: on CUDA a Triton kernel that reads each sequence's keys and values in place
through its block table; elsewhere the torch reference, which gathers them into a padded batch for SDPA (its
gather indices and masks are built once per step and shared by every layer).

Metadata reaches attention through a module-level "current step" (set by the runner around the forward), as vLLM's
forward context does, so that it does not depend on how each model family threads ``**kwargs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cospec import kernels
from cospec.kernels import GatherLayout

ATTN_IMPLEMENTATION = "cospec_paged"


@dataclass
class StepMetadata:
    """Ragged batch layout of one forward: flat tensors plus offsets (sequences packed in order)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V goes
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32: block ids of each sequence, enough for max_kv_len
    seq_lens: torch.Tensor  # [num_seqs] int32: cached tokens per sequence after this step's tokens are written
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: offset of each sequence's tokens in the packed row
    block_size: int
    max_q_len: int
    max_kv_len: int
    region_blocks: int | None = None  # each sequence's blocks form a region this long (RegionBlockManager); or None
    min_kv_len: int | None = None  # the shortest seq_len, when the caller knows it (else read from seq_lens if needed)
    layout: GatherLayout = field(init=False)  # the reference path's gather indices, built on first use
    # (sliding_window, softcap) variants whose attention inputs a layer of this step had checked: every layer's
    # queries and pools have the same shapes, so the next layers skip the checks (~3 us a layer on the CPU).
    checked_variants: set = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.layout = GatherLayout(self.block_tables, self.seq_lens, self.query_start_loc, self.block_size,
                                   self.max_q_len, self.max_kv_len, num_tokens=self.slot_mapping.shape[0],
                                   region_blocks=self.region_blocks, min_kv_len=self.min_kv_len)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


_current: list[tuple[StepMetadata, object]] = []


class step_context:  # noqa: N801 (used as a function: ``with step_context(meta, pool):``)
    """Make ``meta`` and the model's KV ``pool`` visible to the attention function during one forward. (A class:
    a generator-based context manager costs a few us more, once per forward.)"""

    __slots__ = ("entry",)

    def __init__(self, meta: StepMetadata, pool) -> None:
        self.entry = (meta, pool)

    def __enter__(self) -> None:
        _current.append(self.entry)

    def __exit__(self, *exc) -> None:
        _current.pop()


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                    softcap=None, **kwargs):
    """HF attention-interface function. query: [1, num_heads, num_tokens, head_dim]; returns [1, num_tokens, heads, dim]."""
    meta, pool = _current[-1]
    layer = module.layer_idx
    variant = (sliding_window, softcap)
    out = kernels.paged_attention(
        query[0].transpose(0, 1), pool.k[layer], pool.v[layer], meta.block_tables, meta.seq_lens,
        meta.query_start_loc, meta.block_size, scaling, sliding_window, softcap, max_kv_len=meta.max_kv_len,
        layout=meta.layout, checked=variant in meta.checked_variants)  # [num_tokens, heads, dim]
    meta.checked_variants.add(variant)
    return out.unsqueeze(0), None


def register() -> None:
    """Register the attention function with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
