"""Fair admission: a short request's time to first token while a long prompt is being prefilled, against its time
to first token alone.

One engine per scheduling policy (``fair``, the default, and ``fcfs``), long-lived as in a server and warmed up
(so the fair policy has measured step costs). Each trial adds the long prompt (``--long-tokens``, 3,000 by default),
runs ``--lead-steps`` steps so that its prefill is under way, then adds the short request at that step boundary and
times its first token; the long request is then aborted. "Alone" is the short request on an idle engine. Trials of
the three cases are interleaved; the ratios are medians of per-trial ratios. A request that arrives in the middle of
a step also waits for the rest of that step: at most one full step of the long prefill, reported below.
Prefix caching is off, so that every trial prefills the long prompt from scratch.

    python -m benchmarks.bench_fair_admission [--long-tokens 3000] [--repeats 5] [--lead-steps 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks import workloads
from benchmarks.bench_prefix_cache import encode_chat
from benchmarks.common import environment
from cospec import EngineConfig, LLMEngine, SamplingParams

PARAMS = SamplingParams(max_tokens=4, temperature=0.0)


def first_token(engine: LLMEngine, request_id: str, prompt: list[int]) -> tuple[float, int]:
    """Add a request, step until its first token: (seconds, steps)."""
    start = time.perf_counter()
    engine.add_request(request_id, prompt, PARAMS)
    for steps in range(1, 100_000):
        if any(out.request_id == request_id for out in engine.step()):
            return time.perf_counter() - start, steps
    raise RuntimeError(f"{request_id} got no token")


def behind_long_prefill(engine: LLMEngine, long_prompt: list[int], short_prompt: list[int], lead_steps: int,
                        trial: int) -> tuple[float, int, float]:
    """(short request's TTFT, steps it waited, seconds of the long prefill's last lead step)."""
    engine.add_request(f"long-{trial}", long_prompt, PARAMS)
    for _ in range(lead_steps):
        start = time.perf_counter()
        engine.step()
        lead_step = time.perf_counter() - start
    seconds, steps = first_token(engine, f"short-{trial}", short_prompt)
    engine.abort(f"long-{trial}")
    while engine.has_unfinished_requests():  # the short request's remaining tokens
        engine.step()
    return seconds, steps, lead_step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--long-tokens", type=int, default=3000)
    parser.add_argument("--short-prompt", default="What is the capital of France?")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lead-steps", type=int, default=1, help="steps of the long prefill before the short request")
    parser.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig().max_num_batched_tokens)
    parser.add_argument("--out", default="bench_results/fair_admission")
    args = parser.parse_args(argv)

    from cospec.engine.models import load_model

    model, tokenizer = load_model(args.model)
    text = "\n\n".join(workloads.sharegpt(64, seed=3, max_chars=4000))
    long_prompt = tokenizer(text)["input_ids"][: args.long_tokens]
    if len(long_prompt) < args.long_tokens:
        raise SystemExit(f"the text gives only {len(long_prompt)} tokens")
    short_prompt = encode_chat(tokenizer, [{"role": "user", "content": args.short_prompt}])
    engines = {policy: LLMEngine(model, EngineConfig(scheduling_policy=policy, enable_prefix_caching=False,
                                                     max_num_batched_tokens=args.max_num_batched_tokens),
                                 tokenizer=tokenizer)
               for policy in ("fair", "fcfs")}
    for policy, engine in engines.items():  # warm-up: steps of several sizes, so that step costs are measured
        behind_long_prefill(engine, long_prompt[:1000], short_prompt, 2, -1)
        first_token(engine, "warm-up", short_prompt)
        while engine.has_unfinished_requests():
            engine.step()

    trials = []
    for trial in tqdm(range(args.repeats), desc="fair admission"):
        alone, _ = first_token(engines["fair"], f"alone-{trial}", short_prompt)
        while engines["fair"].has_unfinished_requests():
            engines["fair"].step()
        record = {"alone": alone}
        for policy in (("fair", "fcfs") if trial % 2 == 0 else ("fcfs", "fair")):
            seconds, steps, lead_step = behind_long_prefill(engines[policy], long_prompt, short_prompt,
                                                            args.lead_steps, trial)
            record.update({policy: seconds, f"{policy}_steps": steps, f"{policy}_lead_step": lead_step})
        trials.append(record)

    def median(key):
        return statistics.median(t[key] for t in trials)

    summary = {"short_prompt_tokens": len(short_prompt), "long_prompt_tokens": len(long_prompt),
               "ttft_alone": median("alone"),
               **{f"ttft_{p}": median(p) for p in ("fair", "fcfs")},
               **{f"ratio_{p}": statistics.median(t[p] / t["alone"] for t in trials) for p in ("fair", "fcfs")},
               **{f"steps_{p}": median(f"{p}_steps") for p in ("fair", "fcfs")},
               "full_long_step": median("fcfs_lead_step")}
    table = "\n".join([
        f"### Fair admission: {args.model}, a {len(short_prompt)}-token request behind a "
        f"{len(long_prompt)}-token prefill (budget {args.max_num_batched_tokens} tokens per step), median of "
        f"{args.repeats} interleaved trials", "",
        "| policy | TTFT alone (s) | TTFT behind the long prefill (s) | ratio | steps waited |",
        "|---|---:|---:|---:|---:|",
        *[f"| {p} | {summary['ttft_alone']:.3f} | {summary[f'ttft_{p}']:.3f} | {summary[f'ratio_{p}']:.1f}x | "
          f"{summary[f'steps_{p}']:g} |" for p in ("fair", "fcfs")],
        "", f"A request arriving mid-step also waits for that step: one full step of the long prefill took "
            f"{summary['full_long_step']:.3f} s."]) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fair_admission.json").write_text(json.dumps({"environment": environment(), "arguments": vars(args),
                                                          "summary": summary, "trials": trials}, indent=1))
    (out / "fair_admission.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
