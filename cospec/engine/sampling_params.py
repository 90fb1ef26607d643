"""Per-request decoding parameters."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field


@dataclass(slots=True)
class SamplingParams:
    """How one request decodes. ``temperature == 0`` means greedy (argmax)."""

    n: int = 1
    """Samples of the prompt, returned under one request id (``RequestOutput.index``); they share the prompt's
    cached KV blocks. With a seed, sample i uses ``sample_seed(seed, i)``."""
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    """Key of this request's random numbers: the token at output position j is drawn with noise keyed by (seed, j),
    so a seed gives the same tokens whatever else is in the batch, whichever proposer drafts and however long its
    drafts are (with speculation: the same tokens as plain sampling with that seed). None draws a seed at random."""
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    fusion: object = None
    """A ``FusionSpec`` for this request in an engine with a fusion group (None: the group's default spec)."""
    # ---- logits processing (cospec.decoding.logits_processing), applied to target and draft alike ----
    repetition_penalty: float = 1.0
    """Hugging Face's: logits of tokens already in the prompt or output are divided by it (multiplied if negative)."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from the logit of every token that occurs in the output so far."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted once per occurrence of the token in the output so far."""
    no_repeat_ngram_size: int = 0
    """Hugging Face's: ban tokens that would repeat an n-gram of this size (0: off)."""
    bad_words_ids: list[list[int]] | None = None
    """Hugging Face's: token sequences that must not be generated."""
    logit_bias: dict[int, float] | None = None
    """OpenAI's: token id -> bias added to its logit."""
    sequence_bias: dict[tuple[int, ...], float] | None = None
    """Hugging Face's: token sequence -> bias added to its last token's logit when the rest ends the context."""
    logits_processors: list | None = None
    """Hugging Face-style processors, called as ``processor(input_ids [1, L], scores [1, vocab]) -> scores`` per
    position (after the processing above, before temperature / top-k / top-p / min-p)."""
    stopping_criteria: list | None = None
    """Hugging Face-style criteria, called as ``criterion(input_ids [1, L], scores [1, vocab])`` after each output
    token; a true result ends the request (finish reason 'stop')."""
    # ---- what to report ----
    final_only: bool = False
    """``LLMEngine.step()`` returns this request's output only when it finishes, not at every step that gives it
    tokens (offline batches: saves building an output per request and step)."""
    logprobs: int | None = None
    """Report each output token's log-probability and the ``logprobs`` most likely tokens' (None: none), from the
    distribution the token was chosen from (after processing; with temperature, top-k/p and min-p when sampling)."""
    output_scores: bool = False
    """Report the processed logits each output token was chosen from (Hugging Face's ``output_scores``)."""
    output_logits: bool = False
    """Report the raw logits at each output token (Hugging Face's ``output_logits``; fused logits with fusion)."""

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an integer in [0, 2**63), got {self.seed!r}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if not isinstance(self.final_only, bool):
            raise ValueError(f"final_only must be a bool, got {self.final_only!r}")
        self._check_processing()
        if self.fusion is not None:
            from cospec.decoding.fusion import FusionSpec

            if not isinstance(self.fusion, FusionSpec):
                raise ValueError(f"fusion must be a FusionSpec, got {type(self.fusion).__name__}")

    def _check_processing(self) -> None:
        def finite(name: str, low: float = -float("inf")) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number{'' if low == -float('inf') else f' >= {low}'}, "
                                 f"got {value!r}")
            return float(value)

        if finite("repetition_penalty") <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        finite("presence_penalty")
        finite("frequency_penalty")
        if isinstance(self.no_repeat_ngram_size, bool) or not isinstance(self.no_repeat_ngram_size, int) \
                or self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}")
        if self.bad_words_ids is not None:
            self.bad_words_ids = [_token_list(seq, "bad_words_ids") for seq in self.bad_words_ids]
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
            self.logit_bias = {_token_id(k, "logit_bias"): _finite_bias(v, "logit_bias") for k, v in self.logit_bias.items()}
        if self.sequence_bias is not None:
            if not isinstance(self.sequence_bias, dict):
                raise ValueError("sequence_bias must be a dict of token-id tuple -> bias, got "
                                 f"{type(self.sequence_bias).__name__}")
            self.sequence_bias = {tuple(_token_list(k, "sequence_bias")): _finite_bias(v, "sequence_bias")
                                  for k, v in self.sequence_bias.items()}
        for name in ("logits_processors", "stopping_criteria"):
            value = getattr(self, name)
            if value is not None and not all(callable(f) for f in value):
                raise ValueError(f"{name} must be a list of callables")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")

    def token_ids_used(self) -> list[int]:
        """Every token id these parameters name (checked against the vocabulary by the engine)."""
        ids = list(self.stop_token_ids) + list(self.logit_bias or ())
        ids += [t for seq in self.bad_words_ids or () for t in seq] + [t for seq in self.sequence_bias or () for t in seq]
        return ids

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def for_sample(self, index: int) -> SamplingParams:
        """The parameters of sample ``index`` of ``n``: one sample, with its own seed (``sample_seed``)."""
        if self.n == 1:
            return self
        return dataclasses.replace(self, n=1, seed=None if self.seed is None else sample_seed(self.seed, index))


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a request seeded with ``seed``: ``seed`` itself for sample 0 (so sample 0 of
    ``n`` samples is the request with ``n=1``), else 63 bits of SHA-256 of ``(seed, index)``: a stable function,
    the same in every process and version."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _token_id(value, name: str) -> int:
    if isinstance(value, str) and value.lstrip("-").isdigit():  # JSON object keys are strings (OpenAI's logit_bias)
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: token ids must be integers >= 0, got {value!r}")
    return value


def _token_list(value, name: str) -> list[int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name}: expected a sequence of token ids, got {value!r}")
    ids = [_token_id(t, name) for t in value]
    if not ids:
        raise ValueError(f"{name}: token sequences must not be empty")
    return ids


def _finite_bias(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name}: biases must be numbers, got {value!r}")
    return float(value)
