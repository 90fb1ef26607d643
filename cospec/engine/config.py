"""Engine configuration, checked when it is built."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineConfig:
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_memory_bytes: int | None = None
    """KV memory budget over all models of the engine; None derives it from ``num_kv_blocks`` or a default."""
    num_kv_blocks: int | None = None
    """Exact number of KV blocks; overrides ``kv_cache_memory_bytes``."""
    max_num_seqs: int = 64
    """Most requests decoding at once."""
    max_num_batched_tokens: int = 512
    """Most tokens through the model in one step (prefill chunks + decode windows)."""
    max_model_len: int | None = None
    """Longest prompt + output; None takes the model's ``max_position_embeddings``."""
    fast_cpu_linear: bool = True
    """On the CPU, run linear layers as ``W @ x.T`` (MKL gemm) instead of oneDNN's small-batch path: 1.5-2.5x faster
    for few rows here. Numerically equivalent up to float rounding."""

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
