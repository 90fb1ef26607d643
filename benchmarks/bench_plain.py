"""Plain greedy decoding: Hugging Face ``model.generate`` against ``cospec.generate`` on the same model object.

    python -m benchmarks.bench_plain [--max-new-tokens 128] [--prompts 4] [--batch-sizes 1 8] [--repeats 2]
                                     [--busy-threads N]

Both systems run in one process, interleaved prompt by prompt (the order alternates each repeat), so that drift in
the machine's load hits both alike. Every row generates exactly ``max_new_tokens`` tokens (``eos_token_id=None``),
so batches with rows that would stop at different points do the same work in both systems. A batch of B takes B
consecutive chat-templated instructions (wrapping), left-padded for both systems.

Reported: tokens/s per system and batch size (median, min-max over prompts x repeats), the speedup cospec/HF (median
of per-prompt ratios), cospec's batch-B aggregate throughput over its batch-1 throughput, whether the outputs equal
HF's token for token, and resident memory (peak increase while each system runs; process peak).

Busy machine (``--busy-threads N``): a second process multiplies 512x512 float32 matrices with torch on N threads
(``benchmarks.busy_load``) from before the warm-up to the end, as another program on the same machine would; its
throughput is reported too. Both systems run at their default thread count (torch's, or ``--threads``), as a user's
would, and cospec chooses its own setting (``cospec.engine.cpu_threads``); the one it ended with is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import cospec
from benchmarks.busy_load import CompetingLoad
from benchmarks.common import RSSPeakSampler, Timer, chat_prompts, environment, peak_rss_bytes, summarize
from cospec.engine.cpu_threads import thread_choices
from cospec.engine.models import load_model

SYSTEMS = ("hf", "cospec")
MiB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=4, help="prompts (batches) per batch size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--busy-threads", type=int, default=0,
                        help="busy machine: run a competing torch process on this many threads (0: none)")
    parser.add_argument("--warmup-tokens", type=int, default=8, help="tokens of the untimed warm-up run per system")
    parser.add_argument("--out", type=Path, default=Path("bench_results/plain.json"))
    return parser.parse_args(argv)


def make_batches(tokenizer, batch_size: int, num_batches: int) -> list[dict[str, torch.Tensor]]:
    """``num_batches`` left-padded batches; batch i holds prompts i, i+1, ..., i+batch_size-1 (wrapping)."""
    texts = chat_prompts(tokenizer)
    batches = []
    for i in range(num_batches):
        rows = [texts[(i + j) % len(texts)] for j in range(batch_size)]
        batches.append(dict(tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=False)))
    return batches


def run_system(system: str, model, batch: dict[str, torch.Tensor], max_new_tokens: int,
               pad_token_id: int) -> torch.Tensor:
    """Greedy, exactly ``max_new_tokens`` new tokens per row; returns the new tokens ``[batch, max_new_tokens]``."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad_token_id)
    if system == "hf":
        sequences = model.generate(**batch, **kwargs)
    else:
        sequences = cospec.generate(model, **batch, **kwargs)
    new_tokens = sequences[:, batch["input_ids"].shape[1]:]
    assert new_tokens.shape[1] == max_new_tokens, f"{system} generated {new_tokens.shape[1]} tokens per row"
    return new_tokens


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Index of the first differing new token over all rows (None when equal)."""
    differs = (a != b).any(dim=0).nonzero()
    return None if differs.numel() == 0 else int(differs[0])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.disable_progress_bar()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    tokenizer.padding_side = "left"
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = {b: make_batches(tokenizer, b, args.prompts) for b in args.batch_sizes}
    env = environment()

    with CompetingLoad(args.busy_threads) as load, RSSPeakSampler() as sampler:
        for b in args.batch_sizes:  # untimed: first-call costs (allocator, attention registration, lazy imports)
            for system in SYSTEMS:
                run_system(system, model, batches[b][0], args.warmup_tokens, pad_token_id)
        runs, outputs = timed_runs(args, model, batches, pad_token_id, sampler)
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "environment": env, "runs": runs, "summary": summarize_runs(runs, outputs, args),
               "process_peak_rss_bytes": peak_rss_bytes(), "competing_load": load.stats,
               "cospec_cpu_settings": [choice.describe() for choice in thread_choices()]}
    print(markdown(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")
    return results


def timed_runs(args: argparse.Namespace, model, batches: dict, pad_token_id: int,
               sampler: RSSPeakSampler) -> tuple[list[dict], dict]:
    """Every (repeat, batch size, prompt, system) run, the systems interleaved and their order alternating."""
    runs, outputs = [], {}
    total = len(args.batch_sizes) * args.prompts * args.repeats * len(SYSTEMS)
    with tqdm(total=total, desc="bench_plain", unit="run") as bar:
        for repeat in range(args.repeats):
            order = SYSTEMS if repeat % 2 == 0 else SYSTEMS[::-1]
            for b in args.batch_sizes:
                for prompt, batch in enumerate(batches[b]):
                    for system in order:
                        bar.set_postfix_str(f"{system} batch={b} prompt={prompt}")
                        load = os.getloadavg()[0]
                        cpu_start = time.process_time()
                        with sampler.measure() as memory, Timer() as timer:
                            new_tokens = run_system(system, model, batch, args.max_new_tokens, pad_token_id)
                        cpu_seconds = time.process_time() - cpu_start
                        outputs.setdefault((system, b, prompt), new_tokens)
                        num_tokens = new_tokens.numel()
                        runs.append({
                            "system": system, "batch_size": b, "prompt": prompt, "repeat": repeat,
                            "num_prompt_tokens": int(batch["attention_mask"].sum()), "num_new_tokens": num_tokens,
                            "seconds": timer.seconds, "tokens_per_s": num_tokens / timer.seconds,
                            "cpu_seconds": cpu_seconds, "load_average_1m_at_start": load,
                            "rss_start_bytes": memory.start, "rss_peak_bytes": memory.peak,
                            "same_as_first_repeat": bool(torch.equal(new_tokens, outputs[(system, b, prompt)])),
                        })
                        bar.update()
    return runs, outputs


def summarize_runs(runs: list[dict], outputs: dict, args: argparse.Namespace) -> dict:
    def select(system: str, b: int) -> list[dict]:
        return [r for r in runs if r["system"] == system and r["batch_size"] == b]

    summary = {"per_batch_size": {}}
    for b in args.batch_sizes:
        per_system = {}
        for system in SYSTEMS:
            chosen = select(system, b)
            per_system[system] = {
                "tokens_per_s": summarize([r["tokens_per_s"] for r in chosen]),
                "rss_increase_bytes": max(r["rss_peak_bytes"] - r["rss_start_bytes"] for r in chosen),
                "rss_peak_bytes": max(r["rss_peak_bytes"] for r in chosen),
                "deterministic": all(r["same_as_first_repeat"] for r in chosen),
            }
        # Pairwise: the two systems' runs of the same prompt in the same repeat.
        seconds = {(r["system"], r["prompt"], r["repeat"]): r["seconds"] for r in runs if r["batch_size"] == b}
        ratios = [seconds["hf", p, rep] / seconds["cospec", p, rep]
                  for p in range(args.prompts) for rep in range(args.repeats)]
        identical = []
        for p in range(args.prompts):
            hf, ours = outputs["hf", b, p], outputs["cospec", b, p]
            rows_equal = [bool(torch.equal(x, y)) for x, y in zip(hf, ours)]
            identical.append({"prompt": p, "identical": all(rows_equal), "rows_identical": sum(rows_equal),
                              "rows": len(rows_equal), "first_difference": first_difference(hf, ours)})
        per_system["speedup_cospec_over_hf"] = {**summarize(ratios), "ratios": ratios}
        per_system["speedup_best_of_runs"] = (per_system["cospec"]["tokens_per_s"]["max"]
                                              / per_system["hf"]["tokens_per_s"]["max"])
        per_system["identical_to_hf"] = identical
        summary["per_batch_size"][b] = per_system
    if 1 in args.batch_sizes:
        base = summary["per_batch_size"][1]["cospec"]["tokens_per_s"]["median"]
        summary["cospec_batch_scaling"] = {
            b: summary["per_batch_size"][b]["cospec"]["tokens_per_s"]["median"] / base for b in args.batch_sizes}
        best = summary["per_batch_size"][1]["cospec"]["tokens_per_s"]["max"]
        summary["cospec_batch_scaling_best_of_runs"] = {
            b: summary["per_batch_size"][b]["cospec"]["tokens_per_s"]["max"] / best for b in args.batch_sizes}
    loads = [r["load_average_1m_at_start"] for r in runs]
    summary["load_average_1m_during_runs"] = summarize(loads)
    return summary


def markdown(results: dict) -> str:
    summary, env, args = results["summary"], results["environment"], results["args"]
    busy = args.get("busy_threads", 0) > 0
    lines = [
        f"model {args['model']} ({args['dtype']}), greedy, {args['max_new_tokens']} new tokens per row, "
        f"{args['prompts']} prompts x {args['repeats']} repeats; torch {env['torch']}, transformers "
        f"{env['transformers']}, {env['cpu']}, {env['threads']} threads, load average at start "
        f"{env['load_average_1m']:.2f}",
    ]
    if busy:
        stats = results.get("competing_load") or {}
        lines.append(f"busy machine: a competing process multiplied {stats.get('size', 512)}x{stats.get('size', 512)} "
                     f"matrices on {args['busy_threads']} torch thread(s) throughout "
                     f"({stats.get('products_per_s', float('nan')):.0f} products/s)")
    lines += [
        "",
        "| batch | system | tokens/s median (min-max) | speedup vs HF (median, min-max) | cospec bN / cospec b1 "
        "| identical to HF | RSS increase |",
        "|---:|---|---|---|---|---|---:|",
    ]
    scaling = summary.get("cospec_batch_scaling", {})
    for b, per in summary["per_batch_size"].items():
        speed = per["speedup_cospec_over_hf"]
        identical = per["identical_to_hf"]
        rows_same = sum(p["rows_identical"] for p in identical)
        rows_all = sum(p["rows"] for p in identical)
        same = f"{sum(p['identical'] for p in identical)}/{len(identical)} prompts ({rows_same}/{rows_all} rows)"
        cospec_cells = {
            "speedup": f"{speed['median']:.2f}x ({speed['min']:.2f}-{speed['max']:.2f})",
            "scaling": f"{scaling[b]:.2f}x" if b in scaling else "",
            "identical": same,
        }
        for system in SYSTEMS:
            tps = per[system]["tokens_per_s"]
            cells = cospec_cells if system == "cospec" else dict.fromkeys(cospec_cells, "")
            name = "HF generate" if system == "hf" else "cospec.generate"
            lines.append(f"| {b} | {name} | {tps['median']:.1f} ({tps['min']:.1f}-{tps['max']:.1f}) "
                         f"| {cells['speedup']} | {cells['scaling']} | {cells['identical']} "
                         f"| {per[system]['rss_increase_bytes'] / MiB:.0f} MiB |")
    lines.append("")
    lines.append(f"process peak RSS: {results['process_peak_rss_bytes'] / MiB:.0f} MiB")
    for b, per in summary["per_batch_size"].items():
        diffs = [p for p in per["identical_to_hf"] if not p["identical"]]
        for p in diffs:
            lines.append(f"batch {b}, prompt {p['prompt']}: {p['rows_identical']}/{p['rows']} rows identical, "
                         f"first difference at new token {p['first_difference']}")
    targets = []
    for b, target in [(1, 1.0), (8, 1.0)] if busy else [(1, 1.2)]:  # busy: never slower than HF
        if b in summary["per_batch_size"]:
            speedup = summary["per_batch_size"][b]["speedup_cospec_over_hf"]["median"]
            targets.append(f"batch {b} speedup {speedup:.2f}x (target >= {target}x)")
    if 8 in scaling:
        targets.append(f"cospec batch-8 aggregate / batch-1 {scaling[8]:.2f}x (target {'> 1' if busy else '>= 3'}x)")
    if targets:
        lines.append("targets (medians): " + "; ".join(targets))
    best = [f"batch {b} speedup {per['speedup_best_of_runs']:.2f}x" for b, per in summary["per_batch_size"].items()]
    best_scaling = summary.get("cospec_batch_scaling_best_of_runs", {})
    if 8 in best_scaling:
        best.append(f"cospec batch-8 / batch-1 {best_scaling[8]:.2f}x")
    lines.append("best-of-runs (fastest run of each system; least disturbed by other load): " + "; ".join(best))
    load = summary["load_average_1m_during_runs"]
    for setting in results.get("cospec_cpu_settings", []):
        lines.append(f"cospec's CPU setting at the end: {setting}")
    lines.append(f"1-minute load average at the start of the runs: median {load['median']:.1f} "
                 f"({load['min']:.1f}-{load['max']:.1f}) on {env['num_cpus']} CPUs"
                 + (" -- the machine was shared; wall-clock figures are noisy" if load["max"] > env["num_cpus"] else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
