"""The OpenAI protocol as pydantic models: requests, responses, stream chunks and errors.

Requests are validated strictly: each parameter must have the JSON type OpenAI documents (no coercion of ``"10"`` to
10 or of ``1`` to true), unknown names are refused, and a parameter the server does not implement (tools, echo, ...)
is accepted only at its neutral value. A ``ValidationError`` becomes a 400 naming the parameter
(``cospec.serving.errors.from_validation_error``). Names follow OpenAI's API and vLLM's ``protocol.py``; the
extensions cospec accepts (``top_k``, ``min_p``, ``min_tokens``, ``ignore_eos``, ``repetition_penalty``) are extra
fields, as in vLLM.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer
from pydantic_core import PydanticCustomError

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_LOGPROBS = 20  # as vLLM's default max_logprobs
MAX_N = 128  # as OpenAI
MAX_LOGIT_BIAS = 100.0  # |bias| at most, as OpenAI

FinishReason = Literal["stop", "length", "abort", "error"]


# ---- requests -------------------------------------------------------------------------------------------------
class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(RequestModel):
    include_usage: bool | None = None


class ChatMessage(BaseModel):
    """One turn. Keys other than these (``tool_calls: null``, ``refusal``, ...) are ignored, as clients echo them."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = None

    @field_validator("content", mode="plain")
    @classmethod
    def _text_content(cls, value: Any) -> str:
        """A string, or text parts ``[{"type": "text", "text": ...}]`` joined."""
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                           and isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        if isinstance(value, list):
            raise PydanticCustomError("content_parts", "only text parts are supported")
        raise PydanticCustomError("content", "must be a string or an array of text parts, got {type}",
                                  {"type": json_type(value)})


# Parameters the server does not implement, accepted only at their neutral value.
_NEUTRAL = {
    "tools": lambda v: not v, "functions": lambda v: not v, "tool_choice": lambda v: v in (None, "none", "auto"),
    "response_format": lambda v: v in (None, {"type": "text"}), "store": lambda v: not v,
    "parallel_tool_calls": lambda v: True, "service_tier": lambda v: True, "metadata": lambda v: True,
    "echo": lambda v: not v, "suffix": lambda v: not v, "best_of": lambda v: v in (None, 1),
}


class SamplingRequest(RequestModel):
    """What ``/v1/completions`` and ``/v1/chat/completions`` share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[int, float] | None = None
    user: str | None = None
    # Extensions, with vLLM's names.
    top_k: int | None = Field(None, ge=-1, le=2**31)
    """-1 or 0: all tokens."""
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    repetition_penalty: float | None = Field(None, gt=0)
    # Accepted at their neutral value only.
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    response_format: Any = None
    store: Any = None
    parallel_tool_calls: Any = None
    service_tier: Any = None
    metadata: Any = None

    @field_validator(*_NEUTRAL, mode="after", check_fields=False)
    @classmethod
    def _neutral_only(cls, value: Any, info: ValidationInfo) -> Any:
        if not _NEUTRAL[info.field_name](value):
            raise PydanticCustomError("unsupported", "is not supported by this server (got {value})",
                                      {"value": repr(value)[:100]})
        return value

    @field_validator("stream_options", mode="after")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise PydanticCustomError("stream_options", "only allowed with stream=true")
        return value

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop_strings(cls, value: Any) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise PydanticCustomError("stop", "must be a non-empty string or an array of non-empty strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise PydanticCustomError("stop", "takes at most {limit} strings, got {count}",
                                      {"limit": MAX_STOP_STRINGS, "count": len(stops)})
        return stops

    @field_validator("logit_bias", mode="plain")
    @classmethod
    def _token_biases(cls, value: Any) -> dict[int, float] | None:
        """JSON object keys are strings: ``{"50256": -100}`` becomes {50256: -100.0}."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise PydanticCustomError("logit_bias", "must be an object mapping token ids to biases, got {type}",
                                      {"type": json_type(value)})
        biases = {}
        for key, bias in value.items():
            if not (key.isascii() and key.isdigit()):
                raise PydanticCustomError("logit_bias", "keys must be token ids (decimal integers), got {key}",
                                          {"key": repr(key[:50])})
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not abs(bias) <= MAX_LOGIT_BIAS:
                raise PydanticCustomError("logit_bias", "biases must be numbers in [-{limit}, {limit}], got {bias}",
                                          {"limit": MAX_LOGIT_BIAS, "bias": repr(bias)[:50]})
            biases[int(key)] = float(bias)
        return biases


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: one prompt, as text or token ids (a batch of one is accepted)."""

    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _one_prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]  # a batch of one
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
            raise PydanticCustomError("one_prompt", "one prompt per request, got {count}", {"count": len(value)})
        if value == []:
            raise PydanticCustomError("prompt", "must not be empty")
        raise PydanticCustomError("prompt", "must be a string or an array of token ids")


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs", mode="after")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise PydanticCustomError("top_logprobs", "needs logprobs=true")
        return value


# ---- responses ------------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "cospec"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (OpenAI's field for its own prompt caching)."""


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogProbs(BaseModel):
    """The legacy shape: per output token its text, offset in the completion text, logprob, and the ``logprobs``
    most likely tokens (plus the sampled one) as {text: logprob}."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None


class ChatCompletionLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(BaseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


class CompletionResponseChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """What a chat chunk adds; only the keys that are set are sent (``{}`` in the last chunk)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _set_keys_only(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionResponseStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ---- helpers --------------------------------------------------------------------------------------------------
_JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object", type(None): "null"}


def json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def find_lone_surrogate(body: dict) -> str | None:
    """The top-level name of the first parameter holding a lone UTF-16 surrogate (JSON allows ``"\\ud800"``, but it
    is no Unicode text: no tokenizer or encoder takes it), or None. Iterative: the body may be nested deeply."""
    for name, value in body.items():
        pending = [name, value]
        while pending:
            item = pending.pop()
            if isinstance(item, str):
                if not item.isascii() and any("\ud800" <= c <= "\udfff" for c in item):
                    return name
            elif isinstance(item, list):
                pending += item
            elif isinstance(item, dict):
                pending += [*item.keys(), *item.values()]
    return None
