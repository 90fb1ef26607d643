"""BlockManager: exact slot arithmetic and prefix-cache cases, and two stateful property tests.

Without prefix caching (grow / truncate / free), the invariants after any sequence of operations: no block leaks
(free + every table == the pool), no block is in two tables (or twice in the free list), each live sequence has
exactly the blocks its length needs, and the slots of the tokens of live sequences are all distinct.

With prefix caching (start on a cached prefix / compute / speculate and roll back / register / free), the machine
writes every computed token into a shadow of the KV pool and checks what sharing must guarantee: a sequence only
ever writes blocks that nobody else uses and that are not cached; a cached prefix found for a sequence holds exactly
that sequence's tokens (the longest such prefix, never its last token); reference counts equal the number of tables
holding a block; every block is exactly one of empty, cached-and-unused, or in use; eviction takes the least
recently released cached block.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cospec.engine.block_manager import BlockManager, OutOfBlocksError, RegionBlockManager

# ---- exact cases ---------------------------------------------------------------------------------------------


def test_slots_follow_the_block_table():
    bm = BlockManager(num_blocks=6, block_size=4)
    bm.grow(0, 5)  # blocks 0, 1
    bm.grow(1, 3)  # block 2
    bm.grow(0, 9)  # block 3
    assert bm.block_tables == {0: [0, 1, 3], 1: [2]}
    assert bm.slots(0, 0, 9).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 12]
    assert bm.slots(0, 3, 6).tolist() == [3, 4, 5]
    assert bm.slots(1, 0, 3).tolist() == [8, 9, 10]
    assert bm.slots(0, 4, 4).tolist() == []
    assert bm.slots(0, 0, 1).dtype == torch.int64


def test_slots_after_free_reuse_blocks():
    bm = BlockManager(num_blocks=3, block_size=2)
    bm.grow(0, 4)  # blocks 0, 1
    bm.grow(1, 1)  # block 2
    bm.free(0)
    bm.grow(2, 3)  # reuses the two freed blocks
    assert sorted(bm.block_tables[2]) == [0, 1]
    table = bm.block_tables[2]
    assert bm.slots(2, 0, 3).tolist() == [table[0] * 2, table[0] * 2 + 1, table[1] * 2]
    assert bm.slots(1, 0, 1).tolist() == [4]


def test_block_size_one():
    bm = BlockManager(num_blocks=4, block_size=1)
    bm.grow(7, 3)
    assert bm.slots(7, 0, 3).tolist() == bm.block_tables[7] == [0, 1, 2]


def test_truncate_frees_empty_blocks_and_keeps_the_rest():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.grow(0, 14)  # 4 blocks
    bm.truncate(0, 9)  # 3 blocks: the last one held tokens 12, 13 only
    assert bm.block_tables[0] == [0, 1, 2] and bm.lengths[0] == 9 and bm.num_free_blocks == 5
    bm.truncate(0, 8)  # tokens 0..7 fill two blocks exactly
    assert bm.block_tables[0] == [0, 1] and bm.num_free_blocks == 6
    bm.truncate(0, 8)  # no-op
    assert bm.block_tables[0] == [0, 1]
    bm.truncate(0, 0)
    assert bm.block_tables[0] == [] and bm.lengths[0] == 0 and bm.num_free_blocks == 8
    with pytest.raises(ValueError):
        bm.truncate(0, 1)  # past the length


def test_out_of_blocks():
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.grow(0, 8)
    assert not bm.can_grow(1, 5) and bm.can_grow(1, 4) and bm.can_grow(0, 12) and not bm.can_grow(0, 13)
    with pytest.raises(OutOfBlocksError):
        bm.grow(1, 5)
    assert 1 not in bm.block_tables and 1 not in bm.lengths and bm.num_free_blocks == 1  # the failed grow left no trace
    bm.grow(1, 4)
    with pytest.raises(OutOfBlocksError):
        bm.grow(0, 9)
    assert bm.block_tables[0] == [0, 1] and bm.lengths[0] == 8


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_a_second_sequence_starts_on_the_cached_prefix():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(10))
    bm.allocate(0, [], 10, num_lookup_tokens=10)  # blocks 0, 1, 2
    bm.cache_blocks(0, tokens, 10)  # two full blocks registered; the third holds 2 tokens
    assert bm.num_cached_blocks == 2
    other = tokens[:8] + [99, 98, 97]
    prefix = bm.lookup(other, len(other) - 1)
    assert prefix == bm.block_tables[0][:2]
    bm.allocate(1, prefix, 11, num_lookup_tokens=11)
    assert bm.block_tables[1][:2] == prefix and bm.lengths[1] == 11 and len(bm.block_tables[1]) == 3
    assert bm._ref_counts[prefix[0]] == bm._ref_counts[prefix[1]] == 2
    assert bm.num_prefix_query_tokens == 21 and bm.num_prefix_hit_tokens == 8
    # A prefix differing inside the first block finds nothing; the lookup never covers more than max_tokens.
    assert bm.lookup([1] + tokens[1:], 9) == []
    assert bm.lookup(tokens, 7) == prefix[:1] and bm.lookup(tokens, 8) == prefix


def test_cached_blocks_outlive_their_sequence_until_evicted_least_recently_released_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    for seq_id, tokens in ((0, a), (1, b)):
        bm.allocate(seq_id, [], 4)
        bm.cache_blocks(seq_id, tokens, 4)
    a_blocks, b_blocks = list(bm.block_tables[0]), list(bm.block_tables[1])
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4
    assert bm.lookup(a + [0], 4) == a_blocks  # still reusable with no user
    bm.allocate(2, [], 6)  # 3 blocks: 2 empty ones first, then one eviction: a's tail (released first, tail first)
    assert bm.lookup(a + [0], 4) == a_blocks[:1] and bm.lookup(b + [0], 4) == b_blocks
    bm.free(2)
    bm.allocate(3, bm.lookup(b + [0], 4), 5)  # taking b's cached blocks makes them used, not free
    assert bm.num_free_blocks == 6 - 3
    bm.allocate(4, [], 6)  # evicts a's head and then seq 2's blocks; b's are in use
    assert bm.lookup(a + [0], 4) == [] and bm.lookup(b + [0], 4) == b_blocks


def test_rolled_back_drafts_never_enter_the_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = [3, 1, 4, 1, 5, 9]
    bm.allocate(0, [], 6)
    bm.grow(0, 6 + 5)  # room for 5 drafts: tokens 6..10 would fill the second block
    bm.truncate(0, 7)  # one accepted
    tokens.append(2)
    bm.cache_blocks(0, tokens, 7)
    assert bm.num_cached_blocks == 1  # only the block of accepted tokens 0..3
    assert bm.lookup(tokens + [6, 5], 8) == bm.block_tables[0][:1]


def test_truncating_into_a_cached_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(8))
    bm.allocate(0, [], 8)
    bm.cache_blocks(0, tokens, 8)
    bm.allocate(1, bm.lookup(tokens, 8), 8)
    with pytest.raises(ValueError, match="shared"):  # block 1 would be written again while seq 1 reads it
        bm.truncate(0, 6)
    bm.free(1)
    bm.truncate(0, 6)  # the only user: the block leaves the cache and may be rewritten
    assert bm.lookup(tokens, 8) == bm.block_tables[0][:1] and bm.num_cached_blocks == 1


def test_prefix_caching_off():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    bm.allocate(0, [], 4, num_lookup_tokens=4)
    bm.cache_blocks(0, [1, 2, 3, 4], 4)
    assert bm.lookup([1, 2, 3, 4, 5], 4) == [] and bm.num_cached_blocks == 0
    assert bm.num_prefix_query_tokens == 0


def test_regions_hold_each_sequence_in_a_run_of_its_own():
    bm = RegionBlockManager(num_regions=3, region_blocks=4, block_size=2)
    bm.allocate(7, [], 3)  # the lowest free region: 0
    bm.grow(8, 2)  # region 1
    bm.grow(7, 8)
    assert bm.block_tables == {7: [0, 1, 2, 3], 8: [4]}
    assert bm.slots(7, 0, 8).tolist() == list(range(8))
    assert (bm.region_of(7), bm.region_of(8), bm.num_free_blocks, bm.max_blocks_per_seq) == (0, 1, 4, 4)
    assert not bm.try_grow(7, 9) and not bm.can_grow(7, 9)  # a region is never outgrown
    with pytest.raises(OutOfBlocksError):
        bm.grow(7, 9)
    assert bm.block_tables[7] == [0, 1, 2, 3]
    bm.truncate(7, 3)  # rolled back, then grown again: the same blocks
    bm.grow(7, 6)
    assert bm.block_tables[7] == [0, 1, 2]
    bm.free(7)
    bm.grow(9, 1)  # region 0 again (lowest first)
    assert bm.block_tables[9] == [0] and bm.num_free_blocks == 4
    assert not bm.can_allocate([], 9) and bm.can_allocate([], 8)  # longer than a region
    bm.grow(10, 1)
    assert not bm.can_allocate([], 1) and not bm.try_grow(11, 1)  # every region taken
    assert bm.lookup([1, 2, 3, 4], 4) == []  # no prefix cache
    with pytest.raises(ValueError, match="positive"):
        RegionBlockManager(num_regions=0, region_blocks=4, block_size=2)


# ---- stateful property test ----------------------------------------------------------------------------------

NUM_SEQS = 4


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 12), block_size=st.integers(1, 5))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.model: dict[int, int] = {}  # seq_id -> length, the reference

    @rule(seq_id=st.integers(0, NUM_SEQS - 1), extra=st.integers(0, 20))
    def grow(self, seq_id: int, extra: int) -> None:
        bm = self.bm
        old_length = self.model.get(seq_id, 0)
        new_length = old_length + extra
        old_table = list(bm.block_tables.get(seq_id, []))
        needed = -(-new_length // bm.block_size) - len(old_table)
        free_before = bm.num_free_blocks
        assert bm.can_grow(seq_id, new_length) == (needed <= free_before)
        if needed > free_before:
            with pytest.raises(OutOfBlocksError):
                bm.grow(seq_id, new_length)
            assert bm.num_free_blocks == free_before
            assert bm.block_tables.get(seq_id) == (old_table if seq_id in self.model else None)
            return
        bm.grow(seq_id, new_length)
        self.model[seq_id] = new_length
        table = bm.block_tables[seq_id]
        assert table[: len(old_table)] == old_table  # existing tokens never move
        assert bm.num_free_blocks == free_before - max(0, needed)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def truncate(self, data) -> None:
        bm = self.bm
        seq_id = data.draw(st.sampled_from(sorted(self.model)))
        new_length = data.draw(st.integers(0, self.model[seq_id]))
        old_table = list(bm.block_tables[seq_id])
        free_before = bm.num_free_blocks
        bm.truncate(seq_id, new_length)
        self.model[seq_id] = new_length
        keep = -(-new_length // bm.block_size)
        assert bm.block_tables[seq_id] == old_table[:keep]
        assert bm.num_free_blocks == free_before + len(old_table) - keep

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def truncate_too_far(self, data) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.model)))
        with pytest.raises(ValueError):
            self.bm.truncate(seq_id, self.model[seq_id] + 1)

    @rule(seq_id=st.integers(0, NUM_SEQS - 1))
    def free(self, seq_id: int) -> None:
        bm = self.bm
        num_blocks = len(bm.block_tables.get(seq_id, []))
        free_before = bm.num_free_blocks
        bm.free(seq_id)  # freeing an unknown sequence is a no-op
        self.model.pop(seq_id, None)
        assert seq_id not in bm.block_tables and seq_id not in bm.lengths
        assert bm.num_free_blocks == free_before + num_blocks

    @invariant()
    def no_leak_no_sharing(self) -> None:
        bm = self.bm
        tables = [b for t in bm.block_tables.values() for b in t]
        free = list(bm._empty_blocks) + list(bm._evictable)
        assert len(free) + len(tables) == bm.num_blocks == bm.num_free_blocks + bm.num_used_blocks
        assert sorted(free + tables) == list(range(bm.num_blocks))  # every block exactly once

    @invariant()
    def tables_match_lengths(self) -> None:
        bm = self.bm
        for seq_id, length in self.model.items():
            assert bm.lengths[seq_id] == length
            assert len(bm.block_tables[seq_id]) == -(-length // bm.block_size)
        assert set(bm.block_tables) == set(bm.lengths) == set(self.model)

    @invariant()
    def live_slots_are_distinct(self) -> None:
        bm = self.bm
        slots = [bm.slots(s, 0, n) for s, n in self.model.items() if n > 0]
        if slots:
            flat = torch.cat(slots)
            assert flat.unique().numel() == flat.numel()
            assert int(flat.min()) >= 0 and int(flat.max()) < bm.num_blocks * bm.block_size


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


class RegionBlockManagerMachine(RuleBasedStateMachine):
    """Grow / truncate / free in regions: a sequence's block j is always block region * region_blocks + j, no two
    live sequences share a region, a sequence grows exactly while it fits its region and a free region exists for
    it, and a freed region is handed out again, lowest first."""

    @initialize(num_regions=st.integers(1, 4), region_blocks=st.integers(1, 4), block_size=st.integers(1, 3))
    def setup(self, num_regions: int, region_blocks: int, block_size: int) -> None:
        self.bm = RegionBlockManager(num_regions, region_blocks, block_size)
        self.model: dict[int, int] = {}  # seq_id -> length
        self.regions: dict[int, int] = {}  # seq_id -> region, for sequences holding blocks

    @rule(seq_id=st.integers(0, NUM_SEQS - 1), extra=st.integers(0, 10))
    def grow(self, seq_id: int, extra: int) -> None:
        bm = self.bm
        new_length = self.model.get(seq_id, 0) + extra
        has_region = seq_id in self.regions
        free_regions = sorted(set(range(bm.num_blocks // bm.region_blocks)) - set(self.regions.values()))
        fits = -(-new_length // bm.block_size) <= bm.region_blocks
        ok = new_length == 0 or len(bm.block_tables.get(seq_id, ())) * bm.block_size >= new_length or (
            fits and (has_region or bool(free_regions)))
        assert bm.try_grow(seq_id, new_length) == ok
        if not ok:
            return
        self.model[seq_id] = new_length
        if not has_region and bm.block_tables[seq_id]:
            self.regions[seq_id] = free_regions[0]
        assert bm.region_of(seq_id) == self.regions.get(seq_id)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def truncate(self, data) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.model)))
        new_length = data.draw(st.integers(0, self.model[seq_id]))
        self.bm.truncate(seq_id, new_length)
        self.model[seq_id] = new_length

    @rule(seq_id=st.integers(0, NUM_SEQS - 1))
    def free(self, seq_id: int) -> None:
        self.bm.free(seq_id)
        self.model.pop(seq_id, None)
        self.regions.pop(seq_id, None)

    @invariant()
    def blocks_lie_in_their_regions(self) -> None:
        bm = self.bm
        for seq_id, length in self.model.items():
            table = bm.block_tables[seq_id]
            assert len(table) == -(-length // bm.block_size) and bm.lengths[seq_id] == length
            if table:
                base = self.regions[seq_id] * bm.region_blocks
                assert table == list(range(base, base + len(table)))
        assert len(set(self.regions.values())) == len(self.regions)
        assert bm.num_free_blocks == bm.num_blocks - len(self.regions) * bm.region_blocks


TestRegionBlockManagerMachine = RegionBlockManagerMachine.TestCase
TestRegionBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ---- stateful property test with prefix caching ----------------------------------------------------------------

# Two token values and short sequences: prefixes are shared often.
TOKENS = st.lists(st.integers(0, 1), min_size=1, max_size=12)


class PrefixCacheMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 10), block_size=st.integers(1, 3))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.bm = BlockManager(num_blocks, block_size)
        self.tokens: dict[int, list[int]] = {}  # seq_id -> its tokens (accepted)
        self.computed: dict[int, int] = {}  # seq_id -> tokens whose K/V are written
        self.pool: dict[int, int] = {}  # shadow KV pool: slot -> token whose K/V it holds
        self.prefix_of: dict[int, tuple] = {}  # cached block -> the tokens up to its end

    def _write(self, seq_id: int, start: int, tokens: list[int]) -> None:
        bm = self.bm
        table = bm.block_tables[seq_id]
        for position, token in enumerate(tokens, start):
            block = table[position // bm.block_size]
            assert bm._ref_counts[block] == 1 and block not in bm._hash_of, "wrote a shared or cached block"
            self.pool[block * bm.block_size + position % bm.block_size] = token

    def _expected_prefix_blocks(self, tokens: list[int], max_tokens: int) -> int:
        """Whole blocks of ``tokens`` (at most max_tokens) whose prefix some registered block holds, in a chain."""
        bm = self.bm
        held = {self.prefix_of[b] for b in bm._hash_of}
        count = 0
        while (count + 1) * bm.block_size <= max_tokens and tuple(tokens[: (count + 1) * bm.block_size]) in held:
            count += 1
        return count

    @precondition(lambda self: len(self.tokens) < NUM_SEQS)
    @rule(tokens=TOKENS, data=st.data())
    def start(self, tokens: list[int], data) -> None:
        bm = self.bm
        seq_id = min(set(range(NUM_SEQS)) - set(self.tokens))
        prefix = bm.lookup(tokens, len(tokens) - 1)
        assert len(prefix) == self._expected_prefix_blocks(tokens, len(tokens) - 1)
        num_cached = len(prefix) * bm.block_size
        for i, block in enumerate(prefix):  # the cached K/V are this sequence's tokens
            assert self.prefix_of[block] == tuple(tokens[: (i + 1) * bm.block_size])
            slots = range(block * bm.block_size, (block + 1) * bm.block_size)
            assert [self.pool[s] for s in slots] == tokens[i * bm.block_size: (i + 1) * bm.block_size]
        num_new = data.draw(st.integers(1, len(tokens) - num_cached))
        free_before = bm.num_free_blocks
        fits = bm.can_allocate(prefix, num_cached + num_new)
        unused = sum(bm._ref_counts[b] == 0 for b in prefix)
        assert fits == (bm.num_blocks_for(num_cached + num_new) - len(prefix) + unused <= free_before)
        if not fits:
            with pytest.raises(OutOfBlocksError):
                bm.allocate(seq_id, prefix, num_cached + num_new)
            assert bm.num_free_blocks == free_before and seq_id not in bm.block_tables
            return
        evicted = self._expected_evictions(bm.num_blocks_for(num_cached + num_new) - len(prefix), exclude=prefix)
        bm.allocate(seq_id, prefix, num_cached + num_new)
        self._check_evicted(evicted)
        self.tokens[seq_id], self.computed[seq_id] = list(tokens), num_cached + num_new
        self._write(seq_id, num_cached, tokens[num_cached: num_cached + num_new])

    def _expected_evictions(self, num_new_blocks: int, exclude=()) -> list[int]:
        """The cached unused blocks that taking ``num_new_blocks`` blocks evicts: empty blocks go first, then the
        least recently released cached ones."""
        candidates = [b for b in self.bm._evictable if b not in exclude]
        return candidates[: max(0, num_new_blocks - len(self.bm._empty_blocks))]

    def _check_evicted(self, evicted: list[int]) -> None:
        for block in evicted:
            assert block not in self.bm._hash_of
            del self.prefix_of[block]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), more=TOKENS)
    def compute(self, data, more: list[int]) -> None:
        """Prefill a chunk or decode: new tokens get K/V."""
        bm = self.bm
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        tokens, computed = self.tokens[seq_id], self.computed[seq_id]
        if computed == len(tokens):
            tokens += more
        n = data.draw(st.integers(1, len(tokens) - computed))
        if not bm.can_grow(seq_id, computed + n):
            return
        evicted = self._expected_evictions(bm.num_new_blocks_needed(seq_id, computed + n))
        bm.grow(seq_id, computed + n)
        self._check_evicted(evicted)
        self._write(seq_id, computed, tokens[computed: computed + n])
        self.computed[seq_id] = computed + n

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), drafts=TOKENS)
    def speculate(self, data, drafts: list[int]) -> None:
        """Write a verify window of drafts after the computed tokens, keep an accepted prefix, roll back the rest."""
        bm = self.bm
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        computed = self.computed[seq_id]
        if computed != len(self.tokens[seq_id]) or not bm.can_grow(seq_id, computed + len(drafts)):
            return
        evicted = self._expected_evictions(bm.num_new_blocks_needed(seq_id, computed + len(drafts)))
        bm.grow(seq_id, computed + len(drafts))
        self._check_evicted(evicted)
        self._write(seq_id, computed, drafts)
        num_accepted = data.draw(st.integers(0, len(drafts)))
        bm.truncate(seq_id, computed + num_accepted)
        self.tokens[seq_id] += drafts[:num_accepted]
        self.computed[seq_id] = computed + num_accepted

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def cache(self, data) -> None:
        bm = self.bm
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        before = set(bm._hash_of)
        bm.cache_blocks(seq_id, self.tokens[seq_id], self.computed[seq_id])
        table = bm.block_tables[seq_id]
        for i, block in enumerate(table):
            if block in bm._hash_of and block not in before:
                assert (i + 1) * bm.block_size <= self.computed[seq_id]  # only full blocks of computed tokens
                self.prefix_of[block] = tuple(self.tokens[seq_id][: (i + 1) * bm.block_size])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(seq_id)
        del self.tokens[seq_id], self.computed[seq_id]
        assert seq_id not in self.bm.block_tables and seq_id not in self.bm.lengths

    @invariant()
    def reference_counts_and_free_lists(self) -> None:
        bm = self.bm
        uses = [0] * bm.num_blocks
        for table in bm.block_tables.values():
            assert len(set(table)) == len(table)
            for block in table:
                uses[block] += 1
        assert uses == bm._ref_counts
        empty, evictable = list(bm._empty_blocks), list(bm._evictable)
        used = [b for b in range(bm.num_blocks) if uses[b]]
        assert sorted(empty + evictable + used) == list(range(bm.num_blocks))  # each block exactly one kind
        assert all(b in bm._hash_of for b in evictable) and not any(b in bm._hash_of for b in empty)
        assert bm.num_free_blocks == len(empty) + len(evictable) == bm.num_blocks - bm.num_used_blocks
        assert {b: h for h, b in bm._cached.items()} == bm._hash_of
        assert set(self.prefix_of) == set(bm._hash_of)

    @invariant()
    def tables_cover_the_computed_tokens(self) -> None:
        bm = self.bm
        assert set(bm.block_tables) == set(self.tokens)
        for seq_id, computed in self.computed.items():
            assert bm.lengths[seq_id] == computed
            assert len(bm.block_tables[seq_id]) == bm.num_blocks_for(computed)


TestPrefixCacheMachine = PrefixCacheMachine.TestCase
TestPrefixCacheMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
