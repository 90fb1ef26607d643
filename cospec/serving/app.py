"""The OpenAI-compatible HTTP API over an engine client (the engine of this process, or Ray Serve replicas).

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (server-sent events when ``stream`` is true,
ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

Parameters: OpenAI's ``max_tokens`` (``max_completion_tokens``), ``temperature`` (default 1; 0 is greedy),
``top_p``, ``seed``, ``stop`` (up to 4 strings; the text is cut before the first one, and the choice stops there),
``n``, ``logprobs`` / ``top_logprobs``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``stream`` and
``stream_options.include_usage``; extensions ``top_k``, ``min_p``, ``min_tokens``, ``ignore_eos`` and
``repetition_penalty``. See ``cospec.serving.protocol`` for the validation and ``cospec.serving.errors`` for the
error statuses; no error touches the engine or the other requests.

Shutdown (``begin_drain``): new requests get 503 and ``/health`` reports "draining"; running requests go on until
the drain time runs out, then each stream ends with an error event and ``data: [DONE]`` (a non-streamed request gets
a 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pydantic import ValidationError

from cospec.engine.sampling_params import SamplingParams
from cospec.engine.sequence import RequestOutput
from cospec.serving import protocol as p
from cospec.serving.asgi import CatchUnexpected, Gate, error_response, event_stream, sse, unexpected, until_disconnect
from cospec.serving.engine_client import EngineFailed, RequestStream, ServerShuttingDown
from cospec.serving.errors import ApiError, from_validation_error
from cospec.serving.metrics import CONTENT_TYPE, RequestMetrics, ServerMetrics
from cospec.serving.text import ChoiceText, chat_logprobs, completion_logprobs

logger = logging.getLogger("cospec.serving")

RETRY_AFTER_S = 1


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
    drain_timeout_s: float = 30.0
    """On shutdown, how long running requests may go on before their streams are ended."""

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        for name in ("max_waiting", "max_tokens_limit", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")


@dataclass(slots=True)
class _Job:
    """One validated request: what to run and how to answer."""

    kind: str  # "completion" | "chat"
    prompt_token_ids: list[int]
    params: SamplingParams
    num_choices: int
    stop: list[str]
    stream: bool
    include_usage: bool
    num_logprobs: int | None  # None: no logprobs; else how many top tokens per position
    affinity_key: str


@dataclass(slots=True, eq=False)
class _Choice:
    index: int
    text: ChoiceText
    output: RequestOutput | None = None
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)  # the logprobs objects of a non-streamed answer, in order


@dataclass(slots=True, eq=False)
class _Response:
    """One request in flight: its engine stream, its choices and the response objects' header."""

    job: _Job
    stream: RequestStream
    metrics: RequestMetrics
    choices: list[_Choice]
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def is_finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def usage(self) -> p.UsageInfo:
        prompt = len(self.job.prompt_token_ids)
        outputs = [c.output for c in self.choices if c.output is not None]
        completion = sum(len(o.output_token_ids) for o in outputs)
        # The samples of n > 1 reuse each other's prompt blocks: the fewest any of them found cached is what the
        # prompt found from earlier requests.
        cached = min((o.stats.num_cached_prompt_tokens for o in outputs), default=0)
        return p.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                           prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached))


class Server:
    """The HTTP side: validates requests, submits them to the engine client, shapes the answers."""

    def __init__(self, client, options: ServeOptions) -> None:
        self.client, self.options = client, options
        self.tokenizer = client.tokenizer
        self.metrics = ServerMetrics(client.gauges)
        self.max_prompt_tokens = min(options.max_prompt_tokens or client.max_model_len, client.max_model_len)
        self.created = int(time.time())
        self.num_in_engine = 0  # submitted requests not yet closed (asyncio loop only)
        self.active: set[RequestStream] = set()
        self.draining = False
        self._drain_deadline = 0.0
        # Tokenizing and chat templates run here, off the event loop (one thread: the tokenizer is shared).
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="cospec-tokenize")

    # ---- parsing ----
    async def _read_json(self, request) -> dict:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(f"the request body must be JSON sent with 'Content-Type: application/json', got "
                           f"{media_type or 'no Content-Type'!r}", status=415, code="unsupported_media_type")
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
            raise ApiError(f"the request body must be a JSON object, got {p.json_type(body)}")
        param = p.find_lone_surrogate(body)
        if param is not None:
            raise ApiError(f"'{param}' holds a lone UTF-16 surrogate (an escape such as \\ud800 that is not half "
                           "of a pair); strings must be valid Unicode", param)
        return body

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.options.served_model_name:
            raise ApiError(f"the model '{model}' does not exist; this server serves '{self.options.served_model_name}'",
                           "model", status=404, code="model_not_found")

    def _check_capacity(self) -> None:
        num_waiting = self.num_in_engine - self.client.gauges().num_running
        if num_waiting >= self.options.max_waiting:
            raise ApiError(f"the server is busy ({num_waiting} requests waiting); retry later", status=429,
                           type="rate_limit_error", code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})

    def _need_tokenizer(self, param: str) -> None:
        if self.tokenizer is None:
            raise ApiError("this model has no tokenizer: give the prompt as token ids", param)

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    async def _completion_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            self._need_tokenizer("prompt")
            return list((await self._off_loop(self.tokenizer, prompt))["input_ids"])
        vocab = self.client.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(f"token id {bad} in 'prompt' is outside the vocabulary [0, {vocab})", "prompt")
        return prompt

    async def _chat_prompt(self, messages: list[p.ChatMessage]) -> list[int]:
        self._need_tokenizer("messages")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ApiError("this model has no chat template; use /v1/completions", "messages")
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
        try:
            ids = await self._off_loop(lambda: self.tokenizer.apply_chat_template(turns, add_generation_prompt=True,
                                                                                 tokenize=True))
        except Exception as error:  # noqa: BLE001 - a template that rejects the conversation (e.g. role order)
            raise ApiError(f"the chat template rejected the messages: {error}", "messages") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _job(self, request: p.CompletionRequest | p.ChatCompletionRequest, prompt: list[int]) -> _Job:
        kind = "chat" if isinstance(request, p.ChatCompletionRequest) else "completion"
        prompt_param = "prompt" if kind == "completion" else "messages"
        if not prompt:
            raise ApiError("the prompt is empty", prompt_param)
        if len(prompt) > self.max_prompt_tokens:
            raise ApiError(f"the prompt has {len(prompt)} tokens; the limit is {self.max_prompt_tokens}",
                           prompt_param, code="context_length_exceeded")
        room = self.client.max_model_len - len(prompt)
        limit = self.options.max_tokens_limit
        max_param, max_tokens = "max_tokens", request.max_tokens
        if kind == "chat" and request.max_completion_tokens is not None:
            max_param, max_tokens = "max_completion_tokens", request.max_completion_tokens
        if max_tokens is None:
            max_tokens = 16 if kind == "completion" else max(1, min(limit, room))  # OpenAI's defaults: 16; the context
        if max_tokens > limit:
            raise ApiError(f"'{max_param}' must be at most {limit}, got {max_tokens}", max_param)
        if max_tokens > room:
            raise ApiError(f"this model's context is {self.client.max_model_len} tokens; the prompt has {len(prompt)} "
                           f"and {max_param} asks for {max_tokens} more", max_param, code="context_length_exceeded")
        min_tokens = request.min_tokens or 0
        if min_tokens > max_tokens:
            raise ApiError(f"'min_tokens' must be at most max_tokens={max_tokens}, got {min_tokens}", "min_tokens")
        vocab = self.client.vocab_size
        bad = next((t for t in request.logit_bias or {} if t >= vocab), None)
        if bad is not None:
            raise ApiError(f"token id {bad} in 'logit_bias' is outside the vocabulary [0, {vocab})", "logit_bias")
        if kind == "chat":
            num_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        else:
            num_logprobs = request.logprobs
        fields = dict(max_tokens=max_tokens, min_tokens=min_tokens, temperature=_default(request.temperature, 1.0),
                      top_k=max(request.top_k or 0, 0), top_p=_default(request.top_p, 1.0),
                      min_p=_default(request.min_p, 0.0), seed=request.seed, ignore_eos=bool(request.ignore_eos))
        # Parameters a client sets go to the engine as they are; unset ones keep SamplingParams' defaults.
        extensions = dict(n=request.n, logprobs=num_logprobs, presence_penalty=request.presence_penalty,
                          frequency_penalty=request.frequency_penalty, repetition_penalty=request.repetition_penalty,
                          logit_bias=request.logit_bias)
        fields.update((name, value) for name, value in extensions.items() if value is not None)
        try:
            params = SamplingParams(**fields)
        except ValueError as error:  # a combination SamplingParams refuses; its message names the field
            message = str(error)
            raise ApiError(message, next((f for f in fields if message.startswith(f)), None)) from None
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return _Job(kind, prompt, params, request.n or 1, request.stop or [], bool(request.stream), include_usage,
                    num_logprobs, _affinity_key(request, prompt))

    # ---- handlers ----
    async def completions(self, request):
        return await self._serve(request, p.CompletionRequest)

    async def chat_completions(self, request):
        return await self._serve(request, p.ChatCompletionRequest)

    async def _serve(self, request, request_model):
        from starlette.responses import JSONResponse, Response

        arrival_time = time.perf_counter()
        if self.draining:
            raise ApiError("the server is shutting down", status=503, type="server_error", code="shutting_down")
        body = await self._read_json(request)
        try:
            parsed = request_model.model_validate(body)
        except ValidationError as error:
            raise from_validation_error(error) from None
        self._check_model(parsed.model)
        self._check_capacity()
        self.num_in_engine += 1  # taken at once: the awaits below let other requests pass the check meanwhile
        try:
            stream, job = await self._submit(parsed)
        except BaseException:
            self.num_in_engine -= 1
            raise
        self.active.add(stream)
        response = _Response(job, stream, self.metrics.request(len(job.prompt_token_ids), arrival_time),
                             [_Choice(i, ChoiceText(self.tokenizer, job.stop)) for i in range(job.num_choices)],
                             stream.request_id, self.options.served_model_name)
        headers = {"X-Cospec-Replica": stream.replica} if stream.replica else {}
        if job.stream:
            return event_stream(self._events(response), on_close=lambda: self._close(response), headers=headers)
        try:
            finished = await until_disconnect(request, self._final(response))
        finally:
            self._close(response)
        if not finished:  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse(self._full_response(response).model_dump(mode="json"), headers=headers)

    async def _submit(self, parsed) -> tuple[RequestStream, _Job]:
        if isinstance(parsed, p.ChatCompletionRequest):
            prompt = await self._chat_prompt(parsed.messages)
        else:
            prompt = await self._completion_prompt(parsed.prompt)
        job = self._job(parsed, prompt)
        request_id = f"{'chatcmpl' if job.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            stream = await self.client.submit(request_id, job.prompt_token_ids, job.params, job.affinity_key)
        except (ValueError, TypeError) as error:  # the engine refused it (naming the problem)
            raise ApiError(str(error), "prompt" if job.kind == "completion" else "messages") from None
        except EngineFailed as error:
            raise ApiError(str(error), status=503, type="server_error", code="engine_down") from None
        return stream, job

    def _close(self, response: _Response) -> None:
        """The handler is done with the request: abort what still runs, count the choices cut short."""
        if response.stream.is_closed:
            return
        response.stream.close()
        self.active.discard(response.stream)
        self.num_in_engine -= 1
        for choice in response.choices:
            if choice.finish_reason is None:
                choice.finish_reason = "abort"
                response.metrics.finish_choice(choice.index, 0, "abort")

    async def _advance(self, response: _Response) -> list[tuple[_Choice, str, list | None, str | None]]:
        """Wait for new outputs; for each choice that changed: (choice, new text, logprobs of the tokens it
        releases (None without logprobs), finish reason or None)."""
        try:
            outputs = await response.stream.next()
        except EngineFailed as error:
            raise ApiError(str(error), status=500, type="server_error", code="engine_error") from None
        except ServerShuttingDown:
            raise ApiError("the server shut down before this request finished", status=503, type="server_error",
                           code="shutting_down") from None
        updates = []
        for index, out in sorted(outputs.items()):
            choice = response.choices[index]
            if choice.finish_reason is not None:
                continue
            if out.finish_reason == "error":  # e.g. the model gave NaN logits for this request: fail it, loudly
                raise ApiError(f"the engine failed on this request: {out.error}", status=500, type="server_error",
                               code="engine_error")
            response.metrics.update(out)
            choice.output = out
            text = choice.text
            if self.tokenizer is not None:
                text.update(out.output_token_ids)
            finish_reason = "stop" if text.is_stopped else (out.finish_reason if out.finished else None)
            piece = text.delta(finished=finish_reason is not None) if self.tokenizer is not None else ""
            logprobs = None
            if response.job.num_logprobs is not None and self.tokenizer is not None:
                logprobs = self._logprobs(response, choice, text.tokens_to_report(finish_reason is not None))
            if finish_reason is not None:
                choice.finish_reason = finish_reason
                response.metrics.finish_choice(index, len(out.output_token_ids), finish_reason)
            updates.append((choice, piece, logprobs, finish_reason))
        if response.is_finished:
            response.metrics.finish()
        return updates

    def _logprobs(self, response: _Response, choice: _Choice, tokens: range):
        if response.job.kind == "chat":
            return chat_logprobs(choice.text, choice.output.logprobs, tokens)
        return completion_logprobs(choice.text, choice.output.logprobs, tokens, response.job.num_logprobs)

    async def _final(self, response: _Response) -> bool:
        """Run the request to its end (for a non-streamed answer)."""
        while not response.is_finished:
            for choice, _, logprobs, _ in await self._advance(response):
                if logprobs is not None:
                    choice.logprobs.append(logprobs)
        return True

    def _full_response(self, response: _Response):
        job = response.job
        if job.kind == "chat":
            choices = [p.ChatCompletionResponseChoice(
                index=c.index, message=p.ChatCompletionMessage(content=c.text.text), finish_reason=c.finish_reason,
                logprobs=_merge_chat(c.logprobs) if job.num_logprobs is not None else None)
                for c in response.choices]
            return p.ChatCompletionResponse(id=response.id, created=response.created, model=response.model,
                                            choices=choices, usage=response.usage())
        choices = [p.CompletionResponseChoice(
            index=c.index, text=c.text.text, finish_reason=c.finish_reason,
            logprobs=_merge_completion(c.logprobs, job.num_logprobs) if job.num_logprobs is not None else None)
            for c in response.choices]
        return p.CompletionResponse(id=response.id, created=response.created, model=response.model, choices=choices,
                                    usage=response.usage())

    async def _events(self, response: _Response):
        job = response.job
        chunk = self._chat_chunk if job.kind == "chat" else self._completion_chunk
        try:
            if job.kind == "chat":
                for choice in response.choices:
                    yield sse(chunk(response, choice.index, p.DeltaMessage(role="assistant", content=""), None, None))
            while not response.is_finished:
                try:
                    updates = await self._advance(response)
                except ApiError as error:
                    yield sse(error.body())
                    break
                for choice, piece, logprobs, finish_reason in updates:
                    if piece or (logprobs is not None and _has_tokens(logprobs)):
                        yield sse(chunk(response, choice.index, piece, logprobs, None))
                    if finish_reason is not None:
                        yield sse(chunk(response, choice.index, None, None, finish_reason))
                if response.is_finished:
                    self._close(response)  # at once (a stop string): the engine need not run on
            if response.is_finished and job.include_usage:
                usage_chunk = (p.ChatCompletionStreamResponse if job.kind == "chat" else p.CompletionStreamResponse)(
                    id=response.id, created=response.created, model=response.model, choices=[], usage=response.usage())
                yield sse(usage_chunk)
        except Exception:  # noqa: BLE001 - the response has started: end it with an error event, not a cut body
            error_id = uuid.uuid4().hex
            logger.exception("unexpected error in stream %s (error id %s)", response.id, error_id)
            yield sse(unexpected(error_id).body())
        yield "data: [DONE]\n\n"

    def _chat_chunk(self, response: _Response, index: int, delta, logprobs, finish_reason):
        if not isinstance(delta, p.DeltaMessage):
            delta = p.DeltaMessage(content=delta)
        return p.ChatCompletionStreamResponse(
            id=response.id, created=response.created, model=response.model,
            choices=[p.ChatCompletionResponseStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                                          finish_reason=finish_reason)])

    def _completion_chunk(self, response: _Response, index: int, text, logprobs, finish_reason):
        return p.CompletionStreamResponse(
            id=response.id, created=response.created, model=response.model,
            choices=[p.CompletionResponseChoice(index=index, text=text or "", logprobs=logprobs,
                                                finish_reason=finish_reason)])

    async def models(self, request):
        from starlette.responses import JSONResponse

        card = p.ModelCard(id=self.options.served_model_name, created=self.created,
                           max_model_len=self.client.max_model_len)
        return JSONResponse(p.ModelList(data=[card]).model_dump(mode="json"))

    async def health(self, request):
        from starlette.responses import JSONResponse

        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not self.client.is_alive:
            return JSONResponse({"status": "engine down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request):
        from starlette.responses import Response

        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # ---- shutdown ----
    def begin_drain(self) -> None:
        """Stop admitting requests; the running ones have ``drain_timeout_s`` to finish."""
        if not self.draining:
            self.draining = True
            self._drain_deadline = time.monotonic() + self.options.drain_timeout_s
            logger.warning("draining: %d requests running, %.0f s to finish", len(self.active),
                           self.options.drain_timeout_s)

    def drain_step(self) -> bool:
        """Called periodically while draining: True once no request is left. At the deadline, ends the rest."""
        if not self.active:
            return True
        if time.monotonic() >= self._drain_deadline:
            for stream in self.active:
                stream.put(ServerShuttingDown())
        return False

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)


def _default(value, default):
    return default if value is None else value


def _affinity_key(request, prompt: list[int]) -> str:
    """What should route requests of one conversation to the same replica: the client's ``user``, or the start of
    the conversation (the first user turn and what comes before it), or the first tokens of a completion prompt."""
    if request.user:
        return f"user:{request.user}"
    if isinstance(request, p.ChatCompletionRequest):
        first_user = next((i for i, m in enumerate(request.messages) if m.role == "user"), len(request.messages) - 1)
        opening = [(m.role, m.content) for m in request.messages[: first_user + 1]]
        return "chat:" + uuid.uuid5(uuid.NAMESPACE_OID, json.dumps(opening)).hex
    return "prompt:" + uuid.uuid5(uuid.NAMESPACE_OID, json.dumps(prompt[:256])).hex


def _has_tokens(logprobs) -> bool:
    return bool(logprobs.content if isinstance(logprobs, p.ChatCompletionLogProbs) else logprobs.tokens)


def _merge_chat(parts: list[p.ChatCompletionLogProbs]) -> p.ChatCompletionLogProbs:
    return p.ChatCompletionLogProbs(content=[entry for part in parts for entry in part.content])


def _merge_completion(parts: list[p.CompletionLogProbs], num_top: int) -> p.CompletionLogProbs:
    merged = p.CompletionLogProbs(top_logprobs=[] if num_top else None)
    for part in parts:
        merged.tokens += part.tokens
        merged.token_logprobs += part.token_logprobs
        merged.text_offset += part.text_offset
        if num_top:
            merged.top_logprobs += part.top_logprobs
    return merged


def build_app(client, options: ServeOptions):
    """The ASGI app; the engine client runs while the app's lifespan does. ``app.server`` is the ``Server``."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.routing import Route

    server = Server(client, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        client.start()
        try:
            yield
        finally:
            client.stop()
            server.close()

    async def api_error(request, error: ApiError):
        return error_response(error)

    async def http_error(request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = f"{error.detail}: {request.method} {request.url.path}"
        return error_response(ApiError(message, status=error.status_code, code=code))

    routes = [
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(CatchUnexpected)],
                    exception_handlers={ApiError: api_error, HTTPException: http_error})
    gate = Gate(app, options.api_key, server.metrics)
    gate.server = server
    return gate
