"""A faster linear layer for few rows on the CPU.

``F.linear(x, W)`` with a handful of rows goes through oneDNN's small-batch path, which on the 2-core AVX-512
machines we measure reaches about a third of the memory bandwidth that MKL's gemm gets for ``W @ x.T``
(SmolLM2-135M, all 211 projections, 1 row: 52 ms against 19 ms). Decoding is exactly this case, so the model
runner swaps every ``nn.Linear.forward`` of the model for ``fast_linear_forward`` while cospec runs it, and puts the
original back afterwards: the user's model object is unchanged outside cospec's forwards.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

# Above this many rows the two paths converge (both become compute-bound gemms).
MAX_FAST_ROWS = 256


def fast_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows > MAX_FAST_ROWS or rows == 0 or x.dtype != self.weight.dtype:
        return F.linear(x, self.weight, self.bias)
    x2 = x.reshape(rows, x.shape[-1])
    if rows == 1:
        # MKL takes its slow gemv path for a single column; two identical columns take the gemm path.
        x2 = torch.cat([x2, x2])
    y = torch.mm(self.weight, x2.t()).t()[:rows].contiguous()  # [rows, out_features]
    if self.bias is not None:
        y += self.bias
    return y.view(*x.shape[:-1], y.shape[-1])


@contextlib.contextmanager
def fast_cpu_linears(linears: list[nn.Linear]):
    """Route the given CPU linear layers through ``fast_linear_forward`` inside the block."""
    for module in linears:
        module.forward = fast_linear_forward.__get__(module)
    try:
        yield
    finally:
        for module in linears:
            del module.forward


def cpu_linears(model: nn.Module) -> list[nn.Linear]:
    """The plain float ``nn.Linear`` layers of ``model`` that live on the CPU (quantized or subclassed ones are skipped)."""
    return [m for m in model.modules()
            if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype in (torch.float32, torch.float64)]
