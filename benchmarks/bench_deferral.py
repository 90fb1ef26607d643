"""Confidence deferral: how often the large model is needed against how much the output departs from it.

The small model emits tokens alone while its top probability is >= tau; the large model runs only where it is not
(taking in the pending tokens in the same forward), optionally rolling back a deferred token it finds too unlikely.
Quality here is agreement with the large model alone: the fraction of greedy tokens that match its own greedy
continuation position by position, and the length of the common prefix.

    python -m benchmarks.bench_deferral [--taus 0.5 0.7 0.9 0.95 1.0] [--small-layers 12] [--num-prompts 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks import workloads
from benchmarks.common import environment
from benchmarks.systems import truncated_copy
from cospec import EngineConfig, LLMEngine, SamplingParams, SpeculativeConfig


def _generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int):
    start = time.perf_counter()
    ids = [str(i) for i in range(len(prompts))]
    for request_id, p in zip(ids, prompts):
        engine.add_request(request_id, p, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[r] for r in ids], time.perf_counter() - start


def _agreement(mine: list[int], reference: list[int]) -> tuple[float, int]:
    n = min(len(mine), len(reference))
    same = sum(a == b for a, b in zip(mine[:n], reference[:n]))
    prefix = next((i for i in range(n) if mine[i] != reference[i]), n)
    return same / max(len(reference), 1), prefix


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--small-layers", type=int, default=12,
                        help="the small model: a copy of the large one's first layers (+ final norm and LM head)")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9, 0.95, 1.0])
    parser.add_argument("--rollback", type=float, default=None, help="BiLD rollback threshold (off by default)")
    parser.add_argument("--workload", default="humaneval", choices=workloads.WORKLOADS)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", default="bench_results/deferral")
    args = parser.parse_args(argv)

    from cospec.engine.models import load_model
    from benchmarks.suite import _encode

    model, tokenizer = load_model(args.model)
    small = truncated_copy(model, args.small_layers)
    prompts = [_encode(tokenizer, text) for text in workloads.load(args.workload, args.num_prompts)]
    reference, large_seconds = _generate(LLMEngine(model, EngineConfig(max_num_seqs=len(prompts))), prompts,
                                         args.max_new_tokens)
    rows = []
    for tau in tqdm(args.taus, desc="deferral sweep"):
        engine = LLMEngine(model, EngineConfig(max_num_seqs=len(prompts)), speculative=SpeculativeConfig(
            "draft", num_draft_tokens=16, draft_model=small, deferral_threshold=tau, deferral_rollback=args.rollback))
        outs, seconds = _generate(engine, prompts, args.max_new_tokens)
        tokens = sum(len(o.output_token_ids) for o in outs)
        large_tokens = tokens - sum(o.stats.num_accepted_tokens for o in outs)  # all but the kept deferred tokens
        agreements = [_agreement(o.output_token_ids, r.output_token_ids) for o, r in zip(outs, reference)]
        rows.append({
            "tau": tau, "large_model_fraction": large_tokens / tokens, "token_agreement": sum(a for a, _ in agreements) / len(agreements),
            "mean_common_prefix": sum(p for _, p in agreements) / len(agreements), "tokens_per_s": tokens / seconds,
            "large_alone_tokens_per_s": sum(len(r.output_token_ids) for r in reference) / large_seconds,
        })
    lines = [f"### Confidence deferral: {args.model} with its first {args.small_layers} layers as the small model, "
             f"{args.workload}, {args.num_prompts} prompts x {args.max_new_tokens} tokens, greedy"
             + (f", rollback below p={args.rollback}" if args.rollback is not None else ""), "",
             "| tau | large-model token fraction | token agreement with large alone | mean common prefix | tokens/s |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tau']:.2f} | {r['large_model_fraction']:.2f} | {r['token_agreement']:.2f} | "
                     f"{r['mean_common_prefix']:.1f} | {r['tokens_per_s']:.1f} |")
    lines.append(f"\nLarge model alone: {rows[0]['large_alone_tokens_per_s']:.1f} tokens/s.")
    table = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deferral.json").write_text(json.dumps({"environment": environment(), "arguments": vars(args), "rows": rows}, indent=1))
    (out / "deferral.md").write_text(table)
    _plot(rows, out / "deferral.png")
    print(table)
    return 0


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["large_model_fraction"] for r in rows], [r["token_agreement"] for r in rows], marker="o")
    for r in rows:
        ax.annotate(f"τ={r['tau']}", (r["large_model_fraction"], r["token_agreement"]), fontsize=8)
    ax.set_xlabel("fraction of tokens that needed the large model")
    ax.set_ylabel("agreement with the large model alone")
    ax.set_title("confidence deferral")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
