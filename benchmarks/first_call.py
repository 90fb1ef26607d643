"""First-call time of ``cospec.generate`` in a fresh process, without and with a stored CPU row plan (and of HF
``generate`` for reference).

    python -m benchmarks.first_call [--model smollm2-135m] [--max-new-tokens 8] [--repeats 1] [--threads N]
                                    [--busy-threads N]

Every measurement is a new Python process that loads the model, then times its first generate call (one chat
prompt, greedy, ``--max-new-tokens`` tokens) and a second one. Each repeat gives cospec a new cache directory whose
``models`` entry links to the real one: its first process finds no row plan (it measures one, and stores it when the
measurement is clean), the second finds what the first stored. Reported per system and case: seconds to import and
load the model, the first call, the second call, and whether the process measured a plan (and how long that took).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.busy_load import REPO, CompetingLoad

CASES = ("hf", "cospec, no stored plan", "cospec, stored plan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--busy-threads", type=int, default=0,
                        help="busy machine: run a competing torch process on this many threads (0: none)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/first_call.json"))
    parser.add_argument("--child", choices=("hf", "cospec"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(args: argparse.Namespace) -> dict:
    """Runs in the fresh process: load, first call, second call."""
    start = time.perf_counter()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import cospec
    from benchmarks.common import chat_prompts
    from cospec.engine import cpu_plans
    from cospec.engine.models import load_model

    measurements = []
    measure = cpu_plans.measure_row_plan

    def timed_measure(*a, **kw):
        measurement = measure(*a, **kw)
        measurements.append(measurement.elapsed)
        return measurement

    cpu_plans.measure_row_plan = timed_measure
    model, tokenizer = load_model(args.model)
    loaded = time.perf_counter() - start
    batch = tokenizer(chat_prompts(tokenizer)[:1], return_tensors="pt", add_special_tokens=False)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=None,
                  pad_token_id=tokenizer.eos_token_id)
    calls = []
    for _ in range(2):
        begin = time.perf_counter()
        if args.child == "hf":
            model.generate(**batch, **kwargs)
        else:
            cospec.generate(model, **batch, **kwargs)
        calls.append(time.perf_counter() - begin)
    return {"import_and_load_s": loaded, "first_call_s": calls[0], "second_call_s": calls[1],
            "plan_measurements_s": measurements, "threads": torch.get_num_threads()}


def run_child(system: str, args: argparse.Namespace, cache: Path | None) -> dict:
    command = [sys.executable, "-m", "benchmarks.first_call", "--child", system, "--model", args.model,
               "--max-new-tokens", str(args.max_new_tokens)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    if cache is not None:
        env["COSPEC_CACHE_DIR"] = str(cache)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    from cospec.engine.models import cache_dir, resolve_model_path

    resolve_model_path(args.model)  # converted once here, not in a timed process
    runs = {case: [] for case in CASES}
    with CompetingLoad(args.busy_threads) as load, tqdm(total=args.repeats * len(CASES), desc="first_call") as bar:
        for _ in range(args.repeats):
            runs["hf"].append(run_child("hf", args, None))
            bar.update()
            with tempfile.TemporaryDirectory(prefix="cospec-first-call-") as tmp:
                (Path(tmp) / "models").symlink_to(cache_dir() / "models")
                for case in CASES[1:]:
                    runs[case].append(run_child("cospec", args, Path(tmp)))
                    bar.update()
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": runs,
               "competing_load": load.stats, "load_average_1m_at_end": os.getloadavg()[0]}
    print(markdown(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")
    return results


def markdown(results: dict) -> str:
    args = results["args"]
    lines = [f"model {args['model']}, {args['max_new_tokens']} new tokens, batch 1, fresh process per run, median of "
             f"{args['repeats']} repeat(s)" + (f", competing torch process on {args['busy_threads']} thread(s)"
                                               if args["busy_threads"] else ""),
             "",
             "| case | import + load | first call | second call | plan measured in the process |",
             "|---|---:|---:|---:|---|"]
    for case, runs in results["runs"].items():
        def median(name: str) -> str:
            return f"{statistics.median(r[name] for r in runs):.2f} s"

        measured = [m for r in runs for m in r["plan_measurements_s"]]
        plans = "n/a" if case == "hf" else (f"{len(measured)}x, {statistics.median(measured):.2f} s" if measured
                                            else "no")
        lines.append(f"| {case} | {median('import_and_load_s')} | {median('first_call_s')} "
                     f"| {median('second_call_s')} | {plans} |")
    lines.append(f"1-minute load average at the end: {results['load_average_1m_at_end']:.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
