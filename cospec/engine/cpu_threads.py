"""How cospec's CPU forwards run while other processes use the cores: the setting (threads and row plan) that is
fastest now.

torch runs each matrix product on all its OpenMP threads, which meet at a barrier when the product is done; GNU
OpenMP's threads spin there before they sleep. When other processes take the cores, every product waits until the
scheduler has run each of its threads, and the spinning spends the process's share of the cores. Measured on the
shared 2-core machine we use (load average 8-12 from other processes; one pass over SmolLM2's 210 projections at
1 row, median): ``F.linear`` 121 ms on one thread, 4,073 ms on two; with ``OMP_WAIT_POLICY=PASSIVE`` (no spinning,
fixed when the process starts) two threads did as well as one. HF ``generate`` at batch 1 ran 0.2-0.4 tokens/s on
two threads and 2.1-4.2 on one; cospec 0.4 on two threads and 4.2-5.0 on one thread with ``F.linear``. On one
thread a process only shares a core: it slows down with the load instead of collapsing.

So each model shape has, per process, a ``ThreadChoice`` among up to three settings: the row plan on torch's thread
count (the fast path of a quiet machine), ``F.linear`` on torch's thread count (the model's own path) and
``F.linear`` on one thread (the fallback). A check times one pass of each setting over the model's first layers on
the forward's row count, ``_CHECK_ROUNDS`` times interleaved, and another setting replaces the current one only if
its slowest pass beats the current one's fastest (as in the row plan: noise never decides). Checks run at the first
forward of at most ``MEASURED_ROWS[-1]`` rows, then every ``interval`` forwards (doubling from ``_MIN_INTERVAL`` to
``_MAX_INTERVAL`` while the setting holds, back to the minimum after a change), and at once when a forward takes more
than ``_SLOWDOWN`` times as long as the last ones of its size (the load changed).

The row plan comes from disk (``cospec.engine.cpu_plans``). When none is stored, it is measured at the first check
that finds torch's threads unhindered (at once on one thread): a measurement on a machine whose cores are taken would
take long and say little, and meanwhile the fallback is what runs best anyway. Until then checks time
``MEASURED_ROWS[-1]`` rows, where more threads pay off on any machine whose cores are free (on one row ``F.linear``
can be as fast on one thread as on two).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from cospec.engine.cpu_linear import MEASURED_ROWS, RowPlan, fast_cpu_linears, fast_linear_forward
from cospec.engine.cpu_plans import load_plan, measure_plan, plan_digest, plan_key

_CHECK_ROUNDS = 3
# A check times the model's first layers up to this many bytes of weights (about one SmolLM2 decoder layer).
_CHECK_BYTES = 16 << 20
_MIN_INTERVAL = 16
_MAX_INTERVAL = 256
# A forward this many times slower than the median of the last ones of its size calls a check at once.
_SLOWDOWN = 2.0
_RECENT = 4


@dataclass(frozen=True, slots=True)
class Setting:
    threads: int
    plan: RowPlan

    def describe(self) -> str:
        return f"{'F.linear' if self.plan.is_plain else 'row plan'} on {self.threads} thread(s)"


def better_setting(current: int, seconds: list[list[float]]) -> int:
    """The setting to use after a check that timed ``seconds[i]`` for setting ``i``: ``current``, unless another
    setting's slowest pass beat its fastest one; then the fastest of those."""
    fastest = [min(times) for times in seconds]
    winners = [i for i, times in enumerate(seconds) if i != current and max(times) < fastest[current]]
    return min(winners, key=fastest.__getitem__) if winners else current


class ThreadChoice:
    """The setting cospec's forwards of one model shape run at, checked against the others as described above.
    ``key``: the row plan's key (``cpu_plans.plan_key``); ``plan``: the stored plan, None while it is unmeasured."""

    def __init__(self, key: dict, plan: RowPlan | None) -> None:
        self.key = key
        self.max_threads = key["threads"]
        self.plan = plan
        self.settings = self._settings()
        self.current = 0
        self.interval = _MIN_INTERVAL
        self.num_checks = 0
        self.last_check: list[float] = []  # the fastest pass of each setting at the last check (seconds)
        self._until_check = 0  # the first small forward is checked

    def _settings(self) -> list[Setting]:
        has_plan = self.plan is not None and not self.plan.is_plain
        candidates = ([Setting(self.max_threads, self.plan)] if has_plan else []) + [
            Setting(self.max_threads, RowPlan()), Setting(1, RowPlan())]
        return list(dict.fromkeys(candidates))  # distinct, in order of preference

    @property
    def setting(self) -> Setting:
        return self.settings[self.current]

    def setting_for(self, rows: int, linears: list[nn.Linear], layers: list[nn.Linear]) -> Setting:
        """The setting for a forward of ``rows`` rows through ``linears``; a due check times ``layers``."""
        if self.plan is None and self.max_threads == 1:
            self._measure_plan(linears)
        elif self._until_check <= 0 and len(self.settings) > 1 and rows <= MEASURED_ROWS[-1]:
            if self.plan is None:  # on many rows more threads pay off wherever the cores are free
                self.check(MEASURED_ROWS[-1], layers)
                if self.setting.threads == self.max_threads:
                    self._measure_plan(linears)
            else:
                self.check(rows, layers)
        return self.setting

    def _measure_plan(self, linears: list[nn.Linear]) -> None:
        with torch_threads(self.max_threads):
            self.plan = measure_plan(linears, self.key)
        self.settings = self._settings()
        self.current = 0
        self.last_check = []

    def describe(self) -> str:
        """The current setting, and the last check's fastest passes."""
        timed = ", ".join(f"{setting.describe()} {seconds * 1e3:.2f} ms"
                          for setting, seconds in zip(self.settings, self.last_check))
        return f"{self.setting.describe()} ({self.num_checks} checks; last: {timed or 'none'})"

    def count_forward(self, slow: bool = False) -> None:
        """Count a forward towards the next check; a ``slow`` one (the load changed) calls a check at once."""
        self._until_check = 0 if slow else self._until_check - 1

    @torch.inference_mode()
    def check(self, rows: int, layers: list[nn.Linear]) -> None:
        """Time every setting on ``layers`` with ``rows`` rows, interleaved, and keep the better one."""
        inputs = {(m.in_features, m.weight.dtype) for m in layers}
        xs = {key: torch.randn(rows, key[0], dtype=key[1]) for key in inputs}
        seconds: list[list[float]] = [[] for _ in self.settings]
        for check_round in range(_CHECK_ROUNDS):
            shift = check_round % len(self.settings)  # no setting always goes first
            for i in [*range(shift, len(self.settings)), *range(shift)]:
                with torch_threads(self.settings[i].threads):
                    start = time.perf_counter()
                    for m in layers:
                        fast_linear_forward(m, xs[m.in_features, m.weight.dtype], self.settings[i].plan)
                    seconds[i].append(time.perf_counter() - start)
        best = better_setting(self.current, seconds)
        self.last_check = [min(times) for times in seconds]
        if best == self.current:
            self.interval = min(2 * self.interval, _MAX_INTERVAL)
        else:
            self.current, self.interval = best, _MIN_INTERVAL
        self._until_check = self.interval
        self.num_checks += 1


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block on ``threads`` torch threads (set in this thread, as OpenMP keeps it), then restore the count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_layers(linears: list[nn.Linear]) -> list[nn.Linear]:
    """The layers a check times: the model's first ones, up to ``_CHECK_BYTES`` of weights (the LM head aside)."""
    layers, total = [], 0
    for m in linears:
        if total >= _CHECK_BYTES:
            break
        if m.weight.numel() * m.weight.element_size() <= _CHECK_BYTES:
            layers.append(m)
            total += m.weight.numel() * m.weight.element_size()
    return layers or linears[:1]


_UNCHANGED = contextlib.nullcontext()  # (reusable: it holds nothing)
_choices: dict[str, ThreadChoice] = {}  # this process's choices, by the plan key


def thread_choices() -> list[ThreadChoice]:
    """This process's thread choices (one per model shape and thread count), for reports."""
    return list(_choices.values())


def thread_choice(linears: list[nn.Linear], allow_packed: bool = True) -> ThreadChoice:
    """This process's ``ThreadChoice`` for these layers' shapes at torch's current thread count, with the stored
    row plan when there is one."""
    key = plan_key(linears, allow_packed)
    digest = plan_digest(key)
    if digest not in _choices:
        _choices[digest] = ThreadChoice(key, load_plan(key))
    return _choices[digest]


class CpuLinears:
    """One model's CPU linear layers, run in each of cospec's forwards at the setting its ``ThreadChoice`` picks.
    The times of its own forwards (a self-speculation draft shares the model's choice, not its times) tell the
    choice when a forward turns much slower than the last ones of its size."""

    def __init__(self, linears: list[nn.Linear], allow_packed: bool = True) -> None:
        self.linears = linears
        self.choice = thread_choice(linears, allow_packed)
        self._check_layers = check_layers(linears)
        self._recent: dict[int, deque[float]] = {}  # rows -> seconds of the last forwards at ``_recent_setting``
        self._recent_setting: Setting | None = None

    def padded_rows(self, rows):
        """The rows a forward of ``rows`` rows runs now (padded by the row plan in use); an int or an int64
        tensor."""
        return self.choice.setting.plan.rows_for(rows)

    def forward(self, rows: int, head_rows: int | None = None):
        """A context manager: inside it, the fast linears and thread count for a forward of ``rows`` rows
        (``head_rows`` of them through the LM head; all by default)."""
        setting = self.choice.setting_for(rows, self.linears, self._check_layers)
        plan = setting.plan
        # Where the plan says F.linear for every layer of this forward, the layers run as they are (routing them
        # through fast_linear_forward would only add a Python call per layer).
        plain = plan.path_for(rows) == "linear" and plan.path_for(rows if head_rows is None else head_rows) == "linear"
        if plain and len(self.choice.settings) == 1 and setting.threads == torch.get_num_threads():
            # Nothing to switch, and no other setting a slow forward could call a check for (one thread and no
            # row plan that pays off): untimed. The context managers and the timing cost ~25 us per forward.
            return _UNCHANGED
        return self._forward(setting, plain, rows)

    @contextlib.contextmanager
    def _forward(self, setting: Setting, plain: bool, rows: int):
        linears = contextlib.nullcontext() if plain else fast_cpu_linears(self.linears, setting.plan)
        with torch_threads(setting.threads), linears:
            start = time.perf_counter()
            yield
            self.observe(setting, rows, time.perf_counter() - start)

    def observe(self, setting: Setting, rows: int, seconds: float) -> None:
        """Count a forward of ``rows`` rows that took ``seconds`` at ``setting`` towards the choice's next check."""
        if setting != self._recent_setting:
            self._recent.clear()
            self._recent_setting = setting
        recent = self._recent.setdefault(rows, deque(maxlen=_RECENT))
        self.choice.count_forward(slow=len(recent) >= _RECENT - 1 and seconds > _SLOWDOWN * statistics.median(recent))
        recent.append(seconds)
