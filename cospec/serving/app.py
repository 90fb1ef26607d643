"""An OpenAI-compatible HTTP server over ``LLMEngine``: ``cospec serve --model M [--prompt-lookup 3]``.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (server-sent events when ``stream`` is true,
ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

Threads: the asyncio loop (uvicorn) parses requests, (de)tokenizes and streams responses; one engine thread owns the
``LLMEngine`` and is its only caller. Handlers talk to it through a command queue (add, abort) that the thread drains
at the top of each iteration, before ``step()``; it hands each request's outputs to the request's asyncio queue with
``loop.call_soon_threadsafe``. A client that goes away aborts its request, which frees its KV blocks at the next
iteration.

Parameters: OpenAI's ``max_tokens`` (``max_completion_tokens``), ``temperature`` (default 1; 0 is greedy),
``top_p``, ``seed``, ``stop`` (up to 4 strings; the text is cut before the first one, and the request stops there),
``n`` (1 only), ``stream`` and ``stream_options.include_usage``; extensions ``top_k``, ``min_p``, ``min_tokens`` and
``ignore_eos``. Parameters the server does not implement (penalties, logprobs, tools, ...) are accepted only at their
neutral value; anything else, unknown names included, is a 400 naming the parameter.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 bad JSON, types or values and
context overflow, 401 a missing or wrong API key, 404 an unknown model or path, 413 a body over the size limit,
429 a full waiting queue (with ``Retry-After``). None of them touches the engine or the other requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

from cospec.engine.sampling_params import SamplingParams
from cospec.engine.sequence import RequestOutput

logger = logging.getLogger("cospec.server")

MAX_STOP_STRINGS = 4  # as OpenAI
RETRY_AFTER_S = 1


# ---- options and errors -------------------------------------------------------------------------------------
@dataclass(slots=True)
class ServeOptions:
    served_model_name: str
    api_key: str | None = None
    max_waiting: int = 256
    """Most requests queued but not yet running; more get 429."""
    max_tokens_limit: int = 4096
    """Largest ``max_tokens`` a request may ask for."""
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens; None: the model's context."""
    max_request_bytes: int = 1 << 20
    num_threads: int | None = None
    """torch intra-op threads of the engine thread; None keeps torch's default. One thread is often fastest for small
    models on a busy machine, where spinning OpenMP workers wait on each other."""

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        for name in ("max_waiting", "max_tokens_limit", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "num_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class ApiError(Exception):
    """A request the server refuses, rendered as OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- metrics ------------------------------------------------------------------------------------------------
class Metrics:
    """Counters and gauges for ``/metrics``. The engine thread writes token counts and gauges; the loop reads."""

    def __init__(self, num_kv_blocks: int) -> None:
        self._lock = threading.Lock()
        self.http_requests: dict[int, int] = {}
        self.finished: dict[str, int] = {}
        self.prompt_tokens = self.generation_tokens = self.drafted_tokens = self.accepted_tokens = 0
        self.num_waiting = self.num_running = self.kv_blocks_used = 0
        self.kv_blocks_total = num_kv_blocks

    def count_http(self, status: int) -> None:
        with self._lock:
            self.http_requests[status] = self.http_requests.get(status, 0) + 1

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def count_finished(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def render(self) -> str:
        with self._lock:
            rate = self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0
            rows = [
                ("cospec_http_requests_total", "counter", "HTTP requests to /v1 by response status",
                 [(f'{{status="{s}"}}', n) for s, n in sorted(self.http_requests.items())]),
                ("cospec_requests_finished_total", "counter", "Engine requests finished, by reason",
                 [(f'{{reason="{r}"}}', n) for r, n in sorted(self.finished.items())]),
                ("cospec_prompt_tokens_total", "counter", "Prompt tokens admitted", [("", self.prompt_tokens)]),
                ("cospec_generation_tokens_total", "counter", "Tokens generated", [("", self.generation_tokens)]),
                ("cospec_spec_draft_tokens_total", "counter", "Draft tokens proposed", [("", self.drafted_tokens)]),
                ("cospec_spec_accepted_tokens_total", "counter", "Draft tokens accepted", [("", self.accepted_tokens)]),
                ("cospec_spec_acceptance_rate", "gauge", "Accepted / drafted tokens since start", [("", rate)]),
                ("cospec_num_requests_waiting", "gauge", "Requests waiting for the engine", [("", self.num_waiting)]),
                ("cospec_num_requests_running", "gauge", "Requests the engine is running", [("", self.num_running)]),
                ("cospec_kv_blocks_used", "gauge", "KV cache blocks in use", [("", self.kv_blocks_used)]),
                ("cospec_kv_blocks_total", "gauge", "KV cache blocks in the pool", [("", self.kv_blocks_total)]),
            ]
        lines = []
        for name, kind, help_text, samples in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{labels} {value}" for labels, value in samples]
        return "\n".join(lines) + "\n"


# ---- the engine thread --------------------------------------------------------------------------------------
@dataclass(slots=True, eq=False)
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    outputs: asyncio.Queue  # RequestOutput snapshots (each holds all output tokens so far), or an exception
    admitted: asyncio.Future  # None once the engine took it; the engine's exception if it refused it
    # Engine-thread bookkeeping for the metrics deltas.
    seen: list[int] = field(default_factory=lambda: [0, 0, 0])  # output, drafted, accepted tokens


class EngineLoop:
    """Owns the engine: the only thread that calls it. ``add`` and ``abort`` may be called from the asyncio loop."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, metrics: Metrics,
                 num_threads: int | None = None) -> None:
        self.engine, self.loop, self.metrics, self.num_threads = engine, loop, metrics, num_threads
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = False
        self._live: dict[str, _Request] = {}  # engine thread only
        self.num_running = 0  # last published by the engine thread
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cospec-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self.thread.join(timeout=30)

    def add(self, request: _Request) -> None:
        self._commands.put(("add", request))
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wakeup.set()

    @property
    def is_alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def _run(self) -> None:
        if self.num_threads is not None:  # set here: OpenMP keeps the thread count per thread
            import torch

            torch.set_num_threads(self.num_threads)
        try:
            while not self._stopping:
                self._drain_commands()
                if self.engine.has_unfinished_requests():
                    self._step()
                else:
                    self._wakeup.wait()
                    self._wakeup.clear()
        except BaseException as error:  # noqa: BLE001 - record it; /health reports the engine as down
            self.error = error
            logger.error("engine thread died:\n%s", traceback.format_exc())
            for request in self._live.values():
                self._deliver(request, error)

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._add(arg)
            elif arg in self._live:
                del self._live[arg]
                self.engine.abort(arg)
                self.metrics.count_finished("abort")
        self._publish_gauges()

    def _add(self, request: _Request) -> None:
        try:
            self.engine.add_request(request.request_id, request.prompt_token_ids, request.params)
        except Exception as error:  # noqa: BLE001 - a request the engine refuses; the handler answers 400
            self._call(_resolve, request.admitted, error)
            return
        self._live[request.request_id] = request
        self.metrics.add(prompt_tokens=len(request.prompt_token_ids))
        self._call(_resolve, request.admitted, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:  # noqa: BLE001 - an engine bug: fail the requests in flight, keep serving
            logger.error("engine step failed; aborting %d requests:\n%s", len(self._live), traceback.format_exc())
            for request_id, request in list(self._live.items()):
                with contextlib.suppress(Exception):
                    self.engine.abort(request_id)
                self._deliver(request, error)
            self._live.clear()
            return
        for out in outputs:
            request = self._live.get(out.request_id)
            if request is None:
                continue
            stats = out.stats
            now = [len(out.output_token_ids), stats.num_drafted_tokens, stats.num_accepted_tokens]
            self.metrics.add(generation_tokens=now[0] - request.seen[0], drafted_tokens=now[1] - request.seen[1],
                             accepted_tokens=now[2] - request.seen[2])
            request.seen = now
            if out.finished:
                del self._live[out.request_id]
                self.metrics.count_finished(out.finish_reason or "unknown")
            self._deliver(request, out)
        self._publish_gauges()

    def _publish_gauges(self) -> None:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        self.num_running = len(scheduler.running)
        self.metrics.num_waiting, self.metrics.num_running = len(scheduler.waiting), self.num_running
        self.metrics.kv_blocks_used = blocks.num_used_blocks

    def _deliver(self, request: _Request, item) -> None:
        self._call(request.outputs.put_nowait, item)

    def _call(self, fn, *args) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            self.loop.call_soon_threadsafe(fn, *args)


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the handler was cancelled meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


# ---- request parsing ----------------------------------------------------------------------------------------
# Parameters accepted only at their neutral value (the server does not implement them).
_NEUTRAL = {
    "presence_penalty": lambda v: v in (None, 0), "frequency_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v, "logprobs": lambda v: v in (None, False, 0),
    "top_logprobs": lambda v: v in (None, 0),
    "echo": lambda v: v in (None, False), "suffix": lambda v: not v, "best_of": lambda v: v in (None, 1),
    "tools": lambda v: not v, "functions": lambda v: not v, "tool_choice": lambda v: v in (None, "none", "auto"),
    "parallel_tool_calls": lambda v: True, "response_format": lambda v: v in (None, {"type": "text"}),
    "user": lambda v: True, "service_tier": lambda v: True, "metadata": lambda v: True, "store": lambda v: not v,
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options",
           "top_k", "min_p", "min_tokens", "ignore_eos"} | set(_NEUTRAL)
_KNOWN = {"completion": _COMMON | {"prompt"}, "chat": _COMMON | {"messages", "max_completion_tokens"}}
_JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object", type(None): "null"}


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(f"'{name}' must be a number, got {_json_type(value)}", name)
    if not (low < value if low_open else low <= value) or not value <= high:
        raise ApiError(f"'{name}' must be in {'(' if low_open else '['}{low}, {high}], got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"'{name}' must be an integer, got {_json_type(value)}", name)
    if not low <= value <= high:
        raise ApiError(f"'{name}' must be an integer in [{low}, {high}], got {value}", name)
    return value


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"'{name}' must be a boolean, got {_json_type(value)}", name)
    return value


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError("'stop' must be a non-empty string or an array of non-empty strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return stops


@dataclass(slots=True)
class _Job:
    """One parsed request: what to run and how to answer."""

    kind: str  # "completion" | "chat"
    prompt_token_ids: list[int]
    params: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool


def _check_parameters(body: dict, kind: str) -> None:
    for name, value in body.items():
        if name not in _KNOWN[kind]:
            raise ApiError(f"unrecognized request argument: '{name}'", name)
        if name in _NEUTRAL and not _NEUTRAL[name](value):
            raise ApiError(f"'{name}' is not supported by this server (got {value!r})", name)
    if _integer(body, "n", 1, 1, 128) != 1:
        raise ApiError("only n=1 is supported", "n")


# ---- text as it streams -------------------------------------------------------------------------------------
class _TextStream:
    """A request's output text as its tokens arrive: cut at the first stop string; ``delta()`` holds back what may
    still change (a trailing incomplete UTF-8 sequence, or text that could be the start of a stop string).

    Each update decodes all output tokens rather than token by token, so that pieces spanning tokens come out whole."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.text = ""
        self.num_sent = 0  # characters of text already given to the client
        self.is_stopped = False

    def update(self, token_ids: list[int]) -> None:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            text, self.is_stopped = text[: min(found)], True
        self.text = text

    def delta(self, finished: bool) -> str:
        end = len(self.text)
        if not (finished or self.is_stopped):
            text = self.text.rstrip("\ufffd")
            # Hold back the longest tail of the text that begins some stop string.
            end = len(text) - max((k for s in self.stop for k in range(1, min(len(s), len(text) + 1))
                                   if text.endswith(s[:k])), default=0)
        # A later token can change how earlier ones decode (rare): what was sent stays sent, by position.
        piece = self.text[self.num_sent:end]
        self.num_sent += len(piece)
        return piece


# ---- the app ------------------------------------------------------------------------------------------------
class Server:
    """The HTTP side: parses and validates requests, submits them to the engine loop, shapes the answers."""

    def __init__(self, engine, options: ServeOptions) -> None:
        self.engine, self.options = engine, options
        self.tokenizer = engine.tokenizer
        self.metrics = Metrics(engine.block_manager.num_blocks)
        self.max_prompt_tokens = min(options.max_prompt_tokens or engine.max_model_len, engine.max_model_len)
        self.created = int(time.time())
        self.loop: EngineLoop | None = None
        self.num_in_engine = 0  # submitted requests the engine has not finished (asyncio loop only)

    # ---- parsing ----
    async def _read_json(self, request) -> dict:
        limit = self.options.max_request_bytes
        length = request.headers.get("content-length")
        too_large = ApiError(f"the request body exceeds {limit} bytes", status=413, code="request_too_large")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ApiError(f"the request body is not valid JSON: {error}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(f"the request body must be a JSON object, got {_json_type(body)}")
        return body

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.options.served_model_name:
            raise ApiError(f"the model '{model}' does not exist; this server serves '{self.options.served_model_name}'",
                           "model", status=404, code="model_not_found")

    def _check_capacity(self) -> None:
        num_waiting = self.num_in_engine - self.loop.num_running
        if num_waiting >= self.options.max_waiting:
            raise ApiError(f"the server is busy ({num_waiting} requests waiting); retry later", status=429,
                           type="rate_limit_error", code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})

    def _need_tokenizer(self, param: str) -> None:
        if self.tokenizer is None:
            raise ApiError("this model has no tokenizer: give the prompt as token ids", param)

    def _completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            self._need_tokenizer("prompt")
            return list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.engine.vocab_size
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise ApiError(f"token id {bad} in 'prompt' is outside the vocabulary [0, {vocab})", "prompt")
            return list(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise ApiError(f"one prompt per request, got {len(prompt)}", "prompt")
        raise ApiError("'prompt' must be a string or an array of token ids", "prompt")

    def _chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError("'messages' must be a non-empty array", "messages")
        turns = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ApiError(f"messages[{i}] must be an object", "messages")
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "developer", "user", "assistant"):
                raise ApiError(f"messages[{i}].role must be system, developer, user or assistant, got {role!r}",
                               "messages")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise ApiError(f"messages[{i}].content: only text parts are supported", "messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise ApiError(f"messages[{i}].content must be a string, got {_json_type(content)}", "messages")
            turns.append({"role": "system" if role == "developer" else role, "content": content})
        self._need_tokenizer("messages")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ApiError("this model has no chat template; use /v1/completions", "messages")
        try:
            ids = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        except Exception as error:  # noqa: BLE001 - a template that rejects the conversation (e.g. role order)
            raise ApiError(f"the chat template rejected the messages: {error}", "messages") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _job(self, body: dict, kind: str) -> _Job:
        _check_parameters(body, kind)
        prompt_param = "prompt" if kind == "completion" else "messages"
        stop = _stop_strings(body)
        stream = _boolean(body, "stream", False)
        stream_options = body.get("stream_options")
        if stream_options is not None and (not isinstance(stream_options, dict) or not stream):
            raise ApiError("'stream_options' must be an object, and only with stream=true", "stream_options")
        include_usage = _boolean(stream_options or {}, "include_usage", False)
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
        min_p = _number(body, "min_p", 0.0, 0.0, 1.0)
        top_k = _integer(body, "top_k", 0, -1, 1 << 31)
        seed = _integer(body, "seed", None, -(1 << 63), (1 << 64) - 1)
        ignore_eos = _boolean(body, "ignore_eos", False)
        prompt = self._completion_prompt(body) if kind == "completion" else self._chat_prompt(body)
        if not prompt:
            raise ApiError("the prompt is empty", prompt_param)
        if len(prompt) > self.max_prompt_tokens:
            raise ApiError(f"the prompt has {len(prompt)} tokens; the limit is {self.max_prompt_tokens}",
                           prompt_param, code="context_length_exceeded")
        room = self.engine.max_model_len - len(prompt)
        limit = self.options.max_tokens_limit
        max_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        default = 16 if kind == "completion" else max(1, min(limit, room))  # OpenAI's defaults: 16; the context
        max_tokens = _integer(body, max_param, default, 1, limit)
        if max_tokens > room:
            raise ApiError(f"this model's context is {self.engine.max_model_len} tokens; the prompt has {len(prompt)} "
                           f"and max_tokens asks for {max_tokens} more", max_param, code="context_length_exceeded")
        min_tokens = _integer(body, "min_tokens", 0, 0, max_tokens)
        params = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, temperature=temperature,
                                top_k=max(top_k, 0), top_p=top_p, min_p=min_p,
                                seed=None if seed is None else seed % (1 << 64), ignore_eos=ignore_eos)
        return _Job(kind, prompt, params, stop, stream, include_usage)

    # ---- handlers ----
    async def completions(self, request):
        return await self._serve(request, "completion")

    async def chat_completions(self, request):
        return await self._serve(request, "chat")

    async def _serve(self, request, kind: str):
        from starlette.responses import JSONResponse

        body = await self._read_json(request)
        self._check_model(body)
        self._check_capacity()
        job = self._job(body, kind)
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        loop = asyncio.get_running_loop()
        req = _Request(f"{prefix}-{uuid.uuid4().hex}", job.prompt_token_ids, job.params, asyncio.Queue(),
                       loop.create_future())
        self.num_in_engine += 1
        done = _Once(lambda: self._release(req))
        self.loop.add(req)
        try:
            await req.admitted
        except asyncio.CancelledError:
            done()
            raise
        except Exception as error:  # noqa: BLE001 - the engine refused it (ValueError naming the problem)
            done()
            raise ApiError(str(error), "prompt" if kind == "completion" else "messages") from None
        shape = _Shape(kind, req.request_id, self.options.served_model_name)
        text = _TextStream(self.tokenizer, job.stop) if self.tokenizer is not None else None
        if job.stream:
            return _EventStream(self._events(req, job, shape, text, done), on_close=done)
        try:
            result = await _until_disconnect(request, self._final(req, text))
        finally:
            done()
        if result is None:  # the client left; nobody reads this
            from starlette.responses import Response

            return Response(status_code=499)
        out, finish_reason = result
        return JSONResponse(shape.full(text.text if text else "", finish_reason, _usage(out)))

    def _release(self, req: _Request) -> None:
        """The handler is done with ``req``: abort it in case the engine still runs it (the engine thread ignores
        ids it no longer runs), and make room in the queue."""
        self.num_in_engine -= 1
        self.loop.abort(req.request_id)

    async def _next_output(self, req: _Request) -> RequestOutput:
        """The newest output of ``req`` (the earlier ones queued meanwhile are contained in it)."""
        item = await req.outputs.get()
        while not req.outputs.empty() and not isinstance(item, BaseException):
            item = req.outputs.get_nowait()
        if isinstance(item, BaseException):
            raise ApiError(f"the engine failed on this request: {item}", status=500, type="server_error")
        return item

    async def _final(self, req: _Request, text: _TextStream | None) -> tuple[RequestOutput, str]:
        while True:
            out = await self._next_output(req)
            if text is not None:
                text.update(out.output_token_ids)
                if text.is_stopped:
                    return out, "stop"
            if out.finished:
                return out, out.finish_reason

    async def _events(self, req: _Request, job: _Job, shape: _Shape, text: _TextStream | None, done: _Once):
        try:
            if job.kind == "chat":
                yield _sse(shape.chunk({"role": "assistant", "content": ""}, None))
            while True:
                try:
                    out = await self._next_output(req)
                except ApiError as error:
                    yield _sse(error.body())
                    break
                finish_reason = None
                if text is not None:
                    text.update(out.output_token_ids)
                    finish_reason = "stop" if text.is_stopped else None
                finish_reason = finish_reason or (out.finish_reason if out.finished else None)
                piece = text.delta(finished=finish_reason is not None) if text is not None else ""
                if piece:
                    yield _sse(shape.chunk(piece, None))
                if finish_reason is not None:
                    done()  # abort at once on a stop string, before the client reads the rest
                    yield _sse(shape.chunk(None, finish_reason))
                    if job.include_usage:
                        yield _sse(shape.usage_chunk(_usage(out)))
                    break
            yield "data: [DONE]\n\n"
        finally:
            done()

    async def models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [{
            "id": self.options.served_model_name, "object": "model", "created": self.created, "owned_by": "cospec",
            "max_model_len": self.engine.max_model_len}]})

    async def health(self, request):
        from starlette.responses import JSONResponse

        if self.loop is None or not self.loop.is_alive:
            return JSONResponse({"status": "engine down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request):
        from starlette.responses import PlainTextResponse

        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")


class _Once:
    """A callable that runs ``fn`` the first time only."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


async def _until_disconnect(request, work):
    """Await ``work`` unless the client disconnects first (then cancel it and return None)."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work_task, watch_task = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        finished, _ = await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
    return work_task.result() if work_task in finished else None


def _usage(out: RequestOutput) -> dict:
    prompt, completion = len(out.prompt_token_ids), len(out.output_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


@dataclass(slots=True)
class _Shape:
    """OpenAI's response objects for one request: text completions or chat completions."""

    kind: str
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def full(self, text: str, finish_reason: str, usage: dict) -> dict:
        if self.kind == "completion":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            return self._head("text_completion") | {"choices": [choice], "usage": usage}
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        return self._head("chat.completion") | {"choices": [choice], "usage": usage}

    def chunk(self, delta, finish_reason: str | None) -> dict:
        """A streamed piece: ``delta`` is text (None: none), or for chat a delta object."""
        if self.kind == "completion":
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
            return self._head("text_completion") | {"choices": [choice]}
        if not isinstance(delta, dict):
            delta = {} if delta is None else {"content": delta}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._head("chat.completion.chunk") | {"choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return self._head("text_completion" if self.kind == "completion" else "chat.completion.chunk") | {
            "choices": [], "usage": usage}


def _event_stream_class():
    from starlette.responses import StreamingResponse

    class EventStream(StreamingResponse):
        """Server-sent events; ``on_close`` runs however the response ends (finished, client gone, cancelled)."""

        def __init__(self, events, on_close) -> None:
            super().__init__(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.on_close = on_close

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    return EventStream


def _EventStream(events, on_close):  # noqa: N802 - builds the class lazily, so importing this module needs no starlette
    return _event_stream_class()(events, on_close)


class _Gate:
    """ASGI middleware: the API key (all paths but /health) and the count of /v1 responses by status."""

    def __init__(self, app, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.startswith("/v1/"):
            inner_send = send

            async def send(message) -> None:
                if message["type"] == "http.response.start":
                    self.metrics.count_http(message["status"])
                await inner_send(message)
        if self.api_key is not None and path != "/health" and not self._authorized(scope):
            error = ApiError("missing or invalid API key: send 'Authorization: Bearer <key>'", status=401,
                             type="authentication_error", code="invalid_api_key")
            return await _error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


def _error_response(error: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def build_app(engine, options: ServeOptions):
    """The ASGI app; the engine thread runs while the app's lifespan does."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    server = Server(engine, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.loop = EngineLoop(engine, asyncio.get_running_loop(), server.metrics, options.num_threads)
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop()

    async def api_error(request, error: ApiError):
        return _error_response(error)

    async def http_error(request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = f"{error.detail}: {request.method} {request.url.path}"
        return _error_response(ApiError(message, status=error.status_code, code=code))

    async def server_error(request, error: Exception):
        return _error_response(ApiError(f"internal server error: {type(error).__name__}", status=500,
                                        type="server_error"))

    routes = [
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.server = server
    return _Gate(app, options.api_key, server.metrics)


# ---- command line -------------------------------------------------------------------------------------------
def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``serve`` flags (``cospec serve`` and ``python -m cospec.engine.server`` share them)."""
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name, model directory or .gguf file")
    parser.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    parser.add_argument("--dtype", default="float32", help="model dtype (float32, bfloat16, float16, float64)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    spec = parser.add_argument_group("speculative decoding").add_mutually_exclusive_group()
    spec.add_argument("--draft", default=None, metavar="MODEL", help="a draft model on the same vocabulary")
    spec.add_argument("--prompt-lookup", type=int, default=None, metavar="N", help="draft by n-gram lookup (n <= N)")
    spec.add_argument("--self-spec", type=int, default=None, metavar="L", help="the target's first L layers draft")
    parser.add_argument("--num-draft-tokens", type=int, default=8, metavar="K", help="most drafts per step")
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    net.add_argument("--port", type=int, default=8000)
    net.add_argument("--api-key", default=os.environ.get("COSPEC_API_KEY"),
                     help="require 'Authorization: Bearer KEY' (default: $COSPEC_API_KEY; unset: no key)")
    net.add_argument("--log-level", default="warning", help="uvicorn log level")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429")
    limits.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    limits.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: the context)")
    limits.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest request body")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="KV cache budget (default 1 GiB)")
    engine.add_argument("--max-num-seqs", type=int, default=64, help="most requests decoding at once")
    engine.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output")
    engine.add_argument("--threads", type=int, default=None, help="torch threads of the engine (default: torch's)")
    return parser


def serve_main(args: argparse.Namespace) -> int:
    """Load the model, then serve until interrupted."""
    import torch
    import uvicorn

    from cospec.engine.config import EngineConfig, choose_speculation
    from cospec.engine.llm_engine import LLMEngine

    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        raise ValueError(f"--dtype {args.dtype!r} is not a torch dtype")
    options = ServeOptions(args.served_model_name or args.model, args.api_key, args.max_waiting,
                           args.max_tokens_limit, args.max_prompt_tokens, args.max_request_bytes, args.threads)
    speculative = choose_speculation(args.num_draft_tokens, args.draft, args.prompt_lookup, args.self_spec)
    config = EngineConfig(kv_cache_memory_bytes=args.kv_cache_memory_bytes, max_num_seqs=args.max_num_seqs,
                          max_model_len=args.max_model_len)
    engine = LLMEngine(args.model, config, dtype=args.dtype, device=args.device, speculative=speculative)
    app = build_app(engine, options)
    print(f"cospec: serving {options.served_model_name!r} at http://{args.host}:{args.port}/v1 "
          f"({engine.block_manager.num_blocks} KV blocks, context {engine.max_model_len})", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                  access_log=False, timeout_graceful_shutdown=5)).run()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _parser = add_serve_arguments(argparse.ArgumentParser(prog="python -m cospec.engine.server",
                                                          description=__doc__.splitlines()[0]))
    sys.exit(serve_main(_parser.parse_args()))
