"""pytest-benchmark micro-benchmarks of kernels (torch reference, and Triton where CUDA is present) and proposers.

    python -m pytest benchmarks/micro --benchmark-only            # not part of the test suite (tests/ only)
"""

import pytest
import torch

from cospec.decoding.draft_length import DraftLengthPolicy
from cospec.decoding.fusion import FusionSpec, fusion_tensors
from cospec.decoding.ngram_model import NgramLM
from cospec.decoding.prompt_lookup import find_ngram_draft
from cospec.kernels import fuse_sample_kernel, rejection_sample_kernel, store_kv_kernel, verify_greedy_kernel

VOCAB = 49152  # SmolLM2's
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLS = ["reference", "triton"]


def _impl(device, impl, module, name):
    if impl == "triton" and device != "cuda":
        pytest.skip("Triton runs compiled only on CUDA (the interpreter is for correctness, not speed)")
    fn = getattr(module, name if impl == "triton" else f"{name}_ref")
    if device == "cuda":
        def timed(*args):
            out = fn(*args)
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
