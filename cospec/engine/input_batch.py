"""The persistent batch of a model runner: block tables kept in a preallocated tensor, and each step's inputs
(token ids, positions, slot mapping, attention metadata, logit rows) built from it with tensor ops.

Terms:
- row: where a sequence's block table lives in the persistent ``block_tables`` tensor. A sequence gets a row
  when it first runs and keeps it while the block manager holds its cache; rows of sequences that left
  (finished, aborted, preempted) are reclaimed when a new sequence needs one.
- synced blocks: the block ids written into a row, a copy of the sequence's blocks as far as the block manager
  knows them (``BlockManager.known_blocks``: its table; with regions, the whole region, so a growing sequence in
  a region never needs another write). A step writes only what differs: the new blocks of a growing sequence, the
  tail after a rollback, the whole row of a sequence that (re)joined. The block manager stays the owner of the
  tables; this is a mirror that turns "block tables as a tensor" into one row gather. A table changes other than
  by appending blocks only with a new stamp (``BlockManager.table_stamps``), so a row whose stamp is unchanged and
  whose copy is long enough needs no comparison at all.

The only Python loop over sequences is that check (list operations, no tensors); everything else is a few tensor
operations per step, whatever the batch size. A plain decoding step (one token and one logit per sequence)
is built from lists instead: a dozen tensor operations cost more than its list work at any batch size here.
"""

from __future__ import annotations

import array
import itertools
from dataclasses import dataclass

import torch

from cospec.decoding.protocols import ForwardItem
from cospec.engine.attention import StepMetadata
from cospec.engine.block_manager import BlockManager


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    logit_rows: torch.Tensor  # [num_logits] rows of the packed batch whose logits are returned


class InputBatch:
    def __init__(self, block_manager: BlockManager, device: torch.device, num_rows: int = 16,
                 max_blocks: int = 16) -> None:
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.device = device
        self.block_tables = torch.zeros(num_rows, max_blocks, dtype=torch.int32)  # [num_rows, max_blocks], CPU
        self.row_of: dict[int, int] = {}  # seq_id -> row
        self.synced: list[list[int]] = [[] for _ in range(num_rows)]  # per row: block ids written into it
        self.synced_stamps: list[int | None] = [None] * num_rows  # per row: the table stamp its copy was made at
        self._free_rows = list(range(num_rows - 1, -1, -1))
        self._count_tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- membership and block tables -----------------------------------------------------------------------
    def sync(self, seq_ids: list[int], seq_lens: list[int]) -> list[int]:
        """Bring the rows of this step's sequences up to date with the block manager; returns their rows."""
        row_of, synced, block_size = self.row_of, self.synced, self.block_size
        stamps, synced_stamps = self.block_manager.table_stamps, self.synced_stamps
        known_blocks = self.block_manager.known_blocks
        rows, writes = [], []
        for seq_id, seq_len in zip(seq_ids, seq_lens):  # the hot loop: list operations only
            row = row_of.get(seq_id)
            if row is None:
                row = self._join(seq_id)
            num_blocks = -(-seq_len // block_size)
            if len(synced[row]) < num_blocks or synced_stamps[row] != stamps.get(seq_id):
                self._resync(seq_id, row, known_blocks(seq_id), num_blocks, writes)
            rows.append(row)
        if writes:
            self._write(writes)
        return rows

    def _resync(self, seq_id: int, row: int, wanted: list[int], num_blocks: int, writes: list) -> None:
        """Queue the writes that make ``row`` hold ``wanted``: from the first block that differs from what it holds."""
        if len(wanted) < num_blocks:
            raise ValueError(f"sequence {seq_id} needs {num_blocks} KV blocks of {self.block_size} tokens for this "
                             f"step but holds {len(wanted)}: grow it in the block manager first")
        synced = self.synced[row]
        first = len(synced) if wanted[: len(synced)] == synced else _common_prefix(wanted, synced)
        if first < len(wanted):
            writes.append((row, first, wanted[first:]))
        self.synced[row] = wanted
        self.synced_stamps[row] = self.block_manager.table_stamps.get(seq_id)

    def _join(self, seq_id: int) -> int:
        if not self._free_rows:
            self._reclaim()
        if not self._free_rows:  # every row belongs to a live sequence: double the rows
            num_rows = self.block_tables.shape[0]
            self.block_tables = torch.cat([self.block_tables, torch.zeros_like(self.block_tables)])
            self.synced += [[] for _ in range(num_rows)]
            self.synced_stamps += [None] * num_rows
            self._free_rows = list(range(2 * num_rows - 1, num_rows - 1, -1))
        row = self._free_rows.pop()
        self.row_of[seq_id] = row
        self.synced[row] = []
        self.synced_stamps[row] = None
        return row

    def _reclaim(self) -> None:
        """Free the rows of sequences whose cache the block manager no longer holds."""
        tables = self.block_manager.block_tables
        for seq_id in [s for s in self.row_of if s not in tables]:
            self._free_rows.append(self.row_of.pop(seq_id))

    def _write(self, writes: list[tuple[int, int, list[int]]]) -> None:
        """Write ``block_ids`` into ``row`` from column ``first`` on, for every (row, first, block_ids)."""
        needed = max(first + len(ids) for _, first, ids in writes)
        if needed > self.block_tables.shape[1]:
            grown = torch.zeros(self.block_tables.shape[0], max(needed, 2 * self.block_tables.shape[1]),
                                dtype=torch.int32)
            grown[:, : self.block_tables.shape[1]] = self.block_tables
            self.block_tables = grown
        rows = _int64_tensor([row for row, _, ids in writes for _ in ids])
        cols = _int64_tensor([first + j for _, first, ids in writes for j in range(len(ids))])
        self.block_tables[rows, cols] = _int32_tensor([b for _, _, ids in writes for b in ids])

    # ---- step inputs ---------------------------------------------------------------------------------------
    def prepare(self, items: list[ForwardItem]) -> tuple[StepInputs, StepMetadata]:
        """The tensors of one ragged forward over ``items`` (sequences packed in order)."""
        if all(len(item.token_ids) == 1 and item.num_logits == 1 for item in items):
            return self.prepare_decode([item.seq_id for item in items], [item.token_ids[0] for item in items],
                                       [item.start_pos for item in items])
        num_seqs = len(items)
        q_lens = [len(item.token_ids) for item in items]
        starts = [item.start_pos for item in items]
        seq_lens = [start + n for start, n in zip(starts, q_lens)]
        num_logits = [item.num_logits for item in items]
        rows = self.sync([item.seq_id for item in items], seq_lens)
        query_start_loc = [0, *itertools.accumulate(q_lens)]
        # Per sequence: position of its first token minus its offset in the packed row; end of its window minus
        # the logits before its own (so that packed token t sits at position t + shift, logit j at row j + shift).
        position_shift = [start - offset for start, offset in zip(starts, query_start_loc)]
        logit_shift = [end - n for end, n in zip(query_start_loc[1:], itertools.accumulate(num_logits))]
        num_tokens, num_rows = query_start_loc[-1], sum(num_logits)
        max_kv_len, block_size = max(seq_lens), self.block_size
        num_blocks = -(-max_kv_len // block_size)

        # One conversion for the per-sequence lists (torch.tensor(list) costs ~0.3 us per element; this does not).
        per_seq = _int64_tensor([*q_lens, *num_logits, *position_shift, *logit_shift, *rows]).view(5, num_seqs)
        kernel_meta = _int32_tensor([*query_start_loc, *seq_lens])  # [2 * num_seqs + 1]
        token_seq = torch.repeat_interleave(per_seq[0], output_size=num_tokens)  # [num_tokens] sequence of each token
        positions = torch.arange(num_tokens) + per_seq[2].index_select(0, token_seq)  # [num_tokens]
        block_tables = self.block_tables[:, :num_blocks].index_select(0, per_seq[4])  # [num_seqs, num_blocks]
        block_ids = block_tables.view(-1).index_select(0, token_seq * num_blocks + positions // block_size)
        slot_mapping = block_ids.long() * block_size + positions % block_size  # [num_tokens]
        logit_seq = torch.repeat_interleave(per_seq[1], output_size=num_rows)  # [num_rows]
        logit_rows = torch.arange(num_rows) + per_seq[3].index_select(0, logit_seq)  # [num_rows]
        input_ids = _int64_tensor([t for item in items for t in item.token_ids])

        to_device = self._to_device
        meta = StepMetadata(
            slot_mapping=to_device(slot_mapping), block_tables=to_device(block_tables),
            seq_lens=to_device(kernel_meta[num_seqs + 1:]), query_start_loc=to_device(kernel_meta[: num_seqs + 1]),
            block_size=block_size, max_q_len=max(q_lens), max_kv_len=max_kv_len, min_kv_len=min(seq_lens),
            region_blocks=self.block_manager.region_blocks)
        return StepInputs(to_device(input_ids), to_device(positions), to_device(logit_rows)), meta

    def prepare_decode(self, seq_ids: list[int], token_ids: list[int],
                       positions: list[int]) -> tuple[StepInputs, StepMetadata]:
        """``prepare`` for a step of one token and one logit per sequence (plain decoding, the common step), from
        lists: token i (``token_ids[i]`` at ``positions[i]``) is sequence ``seq_ids[i]``'s last, and gives logit row
        i. The general path's dozen tensor operations cost ~60 us whatever the batch; this one's list work grows by
        well under 1 us per sequence."""
        num_seqs, block_size = len(seq_ids), self.block_size
        seq_lens = [position + 1 for position in positions]
        rows = self.sync(seq_ids, seq_lens)
        tables = self.block_manager.block_tables
        slots = [tables[seq_id][position // block_size] * block_size + position % block_size
                 for seq_id, position in zip(seq_ids, positions)]
        max_kv_len = max(seq_lens)
        # One conversion for the four int64 lists (each conversion costs ~1.3 us whatever its length): each is a
        # row of the [4, num_seqs] result.
        slot_mapping, input_ids, positions_t, rows_t = _int64_tensor([*slots, *token_ids, *positions, *rows]).view(
            4, num_seqs)
        num_blocks = -(-max_kv_len // block_size)
        if rows == list(range(rows[0], rows[0] + num_seqs)):  # (as when a batch joined together decodes): a view
            block_tables = self.block_tables[rows[0]: rows[0] + num_seqs, :num_blocks]
        else:
            block_tables = self.block_tables[:, :num_blocks].index_select(0, rows_t)
        counts, query_start_loc = self._counts(num_seqs)
        to_device = self._to_device
        meta = StepMetadata(
            slot_mapping=to_device(slot_mapping), block_tables=to_device(block_tables),
            seq_lens=to_device(_int32_tensor(seq_lens)), query_start_loc=to_device(query_start_loc),
            block_size=block_size, max_q_len=1, max_kv_len=max_kv_len, min_kv_len=min(seq_lens),
            region_blocks=self.block_manager.region_blocks)
        inputs = StepInputs(to_device(input_ids), to_device(positions_t), to_device(counts[:num_seqs]))
        return inputs, meta

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (built on the CPU) on the runner's device (a call of ``.to`` costs ~0.8 us even when it is a
        no-op, six per decoding step)."""
        return tensor if self.device.type == "cpu" else tensor.to(self.device)

    def _counts(self, num_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``arange(num_seqs + 1)`` as int64 and as int32, kept per size (read only)."""
        counts = self._count_tensors.get(num_seqs)
        if counts is None:
            counts = self._count_tensors[num_seqs] = (torch.arange(num_seqs + 1),
                                                      torch.arange(num_seqs + 1, dtype=torch.int32))
        return counts


def _int64_tensor(values: list[int]) -> torch.Tensor:
    """A 1-D int64 CPU tensor of Python ints, through ``array.array`` (3-4x cheaper than torch.tensor(list))."""
    if not values:  # frombuffer refuses an empty buffer
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(array.array("q", values), dtype=torch.int64)


def _int32_tensor(values: list[int]) -> torch.Tensor:
    return torch.frombuffer(array.array("i", values), dtype=torch.int32)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
