"""Row plans kept on disk: measured once per machine and model shape, loaded by every later process.

A plan (``cospec.engine.cpu_linear.RowPlan``) is stored as ``<cache_dir>/cpu_plans/<key digest>.json`` together
with its key: the CPU (its name and torch's instruction-set level), torch's version, the thread count, the shapes and
dtypes of the model's linear weights and whether prepacked weights are allowed. A process looks the plan up there
first and measures only when it is missing (a few seconds), unreadable, or stored under another key, at a moment
when its threads are not held up by other processes (``cospec.engine.cpu_threads``); ``cospec info`` lists the
stored plans. Only a measurement that finished within its time budget, with timings that agree with each
other (``_MAX_STORED_SPREAD``), is stored: a plan measured while other processes took the cores is used by the
process that measured it, and the next process measures again. Delete the directory to measure everything again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from cospec.engine.cpu_linear import (PACKABLE_DTYPE_NAMES, PlanMeasurement, RowPlan, measure_row_plan,
                                      measured_weights, packing_available, weight_shapes)
from cospec.engine.models import cache_dir

logger = logging.getLogger("cospec.cpu_plans")

# A measurement is stored only if its passes agree: the median over (path, row count) of median / minimum - 1.
_MAX_STORED_SPREAD = 0.1
_FORMAT = 2  # 2: MKL timed with its output copy, and never the path beyond the measured rows


def plans_dir() -> Path:
    return cache_dir() / "cpu_plans"


@functools.cache  # (read once: a file read per engine would cost more than the rest of a plan lookup)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plan_key(linears: list[nn.Linear], allow_packed: bool = True, threads: int | None = None) -> dict:
    """What a plan depends on, as JSON values."""
    shapes = weight_shapes(linears)
    return {
        "format": _FORMAT,
        "cpu": cpu_name(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": threads or torch.get_num_threads(),
        "weights": [[out_features, in_features, dtype] for out_features, in_features, dtype in shapes],
        "packed": allow_packed and packing_available() and all(d in PACKABLE_DTYPE_NAMES for *_, d in shapes),
    }


def plan_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def measure_plan(linears: list[nn.Linear], key: dict) -> RowPlan:
    """Measure the plan for ``key`` on these layers' weights; store it when the measurement is clean."""
    logger.info("cospec: measuring the CPU row plan (once per machine and model shape)")
    measurement = measure_row_plan(measured_weights(linears), packed=key["packed"])
    if is_clean(measurement):
        store_plan(key, measurement)
    else:
        logger.warning("cospec: the CPU row plan was measured on a busy machine (%s); only this process uses it",
                       "the time budget ran out" if not measurement.complete else "noisy timings")
    return measurement.plan


def spread(measurement: PlanMeasurement) -> float:
    """How much the passes disagree: the median over (path, row count) of median / minimum - 1."""
    ratios = [statistics.median(times) / min(times) - 1 for times in measurement.seconds.values() if len(times) > 1]
    return statistics.median(ratios) if ratios else float("inf")


def is_clean(measurement: PlanMeasurement) -> bool:
    return measurement.complete and spread(measurement) <= _MAX_STORED_SPREAD


def load_plan(key: dict) -> RowPlan | None:
    """The stored plan for ``key``, or None when there is none, or the file is unreadable or holds another key."""
    path = plans_dir() / f"{plan_digest(key)}.json"
    try:
        data, plan = _read(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:  # ValueError: bad JSON or an invalid RowPlan
        logger.warning("cospec: cannot read the stored CPU row plan %s (%s); measuring again", path, error)
        return None
    if data["key"] != key:
        logger.warning("cospec: %s holds the plan of another key; measuring again", path)
        return None
    return plan


def _read(path: Path) -> tuple[dict, RowPlan]:
    data = json.loads(path.read_text())
    plan = data["plan"]
    return data, RowPlan(tuple(plan["paths"]), tuple(plan["padded"]), plan["large_path"])


def store_plan(key: dict, measurement: PlanMeasurement) -> None:
    """Write the plan with its key and a summary of its timings (written whole, then renamed: readers never see a
    partial file). A cache directory that cannot be written only costs the next process a measurement."""
    plan = measurement.plan
    timings = {f"{path}@{rows}": [round(min(t) * 1e3, 3), round(statistics.median(t) * 1e3, 3)]
               for (path, rows), t in sorted(measurement.seconds.items(), key=lambda item: (item[0][1], item[0][0]))}
    data = {
        "key": key,
        "plan": {"paths": list(plan.paths), "padded": list(plan.padded), "large_path": plan.large_path},
        "measured": {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(measurement.elapsed, 2),
                     "spread": round(spread(measurement), 4), "ms_min_median": timings},
    }
    directory = plans_dir()
    temporary = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
            temporary = Path(f.name)
            json.dump(data, f, indent=1)
        os.replace(temporary, directory / f"{plan_digest(key)}.json")
    except OSError as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        logger.warning("cospec: cannot store the CPU row plan in %s (%s)", directory, error)


def stored_plans() -> list[dict]:
    """Every stored plan file (``cospec info``), as ``{"file", "key", "plan": RowPlan, "measured"}``; unreadable
    files as ``{"file", "error"}``."""
    entries = []
    for path in sorted(plans_dir().glob("*.json")):
        try:
            data, plan = _read(path)
            entries.append({"file": path, "key": data["key"], "measured": data.get("measured", {}), "plan": plan})
        except (OSError, ValueError, KeyError, TypeError) as error:
            entries.append({"file": path, "error": str(error)})
    return entries
