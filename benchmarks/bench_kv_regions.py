"""What reading the KV cache in place saves: ``cospec.generate`` with each row's KV in a region of its own (the
default; the CPU attention reads the batch as a strided view of the pool) against one shared pool (attention gathers
every sequence's keys and values at every layer and step), interleaved in one process, same model and prompts.

    python -m benchmarks.bench_kv_regions --batch-size 8 --max-new-tokens 128 --repeats 4
    python -m benchmarks.bench_kv_regions --batch-size 4 --prompt-repeats 8 --max-new-tokens 64   # longer contexts

Reports each layout's seconds per run, the median ratio regions / shared (below 1: regions faster) and whether the
outputs are identical (they must be).
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

import cospec
import cospec.engine.generate as generate_module
from benchmarks.bench_plain import make_batches
from cospec.engine.config import EngineConfig
from cospec.engine.models import load_model


def shared_pool_config(batch: dict[str, torch.Tensor], max_new_tokens: int):
    """An EngineConfig factory that turns generate()'s regions into one shared pool of the same rows' blocks."""
    def make(**kwargs):
        if "kv_region_tokens" in kwargs:
            kwargs.pop("kv_region_tokens")
            block_size = kwargs["block_size"]
            rows, width = batch["input_ids"].shape
            kwargs["num_kv_blocks"] = rows * -(-(width + max_new_tokens) // block_size)
        return EngineConfig(**kwargs)
    return make


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompt-repeats", type=int, default=1, help="repeat each prompt's tokens (longer contexts)")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    tokenizer.padding_side = "left"
    batch = make_batches(tokenizer, args.batch_size, 1)[0]
    batch = {name: tensor.repeat(1, args.prompt_repeats) for name, tensor in batch.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad)
    shared = shared_pool_config(batch, args.max_new_tokens)
    outputs, seconds = {}, {"regions": [], "shared": []}

    def run(layout: str) -> float:
        with mock.patch.object(generate_module, "EngineConfig", EngineConfig if layout == "regions" else shared):
            start = time.perf_counter()
            outputs[layout] = cospec.generate(model, **batch, **kwargs)
            return time.perf_counter() - start

    run("regions"), run("shared")  # warm-up
    for repeat in range(args.repeats):
        for layout in ("regions", "shared") if repeat % 2 == 0 else ("shared", "regions"):
            seconds[layout].append(run(layout))
    ratio = statistics.median(r / s for r, s in zip(seconds["regions"], seconds["shared"]))
    identical = torch.equal(outputs["regions"], outputs["shared"])
    print(f"{args.batch_size} rows x {batch['input_ids'].shape[1]} prompt tokens + {args.max_new_tokens} new; "
          f"seconds per run: regions {[round(x, 2) for x in seconds['regions']]}, "
          f"shared {[round(x, 2) for x in seconds['shared']]}")
    print(f"regions / shared time: {ratio:.3f} (median of {args.repeats}); outputs identical: {identical}")
    return {"seconds": seconds, "ratio": ratio, "identical": identical}


if __name__ == "__main__":
    main()
