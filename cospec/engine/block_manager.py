"""Paged KV-cache bookkeeping: which blocks of the pool each sequence owns, and which blocks hold a reusable prefix.

Terms:
- block: ``block_size`` consecutive slots of the KV pool; every model in the engine (target, draft) has its own
  pool tensors, all indexed by the same block ids, so one block table serves every model of a sequence.
- block table: the ordered block ids of one sequence; token ``i`` of the sequence lives in slot
  ``block_table[i // block_size] * block_size + i % block_size``.
- length: how many tokens of the sequence have K/V in the cache. Truncation (the rollback that speculation needs)
  only lowers the length and returns blocks that became empty; nothing is copied.
- prefix cache: a full block of accepted tokens is registered under a hash of its tokens and of every token before
  it (the hash chains its parent block's hash, as in vLLM's ``kv_cache_utils``), so a later sequence that starts
  with the same tokens takes the block into its own table instead of recomputing it. Blocks are reference-counted
  (shared read-only: a sequence only writes past its cached prefix); a cached block that no sequence uses stays
  reusable until memory is needed, and is then evicted least recently released first.

Free blocks come in two kinds: empty ones (handed out first) and cached ones with no user (``_evictable``, in
release order). Both count as free: taking one never fails while either kind is left.

``RegionBlockManager`` lays the pool out differently, for a batch known in advance (``cospec.generate``): each
sequence owns a region of consecutive blocks, so that its keys and values lie in one run of the pool and the CPU
attention path reads them in place instead of gathering them (see ``GatherLayout``).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from array import array
from collections import OrderedDict, deque

import torch


class OutOfBlocksError(RuntimeError):
    """Raised when an allocation asks for more free blocks than the pool has."""


def block_hash(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """The prefix-cache key of a full block: SHA-256 of its parent block's key and its tokens. A cryptographic hash,
    so two different prefixes never share a key in practice (a collision would serve one prompt another's K/V)."""
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


class BlockManager:
    region_blocks: int | None = None  # blocks per sequence region (RegionBlockManager); None: one shared pool

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        # seq_id -> a stamp that changes whenever its table changes other than by appending blocks (created, cut
        # back, freed), so that a mirror of the table (InputBatch) knows when a prefix it copied may be stale.
        self.table_stamps: dict[int, int] = {}
        self._stamps = itertools.count(1)
        self._ref_counts = [0] * num_blocks
        self._empty_blocks: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; least recently released first
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        self._hash_of: dict[int, bytes] = {}  # block id -> its hash, for cached blocks
        self._seq_hashes: dict[int, list[bytes]] = {}  # seq_id -> hashes of its full blocks registered so far
        # Prefix-cache statistics, cumulative: tokens looked up at admission and tokens found cached.
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0

    # ---- queries -------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence uses: empty ones and cached ones that can be evicted."""
        return len(self._empty_blocks) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (in use or not)."""
        return len(self._cached)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def max_blocks_per_seq(self) -> int:
        """The most blocks one sequence can ever hold."""
        return self.num_blocks

    def num_new_blocks_needed(self, seq_id: int, new_length: int) -> int:
        have = len(self.block_tables.get(seq_id, ()))
        return max(0, self.num_blocks_for(new_length) - have)

    def can_grow(self, seq_id: int, new_length: int, reserve: int = 0) -> bool:
        """Whether ``seq_id`` can be extended to ``new_length`` tokens leaving ``reserve`` blocks free."""
        table = self.block_tables.get(seq_id)
        if table is not None and len(table) * self.block_size >= new_length and not reserve:
            return True  # the common case of a decode step: the last block has room
        return self.num_new_blocks_needed(seq_id, new_length) + reserve <= self.num_free_blocks

    # ---- prefix cache ----------------------------------------------------------------------------------------
    def lookup(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Block ids holding the longest cached prefix of ``token_ids`` that is at most ``max_tokens`` tokens long
        (whole blocks only). Looks only; ``allocate`` takes them."""
        if not self.enable_prefix_caching:
            return []
        blocks, parent = [], b""
        for i in range(min(max_tokens, len(token_ids)) // self.block_size):
            parent = block_hash(parent, token_ids[i * self.block_size: (i + 1) * self.block_size])
            block = self._cached.get(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_allocate(self, prefix_blocks: list[int], num_tokens: int) -> bool:
        """Whether a new sequence that reuses ``prefix_blocks`` fits ``num_tokens`` tokens: the blocks it still
        needs, plus the cached ones it takes that nobody uses (they stop being free), must be free."""
        taken_free = sum(self._ref_counts[b] == 0 for b in prefix_blocks)
        needed = max(0, self.num_blocks_for(num_tokens) - len(prefix_blocks))
        return needed + taken_free <= self.num_free_blocks

    def allocate(self, seq_id: int, prefix_blocks: list[int], num_tokens: int, num_lookup_tokens: int = 0) -> None:
        """Start ``seq_id`` on the cached ``prefix_blocks`` (from ``lookup``) with room for ``num_tokens`` tokens.
        ``num_lookup_tokens`` (the sequence's length) is counted as looked up in the prefix-cache statistics."""
        if seq_id in self.block_tables:
            raise ValueError(f"sequence {seq_id} already has blocks")
        if not self.can_allocate(prefix_blocks, num_tokens):
            raise OutOfBlocksError(f"sequence {seq_id} needs more blocks than the {self.num_free_blocks} free")
        for block in prefix_blocks:
            self._take(block)
        self.block_tables[seq_id] = list(prefix_blocks)
        self.table_stamps[seq_id] = next(self._stamps)
        self.lengths[seq_id] = len(prefix_blocks) * self.block_size
        self._seq_hashes[seq_id] = [self._hash_of[b] for b in prefix_blocks]
        if self.enable_prefix_caching:
            self.num_prefix_query_tokens += num_lookup_tokens
            self.num_prefix_hit_tokens += len(prefix_blocks) * self.block_size
        self.grow(seq_id, num_tokens)

    def cache_blocks(self, seq_id: int, token_ids: list[int], num_tokens: int) -> None:
        """Register the full blocks among the first ``num_tokens`` of ``token_ids`` (the sequence's tokens whose K/V
        are computed and final: accepted, never a draft that may still be rejected) in the prefix cache."""
        if not self.enable_prefix_caching or seq_id not in self.block_tables:
            return
        hashes = self._seq_hashes.setdefault(seq_id, [])
        if len(hashes) >= num_tokens // self.block_size:  # no block filled up since the last call
            return
        table = self.block_tables[seq_id]
        for i in range(len(hashes), min(num_tokens // self.block_size, len(table))):
            key = block_hash(hashes[-1] if hashes else b"", token_ids[i * self.block_size: (i + 1) * self.block_size])
            hashes.append(key)
            # The same prefix computed twice (two sequences at once) stays cached once; the copy is a plain block.
            if key not in self._cached:
                self._cached[key] = table[i]
                self._hash_of[table[i]] = key

    # ---- updates -------------------------------------------------------------------------------------------
    def try_grow(self, seq_id: int, new_length: int) -> bool:
        """``grow`` if the free blocks allow it; False (nothing changed) if not."""
        table = self.block_tables.get(seq_id)
        if table is not None and len(table) * self.block_size >= new_length:  # room in the last block
            if new_length > self.lengths[seq_id]:
                self.lengths[seq_id] = new_length
            return True
        if not self._has_room(seq_id, self.num_new_blocks_needed(seq_id, new_length)):
            return False
        self.grow(seq_id, new_length)
        return True

    def try_grow_each(self, seq_ids: list[int], new_lengths: list[int]) -> bool:
        """``try_grow`` for each sequence in turn (a decoding step's room, in one pass); False at the first that
        cannot grow (the ones before it keep their growth, as after the same ``try_grow`` calls one by one)."""
        tables, lengths, block_size = self.block_tables, self.lengths, self.block_size
        for seq_id, new_length in zip(seq_ids, new_lengths):
            if len(tables[seq_id]) * block_size >= new_length:  # room in the last block
                if new_length > lengths[seq_id]:
                    lengths[seq_id] = new_length
            elif not self.try_grow(seq_id, new_length):
                return False
        return True

    def grow(self, seq_id: int, new_length: int) -> None:
        """Make room for ``new_length`` tokens (allocating the sequence on first use); sets its length."""
        table = self.block_tables.get(seq_id)
        if table is not None and len(table) * self.block_size >= new_length:  # room in the last block
            if new_length > self.lengths[seq_id]:
                self.lengths[seq_id] = new_length
            return
        needed = self.num_new_blocks_needed(seq_id, new_length)
        if not self._has_room(seq_id, needed):
            # Checked before the sequence is registered: a failed grow leaves no trace (no empty table behind).
            raise OutOfBlocksError(f"sequence {seq_id} needs {needed} more blocks, {self.num_free_blocks} are free")
        if table is None:
            table = self.block_tables[seq_id] = []
            self.table_stamps[seq_id] = next(self._stamps)
        self.lengths.setdefault(seq_id, 0)
        for _ in range(needed):
            table.append(self._take_free(seq_id))
        self.lengths[seq_id] = max(self.lengths[seq_id], new_length)

    def known_blocks(self, seq_id: int) -> list[int]:
        """The sequence's block ids as far as they are known now (its table; a copy)."""
        return list(self.block_tables[seq_id])

    def truncate(self, seq_id: int, new_length: int) -> None:
        """Drop the cached tokens past ``new_length`` (O(1) in tokens); frees blocks that became empty."""
        length = self.lengths[seq_id]
        if new_length == length:
            return
        if new_length < 0 or new_length > length:
            raise ValueError(f"cannot truncate sequence {seq_id} of length {length} to {new_length}")
        table = self.block_tables[seq_id]
        keep = self.num_blocks_for(new_length)
        if new_length % self.block_size and table[keep - 1] in self._hash_of:
            # The last kept block will be written again: it must leave the prefix cache, and nobody else may use it.
            block = table[keep - 1]
            if self._ref_counts[block] > 1:
                raise ValueError(f"cannot truncate sequence {seq_id} to {new_length}: block {block} is a cached "
                                 "prefix shared with other sequences")
            del self._cached[self._hash_of.pop(block)]
        if len(table) > keep:
            self.table_stamps[seq_id] = next(self._stamps)
        while len(table) > keep:
            self._release(table.pop())
        hashes = self._seq_hashes.get(seq_id)
        if hashes is not None:
            del hashes[new_length // self.block_size:]  # a block no longer full is no longer this sequence's prefix
        self.lengths[seq_id] = new_length

    def free(self, seq_id: int) -> None:
        table = self.block_tables.pop(seq_id, None)
        self.lengths.pop(seq_id, None)
        self.table_stamps.pop(seq_id, None)
        self._seq_hashes.pop(seq_id, None)
        # Last block first: the tail of a sequence is the least likely to be shared, so it is evicted first.
        for block in reversed(table or ()):
            self._release(block)

    def _has_room(self, seq_id: int, needed: int) -> bool:
        """Whether ``needed`` more blocks can be taken for ``seq_id``."""
        return needed <= self.num_free_blocks

    def _take_free(self, seq_id: int) -> int:
        """A free block for new K/V of ``seq_id``: an empty one, else the least recently released cached one
        (evicted)."""
        if self._empty_blocks:
            block = self._empty_blocks.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(block)]
        self._ref_counts[block] = 1
        return block

    def _take(self, block: int) -> None:
        """One more sequence uses the cached ``block``."""
        if self._ref_counts[block] == 0:
            del self._evictable[block]
        self._ref_counts[block] += 1

    def _release(self, block: int) -> None:
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._empty_blocks.append(block)

    # ---- slot arithmetic -----------------------------------------------------------------------------------
    def slots(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """Slot ids of tokens ``start .. end-1`` of a sequence: ``[end - start]`` int64."""
        table = torch.tensor(self.block_tables[seq_id], dtype=torch.int64)
        positions = torch.arange(start, end, dtype=torch.int64)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size


class RegionBlockManager(BlockManager):
    """Each sequence owns a region of ``region_blocks`` consecutive blocks from its first allocation until it is
    freed: its block ``j`` is always block ``region * region_blocks + j``.

    So every sequence's K/V lie in one run of slots, and the regions sit at a fixed stride: the CPU attention path
    reads a batch's keys as a strided view of the pool instead of copying them (``GatherLayout``). This suits a batch
    whose lengths are known in advance (``cospec.generate`` sizes the regions for its longest row). A sequence can
    never outgrow its region, and no block is shared, so there is no prefix cache. Regions are handed out lowest
    first: sequences admitted together get consecutive regions, in admission order, which is the batch order.
    """

    def __init__(self, num_regions: int, region_blocks: int, block_size: int) -> None:
        if num_regions <= 0 or region_blocks <= 0:
            raise ValueError(f"num_regions and region_blocks must be positive, got {num_regions} and {region_blocks}")
        super().__init__(num_regions * region_blocks, block_size, enable_prefix_caching=False)
        self.region_blocks = region_blocks
        self._empty_blocks.clear()  # blocks come from their sequence's region, never from a shared list
        self._free_regions = list(range(num_regions))  # a min-heap
        self._region_of: dict[int, int] = {}

    @property
    def max_blocks_per_seq(self) -> int:
        return self.region_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks of the regions no sequence owns (a region's unused blocks serve only its own sequence)."""
        return len(self._free_regions) * self.region_blocks

    def region_of(self, seq_id: int) -> int | None:
        return self._region_of.get(seq_id)

    def known_blocks(self, seq_id: int) -> list[int]:
        """The whole region: the blocks the sequence will take as it grows are known from its first one."""
        table = self.block_tables[seq_id]
        region = self._region_of.get(seq_id)
        if region is None:  # no block yet, so no region
            return list(table)
        return list(range(region * self.region_blocks, (region + 1) * self.region_blocks))

    def can_grow(self, seq_id: int, new_length: int, reserve: int = 0) -> bool:
        return (self._has_room(seq_id, self.num_new_blocks_needed(seq_id, new_length))
                and reserve <= self.num_free_blocks)

    def can_allocate(self, prefix_blocks: list[int], num_tokens: int) -> bool:
        return (not prefix_blocks and bool(self._free_regions)
                and self.num_blocks_for(num_tokens) <= self.region_blocks)

    def free(self, seq_id: int) -> None:
        super().free(seq_id)
        region = self._region_of.pop(seq_id, None)
        if region is not None:
            heapq.heappush(self._free_regions, region)

    def _has_room(self, seq_id: int, needed: int) -> bool:
        if not needed:
            return True
        has_region = seq_id in self._region_of or bool(self._free_regions)
        return has_region and len(self.block_tables.get(seq_id, ())) + needed <= self.region_blocks

    def _take_free(self, seq_id: int) -> int:
        region = self._region_of.get(seq_id)
        if region is None:
            region = self._region_of[seq_id] = heapq.heappop(self._free_regions)
        block = region * self.region_blocks + len(self.block_tables[seq_id])
        self._ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._ref_counts[block] -= 1  # it stays in its sequence's region
