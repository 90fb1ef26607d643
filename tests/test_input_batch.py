"""InputBatch: the persistent block tables of a model runner and the step inputs built from them with tensor ops.

A stateful property test drives it through joins (some with a cached prefix, as prefix caching gives them), steps
of ragged windows, growth, rollbacks, finishes, aborts and preemptions (rejoining with or without a cached prefix
in fresh blocks), and after every step checks its tensors against a rebuild from scratch: sequence by sequence
from the block manager's tables in Python, and a fresh InputBatch.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cospec.decoding.protocols import ForwardItem
from cospec.engine.block_manager import BlockManager, RegionBlockManager
from cospec.engine.input_batch import InputBatch

CPU = torch.device("cpu")


def _rebuild(bm: BlockManager, items: list[ForwardItem]) -> dict:
    """Every step input and gather index, sequence by sequence in Python from the block manager's tables."""
    bs = bm.block_size
    out = {"input_ids": [], "positions": [], "slot_mapping": [], "logit_rows": [], "query_start_loc": [0],
           "seq_lens": [], "tables": [], "kv_gather": [], "q_positions": [], "padded_rows": []}
    for it in items:
        q_len, seq_len, packed = len(it.token_ids), it.start_pos + len(it.token_ids), out["query_start_loc"][-1]
        table = bm.block_tables[it.seq_id]
        slot = [table[p // bs] * bs + p % bs for p in range(seq_len)]
        out["input_ids"] += it.token_ids
        out["positions"] += list(range(it.start_pos, seq_len))
        out["slot_mapping"] += slot[it.start_pos:]
        out["logit_rows"] += list(range(packed + q_len - it.num_logits, packed + q_len))
        out["query_start_loc"].append(packed + q_len)
        out["seq_lens"].append(seq_len)
        out["tables"].append(table[: -(-seq_len // bs)])
        out["kv_gather"].append(slot)
    max_q = max(len(it.token_ids) for it in items)
    for i, it in enumerate(items):
        out["q_positions"].append(list(range(it.start_pos, out["seq_lens"][i])))
        out["padded_rows"] += [i * max_q + j for j in range(len(it.token_ids))]
    return out


def _check_step(bm: BlockManager, batch: InputBatch, items: list[ForwardItem]) -> None:
    inputs, meta = batch.prepare(items)
    expected = _rebuild(bm, items)
    assert inputs.input_ids.tolist() == expected["input_ids"]
    assert inputs.positions.tolist() == expected["positions"]
    assert inputs.logit_rows.tolist() == expected["logit_rows"] and inputs.logit_rows.dtype == torch.int64
    assert meta.slot_mapping.tolist() == expected["slot_mapping"] and meta.slot_mapping.dtype == torch.int64
    assert meta.query_start_loc.tolist() == expected["query_start_loc"]
    assert meta.seq_lens.tolist() == expected["seq_lens"]
    assert meta.max_q_len == max(len(it.token_ids) for it in items) and meta.max_kv_len == max(expected["seq_lens"])
    assert meta.block_tables.dtype == meta.seq_lens.dtype == meta.query_start_loc.dtype == torch.int32
    assert meta.block_tables.shape == (len(items), -(-meta.max_kv_len // bm.block_size))
    for row, table in zip(meta.block_tables.tolist(), expected["tables"]):
        assert row[: len(table)] == table
    # The reference's gather layout, from these tensors.
    layout = meta.layout
    for i, slots in enumerate(expected["kv_gather"]):
        blocks = layout.block_gather_index[i].tolist()
        assert [blocks[j // bm.block_size] * bm.block_size + j % bm.block_size for j in range(len(slots))] == slots
        assert layout.q_positions[i, : len(expected["q_positions"][i])].tolist() == expected["q_positions"][i]
    padded_rows = expected["padded_rows"]
    if layout.regions is not None:  # read in place: sequence i's queries sit in the row of its region
        max_q = meta.max_q_len
        rows = [bm.region_of(it.seq_id) - layout.regions.first for it in items]
        padded_rows = [rows[i] * max_q + j for i, it in enumerate(items) for j in range(len(it.token_ids))]
    if layout.q_unpad_index is None:
        assert padded_rows == list(range(len(expected["input_ids"])))
    else:
        assert layout.q_unpad_index.tolist() == padded_rows
        assert layout.q_pad_index[layout.q_unpad_index].tolist() == list(range(len(expected["input_ids"])))
    # A fresh batch (no history) builds the same tensors; stale columns past a sequence's blocks may differ only
    # where nothing reads them.
    fresh_inputs, fresh = InputBatch(bm, CPU).prepare(items)
    for name in ("input_ids", "positions", "logit_rows"):
        assert torch.equal(getattr(inputs, name), getattr(fresh_inputs, name))
    for name in ("slot_mapping", "seq_lens", "query_start_loc"):
        assert torch.equal(getattr(meta, name), getattr(fresh, name))
    assert torch.equal(layout.block_gather_index, fresh.layout.block_gather_index)


class InputBatchMachine(RuleBasedStateMachine):
    @initialize(block_size=st.integers(1, 6), num_rows=st.integers(1, 3), max_blocks=st.integers(1, 3),
                regions=st.booleans())
    def setup(self, block_size: int, num_rows: int, max_blocks: int, regions: bool) -> None:
        # Small initial capacity: rows and columns must grow as sequences join and lengthen. With regions a row
        # mirrors the whole region from the sequence's join on (its blocks are known before it takes them).
        self.bm = (RegionBlockManager(num_regions=8, region_blocks=12, block_size=block_size) if regions
                   else BlockManager(num_blocks=96, block_size=block_size))
        self.batch = InputBatch(self.bm, CPU, num_rows=num_rows, max_blocks=max_blocks)
        self.computed: dict[int, int] = {}  # live seq_id -> tokens in its cache
        self.next_seq_id = 0

    def _cache(self, seq_id: int, num_tokens: int) -> bool:
        """Give a sequence a cache of ``num_tokens`` tokens (a cached prefix); False if the pool is too full."""
        if num_tokens and not self.bm.can_grow(seq_id, num_tokens):
            return False
        if num_tokens:
            self.bm.grow(seq_id, num_tokens)
        self.computed[seq_id] = num_tokens
        return True

    @rule(cached=st.sampled_from([0, 0, 0, 3, 17]))
    def join(self, cached: int) -> None:
        if self._cache(self.next_seq_id, cached):
            self.next_seq_id += 1

    @precondition(lambda self: self.computed)
    @rule(data=st.data())
    def step(self, data) -> None:
        seq_ids = data.draw(st.lists(st.sampled_from(sorted(self.computed)), min_size=1, max_size=8, unique=True))
        items = []
        for seq_id in seq_ids:  # in the drawn order: packing order is the caller's
            q_len = data.draw(st.integers(1, 16))
            start = self.computed[seq_id]
            if not self.bm.can_grow(seq_id, start + q_len):
                continue
            self.bm.grow(seq_id, start + q_len)
            token_ids = data.draw(st.lists(st.integers(0, 999), min_size=q_len, max_size=q_len))
            items.append(ForwardItem(seq_id, token_ids, start, data.draw(st.integers(0, q_len))))
        if not items:
            return
        _check_step(self.bm, self.batch, items)
        for it in items:
            self.computed[it.seq_id] = it.start_pos + len(it.token_ids)

    @precondition(lambda self: self.computed)
    @rule(data=st.data())
    def decode_step(self, data) -> None:
        """One token and one logit per sequence: the plain-decoding step, which prepare builds from lists."""
        seq_ids = data.draw(st.lists(st.sampled_from(sorted(self.computed)), min_size=1, max_size=8, unique=True))
        items = []
        for seq_id in seq_ids:
            start = self.computed[seq_id]
            if self.bm.can_grow(seq_id, start + 1):
                self.bm.grow(seq_id, start + 1)
                items.append(ForwardItem(seq_id, [data.draw(st.integers(0, 999))], start, 1))
        if not items:
            return
        _check_step(self.bm, self.batch, items)
        for it in items:
            self.computed[it.seq_id] = it.start_pos + 1

    @precondition(lambda self: any(n > 0 for n in self.computed.values()))
    @rule(data=st.data())
    def rollback(self, data) -> None:
        seq_id = data.draw(st.sampled_from(sorted(s for s, n in self.computed.items() if n > 0)))
        new_length = data.draw(st.integers(0, self.computed[seq_id]))
        self.bm.truncate(seq_id, new_length)
        self.computed[seq_id] = new_length

    @precondition(lambda self: self.computed)
    @rule(data=st.data())
    def finish_or_abort(self, data) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.computed)))
        self.bm.free(seq_id)
        del self.computed[seq_id]

    @precondition(lambda self: self.computed)
    @rule(data=st.data(), cached=st.sampled_from([0, 0, 5]))
    def preempt_and_rejoin(self, data, cached: int) -> None:
        """The cache is dropped; the sequence (same id) comes back later in fresh blocks, maybe with a cached prefix."""
        seq_id = data.draw(st.sampled_from(sorted(self.computed)))
        self.bm.free(seq_id)
        del self.computed[seq_id]
        taken = min(2, self.bm.num_free_blocks)  # someone else takes the freed blocks first (what is free of them)
        if taken:
            self.bm.grow(10_000, taken * self.bm.block_size)
            self.bm.free(10_000)
        self._cache(seq_id, cached)

    @invariant()
    def rows_mirror_what_they_synced(self) -> None:
        batch = self.batch
        rows = list(batch.row_of.values())
        assert len(set(rows)) == len(rows) and not set(rows) & set(batch._free_rows)
        assert len(rows) + len(batch._free_rows) == batch.block_tables.shape[0] == len(batch.synced)
        for row in rows:
            synced = batch.synced[row]
            assert batch.block_tables[row, : len(synced)].tolist() == synced


TestInputBatchMachine = InputBatchMachine.TestCase
TestInputBatchMachine.settings = settings(max_examples=120, stateful_step_count=30, deadline=None)


def test_a_sequence_growing_in_its_region_needs_no_write_after_its_join():
    bm = RegionBlockManager(num_regions=2, region_blocks=6, block_size=4)
    batch = InputBatch(bm, CPU)
    writes = []
    original = batch._write
    batch._write = lambda queued: (writes.append(queued), original(queued))
    for seq_id in (0, 1):
        bm.grow(seq_id, 3)
    for position in range(3, 22):  # across five block boundaries
        for seq_id in (0, 1):
            bm.grow(seq_id, position + 1)
        _check_step(bm, batch, [ForwardItem(s, [7], position, 1) for s in (0, 1)])
    assert len(writes) == 1  # the join of both, once
    assert batch.block_tables[batch.row_of[1], :6].tolist() == list(range(6, 12))


def test_rows_are_reclaimed_before_the_batch_grows():
    bm = BlockManager(num_blocks=16, block_size=4)
    batch = InputBatch(bm, CPU, num_rows=2, max_blocks=1)
    for seq_id in range(3):
        bm.grow(seq_id, 5)
    batch.prepare([ForwardItem(s, [1] * 5, 0, 1) for s in range(3)])
    assert batch.block_tables.shape == (4, 2)  # rows doubled, columns grew to the 2 blocks of 5 tokens
    bm.free(0)
    bm.free(1)
    bm.grow(3, 2)
    batch.prepare([ForwardItem(3, [1, 2], 0, 1)])
    assert batch.block_tables.shape[0] == 4 and 3 in batch.row_of
    bm.grow(4, 1)
    bm.grow(5, 1)
    batch.prepare([ForwardItem(4, [1], 0, 1), ForwardItem(5, [1], 0, 1)])  # needs the rows of 0 and 1 back
    assert batch.block_tables.shape[0] == 4 and set(batch.row_of) == {2, 3, 4, 5}


def test_a_window_past_the_blocks_is_named():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.grow(0, 4)
    with pytest.raises(ValueError, match="sequence 0 needs 2 KV blocks of 4 tokens for this step but holds 1"):
        InputBatch(bm, CPU).prepare([ForwardItem(0, [1, 2], 4, 1)])
