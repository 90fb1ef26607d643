"""Row max / argmax on the CPU through chunk maxima: the same values and indices as torch.max(dim=-1), ties (the
lowest index), NaN and infinities included, for every width (those without a usable chunk size go through torch)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cospec import kernels
from cospec.kernels import row_max_cpu
from cospec.kernels.row_max_cpu import chunk_size, row_max_chunked, row_max_ref


@pytest.fixture(autouse=True)
def _chunks_at_every_size(monkeypatch):
    """Small inputs normally skip the chunks (torch.max is cheaper there): test the chunked path at every size."""
    monkeypatch.setattr(row_max_cpu, "MIN_ELEMENTS", 0)

_WIDTHS = [1, 7, 31, 32, 40, 1000, 1024, 1031, 4096, 49152]  # 1031 is prime, 1000 = 8 x 125


def _assert_same(x: torch.Tensor) -> None:
    values, indices = row_max_chunked(x)
    expected_values, expected_indices = torch.max(x, dim=-1)
    assert indices.dtype == torch.int64 and indices.shape == expected_indices.shape
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("width", _WIDTHS)
@pytest.mark.parametrize("num_rows", [1, 5, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_torch_max(width, num_rows, dtype):
    gen = torch.Generator().manual_seed(width * 131 + num_rows)
    x = torch.randn(num_rows, width, generator=gen).to(dtype)
    _assert_same(x)


@pytest.mark.parametrize("width", [32, 1024, 49152])
def test_ties_take_the_lowest_index(width):
    x = torch.zeros(6, width)
    x[0, [3, width - 1]] = 1.0  # two maxima in different chunks
    x[1, [width // 2, width // 2 + 1]] = 2.0  # two maxima in one chunk
    x[2] = 5.0  # all equal: index 0
    x[3, -1] = 1.0  # the maximum in the last column
    x[4, [1, 2]] = float("inf")
    x[5] = float("-inf")  # nothing finite: index 0, as torch
    _assert_same(x)
    assert row_max_chunked(x)[1].tolist() == [3, width // 2, 0, width - 1, 1, 0]


@pytest.mark.parametrize("width", [32, 1024, 49152])
def test_nan_counts_as_the_maximum(width):
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0))
    x[0, width - 3] = float("nan")
    x[1, [5, width - 1]] = float("nan")  # the first NaN wins
    x[2, 0] = float("inf")
    x[2, width // 2] = float("nan")  # NaN beats +inf
    x[3, 7] = float("inf")
    _assert_same(x)
    values, indices = row_max_chunked(x)
    assert indices.tolist() == [width - 3, 5, width // 2, 7]
    assert values[:3].isnan().all() and values[3] == float("inf")


def test_strided_rows():
    """A column slice of wider logits (a padded vocabulary cut to the tokenizer's) and a row-strided view."""
    wide = torch.randn(9, 1100, generator=torch.Generator().manual_seed(1))
    _assert_same(wide[:, :1024])
    _assert_same(wide[::2, :1024])
    _assert_same(wide.t().contiguous().t()[:, :1024])  # column-major storage


@settings(max_examples=60, deadline=None)
@given(num_rows=st.integers(1, 6), width=st.sampled_from([32, 64, 96, 256, 1024]), seed=st.integers(0, 2**16),
       num_values=st.integers(1, 4))
def test_few_distinct_values(num_rows, width, seed, num_values):
    """Logits with few distinct values (many ties in many chunks), as after top-k or a ban."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(num_values, (num_rows, width), generator=gen).float()
    x[torch.rand(num_rows, width, generator=gen) < 0.1] = float("-inf")
    _assert_same(x)


def test_chunk_size():
    assert chunk_size(1024) == 32
    assert chunk_size(49152) == 256  # sqrt = 222: 256 is the nearer power of two
    assert chunk_size(32000) == 128  # sqrt = 179
    assert chunk_size(1000) == 8  # 32 and 16 do not divide it
    assert chunk_size(1031) is None and chunk_size(31) is None


def test_large_inputs_take_the_chunks(monkeypatch):
    monkeypatch.undo()  # the real threshold
    calls = []
    monkeypatch.setattr(row_max_cpu, "row_max_ref", lambda x: calls.append(x.shape) or torch.max(x, dim=-1))
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(2))
    assert torch.equal(kernels.row_argmax(x), x.argmax(dim=-1)) and calls == []
    kernels.row_argmax(x[:2])  # 2,048 elements: torch's own
    assert calls == [(2, 1024)]


def test_dispatch_and_errors():
    x = torch.randn(3, 1024)
    assert torch.equal(kernels.row_argmax(x), x.argmax(dim=-1))
    assert torch.equal(kernels.row_max(x)[0], x.amax(dim=-1))
    assert torch.equal(row_max_ref(x)[1], x.argmax(dim=-1))
    with pytest.raises(ValueError, match="2-D floating-point"):
        kernels.row_max(torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="2-D floating-point"):
        kernels.row_max(torch.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        kernels.row_max(torch.zeros(3, 0))
    assert kernels.row_argmax(torch.zeros(0, 1024)).shape == (0,)
