"""A reproducible competing load for "busy machine" benchmarks: another process multiplying matrices with torch on
N threads, as another program on the same machine would.

    python -m benchmarks.busy_load [--threads 1] [--size 512]

runs until it is stopped (SIGTERM or Ctrl-C), then prints its throughput as one JSON line. ``CompetingLoad`` starts
it for the length of a ``with`` block (``bench_plain --busy-threads N``).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the competing process")
    parser.add_argument("--size", type=int, default=512, help="square float32 matrices of this size")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    a = torch.randn(args.size, args.size)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    products, start = 0, time.perf_counter()
    print("ready", flush=True)
    try:
        while not stopping:
            a @ a
            products += 1
    except KeyboardInterrupt:
        pass
    seconds = time.perf_counter() - start
    print(json.dumps({"threads": args.threads, "size": args.size, "seconds": seconds,
                      "products_per_s": products / seconds}), flush=True)


class CompetingLoad:
    """``with CompetingLoad(threads) as load:`` runs ``busy_load`` beside the block (started and running before the
    block begins); ``load.stats`` then holds its throughput. ``threads=0`` runs nothing."""

    def __init__(self, threads: int, size: int = 512) -> None:
        self.threads, self.size = threads, size
        self.process: subprocess.Popen | None = None
        self.stats: dict | None = None

    def __enter__(self) -> "CompetingLoad":
        if self.threads > 0:
            command = [sys.executable, "-m", "benchmarks.busy_load", "--threads", str(self.threads),
                       "--size", str(self.size)]
            self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
            if self.process.stdout.readline().strip() != "ready":
                raise RuntimeError("the competing load did not start")
        return self

    def __exit__(self, *exc) -> None:
        if self.process is None:
            return
        self.process.terminate()
        out, _ = self.process.communicate(timeout=60)
        lines = out.strip().splitlines()
        self.stats = json.loads(lines[-1]) if lines else None


if __name__ == "__main__":
    main()
