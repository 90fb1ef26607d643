"""Max and argmax of each row of a 2-D tensor (``torch.max(x, dim=-1)``), on the CPU in two passes over chunks.

torch's CPU reductions that return an index (``max(dim)``, ``argmax``) do not vectorize: about 3 ns per element
on one thread, 10-25x its ``amax``. Greedy decoding takes one per step over ``[rows, vocab_size]`` logits (0.7 ms at
256 rows of a 1,024-token vocabulary, 0.8 ms at 8 rows of SmolLM2's 49,152 tokens), and so does every exponential
race. Split each row into chunks of ``c`` columns instead: the chunks' maxima (``amax``, vectorized), the first
chunk holding the row's maximum (an index reduction over ``vocab_size / c`` values), then the first maximum within
that chunk (over ``c`` values). With ``c`` near ``sqrt(vocab_size)`` the index reductions read ``2 sqrt(V)`` values
per row instead of ``V``. Below MIN_ELEMENTS the few extra tensor operations cost more than they save.

Same result as torch by construction, ties and non-finite values included: the lowest index of the maximum, NaN
counting as the maximum (``amax`` and ``argmax`` both propagate it). On CUDA torch's reduction is already one
fused kernel, so ``cospec.kernels.row_max`` sends CUDA tensors to ``row_max_ref``.
"""

from __future__ import annotations

import torch

MIN_CHUNK = 8  # a vocabulary without a power-of-two divisor this large goes through torch.max
MIN_ELEMENTS = 32768  # below this torch.max is cheaper (~3 ns an element against the chunks' ~40 us of fixed cost)


def row_max_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of each row's maximum: torch.max over the last dimension."""
    _check(x)
    values, indices = x.max(dim=-1)
    return values, indices


def row_max_chunked(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``row_max_ref`` through chunk maxima (see the module docstring)."""
    _check(x)
    num_rows, width = x.shape
    chunk = chunk_size(width)
    if chunk is None or x.numel() < MIN_ELEMENTS:
        return row_max_ref(x)
    chunks = x.unflatten(1, (width // chunk, chunk))  # [rows, num_chunks, chunk] (a view when it can be)
    chunk_max = chunks.amax(dim=-1)  # [rows, num_chunks]
    first_chunk = chunk_max.argmax(dim=-1)  # [rows]: the first chunk that holds the maximum
    rows = torch.arange(num_rows, device=x.device)
    within = chunks[rows, first_chunk].argmax(dim=-1)  # [rows]: the first maximum inside it
    return chunk_max[rows, first_chunk], first_chunk * chunk + within


def chunk_size(width: int) -> int | None:
    """The power of two nearest ``sqrt(width)`` that divides ``width`` (at least MIN_CHUNK), or None: then the
    chunks would be too small for the two passes to pay."""
    if width < 4 * MIN_CHUNK:
        return None
    chunk = 1 << max(round(width ** 0.5).bit_length() - 1, 0)
    if 2 * chunk * chunk <= width:  # the nearer power of two is the one above
        chunk *= 2
    while chunk >= MIN_CHUNK and width % chunk:
        chunk //= 2
    return chunk if chunk >= MIN_CHUNK else None


def _check(x: torch.Tensor) -> None:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"row_max: expected a 2-D floating-point tensor, got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("row_max: the rows are empty (0 columns)")
