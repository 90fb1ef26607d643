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


SPECULATION_METHODS = ("draft", "prompt_lookup", "self_spec")


@dataclass(slots=True)
class SpeculativeConfig:
    """Which proposer drafts tokens, and how many at most per step."""

    method: str
    num_draft_tokens: int = 8
    """Most drafts per sequence per step (k)."""
    adaptive: bool = True
    """Choose k per sequence and step from acceptance history and measured step costs (up to num_draft_tokens)."""
    draft_model: object = None
    """method='draft': a HF causal LM (or a path / embedded name) on the target's vocabulary and device."""
    max_ngram_size: int = 3
    min_ngram_size: int = 1
    self_spec_layers: int | None = None
    """method='self_spec': the draft is the target's first ``self_spec_layers`` layers + final norm + LM head."""
    draft_confidence: float = 0.0
    """method='draft': stop a sequence's draft where the draft's top probability falls below this."""

    def __post_init__(self) -> None:
        if self.method not in SPECULATION_METHODS:
            raise ValueError(f"unknown speculation method {self.method!r}; choose one of {', '.join(SPECULATION_METHODS)}")
        if not isinstance(self.num_draft_tokens, int) or not 1 <= self.num_draft_tokens <= 64:
            raise ValueError(f"num_draft_tokens must be an integer in [1, 64], got {self.num_draft_tokens!r}")
        if self.method == "draft" and self.draft_model is None:
            raise ValueError("method='draft' needs draft_model")
        if self.method == "self_spec" and (not isinstance(self.self_spec_layers, int) or self.self_spec_layers < 1):
            raise ValueError(f"method='self_spec' needs self_spec_layers >= 1, got {self.self_spec_layers!r}")
        if not 0.0 <= self.draft_confidence < 1.0:
            raise ValueError(f"draft_confidence must be in [0, 1), got {self.draft_confidence!r}")
