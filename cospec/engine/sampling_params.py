"""Per-request decoding parameters."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SamplingParams:
    """How one request decodes. ``temperature == 0`` means greedy (argmax)."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    """Seeds this request's own random generator: same seed, same output, whatever else is in the batch."""
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    fusion: object = None
    """A ``FusionSpec`` for this request in an engine with a fusion group (None: the group's default spec)."""
    n: int = 1
    """Samples of the prompt; each one's outputs carry its ``RequestOutput.index``."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an integer in [0, 2**63), got {self.seed!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if self.fusion is not None:
            from cospec.decoding.fusion import FusionSpec

            if not isinstance(self.fusion, FusionSpec):
                raise ValueError(f"fusion must be a FusionSpec, got {type(self.fusion).__name__}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
