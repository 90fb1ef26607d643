"""pytest-benchmark micro-benchmarks of kernels (torch reference, and Triton where CUDA is present) and proposers.

    python -m pytest benchmarks/micro --benchmark-only            # not part of the test suite (tests/ only)
"""

import pytest
import torch

from cospec.decoding.draft_length import DraftLengthPolicy
from cospec.decoding.fusion import FusionSpec, fusion_tensors
from cospec.decoding.ngram_model import NgramLM
from cospec.decoding.prompt_lookup import find_ngram_draft
from benchmarks.gpu_kernel_check import paged_batch
from cospec.kernels.paged_attention_ref import GatherLayout
from cospec.kernels import (fuse_sample_kernel, paged_attention_kernel, rejection_sample_kernel, store_kv_kernel,
                            verify_greedy_kernel)

VOCAB = 49152  # SmolLM2's
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLS = ["reference", "triton"]


def _impl(device, impl, module, name):
    if impl == "triton" and device != "cuda":
        pytest.skip("Triton runs compiled only on CUDA (the interpreter is for correctness, not speed)")
    fn = getattr(module, name if impl == "triton" else f"{name}_ref")
    if device == "cuda":
        def timed(*args, **kwargs):
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            return out
        return timed
    return fn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_tokens", [1, 64])
def test_store_kv(benchmark, device, impl, num_tokens):
    key = torch.randn(num_tokens, 3, 64, device=device)
    cache = torch.zeros(4096, 3, 64, device=device)
    slots = torch.randperm(4096, device=device)[:num_tokens]
    benchmark(_impl(device, impl, store_kv_kernel, "store_kv"), key, key, cache, cache.clone(), slots)


def _windows(batch, k, device):
    gen = torch.Generator().manual_seed(0)
    cu = torch.arange(batch + 1) * k
    target = torch.softmax(torch.randn(batch * (k + 1), VOCAB, generator=gen), -1)
    draft = torch.softmax(torch.randn(batch * k, VOCAB, generator=gen), -1)
    ids = torch.randint(0, VOCAB, (batch * k,), generator=gen)
    uniform = torch.rand(batch * k, generator=gen)
    noise = torch.empty(batch * (k + 1), VOCAB).exponential_(generator=gen)
    return [t.to(device) for t in (target, draft, ids, cu, uniform, noise)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,k", [(1, 8), (8, 4)])
def test_rejection_sample(benchmark, device, impl, batch, k):
    target, draft, ids, cu, uniform, noise = _windows(batch, k, device)
    benchmark(_impl(device, impl, rejection_sample_kernel, "rejection_sample"), target, draft, ids, cu, uniform, noise, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_verify_greedy(benchmark, device, impl):
    target, _, ids, cu, _, _ = _windows(8, 4, device)
    argmax = target.argmax(-1)
    benchmark(_impl(device, impl, verify_greedy_kernel, "verify_greedy"), argmax, ids, cu, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_fuse_sample(benchmark, device, impl):
    specs = [FusionSpec.proxy_tuning(1.0)] * 8
    params = fusion_tensors(specs, device=device)
    logits = torch.randn(3, 8, VOCAB, device=device)
    temperature = torch.full((8,), 0.7, device=device)
    noise = torch.empty(8, VOCAB, device=device).exponential_()
    benchmark(_impl(device, impl, fuse_sample_kernel, "fuse_sample"), logits, params.weights, temperature, noise,
              params.plausibility_alpha, params.is_mixture)


_PAGED_SHAPES = {  # name: (num_seqs, q_len, seq_len); Llama-8B-like heads (32 query, 8 KV, dim 128) on CUDA
    "decode-64x2k": (64, 1, 2048),
    "verify8-64x2k": (64, 8, 2048),
    "decode-1x16k": (1, 1, 16384),  # split-K
    "prefill-2x1k": (2, 1024, 1024),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(_PAGED_SHAPES))
def test_paged_attention(benchmark, device, impl, shape):
    """One layer's attention: the Triton kernel reading pages in place against the reference's gather + SDPA
    (with its gather indices prebuilt, as the engine shares them across layers). bfloat16 on CUDA; on the CPU
    the reference alone, at 1/8 of the context and a quarter of the heads."""
    num_seqs, q_len, seq_len = _PAGED_SHAPES[shape]
    heads, kv_heads, dim, dtype = (32, 8, 128, torch.bfloat16) if device == "cuda" else (8, 2, 128, torch.float32)
    if device != "cuda":
        q_len, seq_len = min(q_len, seq_len // 8), seq_len // 8
    gen = torch.Generator(device=device).manual_seed(0)
    query, k_pool, v_pool, tables, lens, qsl = paged_batch([q_len] * num_seqs, [seq_len] * num_seqs, heads, kv_heads,
                                                           dim, 16, dtype, gen)
    args = (query, k_pool, v_pool, tables, lens, qsl, 16)
    run = _impl(device, impl, paged_attention_kernel, "paged_attention")
    if impl == "reference":
        layout = GatherLayout(tables, lens, qsl, 16, q_len, seq_len, query.shape[0])
        kwargs = {"layout": layout}
    else:
        kwargs = {"max_kv_len": seq_len}
    run(*args, **kwargs)  # untimed: compiles the kernel, builds the layout's indices
    benchmark(run, *args, **kwargs)


@pytest.mark.parametrize("context", [512, 4000])
def test_prompt_lookup_draft(benchmark, context):
    tokens = torch.randint(0, VOCAB, (context,))
    tokens[-3:] = tokens[100:103]  # a match to find
    benchmark(find_ngram_draft, tokens, 10)


def test_ngram_model_next_token_logprobs(benchmark):
    gen = torch.Generator().manual_seed(0)
    corpus = [torch.randint(0, 2000, (5000,), generator=gen).tolist() for _ in range(20)]
    model = NgramLM.build(corpus, vocab_size=VOCAB, order=4)
    contexts = [corpus[0][:100], corpus[1][:50]] * 4
    benchmark(model.next_token_logprobs, contexts)


def test_draft_length_policy(benchmark):
    policy = DraftLengthPolicy(max_draft_tokens=16)
    for seq in range(32):
        policy.record(seq, 8, seq % 9)
        policy.costs.observe_forward(32 + seq, 0.03 + 0.002 * seq)
    benchmark(policy.choose, list(range(32)))
