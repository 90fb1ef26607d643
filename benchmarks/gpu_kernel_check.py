"""Every Triton kernel against its torch reference on real devices: compiled on CUDA (or interpreted on the CPU
with TRITON_INTERPRET=1), with vocabularies that are not powers of two and k from 1 to 16; paged attention over
ragged windows, GQA, head dims 64/80/128, sliding windows, soft-capping and split-K, within a tolerance per dtype;
and the engine's forward on the device (paged attention through the dispatch) against HF's logits.

    python -m benchmarks.gpu_kernel_check [--device cuda] [--out DIR]

Exits 1 if any case differs; writes kernel_check.json to --out. On the CPU the paged-attention shapes are small
(the interpreter is slow) and the engine runs the reference path.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cospec import kernels
from cospec.decoding.fusion import FusionSpec, fusion_tensors
from cospec.kernels import (fuse_sample_kernel, paged_attention_kernel, rejection_sample_kernel, store_kv_kernel,
                            verify_greedy_kernel)

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


# Paged attention: (dtype, atol, rtol) against the reference computed in float32 from the same inputs.
PAGED_DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 2e-2, 2e-2), (torch.float16, 4e-3, 4e-3)]
PAGED_HEADS = [(32, 8, 128), (16, 16, 64), (12, 4, 80), (8, 2, 64)]  # (heads, kv_heads, head_dim): GQA 4, 1, 3, 4
PAGED_VARIANTS = [(None, None), (1000, None), (None, 30.0), (64, 50.0)]  # (sliding_window, softcap)


def paged_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, gen):
    """(query, k_pool, v_pool, block_tables, seq_lens, query_start_loc) of a ragged batch on ``gen``'s device whose
    blocks are scattered over the pool in random order (a pool with 8 spare blocks)."""
    device = gen.device
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 8
    order = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device=device)
    for s, nb in enumerate(blocks):
        tables[s, :nb] = order[sum(blocks[:s]):sum(blocks[:s]) + nb]
    pools = [torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=gen, device=device).to(dtype)
             for _ in range(2)]
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen, device=device).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    query_start_loc = torch.tensor([0, *q_lens], device=device).cumsum(0).to(torch.int32)
    return query, *pools, tables, lens, query_start_loc


def _paged_attention_cases(device: torch.device):
    gen = torch.Generator(device=device).manual_seed(1)
    on_gpu = device.type == "cuda"
    # The interpreter (CPU) multiplies bfloat16 tiles wrongly in tl.dot; compiled Triton does not.
    dtypes = PAGED_DTYPES if on_gpu else [d for d in PAGED_DTYPES if d[0] != torch.bfloat16]
    windows = [  # (name, q_lens, seq_lens)
        ("decode", [1] * 8, [4000, 17, 1, 2049, 3000, 999, 64, 4096] if on_gpu else [70, 17, 1, 33, 5, 9, 2, 40]),
        ("ragged", [1, 16, 5, 8, 3, 16], [1500, 16, 700, 33, 9, 2100] if on_gpu else [50, 16, 40, 33, 9, 21]),
        ("prefill", [512, 37] if on_gpu else [24, 13], [512, 1061] if on_gpu else [24, 45]),
    ]
    # Every dtype x head layout without variants, then the variants (and a forced split-K) on one head layout:
    # each combination of dtype, head layout and variant flags is a compilation (~1-2 s), so not a full product.
    cases = [(dtype_tol, heads, (None, None), (None,)) for dtype_tol in dtypes
             for heads in (PAGED_HEADS if on_gpu else PAGED_HEADS[2:])]
    cases += [(dtype_tol, PAGED_HEADS[2], variant, (None, 4)) for dtype_tol in dtypes[:2] for variant in PAGED_VARIANTS]
    for (dtype, atol, rtol), (heads, kv_heads, dim), (sliding_window, softcap), splits in cases:
        for name, q_lens, seq_lens in windows:
            args = paged_batch(q_lens, seq_lens, heads, kv_heads, dim, 16, dtype, gen)
            ref = paged_attention_kernel.paged_attention_ref(
                *(t.float() if t.is_floating_point() else t for t in args), 16, None, sliding_window, softcap)
            for num_splits in splits:  # None: the launcher's choice (split-K for the decode batch on a GPU)
                out = paged_attention_kernel.paged_attention(*args, 16, None, sliding_window, softcap,
                                                             num_splits=num_splits)
                diff = (out.float() - ref).abs().max().item()
                ok = bool(torch.isfinite(out).all()) and torch.allclose(out.float(), ref, atol=atol, rtol=rtol)
                yield (f"paged_attention {name} heads={heads}/{kv_heads} dim={dim} {dtype} window={sliding_window} "
                       f"softcap={softcap} splits={num_splits} max_diff={diff:.2e}"), ok


def _engine_cases(device: torch.device):
    """The engine's ragged forward on ``device`` (paged attention through the dispatch: the Triton kernel on CUDA)
    against HF's own forward of each sequence alone: a prefill, then a 4-token verify window, float32."""
    import transformers as tf

    from cospec.decoding.protocols import ForwardItem
    from cospec.engine.block_manager import BlockManager
    from cospec.engine.model_runner import ModelRunner

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=257, max_position_embeddings=512, eos_token_id=None,
                  bos_token_id=None, pad_token_id=0)
    families = [  # (name, config, model class, HF attention): GQA with head_dim 80, a sliding window, soft-capping
        ("llama", tf.LlamaConfig(**common, head_dim=80), tf.LlamaForCausalLM, "sdpa"),
        ("mistral", tf.MistralConfig(**common, sliding_window=16), tf.MistralForCausalLM, "sdpa"),
        ("gemma2", tf.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                                   attn_logit_softcapping=5.0, final_logit_softcapping=None), tf.Gemma2ForCausalLM,
         "eager"),
    ]
    gen = torch.Generator().manual_seed(2)
    for name, config, model_cls, attn in families:
        torch.manual_seed(0)
        model = model_cls._from_config(config, attn_implementation=attn, dtype=torch.float32).to(device).eval()
        bm = BlockManager(num_blocks=64, block_size=16)
        runner = ModelRunner(model, bm, 64, torch.float32, fast_cpu_linear=False)
        prompts = [torch.randint(1, 257, (n,), generator=gen).tolist() for n in (5, 37, 20)]
        windows = [torch.randint(1, 257, (4,), generator=gen).tolist() for _ in prompts]
        worst = 0.0
        for step in range(2):
            items = []
            for seq_id, (prompt, window) in enumerate(zip(prompts, windows)):
                start, tokens = (0, prompt) if step == 0 else (len(prompt), window)
                bm.grow(seq_id, start + len(tokens))
                items.append(ForwardItem(seq_id, tokens, start, len(tokens)))
            with torch.inference_mode():
                got = runner.forward(items)
                expected = torch.cat([
                    model(torch.tensor([p + (w if step else [])], device=device)).logits[0, -len(it.token_ids):]
                    for p, w, it in zip(prompts, windows, items)])
            worst = max(worst, (got - expected).abs().max().item())
        yield (f"engine {name} on {device} (paged attention: {kernels.backend_name(device)}) "
               f"max_logit_diff={worst:.2e}"), worst < 1e-3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_results/kernel_check")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    cases = itertools.chain(_cases(device), _paged_attention_cases(device), _engine_cases(device))
    results = [{"case": name, "equal": bool(ok)} for name, ok in tqdm(cases, desc="kernel cases", unit="case")]
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
