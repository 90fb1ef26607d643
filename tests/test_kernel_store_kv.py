import pytest
import torch

from cospec.kernels import store_kv_kernel as store_kv_mod

triton = pytest.importorskip("triton")

_SHAPE_PARAMS = [  # (num_tokens, num_kv_heads, head_dim, num_slots)
    (1, 1, 8, 16),
    (7, 3, 64, 64),
    (33, 2, 24, 128),  # odd head_dim: row size not a power of two
]
_DTYPE_PARAMS = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("num_tokens,heads,dim,num_slots", _SHAPE_PARAMS)
@pytest.mark.parametrize("dtype", _DTYPE_PARAMS)
def test_store_kv_matches_reference(num_tokens, heads, dim, num_slots, dtype):
    gen = torch.Generator().manual_seed(num_tokens * 131 + dim)
    key = torch.randn(num_tokens, heads, dim, generator=gen).to(dtype)
    value = torch.randn(num_tokens, heads, dim, generator=gen).to(dtype)
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens].to(torch.int64)
    slots[::5] = -1  # padding tokens are not stored
    caches = [torch.zeros(num_slots, heads, dim, dtype=dtype) for _ in range(4)]
    store_kv_mod.store_kv(key, value, caches[0], caches[1], slots)
    store_kv_mod.store_kv_ref(key, value, caches[2], caches[3], slots)
    torch.testing.assert_close(caches[0], caches[2], rtol=0, atol=0)
    torch.testing.assert_close(caches[1], caches[3], rtol=0, atol=0)
    written = slots[slots >= 0]
    assert torch.equal(caches[2][written], key[slots >= 0])


def test_store_kv_non_contiguous_key():
    key = torch.randn(5, 4, 2, 16).select(2, 1)  # [5, 4, 16] with a gap between heads
    value = torch.randn(5, 4, 16)
    slots = torch.tensor([3, 0, 9, 4, 1])
    a = [torch.zeros(10, 4, 16) for _ in range(4)]
    store_kv_mod.store_kv(key, value, a[0], a[1], slots)
    store_kv_mod.store_kv_ref(key, value, a[2], a[3], slots)
    assert torch.equal(a[0], a[2]) and torch.equal(a[1], a[3])


def test_store_kv_rejects_bad_shapes():
    key = torch.randn(3, 2, 8)
    cache = torch.zeros(8, 2, 8)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv_mod.store_kv_ref(key, key, cache, cache, torch.tensor([0, 1], dtype=torch.int64))
    with pytest.raises(ValueError, match="caches"):
        store_kv_mod.store_kv_ref(key, key, torch.zeros(8, 3, 8), torch.zeros(8, 3, 8), torch.arange(3))


@pytest.mark.parametrize("has_padding", [None, False])
def test_store_kv_ref_told_there_is_no_padding_stores_the_same(has_padding):
    gen = torch.Generator().manual_seed(3)
    key, value = torch.randn(6, 2, 8, generator=gen), torch.randn(6, 2, 8, generator=gen)
    slots = torch.randperm(12, generator=gen)[:6]
    expected = [torch.zeros(12, 2, 8) for _ in range(2)]
    expected[0][slots], expected[1][slots] = key, value
    caches = [torch.zeros(12, 2, 8) for _ in range(2)]
    store_kv_mod.store_kv_ref(key, value, *caches, slots, has_padding=has_padding)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


def test_paged_cache_checks_the_first_layer_of_each_step():
    from types import SimpleNamespace

    from cospec.engine.kv_cache import PagedCache

    pool = SimpleNamespace(k=[torch.zeros(8, 2, 4) for _ in range(2)], v=[torch.zeros(8, 2, 4) for _ in range(2)])
    cache = PagedCache(pool)
    states = torch.randn(1, 2, 3, 4)  # [1, kv_heads, num_tokens, head_dim]
    cache.start_step(torch.tensor([5, 0, 2]))
    cache.update(states, states, 0)
    cache.update(states, states, 1)  # checked in layer 0: skipped
    assert torch.equal(pool.k[1][[5, 0, 2]], states[0].transpose(0, 1))
    cache.start_step(torch.tensor([5, 0]))  # a new step: its first layer is checked again
    with pytest.raises(ValueError, match="slot_mapping"):
        cache.update(states, states, 0)
