"""Faster linear layers for few rows on the CPU.

Decoding and verification multiply each weight matrix by a handful of rows, where the default ``F.linear`` is far
from the machine's memory bandwidth. Measured on the 2-core AVX-512 machine we use, the 210 projections of
SmolLM2-135M without the LM head, float32, 2 threads, best of 5 (numbers vary by machine; the plan below is
measured on each):

    rows                                1      2      4      8     16     32     64
    F.linear (oneDNN, plain weight)      39     55     50     54     63     88    136  ms
    W @ x.T (MKL gemm; 1 row as 2)       15     15     26     39     50     72    112  ms
    oneDNN with prepacked weights        21     22     18     22     28     44     80  ms

So cospec can run each ``nn.Linear`` of the model, inside its own forwards only, through one of three paths:
- ``linear``: ``F.linear``, what the model does by itself (and the only path for other dtypes);
- ``mkl``: ``W @ x.T`` with MKL, then its transposed output copied into rows (never on one row: MKL's
  single-column path is as slow as ``F.linear``; never beyond the measured row counts, where the copy outgrows the
  gain);
- ``packed``: oneDNN's matmul on a copy of the weight reordered once into its blocked layout ("prepacked", as
  torch.compile's CPU freezing does), float32 and bfloat16 only. Prepacked copies cost as much memory as the
  weights; they are made on first use, shared by every engine on the same model, and remade when a weight changes.

MKL's time is not even monotone in the number of rows (its kernels work on blocks of columns: 11 rows take longer
than 16), so a ``RowPlan`` says, for each row count, which path to take and how many rows to run (the real ones
plus zero rows). ``measure_row_plan`` times every path on the model's own weight shapes at the row counts of
``MEASURED_ROWS`` and keeps a path only where it beats ``F.linear`` by more than the measurement's spread;
``cospec.engine.cpu_plans`` keeps the plan on disk, ``cospec.engine.cpu_threads`` chooses the thread count. The
original forward is put back after each of cospec's forwards: the user's model object is unchanged outside them.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import statistics
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

PATHS = ("linear", "mkl", "packed")
# Row counts the plan is measured at; a count between two runs as the next measured one (padded with zero rows)
# unless F.linear is chosen. More rows than the last (prefill chunks) run unpadded through the path chosen for it.
MEASURED_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Timed passes per (path, row count): the minimum says how fast a path can be, the median how fast it typically is.
_REPEATS = 5
# A (path, row count) with fewer timed passes is not used: its spread is unknown.
_MIN_SAMPLES = 3
# No repeat beyond the first _MIN_SAMPLES starts after this many seconds; the measurement gives up (a busy machine)
# after twice as long, and what is missing falls back to F.linear.
MEASURE_BUDGET_S = 5.0
# Weights larger than this are left out of the measurement (the LM head): they take long and follow the same pattern.
_MAX_MEASURED_WEIGHT = 1 << 22
# The measurement streams at least this many bytes of weights per pass where the model has them: decoding reads
# every weight from memory, and a weight that stays in the caches would show another cost curve.
_MEASURED_BYTES = 48 << 20
# oneDNN's reordered layout is chosen for this many rows; it serves every row count.
_PACK_ROWS_HINT = 16
_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
PACKABLE_DTYPE_NAMES = tuple(str(dtype).removeprefix("torch.") for dtype in _PACKABLE_DTYPES)


@dataclass(frozen=True, slots=True)
class RowPlan:
    """For ``r`` rows (``r < len(paths)``): run ``padded[r]`` rows (the real ones, then zero rows) through
    ``paths[r]``; more rows run unpadded through ``large_path``. The default plan is ``F.linear`` everywhere."""

    paths: tuple[str, ...] = ()
    padded: tuple[int, ...] = ()
    large_path: str = "linear"

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.padded):
            raise ValueError(f"RowPlan: {len(self.paths)} paths for {len(self.padded)} row counts")
        unknown = set(self.paths) - set(PATHS) | ({self.large_path} - set(PATHS))
        if unknown:
            raise ValueError(f"RowPlan: unknown path(s) {sorted(unknown)} (known: {', '.join(PATHS)})")
        if any(run < rows for rows, run in enumerate(self.padded)):
            raise ValueError("RowPlan: a row count is run on fewer rows than it has")

    @property
    def is_plain(self) -> bool:
        """Whether every row count runs through ``F.linear`` (as ``RowPlan()`` does)."""
        return set(self.paths) <= {"linear"} and self.large_path == "linear"

    def path_for(self, rows: int) -> str:
        return self.paths[rows] if rows < len(self.paths) else self.large_path

    def rows_for(self, rows):
        """The rows run for ``rows`` rows: an int, or elementwise for an int64 tensor."""
        if isinstance(rows, torch.Tensor):
            if not self.padded:
                return rows
            padded = torch.tensor(self.padded)
            return torch.where(rows < len(padded), padded[rows.clamp(max=len(padded) - 1)], rows)
        return self.padded[rows] if rows < len(self.padded) else rows

    def describe(self) -> str:
        """One line of row ranges and their paths, e.g. ``1: mkl on 2 rows; 2-12: packed; 13-64: linear; more:
        packed`` (padding up to the next measured row count goes without saying)."""
        spans: list[list] = []  # [first, last, path, padded count or None]
        for rows in range(1, len(self.paths)):
            path, run = self.paths[rows], self.padded[rows]
            natural = rows if path == "linear" else min([s for s in MEASURED_ROWS if s >= rows] or [rows])
            pad = run if run > natural else None
            if spans and spans[-1][2:] == [path, pad]:
                spans[-1][1] = rows
            else:
                spans.append([rows, rows, path, pad])
        parts = [f"{first}{'' if first == last else f'-{last}'}: {path}" + (f" on {pad} rows" if pad else "")
                 for first, last, path, pad in spans]
        return "; ".join(parts + [f"more: {self.large_path}"])


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
    path = plan.path_for(rows)
    if (path == "linear" or rows == 0 or x.dtype != self.weight.dtype
            or (path == "packed" and self.weight.dtype not in _PACKABLE_DTYPES)):
        return F.linear(x, self.weight, self.bias)
    x2 = x.reshape(rows, x.shape[-1])  # [rows, in_features]
    run_rows = plan.rows_for(rows)
    if run_rows > rows:
        x2 = F.pad(x2, (0, 0, 0, run_rows - rows))
    if path == "packed":
        y = _packed_matmul(x2.contiguous(), _packed_weights.get(self), self.bias)[:rows]
    else:
        y = torch.mm(self.weight, x2.t()).t()[:rows].contiguous()
        if self.bias is not None:
            y += self.bias
    return y.view(*x.shape[:-1], y.shape[-1])  # [..., out_features]


@contextlib.contextmanager
def fast_cpu_linears(linears: list[nn.Linear], plan: RowPlan = RowPlan()):
    """Route the given CPU linear layers through ``fast_linear_forward`` (with ``plan``) inside the block."""
    # Through the instance __dict__: nn.Module's __setattr__/__delattr__ checks cost more than the assignment,
    # and this runs around every forward.
    for module in linears:
        module.__dict__["forward"] = functools.partial(fast_linear_forward, module, plan=plan)
    try:
        yield
    finally:
        for module in linears:
            del module.__dict__["forward"]


def cpu_linears(model: nn.Module) -> list[nn.Linear]:
    """The plain float ``nn.Linear`` layers of ``model`` that live on the CPU (quantized or subclassed ones are skipped)."""
    return [m for m in model.modules()
            if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype in (torch.float32, torch.float64)]


def weight_shapes(linears: list[nn.Linear]) -> list[tuple[int, int, str]]:
    """The distinct (out_features, in_features, dtype name) of the layers' weights, sorted."""
    return sorted({(*m.weight.shape, str(m.weight.dtype).removeprefix("torch.")) for m in linears})


def measured_weights(linears: list[nn.Linear]) -> list[torch.Tensor]:
    """The weights a plan is measured on: the model's own, in model order, until they hold ``_MEASURED_BYTES``
    (the LM head left out: it takes long and follows the same pattern)."""
    weights, total = [], 0
    for m in linears:
        if m.weight.numel() <= _MAX_MEASURED_WEIGHT and total < _MEASURED_BYTES:
            weights.append(m.weight.detach())
            total += m.weight.numel() * m.weight.element_size()
    return weights or [linears[0].weight.detach()]


# ---- the measurement ----


@dataclass(slots=True)
class PlanMeasurement:
    """A measured plan and what it was chosen from: ``seconds[path, rows]`` lists one pass over all weights per
    repeat; ``complete`` is False when the measurement gave up before every (path, row count) had ``_MIN_SAMPLES``."""

    plan: RowPlan
    seconds: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    complete: bool = True
    elapsed: float = 0.0


@torch.inference_mode()
def measure_row_plan(weights: list[torch.Tensor], packed: bool = False, repeats: int = _REPEATS,
                     budget_s: float | None = None) -> PlanMeasurement:
    """Time ``F.linear``, ``W @ x.T`` and (if ``packed``) prepacked oneDNN over all ``weights`` at every row count
    of ``MEASURED_ROWS``, up to ``repeats`` interleaved passes each, and choose a plan from the times
    (``plan_from_seconds``). Time budget: ``budget_s`` seconds (default ``MEASURE_BUDGET_S``)."""
    start = time.perf_counter()
    budget_s = MEASURE_BUDGET_S if budget_s is None else budget_s
    inputs = {(w.shape[1], w.dtype) for w in weights}
    try:
        packs = [_pack(w) for w in weights] if packed else []
    except RuntimeError:  # a oneDNN build that cannot reorder for this CPU: no prepacked path
        packs = []
    passes = {  # path -> one pass over all weights for inputs xs: {(in_features, dtype): [rows, in_features]}
        "linear": lambda xs: [F.linear(xs[w.shape[1], w.dtype], w) for w in weights],
        # As the forward runs it: W @ x.T gives the output transposed, and its copy into rows is part of the cost.
        "mkl": lambda xs: [torch.mm(w, xs[w.shape[1], w.dtype].t()).t().contiguous() for w in weights],
        "packed": lambda xs: [_packed_matmul(xs[w.shape[1], w.dtype], p, None) for w, p in zip(weights, packs)],
    }
    paths = ["linear", "mkl"] + (["packed"] if packs else [])
    seconds: dict[tuple[str, int], list[float]] = {}
    for repeat, rows in itertools.product(range(repeats), MEASURED_ROWS):
        elapsed = time.perf_counter() - start
        if elapsed > 2 * budget_s or (repeat >= _MIN_SAMPLES and elapsed > budget_s):
            break
        xs = {key: torch.randn(rows, key[0], dtype=key[1]) for key in inputs}
        order = paths[repeat % len(paths):] + paths[: repeat % len(paths)]  # no path always goes first
        for path in order:
            if path == "mkl" and rows == 1:
                continue  # MKL's single-column path: never chosen
            begin = time.perf_counter()
            passes[path](xs)
            seconds.setdefault((path, rows), []).append(time.perf_counter() - begin)
    complete = len(seconds) == len(MEASURED_ROWS) * len(paths) - 1 and all(
        len(times) >= _MIN_SAMPLES for times in seconds.values())
    return PlanMeasurement(plan_from_seconds(seconds), seconds, complete, time.perf_counter() - start)


def plan_from_seconds(seconds: dict[tuple[str, int], list[float]], max_pad: int = 8) -> RowPlan:
    """The plan these timings support. Each row count starts from ``F.linear``; a (path, padded count) replaces the
    current choice only if its median time is below the current choice's minimum (a gain larger than the spread
    of the measurement: noise never decides). Padded counts go up to ``2 * rows + max_pad``. ``F.linear``'s time
    at an unmeasured count is taken at the measured count below it (a lower bound: this favours ``F.linear``)."""
    usable = {key: times for key, times in seconds.items() if len(times) >= _MIN_SAMPLES}
    fastest = {key: min(times) for key, times in usable.items()}
    typical = {key: statistics.median(times) for key, times in usable.items()}
    paths, padded = ["linear"], [0]
    for rows in range(1, MEASURED_ROWS[-1] + 1):
        choice = ("linear", max(r for r in MEASURED_ROWS if r <= rows))
        run = rows
        if choice in usable:
            for size in (s for s in MEASURED_ROWS if rows <= s <= 2 * rows + max_pad):
                for path in ("mkl", "packed"):
                    if (path, size) in usable and typical[path, size] < fastest[choice]:
                        choice, run = (path, size), size
        paths.append(choice[0])
        padded.append(run)
    # Beyond the measured counts MKL's transposed output costs a copy that grows with the rows and loses to
    # F.linear (measured: 128-512 rows of SmolLM2's projections take 5-25 % longer); prepacked oneDNN does not.
    return RowPlan(tuple(paths), tuple(padded), "packed" if paths[-1] == "packed" else "linear")
