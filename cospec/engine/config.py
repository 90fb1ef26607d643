"""Engine configuration, checked when it is built."""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULING_POLICIES = ("fair", "fcfs")


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
    """On the CPU, run linear layers through MKL's ``W @ x.T`` or oneDNN with prepacked weights where a row plan
    (measured once per machine and model shape, kept on disk) found them faster than ``F.linear`` for the row count:
    1.5-3.5x faster for few rows here; on one thread, with ``F.linear``, while other processes take the cores.
    Numerically equivalent up to float rounding. See ``cospec.engine.cpu_linear``, ``cpu_plans``, ``cpu_threads``."""
    packed_cpu_weights: bool = True
    """With ``fast_cpu_linear``: allow oneDNN's prepacked copies of float32/bfloat16 weights where they are faster
    (3 or more rows here). They take as much memory again as the linear weights; False saves that memory."""
    kv_region_tokens: int | None = None
    """Give each of the ``max_num_seqs`` sequences a fixed region of the KV pool with room for this many tokens (the
    pool is sized from it; leave ``num_kv_blocks`` and ``kv_cache_memory_bytes`` unset). Each sequence's K/V then lie
    in one run of the pool, and the CPU attention path reads them in place instead of gathering them every layer
    and step. For a batch whose lengths are known in advance (``cospec.generate`` uses it); no prefix caching, and a
    request longer than a region is refused. None: blocks come from one shared pool. See ``RegionBlockManager``."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of a prompt prefix computed before (a system prompt, earlier turns of a conversation)
    instead of recomputing them; see ``cospec.engine.block_manager``."""
    scheduling_policy: str = "fair"
    """'fair': decodes and new requests' first chunks go into every step, and prefills already running are cut so that
    such a step costs at most about twice what those cost alone (a short request never waits for a long prompt to
    finish prefilling). 'fcfs': running prefills take the step's budget first. See ``cospec.engine.scheduler``."""
    fair_prefill_tokens: int | None = None
    """With 'fair': how many tokens a running prefill may add to a step beyond its latency-sensitive work (the tokens
    whose forward costs as much as a step's fixed cost). None: measured from the engine's step times."""

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")
        if self.kv_region_tokens is not None:
            if self.kv_region_tokens <= 0:
                raise ValueError(f"kv_region_tokens must be positive, got {self.kv_region_tokens}")
            if self.num_kv_blocks is not None or self.kv_cache_memory_bytes is not None:
                raise ValueError("kv_region_tokens sizes the KV pool (max_num_seqs regions); leave num_kv_blocks and "
                                 "kv_cache_memory_bytes unset")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"unknown scheduling_policy {self.scheduling_policy!r}; choose one of "
                             f"{', '.join(SCHEDULING_POLICIES)}")
        if self.fair_prefill_tokens is not None and (isinstance(self.fair_prefill_tokens, bool)
                                                     or not isinstance(self.fair_prefill_tokens, int)
                                                     or self.fair_prefill_tokens < 1):
            raise ValueError(f"fair_prefill_tokens must be None or an integer >= 1, got {self.fair_prefill_tokens!r}")


SPECULATION_METHODS = ("draft", "prompt_lookup", "self_spec", "ngram", "eagle3")


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
    ngram_model: object = None
    """method='ngram': an ``NgramLM`` that drafts by greedy retrieval."""
    draft_head: object = None
    """method='eagle3': an EAGLE-3 head: its directory (speculators or EAGLE-3 layout), "default" (the model's
    default head, made by ``cospec train-draft --model M``) or an ``Eagle3Head``."""
    deferral_threshold: float | None = None
    """Confidence deferral (lossy, BiLD style): the draft model's tokens are kept without verification while its top
    probability is >= this; the target runs only where it is not, taking in the pending tokens in the same forward."""
    deferral_rollback: float | None = None
    """With deferral: the target rolls back a deferred token to which it gives a probability below this."""

    def __post_init__(self) -> None:
        if self.method not in SPECULATION_METHODS:
            raise ValueError(f"unknown speculation method {self.method!r}; choose one of {', '.join(SPECULATION_METHODS)}")
        if not isinstance(self.num_draft_tokens, int) or not 1 <= self.num_draft_tokens <= 64:
            raise ValueError(f"num_draft_tokens must be an integer in [1, 64], got {self.num_draft_tokens!r}")
        if self.method == "draft" and self.draft_model is None:
            raise ValueError("method='draft' needs draft_model")
        if self.method == "self_spec" and (not isinstance(self.self_spec_layers, int) or self.self_spec_layers < 1):
            raise ValueError(f"method='self_spec' needs self_spec_layers >= 1, got {self.self_spec_layers!r}")
        if self.method == "ngram" and self.ngram_model is None:
            raise ValueError("method='ngram' needs ngram_model")
        if self.method == "eagle3" and self.draft_head is None:
            raise ValueError("method='eagle3' needs draft_head (a directory, \"default\" or an Eagle3Head)")
        if self.deferral_threshold is not None:
            if self.method != "draft":
                raise ValueError("deferral needs method='draft' (a small model whose confidence decides)")
            if not 0.0 < self.deferral_threshold <= 1.0:
                raise ValueError(f"deferral_threshold must be in (0, 1], got {self.deferral_threshold!r}")
            self.draft_confidence = self.deferral_threshold
            self.adaptive = False
        if self.deferral_rollback is not None and not 0.0 <= self.deferral_rollback < 1.0:
            raise ValueError(f"deferral_rollback must be in [0, 1), got {self.deferral_rollback!r}")
        if not 0.0 <= self.draft_confidence < 1.0 and self.deferral_threshold is None:
            raise ValueError(f"draft_confidence must be in [0, 1), got {self.draft_confidence!r}")


def choose_speculation(num_draft_tokens: int, draft=None, max_ngram_size: int | None = None,
                       self_spec_layers: int | None = None,
                       names: tuple[str, ...] = ("draft", "prompt_lookup", "self_spec_layers", "draft_head"),
                       draft_head=None) -> SpeculativeConfig | None:
    """The SpeculativeConfig for at most one of: a draft model, prompt lookup with n-grams up to ``max_ngram_size``,
    self-speculation from ``self_spec_layers`` layers, or an EAGLE-3 ``draft_head``; ``names`` are the caller's
    names of those four options, for the error when several are given."""
    chosen = [name for name, value in zip(names, (draft, max_ngram_size, self_spec_layers, draft_head))
              if value is not None]
    if len(chosen) > 1:
        raise ValueError(f"choose one way to draft, got {' and '.join(chosen)}")
    if draft is not None:
        return SpeculativeConfig("draft", num_draft_tokens=num_draft_tokens, draft_model=draft)
    if max_ngram_size is not None:
        return SpeculativeConfig("prompt_lookup", num_draft_tokens=num_draft_tokens, max_ngram_size=max_ngram_size)
    if self_spec_layers is not None:
        return SpeculativeConfig("self_spec", num_draft_tokens=num_draft_tokens, self_spec_layers=self_spec_layers)
    if draft_head is not None:
        return SpeculativeConfig("eagle3", num_draft_tokens=num_draft_tokens, draft_head=draft_head)
    return None


@dataclass(slots=True)
class FusionConfig:
    """A fusion group: the target plus ``members`` (HF models, names/paths of models, or ``NgramLM`` objects), whose
    next-token distributions are combined by ``spec`` at every position (a request may override the spec)."""

    members: list = None
    spec: object = None
    """A ``cospec.decoding.fusion.FusionSpec`` over [target, *members], in that order."""

    def __post_init__(self) -> None:
        from cospec.decoding.fusion import FusionSpec

        if not self.members:
            raise ValueError("a fusion group needs at least one member besides the target")
        if not isinstance(self.spec, FusionSpec):
            raise ValueError(f"spec must be a FusionSpec, got {type(self.spec).__name__}")
        if self.spec.num_members != 1 + len(self.members):
            raise ValueError(f"the fusion spec combines {self.spec.num_members} models, but the group has "
                             f"{1 + len(self.members)} (the target and {len(self.members)} members)")
