"""``cospec bench``: cospec against Hugging Face on real workloads, interleaved prompt by prompt in one process.

For every workload and batch size, each batch of prompts runs through every system (in an order rotated from one
batch to the next, so that slow drifts of a shared machine hit all systems alike). Speedups are pairwise: a
system's tokens/s on a batch divided by HF plain's on the same batch; the table reports their median.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks import report, workloads
from benchmarks.common import RSSPeakSampler, environment, peak_rss_bytes
from benchmarks.systems import FUSION_SYSTEMS, SYSTEMS, UnsupportedError, make_system, truncated_copy
from cospec.engine.cpu_threads import thread_choices

DEFAULT_METHODS = ("hf", "hf_prompt_lookup", "hf_assisted", "cospec", "cospec_prompt_lookup", "cospec_self_spec",
                   "cospec_draft", "cospec_eagle")
QUICK = {"workloads": ["rewrite"], "num_prompts": 2, "max_new_tokens": 32, "batch_sizes": [1, 2],
         "methods": ["hf", "hf_prompt_lookup", "cospec", "cospec_prompt_lookup"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model name or path (default: the embedded SmolLM2)")
    parser.add_argument("--workloads", nargs="+", default=["humaneval", "rewrite", "mtbench", "sharegpt"],
                        choices=workloads.WORKLOADS)
    parser.add_argument("--num-prompts", type=int, default=2, help="prompts per workload")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=SYSTEMS)
    parser.add_argument("--draft-layers", type=int, default=6,
                        help="layers of the truncated target copy that stands in for a small draft model")
    parser.add_argument("--self-spec-layers", type=int, default=8)
    parser.add_argument("--num-draft-tokens", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda)")
    parser.add_argument("--out", default=None, help="results folder (default bench_results/<time>)")
    parser.add_argument("--quick", action="store_true", help="a small run (under 2 minutes) for smoke tests")


def run(args: argparse.Namespace) -> Path:
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    from cospec.engine.models import load_model

    model, tokenizer = load_model(args.model, device=args.device)
    tokenizer.padding_side = "left"
    needs_draft = {"hf_assisted", "cospec_draft"} & set(args.methods)
    draft = truncated_copy(model, args.draft_layers) if needs_draft else None
    ngram = _stdlib_ngram(model, tokenizer, args.model) if set(FUSION_SYSTEMS) & set(args.methods) else None
    max_batch = max(args.batch_sizes)
    systems = {name: make_system(name, model, tokenizer, max_batch, draft, args.self_spec_layers,
                                 args.num_draft_tokens, ngram) for name in args.methods}
    prompts = {w: [_encode(tokenizer, text) for text in workloads.load(w, args.num_prompts, args.seed)]
               for w in args.workloads}
    out_dir = Path(args.out or Path("bench_results") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)

    records = []
    total = sum(len(range(0, len(p), b)) for p in prompts.values() for b in args.batch_sizes) * len(systems)
    sampler = RSSPeakSampler()
    with sampler, tqdm(total=total, desc="cospec bench", unit="run") as bar:
        rotation = 0
        for workload, workload_prompts in prompts.items():
            for batch_size in args.batch_sizes:
                for start, batch in batches(workload_prompts, batch_size):
                    names = list(systems)
                    rotation += 1
                    names = names[rotation % len(names):] + names[: rotation % len(names)]
                    for name in names:
                        records.append(_measure(systems[name], name, workload, batch_size, start, batch,
                                                args.max_new_tokens, sampler))
                        bar.update()
    # The CPU setting cospec's checks ended on moves whole runs (threads, row plan or F.linear): kept with them.
    results = {"environment": environment(), "arguments": {k: v for k, v in vars(args).items() if not callable(v)},
               "records": records, "process_peak_rss_bytes": peak_rss_bytes(),
               "cospec_cpu_settings": [choice.describe() for choice in thread_choices()]}
    results["summary"] = report.summarize(records)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    markdown = report.markdown(results)
    (out_dir / "results.md").write_text(markdown)
    report.plots(results, out_dir)
    print(markdown)
    print(f"results in {out_dir}{os.sep}")
    return out_dir


def batches(prompts: list, batch_size: int) -> list[tuple[int, list]]:
    """(start, batch) pairs covering ``prompts``; every batch holds ``batch_size`` requests, so the last one (or the
    only one, with fewer prompts than the batch size) repeats prompts from the start of the list."""
    return [(start, [prompts[(start + i) % len(prompts)] for i in range(batch_size)])
            for start in range(0, len(prompts), batch_size)]


def _stdlib_ngram(model, tokenizer, model_name: str):
    """The standard-library 4-gram model for this tokenizer (built once, about half a minute, then cached)."""
    from benchmarks.bench_fusion_quality import make_domain, ngram_model

    options = argparse.Namespace(order=4, max_corpus_tokens=10_000_000, rebuild=False)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    return ngram_model(make_domain("stdlib"), tokenizer, Path(model_name).name, vocab_size, options)[0]


def _encode(tokenizer, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(text)["input_ids"]


def _measure(system, name, workload, batch_size, start, batch, max_new_tokens, sampler) -> dict:
    record = {"system": name, "workload": workload, "batch_size": batch_size, "batch_start": start,
              "num_prompts": len(batch)}
    try:
        with sampler.measure() as memory:
            result = system.run(batch, max_new_tokens)
    except UnsupportedError as error:
        record["unsupported"] = str(error)
        return record
    record.update({
        "seconds": result.seconds, "num_tokens": result.num_tokens, "tokens_per_s": result.num_tokens / result.seconds,
        "ttft_s": result.ttft, "tpot_s": _tpot(result, batch_size), "outputs": result.outputs,
        "target_forwards": result.num_target_forwards, "num_drafted": result.num_drafted,
        "num_accepted": result.num_accepted, "acceptance_histogram": result.acceptance_histogram,
        "rss_increase_bytes": memory.increase, "rss_peak_bytes": memory.peak,
    })
    return record


def _tpot(result, batch_size: int) -> float | None:
    if result.ttft is None:
        return None
    per_request = max(len(o) for o in result.outputs)
    return (result.seconds - result.ttft) / max(per_request - 1, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
