"""Keyed noise: the Triton kernel (interpreter) against the torch reference, the reference against the hash written
out in plain Python, and the statistics of the noise (Exp(1), independent across keys and tokens)."""

import math

import pytest
import torch

from cospec.decoding.sampling import STREAM_ACCEPT, STREAM_DRAFT, STREAM_TARGET, noise_keys, uniform_noise
from cospec.kernels import keyed_noise_kernel as noise_mod

triton = pytest.importorskip("triton")

_M32 = 0xFFFFFFFF
_KEYS = [0, 1, 12345678901234567, (1 << 63) - 1, -(1 << 63), -1]  # int64 keys use all 64 bits
_VOCAB_PARAMS = [1, 50, 1000, 4099]  # none a power of two but 1; 4099 spans five 1024-wide blocks


def _fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def _python_noise(key: int, token: int) -> float:
    key &= (1 << 64) - 1
    x = _fmix32(_fmix32(((token * 0x9E3779B9) & _M32) ^ (key & _M32)) ^ (key >> 32))
    return -math.log(((x >> 9) + 0.5) / 2**23)


def test_reference_is_the_documented_hash():
    keys = torch.tensor(_KEYS, dtype=torch.int64)
    noise = noise_mod.keyed_exponential_ref(keys, 300, torch.float64)
    for row, key in enumerate(_KEYS):
        for token in (0, 1, 2, 157, 299):
            assert noise[row, token].item() == pytest.approx(_python_noise(key, token), rel=1e-15)


@pytest.mark.parametrize("vocab_size", _VOCAB_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_reference(monkeypatch, vocab_size, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    keys = torch.tensor(_KEYS, dtype=torch.int64)
    expected = noise_mod.keyed_exponential_ref(keys, vocab_size, dtype)
    actual = noise_mod.keyed_exponential(keys, vocab_size, dtype)
    assert actual.dtype == dtype and actual.shape == (len(_KEYS), vocab_size)
    # The same 23-bit uniforms; only the rounding of log may differ (numpy's vs torch's).
    torch.testing.assert_close(actual, expected, rtol=5e-7 if dtype == torch.float32 else 1e-15,
                               atol=1e-7 if dtype == torch.float32 else 0)


def test_launcher_checks_its_inputs():
    with pytest.raises(ValueError, match="keys must be 1-D int64"):
        noise_mod.keyed_exponential(torch.zeros(3, dtype=torch.int32), 10)
    with pytest.raises(ValueError, match="vocab_size"):
        noise_mod.keyed_exponential_ref(torch.zeros(3, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="dtype"):
        noise_mod.keyed_exponential_ref(torch.zeros(3, dtype=torch.int64), 10, torch.float16)


def test_noise_is_exponential_and_independent():
    keys = noise_keys(torch.full((64,), 7), torch.arange(64), STREAM_TARGET)
    noise = noise_mod.keyed_exponential_ref(keys, 4096, torch.float64)  # 262k variates
    assert float(noise.min()) > 0 and float(noise.max()) < 17
    assert noise.mean().item() == pytest.approx(1.0, abs=0.01)
    assert noise.var().item() == pytest.approx(1.0, abs=0.02)
    # Kolmogorov-Smirnov against Exp(1): the 1e-3 critical value is 1.95 / sqrt(n).
    sorted_noise = noise.flatten().sort().values
    n = sorted_noise.numel()
    cdf = 1 - torch.exp(-sorted_noise)
    ks = float(torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max())
    assert ks < 1.95 / math.sqrt(n)
    # Neighbouring rows (positions) and neighbouring tokens are uncorrelated.
    centred = noise - 1
    assert abs(float((centred[1:] * centred[:-1]).mean())) < 0.01
    assert abs(float((centred[:, 1:] * centred[:, :-1]).mean())) < 0.01


def test_keys_separate_seeds_positions_and_streams():
    seeds, positions = torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0])
    keys = {stream: noise_keys(seeds, positions, stream).tolist() for stream in (STREAM_TARGET, STREAM_DRAFT, STREAM_ACCEPT)}
    everything = [k for stream_keys in keys.values() for k in stream_keys]
    assert len(set(everything)) == len(everything)
    assert noise_keys(seeds, positions, STREAM_TARGET).tolist() == keys[STREAM_TARGET]  # pure function
    uniforms = uniform_noise(noise_keys(torch.arange(20000), torch.zeros(20000, dtype=torch.int64), STREAM_ACCEPT),
                             torch.float64)
    assert 0 < float(uniforms.min()) and float(uniforms.max()) < 1
    assert uniforms.mean().item() == pytest.approx(0.5, abs=0.01)
