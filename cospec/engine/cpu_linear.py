"""A faster linear layer for few rows on the CPU.

``F.linear(x, W)`` with a handful of rows goes through oneDNN's small-batch path, which on the 2-core AVX-512
machines we measure reaches about a third of the memory bandwidth that MKL's gemm gets for ``W @ x.T``
(SmolLM2-135M, all 211 projections, 1 row: 52 ms against 19 ms). Decoding is exactly this case, so the model
runner swaps every ``nn.Linear.forward`` of the model for ``fast_linear_forward`` while cospec runs it, and puts the
original back afterwards: the user's model object is unchanged outside cospec's forwards.

MKL's gemm time is not monotone in the number of rows: its kernels work on blocks of columns, and a block that is
not full takes a slow path. On the same machine all SmolLM2 projections take 75 ms for 11 rows, 113 ms for 15 and
60 ms for 16. A ``RowPlan``, measured once per process on the model's own weight shapes, says for each row count
how many rows to run (the real ones plus zero rows) so that the gemm takes its fastest path; verifying a window of
drafts is exactly such an odd row count.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Above this many rows the two paths converge (both become compute-bound gemms).
MAX_FAST_ROWS = 256
# Row counts up to this are padded per the measured plan; above it the relative gain of padding is small.
MAX_PLANNED_ROWS = 48
# Pad only where the measured time drops by more than this fraction (measurement noise must not decide).
_MIN_GAIN = 0.1
# Weights larger than this are left out of the measurement (the LM head): they take long and follow the same pattern.
_MAX_MEASURED_WEIGHT = 1 << 22


@dataclass(frozen=True, slots=True)
class RowPlan:
    """``padded[r]``: the rows to run a gemm with when ``r`` rows are asked for (``r <= len(padded) - 1``)."""

    padded: tuple[int, ...] = ()

    def rows_for(self, rows: int) -> int:
        return self.padded[rows] if rows < len(self.padded) else rows


def fast_linear_forward(self: nn.Linear, x: torch.Tensor, plan: RowPlan = RowPlan()) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows > MAX_FAST_ROWS or rows == 0 or x.dtype != self.weight.dtype:
        return F.linear(x, self.weight, self.bias)
    x2 = x.reshape(rows, x.shape[-1])
    # MKL takes its slow gemv path for a single column: run at least two (zero) columns.
    padded_rows = max(plan.rows_for(rows), 2)
    if padded_rows > rows:
        x2 = F.pad(x2, (0, 0, 0, padded_rows - rows))
    y = torch.mm(self.weight, x2.t()).t()[:rows].contiguous()  # [rows, out_features]
    if self.bias is not None:
        y += self.bias
    return y.view(*x.shape[:-1], y.shape[-1])


@contextlib.contextmanager
def fast_cpu_linears(linears: list[nn.Linear], plan: RowPlan = RowPlan()):
    """Route the given CPU linear layers through ``fast_linear_forward`` (with ``plan``) inside the block."""
    for module in linears:
        module.forward = lambda x, module=module: fast_linear_forward(module, x, plan)
    try:
        yield
    finally:
        for module in linears:
            del module.forward


def cpu_linears(model: nn.Module) -> list[nn.Linear]:
    """The plain float ``nn.Linear`` layers of ``model`` that live on the CPU (quantized or subclassed ones are skipped)."""
    return [m for m in model.modules()
            if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype in (torch.float32, torch.float64)]


_plans: dict[tuple, RowPlan] = {}
# The measurement streams at least this many bytes of weights per row count, more than a CPU's last-level cache:
# decoding reads every weight from memory, and a cache-resident weight would show another cost curve.
_MEASURED_BYTES = 48 << 20


def row_plan(linears: list[nn.Linear]) -> RowPlan:
    """The measured ``RowPlan`` for these layers (measured on the first call, then cached per process for the same
    weight shapes and thread count). It is measured on the layers themselves (the LM head left out: it takes long
    and follows the same pattern), in model order, until they hold ``_MEASURED_BYTES``; about 1 s for SmolLM2."""
    shapes = Counter((tuple(m.weight.shape), m.weight.dtype) for m in linears)
    key = (tuple(sorted(shapes.items(), key=str)), torch.get_num_threads())
    if key not in _plans:
        weights, total = [], 0
        for m in linears:
            if m.weight.numel() <= _MAX_MEASURED_WEIGHT and total < _MEASURED_BYTES:
                weights.append(m.weight.detach())
                total += m.weight.numel() * m.weight.element_size()
        _plans[key] = measure_row_plan(weights or [linears[0].weight.detach()])
    return _plans[key]


@torch.inference_mode()
def measure_row_plan(weights: list[torch.Tensor], max_rows: int = MAX_PLANNED_ROWS, repeats: int = 3) -> RowPlan:
    """Time ``W @ x.T`` over all ``weights`` for every row count up to ``max_rows`` (the minimum of ``repeats``
    passes: other processes only ever add time); each row count then runs as the count in ``[r, 2r + 8]`` that took
    least time, where that is more than ``_MIN_GAIN`` faster than ``r`` itself."""
    inputs = {(w.shape[1], w.dtype) for w in weights}
    seconds = [0.0] * (max_rows + 1)
    for rows in range(1, max_rows + 1):
        xs = {key: torch.randn(rows, key[0], dtype=key[1]) for key in inputs}
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for w in weights:
                torch.mm(w, xs[w.shape[1], w.dtype].t())
            best = min(best, time.perf_counter() - start)
        seconds[rows] = best
    padded = [0]
    for rows in range(1, max_rows + 1):
        candidates = range(rows, min(max_rows, 2 * rows + 8) + 1)
        fastest = min(candidates, key=lambda r: seconds[r])
        padded.append(fastest if seconds[fastest] < (1 - _MIN_GAIN) * seconds[rows] else rows)
    return RowPlan(tuple(padded))
