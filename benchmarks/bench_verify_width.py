"""What verifying drafts costs: the time of one HF forward over 1, 2, 3, 4 and 8 new tokens after a cached context.

Speculation pays when ``1 + accepted drafts`` tokens per step outweigh how much longer the wider forward takes. On a
GPU a decode forward is memory-bound and a few more rows are almost free; on a CPU in float32 they may not be (MKL's
small-row matrix products), and this measures by how much. Plain HF (``DynamicCache``, ``F.linear``), so the figure
is the model's and the machine's, not cospec's. Widths are interleaved, repeats give the median.

    python -m benchmarks.bench_verify_width --model smollm2-135m --context 100 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from transformers import DynamicCache

    from cospec.engine.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=100, help="tokens already in the cache")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    model, _ = load_model(args.model)
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(0, vocab, (1, args.context), generator=generator)
    times: dict[int, list[float]] = {w: [] for w in args.widths}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for width in args.widths:  # interleaved: a noisy moment hits every width alike
                cache = DynamicCache()
                model(context, past_key_values=cache, use_cache=True)
                new = torch.randint(0, vocab, (1, width), generator=generator)
                start = time.perf_counter()
                model(new, past_key_values=cache, use_cache=True, logits_to_keep=width)
                times[width].append(time.perf_counter() - start)
    base = statistics.median(times[args.widths[0]])
    print(f"{args.model}, {args.context} cached tokens, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    print(f"| new tokens | ms | / {args.widths[0]} token(s) |\n|---:|---:|---:|")
    for width in args.widths:
        median = statistics.median(times[width])
        print(f"| {width} | {1e3 * median:.1f} | {median / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
