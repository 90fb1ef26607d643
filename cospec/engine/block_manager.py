"""Paged KV-cache bookkeeping: which blocks of the pool each sequence owns.

Terms:
- block: ``block_size`` consecutive slots of the KV pool; every model in the engine (target, draft) has its own
  pool tensors, all indexed by the same block ids, so one block table serves every model of a sequence.
- block table: the ordered block ids of one sequence; token ``i`` of the sequence lives in slot
  ``block_table[i // block_size] * block_size + i % block_size``.
- length: how many tokens of the sequence have K/V in the cache. Truncation (the rollback that speculation needs)
  only lowers the length and returns blocks that became empty; nothing is copied.
"""

from __future__ import annotations

from collections import deque

import torch


class OutOfBlocksError(RuntimeError):
    """Raised when an allocation asks for more free blocks than the pool has."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free_blocks: deque[int] = deque(range(num_blocks))
        self.block_tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    # ---- queries -------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_blocks)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks_needed(self, seq_id: int, new_length: int) -> int:
        have = len(self.block_tables.get(seq_id, ()))
        return max(0, self.num_blocks_for(new_length) - have)

    def can_grow(self, seq_id: int, new_length: int, reserve: int = 0) -> bool:
        """Whether ``seq_id`` can be extended to ``new_length`` tokens leaving ``reserve`` blocks free."""
        return self.num_new_blocks_needed(seq_id, new_length) + reserve <= len(self._free_blocks)

    # ---- updates -------------------------------------------------------------------------------------------
    def grow(self, seq_id: int, new_length: int) -> None:
        """Make room for ``new_length`` tokens (allocating the sequence on first use); sets its length."""
        needed = self.num_new_blocks_needed(seq_id, new_length)
        if needed > len(self._free_blocks):
            # Checked before the sequence is registered: a failed grow leaves no trace (no empty table behind).
            raise OutOfBlocksError(f"sequence {seq_id} needs {needed} more blocks, {len(self._free_blocks)} are free")
        table = self.block_tables.setdefault(seq_id, [])
        self.lengths.setdefault(seq_id, 0)
        for _ in range(needed):
            table.append(self._free_blocks.popleft())
        self.lengths[seq_id] = max(self.lengths[seq_id], new_length)

    def truncate(self, seq_id: int, new_length: int) -> None:
        """Drop the cached tokens past ``new_length`` (O(1) in tokens); frees blocks that became empty."""
        if new_length < 0 or new_length > self.lengths[seq_id]:
            raise ValueError(f"cannot truncate sequence {seq_id} of length {self.lengths[seq_id]} to {new_length}")
        table = self.block_tables[seq_id]
        keep = self.num_blocks_for(new_length)
        while len(table) > keep:
            self._free_blocks.append(table.pop())
        self.lengths[seq_id] = new_length

    def free(self, seq_id: int) -> None:
        table = self.block_tables.pop(seq_id, None)
        self.lengths.pop(seq_id, None)
        if table:
            self._free_blocks.extend(reversed(table))

    # ---- slot arithmetic -----------------------------------------------------------------------------------
    def slots(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """Slot ids of tokens ``start .. end-1`` of a sequence: ``[end - start]`` int64."""
        table = torch.tensor(self.block_tables[seq_id], dtype=torch.int64)
        positions = torch.arange(start, end, dtype=torch.int64)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size
