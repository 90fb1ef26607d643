"""The CPU linear fast path: padded rows give the same results, the plan is sane, the model is left unchanged."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cospec.engine.cpu_linear import (RowPlan, cpu_linears, fast_cpu_linears, fast_linear_forward, measure_row_plan,
                                      packing_available, row_plan)

PAD_TO_16 = RowPlan(tuple([0] + [16 if r <= 16 else r for r in range(1, 33)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 5, 11, 16, 17, 40])
def test_padded_rows_equal_f_linear(dtype, bias, rows):
    torch.manual_seed(rows)
    layer = nn.Linear(37, 23, bias=bias, dtype=dtype)
    x = torch.randn(1, rows, 37, dtype=dtype)
    expected = F.linear(x, layer.weight, layer.bias)
    for plan in (RowPlan(), PAD_TO_16):
        out = fast_linear_forward(layer, x, plan)
        assert out.shape == expected.shape and out.is_contiguous()
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=pytest.mark.skipif(not packing_available(),
                                                                                    reason="torch built without oneDNN"))])
def test_measured_plan_pads_within_bounds(packed):
    weights = [torch.randn(48, 32), torch.randn(32, 48)]
    plan = measure_row_plan(weights, max_rows=20, repeats=1, packed=packed)
    assert len(plan.padded) == 21 and plan.padded[0] == 0 and len(plan.packed) == 21
    assert packed or not any(plan.packed)
    for rows in range(1, 21):
        assert rows <= plan.rows_for(rows) <= min(20, 2 * rows + 8)
    assert plan.rows_for(21) == 21 and plan.rows_for(500) == 500


def test_plan_is_cached_per_shapes_and_threads():
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16))
    linears = cpu_linears(model)
    assert row_plan(linears) is row_plan(cpu_linears(nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16))))


def test_fast_linears_are_restored_after_the_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 8)
    expected = model(x)
    linears = cpu_linears(model)
    assert len(linears) == 2
    with fast_cpu_linears(linears, PAD_TO_16):
        assert all("forward" in m.__dict__ for m in linears)
        torch.testing.assert_close(model(x), expected)
    assert all("forward" not in m.__dict__ for m in linears)
    torch.testing.assert_close(model(x), expected)


needs_packing = pytest.mark.skipif(not packing_available(), reason="torch built without oneDNN")


@needs_packing
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 7, 16, 33])
def test_prepacked_path_equals_f_linear(bias, rows):
    torch.manual_seed(rows)
    layer = nn.Linear(40, 29, bias=bias)
    x = torch.randn(1, rows, 40)
    plan = RowPlan(tuple(range(64)), (False,) + (True,) * 63)
    out = fast_linear_forward(layer, x, plan)
    assert out.shape == (1, rows, 29) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias))


@needs_packing
def test_prepacked_weights_follow_weight_changes():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    plan = RowPlan(tuple(range(8)), (True,) * 8)
    torch.testing.assert_close(fast_linear_forward(layer, x, plan), layer(x))
    with torch.no_grad():
        layer.weight.mul_(2.0)  # in place: the version counter moves
    torch.testing.assert_close(fast_linear_forward(layer, x, plan), layer(x))
    layer.weight = nn.Parameter(torch.randn(8, 16))  # replaced
    torch.testing.assert_close(fast_linear_forward(layer, x, plan), layer(x))


def test_float64_never_takes_the_prepacked_path():
    layer = nn.Linear(16, 8, dtype=torch.float64)
    x = torch.randn(5, 16, dtype=torch.float64)
    plan = RowPlan(tuple(range(8)), (True,) * 8)
    torch.testing.assert_close(fast_linear_forward(layer, x, plan), layer(x))
    assert row_plan(cpu_linears(layer)).packed == () or not any(row_plan(cpu_linears(layer)).packed)


@needs_packing
def test_inference_tensor_weights_are_packed_once():
    with torch.inference_mode():
        layer = nn.Linear(16, 8)  # its parameters are inference tensors: no version counter
    x = torch.randn(4, 16)
    plan = RowPlan(tuple(range(8)), (True,) * 8)
    with torch.inference_mode():
        torch.testing.assert_close(fast_linear_forward(layer, x, plan), F.linear(x, layer.weight, layer.bias))
