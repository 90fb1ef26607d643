"""Every Triton kernel against its torch reference on real devices: compiled on CUDA (or interpreted on the CPU
with TRITON_INTERPRET=1), with vocabularies that are not powers of two and k from 1 to 16.

    python -m benchmarks.gpu_kernel_check [--device cuda] [--out DIR]

Exits 1 if any case differs; writes kernel_check.json to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cospec.decoding.fusion import FusionSpec, fusion_tensors
from cospec.kernels import fuse_sample_kernel, rejection_sample_kernel, store_kv_kernel, verify_greedy_kernel

VOCABS = [1000, 4099, 49152]
DRAFT_PATTERNS = [[1], [4, 0, 8], [16, 1, 4, 0, 8]]
DTYPES = [torch.float32, torch.bfloat16]


def _ragged(pattern, vocab, dtype, gen):
    cu = torch.tensor([0] + pattern).cumsum(0)
    num_drafts, batch = int(cu[-1]), len(pattern)
    target = torch.softmax(2 * torch.randn(num_drafts + batch, vocab, generator=gen), -1).to(dtype)
    draft = torch.softmax(2 * torch.randn(num_drafts, vocab, generator=gen), -1).to(dtype)
    draft_ids = torch.randint(0, vocab, (num_drafts,), generator=gen)
    uniform = torch.rand(num_drafts, generator=gen)
    noise = torch.empty(num_drafts + batch, vocab).exponential_(generator=gen).clamp_min(1e-6)
    return target, draft, draft_ids, cu, uniform, noise


def _cases(device: torch.device):
    gen = torch.Generator().manual_seed(0)
    for rows, heads, dim in [(1, 1, 64), (37, 3, 64), (129, 8, 128), (5, 2, 24)]:
        for dtype in [torch.float32, torch.bfloat16, torch.float16]:
            key, value = (torch.randn(rows, heads, dim, generator=gen).to(dtype) for _ in range(2))
            slots = torch.randperm(4 * rows, generator=gen)[:rows]
            caches = [torch.zeros(4 * rows, heads, dim, dtype=dtype) for _ in range(4)]
            args = [t.to(device) for t in (key, value)]
            store_kv_kernel.store_kv(*args, caches[0].to(device), caches[1].to(device), slots.to(device))
            out_k, out_v = caches[0].to(device), caches[1].to(device)
            store_kv_kernel.store_kv(*args, out_k, out_v, slots.to(device))
            ref_k, ref_v = caches[2].to(device), caches[3].to(device)
            store_kv_kernel.store_kv_ref(*args, ref_k, ref_v, slots.to(device))
            yield f"store_kv rows={rows} heads={heads} dim={dim} {dtype}", torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)
    for vocab in VOCABS:
        for pattern in DRAFT_PATTERNS:
            for dtype in DTYPES:
                target, draft, ids, cu, uniform, noise = (t.to(device) for t in _ragged(pattern, vocab, dtype, gen))
                max_k = max(pattern)
                argmax = target.float().argmax(-1)
                ok = torch.equal(verify_greedy_kernel.verify_greedy(argmax, ids, cu, max_k),
                                 verify_greedy_kernel.verify_greedy_ref(argmax, ids, cu, max_k))
                yield f"verify_greedy vocab={vocab} k={pattern}", ok
                for probs in (draft, None):
                    args = (target, probs, ids, cu, uniform, noise, max_k)
                    ok = torch.equal(rejection_sample_kernel.rejection_sample(*args),
                                     rejection_sample_kernel.rejection_sample_ref(*args))
                    yield f"rejection_sample vocab={vocab} k={pattern} {dtype} draft_probs={probs is not None}", ok
        for rows in [1, 7, 33]:
            specs = [[FusionSpec.proxy_tuning(1.0), FusionSpec.mixture([0.5, 0.3, 0.2]), FusionSpec.dexperts(0.5)][i % 3]
                     for i in range(rows)]
            params = fusion_tensors(specs, device=device)
            logits = (3 * torch.randn(3, rows, vocab, generator=gen)).to(device)
            temperature = torch.tensor([[0.0, 0.7, 1.0][i % 3] for i in range(rows)], device=device)
            noise = torch.empty(rows, vocab).exponential_(generator=gen).clamp_min(1e-6).to(device)
            args = (logits, params.weights, temperature, noise, params.plausibility_alpha, params.is_mixture)
            ok = torch.equal(fuse_sample_kernel.fuse_sample(*args), fuse_sample_kernel.fuse_sample_ref(*args))
            yield f"fuse_sample vocab={vocab} rows={rows}", ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_results/kernel_check")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    results = [{"case": name, "equal": bool(ok)} for name, ok in _cases(device)]
    failed = [r["case"] for r in results if not r["equal"]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"device": str(device), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "cases": len(results), "failed": failed, "seconds": time.perf_counter() - start, "results": results}
    (out / "kernel_check.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(results) - len(failed)}/{len(results)} kernel cases equal their references on {device}"
          + (f"; differing: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
