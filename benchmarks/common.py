"""Shared pieces of the benchmarks: prompts, the environment record, a peak-RSS sampler, summary statistics."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import threading
import time

# Varied instructions (code, explanation, writing, reasoning); a batch of B takes B consecutive ones, wrapping.
INSTRUCTIONS = [
    "Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation.",
    "Explain how a hash map works and why lookups are O(1) on average.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main differences between TCP and UDP? Give an example use for each.",
    "Write a SQL query that returns the ten customers with the highest total order value.",
    "Explain photosynthesis to a ten-year-old.",
    "Give me five tips for writing clear technical documentation.",
    "Implement binary search in JavaScript and explain its time complexity.",
    "Why is the sky blue? Answer in a few sentences.",
    "Summarize the causes of the French Revolution.",
    "Write a bash script that counts the lines of every .py file in a directory tree.",
    "What is the difference between a list and a tuple in Python?",
]


def chat_prompts(tokenizer, instructions: list[str] = INSTRUCTIONS) -> list[str]:
    """Each instruction as a user turn in the tokenizer's chat template, ready for generation (as text)."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=False) for text in instructions]


def environment() -> dict:
    """What a result depends on: versions, device, threads, and how busy the machine was when it started."""
    from cospec.environment import environment as cospec_environment

    env = dict(cospec_environment())
    env.update({
        "platform": platform.platform(),
        "num_cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    return env


def rss_bytes() -> int:
    """Resident set size of this process now (psutil when installed, else /proc/self/status)."""
    try:
        import psutil
    except ImportError:
        return _proc_status_kb("VmRSS") * 1024
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (VmHWM)."""
    kb = _proc_status_kb("VmHWM")
    if kb:
        return kb * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _proc_status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RSSPeakSampler:
    """Samples RSS on a background thread; ``with sampler.measure() as m:`` gives ``m.start`` and ``m.peak`` (bytes)
    for the block. Sampling every few milliseconds can miss a spike shorter than the interval."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RSSPeakSampler:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = rss_bytes()
            with self._lock:
                self._peak = max(self._peak, rss)

    def measure(self) -> _Window:
        return _Window(self)

    def _reset(self, value: int) -> None:
        with self._lock:
            self._peak = value

    def _read(self) -> int:
        with self._lock:
            return self._peak


class _Window:
    def __init__(self, sampler: RSSPeakSampler) -> None:
        self.sampler = sampler
        self.start = self.peak = 0

    def __enter__(self) -> _Window:
        self.start = rss_bytes()
        self.sampler._reset(self.start)
        return self

    def __exit__(self, *exc) -> None:
        self.peak = max(self.sampler._read(), rss_bytes())

    @property
    def increase(self) -> int:
        return self.peak - self.start


def summarize(values: list[float]) -> dict[str, float]:
    """Median, min and max (and the count) of a list of measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
