"""Paged attention: the Triton kernel (interpreter) against the torch reference, the reference against a dense
causal attention written out per sequence, and the engine's attention hook against both.

Every pool slot that no sequence wrote holds NaN and block tables are padded with -1, so an implementation that
reads a key it must not (past a sequence's length, another sequence's block, a padding column) fails loudly.
"""

import math

import pytest
import torch

from cospec.kernels import paged_attention_kernel as pa_mod
from cospec.kernels.paged_attention_ref import GatherLayout, _padded_attention

triton = pytest.importorskip("triton")

_WINDOW_PARAMS = [  # (q_lens, seq_lens): queries per sequence and its KV length after them
    ((1,), (1,)),  # the very first token
    ((1, 1, 1), (7, 33, 50)),  # decode; lengths not multiples of the block size
    ((16, 5, 1), (16, 21, 40)),  # a whole 16-token prefill, a verify window, a decode
    ((3, 16, 9, 1, 12), (70, 16, 30, 9, 12)),  # ragged: chunked prefill (9 new of 30), windows of 1-16
    ((20, 1, 3, 1), (20, 40, 30, 9)),  # a 20-token prefill beside decodes: the reference attends to it apart
]
_HEAD_PARAMS = [  # (num_heads, num_kv_heads, head_dim): GQA ratios 1, 2, 4; head_dim 80 is not a power of two
    (4, 4, 64),
    (4, 2, 80),
    (4, 1, 128),
    (6, 2, 80),  # a group of 3: BLOCK_M rows that do not divide evenly
]
_VARIANT_PARAMS = [  # (sliding_window, softcap)
    (None, None),
    (8, None),
    (None, 5.0),
    (5, 20.0),
]
_DTYPE_PARAMS = [  # (dtype, atol, rtol); bfloat16 runs on the GPU check (the interpreter's bf16 tl.dot is broken)
    (torch.float32, 2e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
]


def _paged_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size=16, dtype=torch.float32, seed=0):
    """Query, pools and metadata of a ragged batch whose blocks are scattered over the pool in random order."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks nobody writes
    order = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.full((len(seq_lens), max(blocks_per_seq)), -1, dtype=torch.int32)
    k_pool = torch.full((num_blocks * block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_pool = k_pool.clone()
    keys, values = [], []  # per sequence, [seq_len, kv_heads, dim] in position order
    for s, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        block_tables[s, :nb] = torch.tensor(order[:nb], dtype=torch.int32)
        order = order[nb:]
        slots = (block_tables[s, :nb].long()[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
        keys.append(torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype))
        values.append(torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype))
        k_pool[slots], v_pool[slots] = keys[-1], values[-1]
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    query_start_loc = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    return query, k_pool, v_pool, block_tables, seq_lens_t, query_start_loc, keys, values


def _dense_attention(query, keys, values, q_lens, scale, sliding_window=None, softcap=None):
    """Causal attention per sequence in float64 from the keys and values in position order (no pages)."""
    outs, start = [], 0
    for q_len, k, v in zip(q_lens, keys, values):
        q = query[start:start + q_len].double().transpose(0, 1)  # [heads, q_len, dim]
        start += q_len
        group = q.shape[0] // k.shape[1]
        k = k.double().transpose(0, 1).repeat_interleave(group, 0)  # [heads, seq_len, dim]
        v = v.double().transpose(0, 1).repeat_interleave(group, 0)
        scores = q @ k.transpose(1, 2) * scale  # [heads, q_len, seq_len]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(k.shape[1] - q_len, k.shape[1])[:, None]
        kv_pos = torch.arange(k.shape[1])[None, :]
        visible = kv_pos <= q_pos
        if sliding_window is not None:
            visible &= q_pos - kv_pos < sliding_window
        outs.append((scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v).transpose(0, 1))
    return torch.cat(outs)  # [num_tokens, heads, dim]


def _assert_close(actual, expected, atol, rtol, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite outputs (a padding slot was read)"
    diff = (actual.double() - expected.double()).abs()
    worst = diff.flatten().argmax()
    token, head, dim = (int(i) for i in torch.unravel_index(worst, diff.shape))
    assert torch.allclose(actual.double(), expected.double(), atol=atol, rtol=rtol), (
        f"{what}: max |diff| {diff.max():.3g} at token {token}, head {head}, dim {dim}: "
        f"{actual[token, head, dim]:.6g} vs {expected[token, head, dim]:.6g}")


# ---- the kernel against the reference ----


@pytest.mark.parametrize("q_lens,seq_lens", _WINDOW_PARAMS)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", _HEAD_PARAMS)
def test_kernel_matches_reference(q_lens, seq_lens, num_heads, num_kv_heads, head_dim):
    query, k_pool, v_pool, tables, lens, qsl, _, _ = _paged_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim)
    args = (query, k_pool, v_pool, tables, lens, qsl, 16, 0.125)
    _assert_close(pa_mod.paged_attention(*args), pa_mod.paged_attention_ref(*args), 2e-5, 1e-5, "kernel")


_SPLIT_PARAMS = [(1, v) for v in _VARIANT_PARAMS] + [(3, (None, None)), (3, (5, 20.0)), (2, (8, None))]


@pytest.mark.parametrize("num_splits,variant", _SPLIT_PARAMS)
@pytest.mark.parametrize("q_lens,seq_lens", [((4, 1, 2), (37, 19, 8)), ((1, 1), (70, 45))])
def test_kernel_variants_and_split_k(num_splits, variant, q_lens, seq_lens):
    # Block size 6: pages that are not a power of two; 3 splits: uneven parts, some of them empty for short rows.
    sliding_window, softcap = variant
    query, k_pool, v_pool, tables, lens, qsl, _, _ = _paged_batch(q_lens, seq_lens, 4, 2, 80, block_size=6, seed=1)
    args = (query, k_pool, v_pool, tables, lens, qsl, 6, 0.3, sliding_window, softcap)
    out = pa_mod.paged_attention(*args, num_splits=num_splits)
    _assert_close(out, pa_mod.paged_attention_ref(*args), 2e-5, 1e-5, f"window={sliding_window} softcap={softcap}")


@pytest.mark.parametrize("dtype,atol,rtol", _DTYPE_PARAMS)
def test_kernel_dtypes(dtype, atol, rtol):
    q_lens, seq_lens = (16, 2, 1), (20, 35, 3)
    query, k_pool, v_pool, tables, lens, qsl, _, _ = _paged_batch(q_lens, seq_lens, 4, 2, 64, dtype=dtype, seed=2)
    args = (query, k_pool, v_pool, tables, lens, qsl, 16, None, 7, None)
    out = pa_mod.paged_attention(*args)
    assert out.dtype == dtype and out.shape == query.shape
    _assert_close(out, pa_mod.paged_attention_ref(*args), atol, rtol, str(dtype))


def test_kernel_strided_query():
    # The attention hook hands the kernel query[0].transpose(0, 1) of HF's [1, heads, tokens, dim]: a strided view.
    q_lens, seq_lens = (2, 3), (9, 3)
    query, k_pool, v_pool, tables, lens, qsl, _, _ = _paged_batch(q_lens, seq_lens, 4, 2, 64, seed=3)
    strided = query.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    args = (k_pool, v_pool, tables, lens, qsl, 16)
    _assert_close(pa_mod.paged_attention(strided, *args), pa_mod.paged_attention_ref(query, *args), 2e-5, 1e-5,
                  "strided query")


# ---- the reference against a dense causal attention ----


@pytest.mark.parametrize("q_lens,seq_lens", _WINDOW_PARAMS)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", _HEAD_PARAMS)
@pytest.mark.parametrize("sliding_window,softcap", _VARIANT_PARAMS)
def test_reference_equals_dense_attention(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, sliding_window,
                                          softcap):
    query, k_pool, v_pool, tables, lens, qsl, keys, values = _paged_batch(
        q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size=4, dtype=torch.float64)
    out = pa_mod.paged_attention_ref(query, k_pool, v_pool, tables, lens, qsl, 4, None, sliding_window, softcap)
    expected = _dense_attention(query, keys, values, q_lens, 1 / math.sqrt(head_dim), sliding_window, softcap)
    # Soft-capped attention takes its softmax in float32, as HF's eager attention does (parity with HF's output).
    tol = 1e-12 if softcap is None else 1e-6
    _assert_close(out, expected, tol, tol, "reference")


def test_reference_layout_is_reused_across_calls():
    # The engine passes one GatherLayout to every layer of a step: its results must not depend on the pool.
    query, k_pool, v_pool, tables, lens, qsl, keys, values = _paged_batch((3, 1), (10, 21), 4, 2, 64,
                                                                          dtype=torch.float64)
    layout = GatherLayout(tables, lens, qsl, 16)
    args = (tables, lens, qsl, 16, None, 4)
    first = pa_mod.paged_attention_ref(query, k_pool, v_pool, *args, layout=layout)
    second = pa_mod.paged_attention_ref(query, v_pool, k_pool, *args, layout=layout)  # another layer's pool
    assert torch.equal(first, pa_mod.paged_attention_ref(query, k_pool, v_pool, *args))
    assert torch.equal(second, pa_mod.paged_attention_ref(query, v_pool, k_pool, *args))
    _assert_close(first, _dense_attention(query, keys, values, (3, 1), 1 / 8, 4), 1e-12, 1e-12, "layout")
    _assert_close(second, _dense_attention(query, values, keys, (3, 1), 1 / 8, 4), 1e-12, 1e-12, "layout")


@pytest.mark.parametrize("q_lens,seq_lens,causal", [
    ((19,), (19,), True),  # a lone prefill from scratch
    ((12, 12, 12), (12, 12, 12), True),  # equal prefills from scratch
    ((12, 12), (12, 14), False),  # a prefill beside a longer one: the mask has rows of its own
    ((5,), (19,), False),  # a chunk after a cached prefix: causal from the last keys, not the first
])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 64), (6, 2, 80)])
@pytest.mark.parametrize("sliding_window", [None, 30, 7])
def test_whole_windows_take_sdpa_causal_path_and_equal_dense_attention(q_lens, seq_lens, causal, num_heads,
                                                                      num_kv_heads, head_dim, sliding_window):
    query, k_pool, v_pool, tables, lens, qsl, keys, values = _paged_batch(
        q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size=4, dtype=torch.float64)
    layout = GatherLayout(tables, lens, qsl, 4)
    assert layout.windows_are_whole == causal
    out = pa_mod.paged_attention_ref(query, k_pool, v_pool, tables, lens, qsl, 4, None, sliding_window, layout=layout)
    expected = _dense_attention(query, keys, values, q_lens, 1 / math.sqrt(head_dim), sliding_window)
    _assert_close(out, expected, 1e-12, 1e-12, "whole windows")


@pytest.mark.parametrize("seq_lens", [(9, 21, 14), (21, 21, 21)])
@pytest.mark.parametrize("sliding_window", [None, 6])
def test_decode_layout_given_its_shortest_length_attends_as_one_that_reads_it(seq_lens, sliding_window):
    # The engine tells the layout its shortest KV length (it has the lengths as a list); equal lengths with no
    # window need no mask at all.
    query, k_pool, v_pool, tables, lens, qsl, keys, values = _paged_batch((1, 1, 1), seq_lens, 4, 2, 16, block_size=4,
                                                                          dtype=torch.float64)
    told = GatherLayout(tables, lens, qsl, 4, min_kv_len=min(seq_lens))
    read = GatherLayout(tables, lens, qsl, 4)
    assert (told.mask(sliding_window) is None) == (read.mask(sliding_window) is None)
    assert (told.mask(None) is None) == (len(set(seq_lens)) == 1)
    out = pa_mod.paged_attention_ref(query, k_pool, v_pool, tables, lens, qsl, 4, None, sliding_window, layout=told)
    _assert_close(out, _dense_attention(query, keys, values, (1, 1, 1), 1 / 4, sliding_window), 1e-12, 1e-12,
                  "decode layout")


@pytest.mark.parametrize("q_len,seq_len", [(1, 37), (5, 40), (16, 16), (1, 1)])
@pytest.mark.parametrize("consecutive", [True, False])
def test_reference_reads_a_lone_sequence_in_place_when_its_blocks_lie_in_a_row(q_len, seq_len, consecutive):
    # One sequence whose blocks are consecutive (from block 2 on: not at the start of the pool) is read as a slice
    # of the pool; scattered blocks are gathered. Both equal dense attention, and neither reads an unwritten slot.
    query, k_pool, v_pool, tables, lens, qsl, keys, values = _paged_batch((q_len,), (seq_len,), 6, 2, 64,
                                                                          block_size=4, dtype=torch.float64)
    num_blocks = -(-seq_len // 4)
    blocks = torch.arange(2, 2 + num_blocks) if consecutive else torch.arange(2 + num_blocks - 1, 1, -1)
    k_pool, v_pool = torch.full_like(k_pool, float("nan")), torch.full_like(v_pool, float("nan"))
    k_pool = torch.cat([k_pool, k_pool[: 8 * 4]])  # room for blocks up to 2 + num_blocks
    v_pool = torch.cat([v_pool, v_pool[: 8 * 4]])
    slots = (blocks[:, None] * 4 + torch.arange(4)).flatten()[:seq_len]
    k_pool[slots], v_pool[slots] = keys[0], values[0]
    tables = blocks.to(torch.int32)[None]
    layout = GatherLayout(tables, lens, qsl, 4)
    assert (layout.single_run_start == 8) == (consecutive or num_blocks == 1)
    out = pa_mod.paged_attention_ref(query, k_pool, v_pool, tables, lens, qsl, 4, None, layout=layout)
    _assert_close(out, _dense_attention(query, keys, values, (q_len,), 1 / 8), 1e-12, 1e-12, "lone sequence")


def _region_batch(q_lens, seq_lens, regions, num_heads, num_kv_heads, head_dim, region_blocks=4, block_size=4,
                  num_regions=8, seed=0):
    """A ragged batch laid out in regions (RegionBlockManager): sequence i's block j is block regions[i] *
    region_blocks + j. Slots a sequence has not written hold finite junk (a zeroed pool's zeros, or its own rejected
    drafts); regions no sequence of the batch owns hold NaN (only padding rows read them)."""
    gen = torch.Generator().manual_seed(seed)
    region_slots = region_blocks * block_size
    k_pool = torch.full((num_regions * region_slots, num_kv_heads, head_dim), float("nan"), dtype=torch.float64)
    v_pool = k_pool.clone()
    tables = torch.zeros(len(seq_lens), region_blocks, dtype=torch.int32)
    keys, values = [], []
    for i, (region, n) in enumerate(zip(regions, seq_lens)):
        tables[i] = torch.arange(region * region_blocks, (region + 1) * region_blocks, dtype=torch.int32)
        start = region * region_slots
        k_pool[start: start + region_slots] = torch.randn(region_slots, num_kv_heads, head_dim, generator=gen)
        v_pool[start: start + region_slots] = torch.randn(region_slots, num_kv_heads, head_dim, generator=gen)
        keys.append(k_pool[start: start + n].clone())
        values.append(v_pool[start: start + n].clone())
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen, dtype=torch.float64)
    qsl = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    return query, k_pool, v_pool, tables, torch.tensor(seq_lens, dtype=torch.int32), qsl, keys, values


@pytest.mark.parametrize("q_lens,seq_lens,regions,in_place", [
    ((1, 1, 1), (7, 16, 13), (0, 1, 2), True),  # decode, consecutive regions: row i is sequence i
    ((1, 1, 1), (16, 16, 16), (2, 3, 4), True),  # every key visible: no mask at all
    ((3, 1, 5), (9, 14, 5), (1, 2, 3), True),  # verify windows and a decode
    ((1, 4, 1), (10, 12, 3), (0, 2, 5), True),  # gaps: regions 1, 3 and 4 are padding rows
    ((2, 1), (6, 11), (4, 1), True),  # regions out of batch order
    ((1, 1, 1), (5, 9, 3), (1, 2, 0), True),  # decode, regions out of order: as many tokens as rows, yet permuted
    ((1, 1), (5, 9), (0, 7), False),  # 8 regions spanned by 2 sequences: gathered
])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 64), (4, 2, 80), (4, 1, 128)])
@pytest.mark.parametrize("sliding_window,softcap", [(None, None), (5, None), (None, 20.0)])
def test_reference_reads_sequences_in_regions_in_place(q_lens, seq_lens, regions, in_place, num_heads, num_kv_heads,
                                                      head_dim, sliding_window, softcap):
    query, k_pool, v_pool, tables, lens, qsl, keys, values = _region_batch(q_lens, seq_lens, regions, num_heads,
                                                                           num_kv_heads, head_dim)
    layout = GatherLayout(tables, lens, qsl, 4, region_blocks=4)
    assert (layout.regions is not None) == in_place
    args = (k_pool, v_pool, tables, lens, qsl, 4, None, sliding_window, softcap)
    out = pa_mod.paged_attention_ref(query, *args, layout=layout)
    expected = _dense_attention(query, keys, values, q_lens, 1 / math.sqrt(head_dim), sliding_window, softcap)
    tol = 1e-12 if softcap is None else 1e-6
    _assert_close(out, expected, tol, tol, "regions")
    if in_place:  # the keys were read through a view of the pool, not copied
        assert layout.gather(k_pool, 0).untyped_storage().data_ptr() == k_pool.untyped_storage().data_ptr()


_MIXED_PARAMS = [  # (q_lens, seq_lens): prefill chunks longer than SHORT_WINDOW beside decodes and verify windows
    ((40, 1, 1, 3, 1), (45, 60, 33, 20, 50)),
    ((20, 1, 33), (20, 70, 50)),  # two chunks: padded together, apart from the decode
]


@pytest.mark.parametrize("q_lens,seq_lens", _MIXED_PARAMS)
@pytest.mark.parametrize("sliding_window,softcap", _VARIANT_PARAMS)
def test_reference_attends_to_prefill_chunks_apart_from_short_windows(q_lens, seq_lens, sliding_window, softcap):
    # Padded together, every decoding sequence would run as many queries as the longest chunk (SDPA computes them
    # all); the layout splits the batch into its short and its long windows, and each query row is computed once.
    query, k_pool, v_pool, tables, lens, qsl, keys, values = _paged_batch(q_lens, seq_lens, 4, 2, 64, block_size=4,
                                                                          dtype=torch.float64)
    layout = GatherLayout(tables, lens, qsl, 4)
    assert layout.parts is not None
    rows = torch.cat([r for _, r in layout.parts])
    assert sorted(rows.tolist()) == list(range(sum(q_lens)))
    assert [part.max_q_len <= 16 for part, _ in layout.parts] == [True, False]
    args = (k_pool, v_pool, tables, lens, qsl, 4, None, sliding_window, softcap)
    out = pa_mod.paged_attention_ref(query, *args, layout=layout)
    expected = _dense_attention(query, keys, values, q_lens, 1 / 8, sliding_window, softcap)
    tol = 1e-12 if softcap is None else 1e-6
    _assert_close(out, expected, tol, tol, "split")
    padded = _padded_attention(query, k_pool, v_pool, GatherLayout(tables, lens, qsl, 4), None, sliding_window,
                               softcap)
    _assert_close(out, padded, tol, tol, "split against padded")


def test_short_windows_alone_are_not_split():
    for q_lens, seq_lens in [((1, 1, 1), (7, 33, 50)), ((16, 5, 1), (16, 21, 40)), ((40,), (45,)),
                             ((40, 30), (45, 60)), ((17, 1), (17, 18))]:  # the last: splitting would not pay
        _, _, _, tables, lens, qsl, _, _ = _paged_batch(q_lens, seq_lens, 4, 2, 64, block_size=4)
        assert GatherLayout(tables, lens, qsl, 4).parts is None, (q_lens, seq_lens)


def test_split_batch_in_regions_reads_each_part_in_place():
    q_lens, seq_lens = (20, 1, 1), (24, 30, 9)
    query, k_pool, v_pool, tables, lens, qsl, keys, values = _region_batch(q_lens, seq_lens, (0, 1, 2), 4, 2, 64,
                                                                           region_blocks=8, num_regions=4)
    layout = GatherLayout(tables, lens, qsl, 4, region_blocks=8)
    assert layout.parts is not None
    out = pa_mod.paged_attention_ref(query, k_pool, v_pool, tables, lens, qsl, 4, layout=layout)
    _assert_close(out, _dense_attention(query, keys, values, q_lens, 1 / 8), 1e-12, 1e-12, "split regions")
    short, long = (part for part, _ in layout.parts)
    assert short.regions is not None and long.single_run_start is not None


# ---- bad input ----


def test_bad_inputs_are_named():
    query, k_pool, v_pool, tables, lens, qsl, _, _ = _paged_batch((2,), (5,), 4, 2, 64)
    ok = dict(query=query, k_pool=k_pool, v_pool=v_pool, block_tables=tables, seq_lens=lens, query_start_loc=qsl,
              block_size=16)
    cases = [
        (dict(block_tables=tables.long()), "block_tables"),
        (dict(seq_lens=lens.long()), "seq_lens"),
        (dict(query_start_loc=qsl[:1]), "query_start_loc"),
        (dict(query=torch.randn(2, 3, 64)), "multiple of num_kv_heads"),
        (dict(query=torch.randn(2, 4, 32)), "head_dim"),
        (dict(query=query.double()), "dtype"),
        (dict(block_size=7), "block_size"),
    ]
    for fn in (pa_mod.paged_attention, pa_mod.paged_attention_ref):
        for change, message in cases:
            with pytest.raises(ValueError, match=message):
                fn(**{**ok, **change})
        with pytest.raises(ValueError, match="sliding_window"):
            fn(**ok, sliding_window=0)
        with pytest.raises(ValueError, match="softcap"):
            fn(**ok, softcap=-1.0)
    with pytest.raises(ValueError, match="blocks per sequence"):
        pa_mod.paged_attention(**{**ok, "seq_lens": torch.tensor([40], dtype=torch.int32)})


# ---- the engine's attention hook ----


@pytest.mark.parametrize("sliding_window,softcap", _VARIANT_PARAMS)
def test_engine_attention_hook_equals_dense_attention(sliding_window, softcap):
    """The HF attention function with the metadata the model runner builds (block manager -> InputBatch) computes
    the same as the reference called on those tensors and as dense attention (on the CPU both go through the
    reference's gather + SDPA, with the step's layout shared across layers)."""
    from types import SimpleNamespace

    from cospec.decoding.protocols import ForwardItem
    from cospec.engine import attention
    from cospec.engine.block_manager import BlockManager
    from cospec.engine.input_batch import InputBatch

    q_lens, seq_lens, heads, kv_heads, dim, block_size = (5, 1, 16, 2), (12, 30, 16, 3), 4, 2, 80, 4
    gen = torch.Generator().manual_seed(4)
    bm = BlockManager(num_blocks=40, block_size=block_size)
    bm.grow(99, 9)  # another sequence's blocks come first: tables do not start at block 0
    for seq_id, n in enumerate(seq_lens):
        bm.grow(seq_id, n)
    items = [ForwardItem(seq_id, [0] * q, n - q, 1) for seq_id, (q, n) in enumerate(zip(q_lens, seq_lens))]
    _, meta = InputBatch(bm, torch.device("cpu")).prepare(items)
    k_pool = torch.full((40 * block_size, kv_heads, dim), float("nan"), dtype=torch.float64)
    v_pool = k_pool.clone()
    keys = [torch.randn(n, kv_heads, dim, generator=gen, dtype=torch.float64) for n in seq_lens]
    values = [torch.randn(n, kv_heads, dim, generator=gen, dtype=torch.float64) for n in seq_lens]
    for seq_id, (k, v) in enumerate(zip(keys, values)):
        slots = bm.slots(seq_id, 0, seq_lens[seq_id])
        k_pool[slots], v_pool[slots] = k, v
    query = torch.randn(sum(q_lens), heads, dim, generator=gen, dtype=torch.float64)
    pool = SimpleNamespace(k=[k_pool], v=[v_pool])
    with attention.step_context(meta, pool):
        out, _ = attention.paged_attention(SimpleNamespace(layer_idx=0), query.transpose(0, 1)[None], None, None,
                                           None, scaling=0.2, sliding_window=sliding_window, softcap=softcap)
    out = out[0]  # [num_tokens, heads, dim]
    reference = pa_mod.paged_attention_ref(query, k_pool, v_pool, meta.block_tables, meta.seq_lens,
                                           meta.query_start_loc, block_size, 0.2, sliding_window, softcap)
    assert torch.equal(out, reference)
    tol = 1e-12 if softcap is None else 1e-6
    _assert_close(out, _dense_attention(query, keys, values, q_lens, 0.2, sliding_window, softcap), tol, tol, "hook")


def test_engine_attention_hook_checks_the_first_layer_of_each_variant_in_a_step():
    """Layers after the first skip the input checks (same shapes every layer), but a variant (sliding window,
    soft-capping) a step has not seen yet is checked, and so is a new step's first layer."""
    from types import SimpleNamespace

    from cospec.decoding.protocols import ForwardItem
    from cospec.engine import attention
    from cospec.engine.block_manager import BlockManager
    from cospec.engine.input_batch import InputBatch

    bm = BlockManager(num_blocks=8, block_size=4)
    bm.grow(0, 6)

    def step_meta():
        return InputBatch(bm, torch.device("cpu")).prepare([ForwardItem(0, [0], 5, 1)])[1]

    pool = SimpleNamespace(k=[torch.randn(32, 2, 8)] * 2, v=[torch.randn(32, 2, 8)] * 2)
    query = torch.randn(1, 4, 1, 8)  # [1, heads, num_tokens, dim]

    def attend(meta, layer, **variant):
        with attention.step_context(meta, pool):
            return attention.paged_attention(SimpleNamespace(layer_idx=layer), query, None, None, None, **variant)

    meta = step_meta()
    attend(meta, 0)
    assert meta.checked_variants == {(None, None)}
    attend(meta, 1)  # checked before: skipped
    with pytest.raises(ValueError, match="sliding_window"):
        attend(meta, 1, sliding_window=-1)  # a variant not seen in this step
    query = torch.randn(1, 4, 1, 6)  # another head_dim than the pool's
    with pytest.raises(ValueError, match="head_dim"):
        attend(step_meta(), 0)  # a new step's first layer
