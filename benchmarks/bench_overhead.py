"""Engine overhead per step: a model so small that its forward costs almost nothing, so what is measured is the
work around the forward (scheduling, step metadata, verification, bookkeeping, Python).

    python -m benchmarks.bench_overhead [--batch-sizes 1 16 64 256] [--max-new-tokens 64] [--repeats 3]

Model: a random Llama with 2 layers, hidden size 32, vocabulary 1024, float32, built from a config; one torch
thread. Systems, in one process and interleaved (the order alternates each repeat): HF ``model.generate``, then
``cospec.generate`` plain and with prompt lookup; greedy, exactly ``max_new_tokens`` new tokens per row.

Reported per batch size: ms per step (wall time of one ``generate`` call / new tokens per row, prefill included)
as the median over repeats, the ratio cospec / HF (median of per-repeat ratios), and the time inside the model's
``forward`` per step, so that ``overhead = step - forward`` is what each system spends outside the model. The
profile (cProfile, one run per system at ``--profile-batch``) splits cospec's step (the general one and the plain
decoding one) into phases: schedule, propose (draft lengths and drafting), metadata, forward, verify,
postprocess, other. cProfile inflates Python-heavy phases; use it for shares, the timed runs for figures.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import cospec
from benchmarks.common import environment, summarize

SYSTEMS = ("hf", "cospec", "cospec_prompt_lookup")
PROMPT_LOOKUP_TOKENS = 4

# Where the functions that phase_profile splits a step by live.
ENGINE, RUNNER, BATCH = "engine/llm_engine.py", "engine/model_runner.py", "engine/input_batch.py"
STEP, DECODE_STEP = (ENGINE, "step"), (ENGINE, "_decode_step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile-batch", type=int, default=64, help="batch size of the profiled runs (0: none)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/overhead"))
    return parser.parse_args(argv)


def tiny_model(seed: int = 0):
    """Random float32 Llama: 2 layers, hidden 32, vocabulary 1024 (no eos: every row runs to max_new_tokens)."""
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096,
                            eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def make_batch(batch_size: int, prompt_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Prompts of ``prompt_len // 2 .. prompt_len`` tokens, left-padded with 0: each repeats a random 8-gram, so
    that prompt lookup finds matches as it would in code or quoted text."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(batch_size, prompt_len, dtype=torch.int64)
    attention_mask = torch.zeros(batch_size, prompt_len, dtype=torch.int64)
    for row in range(batch_size):
        n = int(torch.randint(prompt_len // 2, prompt_len + 1, (), generator=gen))
        pattern = torch.randint(1, 1024, (8,), generator=gen)
        input_ids[row, prompt_len - n:] = pattern.repeat(-(-n // 8))[:n]
        attention_mask[row, prompt_len - n:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class ForwardTimer:
    """Adds up the wall time spent in ``model.forward`` (HF calls it through ``__call__``, so does cospec)."""

    def __init__(self, model) -> None:
        self.seconds = 0.0
        self._forward = model.forward

        @functools.wraps(self._forward)  # keeps the signature that HF and cospec inspect
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._forward(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        model.forward = timed


def run_system(system: str, model, batch: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        if system == "hf":
            sequences = model.generate(**batch, **kwargs)
        elif system == "cospec":
            sequences = cospec.generate(model, **batch, **kwargs)
        else:
            sequences = cospec.generate(model, **batch, **kwargs, prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS)
    new_tokens = sequences[:, batch["input_ids"].shape[1]:]
    assert new_tokens.shape[1] == max_new_tokens, f"{system} generated {new_tokens.shape[1]} tokens per row"
    return new_tokens


def phase_profile(model, batch, max_new_tokens: int, system: str) -> dict[str, float]:
    """Seconds per phase of one profiled ``cospec.generate`` run (cProfile, cumulative times)."""
    profiler = cProfile.Profile()
    profiler.enable()
    run_system(system, model, batch, max_new_tokens)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}

    def cumulative(file_suffix: str, name: str, caller: tuple[str, str] | None = None) -> float:
        total = 0.0
        for (file, _, fn), (_, _, _, cum, callers) in stats.items():
            if fn != name or not file.endswith(file_suffix):
                continue
            if caller is None:
                total += cum
            else:  # only the calls made from ``caller``
                total += sum(c[3] for (f, _, n), c in callers.items() if n == caller[1] and f.endswith(caller[0]))
        return total

    # A step is the general one (schedule, propose, forward, verify, accept) or a plain decoding step
    # (LLMEngine._decode_step: room, forward_decode, tokens, then appending inline, counted as postprocess).
    # The target's forwards are those called from either (draft forwards belong to propose), their metadata apart.
    metadata = (cumulative(BATCH, "prepare", caller=(RUNNER, "forward"))
                + cumulative(BATCH, "prepare_decode", caller=(RUNNER, "forward_decode")))
    decode_room = cumulative("engine/block_manager.py", "try_grow_each", caller=DECODE_STEP)
    decode_forward = cumulative(RUNNER, "forward_decode", caller=DECODE_STEP)
    decode_tokens = cumulative(ENGINE, "_decode_tokens", caller=DECODE_STEP)
    step = cumulative(*STEP)
    phases = {
        "schedule": cumulative("engine/scheduler.py", "schedule") + decode_room,
        "propose": cumulative(ENGINE, "_draft_lengths") + cumulative(ENGINE, "_propose"),
        "metadata": metadata,
        "forward": cumulative(RUNNER, "forward", caller=STEP) + decode_forward - metadata,
        "verify": cumulative(ENGINE, "_verify", caller=STEP) + decode_tokens,
        "postprocess": (cumulative(ENGINE, "_accept")
                        + cumulative(*DECODE_STEP) - decode_room - decode_forward - decode_tokens),
    }
    phases["other"] = step - sum(phases.values())
    return {"step_total": step, **phases}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = tiny_model()
    forward_timer = ForwardTimer(model)
    batches = {b: make_batch(b, args.prompt_len, seed=b) for b in args.batch_sizes}
    env = environment()
    for b in args.batch_sizes:  # untimed: first-call costs (allocator, attention registration, lazy imports)
        for system in SYSTEMS:
            run_system(system, model, batches[b], 4)

    runs, outputs = [], {}
    with tqdm(total=args.repeats * len(args.batch_sizes) * len(SYSTEMS), desc="bench_overhead", unit="run") as bar:
        for repeat in range(args.repeats):
            order = SYSTEMS if repeat % 2 == 0 else SYSTEMS[::-1]
            for b in args.batch_sizes:
                for system in order:
                    bar.set_postfix_str(f"{system} batch={b}")
                    forward_timer.seconds = 0.0
                    start = time.perf_counter()
                    new_tokens = run_system(system, model, batches[b], args.max_new_tokens)
                    seconds = time.perf_counter() - start
                    outputs.setdefault((system, b), new_tokens)
                    runs.append({"system": system, "batch_size": b, "repeat": repeat,
                                 "ms_per_step": 1e3 * seconds / args.max_new_tokens,
                                 "forward_ms_per_step": 1e3 * forward_timer.seconds / args.max_new_tokens})
                    bar.update()

    summary = {}
    for b in args.batch_sizes:
        per = {}
        for system in SYSTEMS:
            chosen = [r for r in runs if r["system"] == system and r["batch_size"] == b]
            step = statistics.median(r["ms_per_step"] for r in chosen)
            forward = statistics.median(r["forward_ms_per_step"] for r in chosen)
            per[system] = {"ms_per_step": summarize([r["ms_per_step"] for r in chosen]), "forward_ms_per_step": forward,
                           "overhead_ms_per_step": step - forward}
            if system != "hf":
                hf = {r["repeat"]: r["ms_per_step"] for r in runs if r["system"] == "hf" and r["batch_size"] == b}
                per[system]["ratio_to_hf"] = summarize([r["ms_per_step"] / hf[r["repeat"]] for r in chosen])
                per[system]["rows_equal_to_hf"] = int((outputs[system, b] == outputs["hf", b]).all(dim=1).sum())
        summary[b] = per

    profile = {}
    if args.profile_batch:
        batch = make_batch(args.profile_batch, args.prompt_len, seed=args.profile_batch)
        profile = {system: phase_profile(model, batch, args.max_new_tokens, system) for system in SYSTEMS[1:]}
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "environment": env,
               "runs": runs, "summary": summary, "profile": profile}
    report = markdown(results)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(results, indent=2))
    (args.out / "overhead.md").write_text(report + "\n")
    print(f"\nwrote {args.out}/overhead.json and overhead.md")
    return results


def markdown(results: dict) -> str:
    args, env = results["args"], results["environment"]
    lines = [f"tiny Llama (2 layers, hidden 32, vocabulary 1024, float32), greedy, {args['max_new_tokens']} new "
             f"tokens, {args['threads']} thread(s), {args['repeats']} repeats; load average at start "
             f"{env['load_average_1m']:.2f}", "",
             "| batch | system | ms/step (median) | / HF (median) | forward ms/step | overhead ms/step | rows = HF |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for b, per in results["summary"].items():
        for system, row in per.items():
            ratio = f"{row['ratio_to_hf']['median']:.2f}" if "ratio_to_hf" in row else ""
            equal = f"{row['rows_equal_to_hf']}/{b}" if "rows_equal_to_hf" in row else ""
            lines.append(f"| {b} | {system} | {row['ms_per_step']['median']:.2f} | {ratio} | "
                         f"{row['forward_ms_per_step']:.2f} | {row['overhead_ms_per_step']:.2f} | {equal} |")
    if results["profile"]:
        phases = list(next(iter(results["profile"].values())))
        lines += ["", f"Profile (cProfile, batch {args['profile_batch']}): ms per step by phase",
                  "", "| system | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
        for system, times in results["profile"].items():
            cells = " | ".join(f"{1e3 * times[p] / args['max_new_tokens']:.2f}" for p in phases)
            lines.append(f"| {system} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
