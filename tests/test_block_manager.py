"""BlockManager: exact slot arithmetic, and a stateful property test of grow / truncate / free.

The invariants after any sequence of operations: no block leaks (free + every table == the pool), no block is in
two tables (or twice in the free list), each live sequence has exactly the blocks its length needs, and the slots
of the tokens of live sequences are all distinct.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cospec.engine.block_manager import BlockManager, OutOfBlocksError

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


# ---- stateful property test ----------------------------------------------------------------------------------

NUM_SEQS = 4


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 12), block_size=st.integers(1, 5))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.bm = BlockManager(num_blocks, block_size)
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
        free = list(bm._free_blocks)
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
