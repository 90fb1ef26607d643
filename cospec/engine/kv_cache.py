"""The paged KV pool of one model and the cache object that HF modeling code writes into.

Every layer of a model gets a key pool and a value pool of ``[num_slots, num_kv_heads, head_dim]``, where
``num_slots = num_blocks * block_size``. The pools are allocated once, when the engine starts; steps only write
slots and move lengths (see ``BlockManager``), so nothing is re-allocated per step.
"""

from __future__ import annotations

import torch

from cospec import kernels


def kv_layout(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a HF text config."""
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return config.num_hidden_layers, num_kv_heads, head_dim


def kv_bytes_per_token(config, dtype: torch.dtype, num_layers: int | None = None) -> int:
    all_layers, num_kv_heads, head_dim = kv_layout(config)
    num_layers = num_layers or all_layers
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class KVCachePool:
    """Key and value pools of every layer of one model."""

    def __init__(self, config, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 num_layers: int | None = None, zeroed: bool = False) -> None:
        """``zeroed``: start from zeros. Attention reading whole regions in place (``RegionBlockManager``) also
        reads, under a mask, slots never written; a masked key still multiplies its value by 0, so they must be
        finite, which uninitialised memory need not be. Otherwise empty: a slot is always written before it is read."""
        all_layers, num_kv_heads, head_dim = kv_layout(config)
        num_layers = num_layers or all_layers
        num_slots = num_blocks * block_size
        # One allocation per kind; per-layer views keep indexing cheap.
        make = torch.zeros if zeroed else torch.empty
        self._k = make(num_layers, num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)
        self._v = make(num_layers, num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.k = list(self._k.unbind(0))
        self.v = list(self._v.unbind(0))
        self.num_layers = num_layers
        self.num_bytes = self._k.numel() * self._k.element_size() * 2


class PagedCache:
    """What a HF attention layer sees as its ``cache``: ``update`` writes the new tokens' K/V into the pool.

    Attention itself (``cospec.engine.attention``) reads the pool through the step's gather indices, so
    ``update`` hands the new states back unchanged.
    """

    is_compileable = False

    def __init__(self, pool: KVCachePool) -> None:
        self.pool = pool
        self.slot_mapping: torch.Tensor | None = None  # [num_tokens] int64, set per step (``start_step``)
        self._checked = False  # whether a layer of this step had its inputs to store_kv checked

    def start_step(self, slot_mapping: torch.Tensor) -> None:
        self.slot_mapping = slot_mapping
        self._checked = False

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        # key_states: [1, num_kv_heads, num_tokens, head_dim] (the packed batch is one row). The runner's slot
        # mappings hold no padding (every packed token is some sequence's), and every layer's states and pool
        # have the shapes of the first layer's: checked once a step.
        kernels.store_kv(key_states[0].transpose(0, 1), value_states[0].transpose(0, 1),
                         self.pool.k[layer_idx], self.pool.v[layer_idx], self.slot_mapping, has_padding=False,
                         checked=self._checked)
        self._checked = True
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:  # only asked when position_ids are missing
        raise RuntimeError("cospec passes explicit position_ids; the paged cache has no single sequence length")

    def __len__(self) -> int:
        return self.pool.num_layers
