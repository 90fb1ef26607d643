"""Faster linear layers for few rows on the CPU.

Decoding and verification multiply each weight matrix by a handful of rows, where the default ``F.linear`` is far
from the machine's memory bandwidth. Measured on the 2-core AVX-512 machine we use, the 210 projections of
SmolLM2-135M without the LM head, float32, best of 5 (numbers vary by machine; the plan below is measured on each):

    rows                                1      2      4      8     16     32     64
    F.linear (oneDNN, plain weight)      39     55     50     54     63     88    136  ms
    W @ x.T (MKL gemm; 1 row as 2)       15     15     26     39     50     72    112  ms
    oneDNN with prepacked weights        21     22     18     22     28     44     80  ms

So cospec runs each ``nn.Linear`` of the model, inside its own forwards only, through the fastest of two paths:
- ``W @ x.T`` with MKL (one row is run as two: MKL's single-column path is as slow as ``F.linear``), and
- oneDNN's matmul on a copy of the weight reordered once into its blocked layout ("prepacked", as torch.compile's
  CPU freezing does), float32 and bfloat16 only. Prepacked copies cost as much memory as the weights; they are made
  on first use, shared by every engine on the same model, and remade when a weight changes (its version counter).

MKL's time is not even monotone in the number of rows (its kernels work on blocks of columns: 11 rows take longer
than 16), so a ``RowPlan`` measured once per process on the model's own weight shapes says, for each row count, which
path to take and how many rows to run (the real ones plus zero rows). The original forward is put back after each of
cospec's forwards: the user's model object is unchanged outside them.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Row counts up to this are planned one by one; above it (prefill chunks) one measurement at
# ``_LARGE_ROWS`` rows decides between prepacked oneDNN and F.linear (MKL's W @ x.T is the slowest there).
MAX_PLANNED_ROWS = 48
_LARGE_ROWS = 64
# A path or padding must be measured this much faster than the plain W @ x.T to be chosen (noise must not decide).
_MIN_GAIN = 0.1
# Weights larger than this are left out of the measurement (the LM head): they take long and follow the same pattern.
_MAX_MEASURED_WEIGHT = 1 << 22
# The measurement streams at least this many bytes of weights per row count, more than a CPU's last-level cache:
# decoding reads every weight from memory, and a cache-resident weight would show another cost curve.
_MEASURED_BYTES = 48 << 20
# oneDNN's reordered layout is chosen for this many rows; it serves every row count.
_PACK_ROWS_HINT = 16
_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True, slots=True)
class RowPlan:
    """For ``r`` rows (``r < len(padded)``): run ``padded[r]`` rows, through prepacked oneDNN if ``packed[r]``; more
    rows run through prepacked oneDNN if ``packed_large``, else through ``F.linear``."""

    padded: tuple[int, ...] = ()
    packed: tuple[bool, ...] = ()
    packed_large: bool = False

    def rows_for(self, rows: int) -> int:
        return self.padded[rows] if rows < len(self.padded) else rows

    def uses_packed(self, rows: int) -> bool:
        return self.packed[rows] if rows < len(self.packed) else self.packed_large


# ---- prepacked weights ----


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS_HINT)


def _packed_matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedWeights:
    """Prepacked copies of linear weights, per module, made on first use and remade when the weight changes."""

    def __init__(self) -> None:
        self._packs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (weight, version, packed)

    def get(self, module: nn.Linear) -> torch.Tensor:
        weight = module.weight
        entry = self._packs.get(module)
        if entry is None or entry[0] is not weight or entry[1] != _version(weight):
            with torch.inference_mode():
                entry = (weight, _version(weight), _pack(weight))
            self._packs[module] = entry
        return entry[2]


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter (None for inference tensors, which cannot be modified in place
    outside inference mode and have no counter)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


_packed_weights = PackedWeights()


# ---- the forward ----


def fast_linear_forward(self: nn.Linear, x: torch.Tensor, plan: RowPlan = RowPlan()) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows == 0 or x.dtype != self.weight.dtype:
        return F.linear(x, self.weight, self.bias)
    x2 = x.reshape(rows, x.shape[-1])
    run_rows = plan.rows_for(rows)
    if plan.uses_packed(rows) and self.weight.dtype in _PACKABLE_DTYPES:
        if run_rows > rows:
            x2 = F.pad(x2, (0, 0, 0, run_rows - rows))
        y = _packed_matmul(x2.contiguous(), _packed_weights.get(self), self.bias)[:rows]
        return y.view(*x.shape[:-1], y.shape[-1])
    if rows >= len(plan.padded) and rows > MAX_PLANNED_ROWS:
        return F.linear(x, self.weight, self.bias)
    # MKL takes its slow gemv path for a single column: run at least two (zero) columns.
    run_rows = max(run_rows, 2)
    if run_rows > rows:
        x2 = F.pad(x2, (0, 0, 0, run_rows - rows))
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


# ---- the plan ----


_plans: dict[tuple, RowPlan] = {}


def row_plan(linears: list[nn.Linear], allow_packed: bool = True) -> RowPlan:
    """The measured ``RowPlan`` for these layers (measured on the first call, then cached per process for the same
    weight shapes, thread count and ``allow_packed``). It is measured on the layers themselves (the LM head left out:
    it takes long and follows the same pattern), in model order, until they hold ``_MEASURED_BYTES``; about 2 s for
    SmolLM2."""
    shapes = tuple(sorted({(tuple(m.weight.shape), m.weight.dtype) for m in linears}, key=str))
    key = (shapes, torch.get_num_threads(), allow_packed)
    if key not in _plans:
        weights, total = [], 0
        for m in linears:
            if m.weight.numel() <= _MAX_MEASURED_WEIGHT and total < _MEASURED_BYTES:
                weights.append(m.weight.detach())
                total += m.weight.numel() * m.weight.element_size()
        weights = weights or [linears[0].weight.detach()]
        packable = allow_packed and packing_available() and all(w.dtype in _PACKABLE_DTYPES for w in weights)
        _plans[key] = measure_row_plan(weights, packed=packable)
    return _plans[key]


@torch.inference_mode()
def measure_row_plan(weights: list[torch.Tensor], max_rows: int = MAX_PLANNED_ROWS, repeats: int = 3,
                     packed: bool = False) -> RowPlan:
    """Time ``W @ x.T`` (and, if ``packed``, prepacked oneDNN) over all ``weights`` for every row count up to
    ``max_rows`` (the minimum of ``repeats`` passes: other processes only ever add time). Each row count then takes
    the (path, count in ``[r, 2r + 8]``) that was fastest, each choice more than ``_MIN_GAIN`` faster than the one
    it replaces (starting from plain ``W @ x.T`` on ``r`` rows)."""
    inputs = {(w.shape[1], w.dtype) for w in weights}
    try:
        packs = [_pack(w) for w in weights] if packed else []
    except RuntimeError:  # a oneDNN build that cannot reorder for this CPU: MKL only
        packs = []
    passes = {  # path -> one pass over all weights for inputs xs: {(in_features, dtype): [rows, in_features]}
        "mkl": lambda xs: [torch.mm(w, xs[w.shape[1], w.dtype].t()) for w in weights],
        "packed": lambda xs: [_packed_matmul(xs[w.shape[1], w.dtype], p, None) for w, p in zip(weights, packs)],
        "linear": lambda xs: [F.linear(xs[w.shape[1], w.dtype], w) for w in weights],
    }

    def fastest_pass(paths: list[str], rows: int, repeats: int) -> dict[str, float]:
        """The minimum time of each path's pass over ``repeats`` interleaved passes: other processes only ever add
        time."""
        xs = {key: torch.randn(rows, key[0], dtype=key[1]) for key in inputs}
        best = dict.fromkeys(paths, float("inf"))
        for _ in range(repeats):
            for path in paths:
                start = time.perf_counter()
                passes[path](xs)
                best[path] = min(best[path], time.perf_counter() - start)
        return best

    planned = ["mkl", "packed"] if packs else ["mkl"]
    measured = [fastest_pass(planned, rows, repeats) if rows else {} for rows in range(max_rows + 1)]

    def seconds(path: str, rows: int) -> float:
        return measured[max(rows, 2) if path == "mkl" else rows][path]  # MKL runs one row as two

    padded, use_packed = [0], [False]
    for rows in range(1, max_rows + 1):
        # Unpadded paths first, then padded ones; each choice must beat the previous one by _MIN_GAIN.
        candidates = [(path, rows) for path in planned if path != "mkl"] + [
            (path, r) for path in planned for r in range(rows + 1, min(max_rows, 2 * rows + 8) + 1)]
        best_path, best_rows = "mkl", rows
        for path, r in candidates:
            if seconds(path, r) < (1 - _MIN_GAIN) * seconds(best_path, best_rows):
                best_path, best_rows = path, r
        padded.append(best_rows)
        use_packed.append(best_path == "packed")
    packed_large = False
    if packs:
        large = fastest_pass(["linear", "packed"], _LARGE_ROWS, repeats=2)
        packed_large = large["packed"] < (1 - _MIN_GAIN) * large["linear"]
    return RowPlan(tuple(padded), tuple(use_packed), packed_large)
