"""What the HTTP side needs from an engine, and the engine of this process behind it.

Threads: the asyncio loop (uvicorn) parses requests, (de)tokenizes and streams responses; one engine thread owns the
``LLMEngine`` and is its only caller. Handlers talk to it through a command queue (add, abort) that the thread drains
at the top of each iteration, before ``step()``; it hands each request's outputs to the request's ``RequestStream``
with ``loop.call_soon_threadsafe``. A client that goes away aborts its request, which frees its KV blocks at the next
iteration. ``cospec.serving.replicas`` puts the same interface in front of engines on Ray Serve replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import traceback
from dataclasses import dataclass, fields

from cospec.engine.sampling_params import SamplingParams
from cospec.engine.sequence import RequestOutput

logger = logging.getLogger("cospec.serving")


class EngineFailed(Exception):
    """The engine failed on this request (a step raised, its thread or its replica died); other requests go on."""


class ServerShuttingDown(Exception):
    """The server's drain time ran out before this request finished."""


@dataclass(slots=True)
class EngineGauges:
    """The engine's state as ``/metrics`` reports it (summed over replicas)."""

    num_waiting: int = 0
    num_running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0

    def __add__(self, other: EngineGauges) -> EngineGauges:
        return EngineGauges(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def engine_gauges(engine) -> EngineGauges:
    scheduler, blocks = engine.scheduler, engine.block_manager
    return EngineGauges(len(scheduler.waiting), len(scheduler.running), blocks.num_used_blocks, blocks.num_blocks)


class RequestStream:
    """The outputs of one submitted request, as the engine side delivers them (on the event loop): lists of
    ``RequestOutput`` snapshots (each holds all of its choice's tokens so far), or an exception that ends it."""

    def __init__(self, request_id: str, num_choices: int = 1, on_close=None) -> None:
        self.request_id, self.num_choices = request_id, num_choices
        self.replica: str | None = None  # where it runs, when there are several engines
        self._items: asyncio.Queue = asyncio.Queue()
        self._finished: set[int] = set()  # choices whose last output was delivered
        self._on_close = on_close
        self.is_closed = False

    @property
    def is_finished(self) -> bool:
        return len(self._finished) == self.num_choices

    def put(self, item: list[RequestOutput] | BaseException) -> None:
        self._items.put_nowait(item)

    async def next(self) -> dict[int, RequestOutput]:
        """The newest output of each choice that changed since the last call (waits for at least one)."""
        newest: dict[int, RequestOutput] = {}
        item = await self._items.get()
        while True:
            if isinstance(item, BaseException):
                raise item
            newest.update((out.index, out) for out in item)
            self._finished.update(out.index for out in item if out.finished)
            if self._items.empty():
                return newest
            item = self._items.get_nowait()

    def close(self) -> None:
        """The handler is done with it: abort it in case the engine still runs it (a no-op for finished ones)."""
        if not self.is_closed:
            self.is_closed = True
            if self._on_close is not None:
                self._on_close()


@dataclass(slots=True, eq=False)
class _Submission:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    admitted: asyncio.Future  # None once the engine took it; the engine's exception if it refused it


class EngineLoop:
    """Owns the engine: the only thread that calls it. ``add`` and ``abort`` may be called from the asyncio loop."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, num_threads: int | None = None) -> None:
        self.engine, self.loop, self.num_threads = engine, loop, num_threads
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = False
        self._live: dict[str, _Submission] = {}  # engine thread only
        self.gauges = engine_gauges(engine)  # last published by the engine thread
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cospec-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self.thread.join(timeout=30)

    def add(self, submission: _Submission) -> None:
        self._commands.put(("add", submission))
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
            for submission in self._live.values():
                self._call(submission.stream.put, EngineFailed(f"the engine thread died: {error!r}"))

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._add(arg)
            elif self._live.pop(arg, None) is not None:
                self.engine.abort(arg)
        self.gauges = engine_gauges(self.engine)

    def _add(self, submission: _Submission) -> None:
        try:
            self.engine.add_request(submission.request_id, submission.prompt_token_ids, submission.params)
        except Exception as error:  # noqa: BLE001 - a request the engine refuses; the handler answers 400
            self._call(_resolve, submission.admitted, error)
            return
        self._live[submission.request_id] = submission
        self._call(_resolve, submission.admitted, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:  # noqa: BLE001 - an engine bug: fail the requests in flight, keep serving
            logger.error("engine step failed; aborting %d requests:\n%s", len(self._live), traceback.format_exc())
            for request_id, submission in self._live.items():
                with contextlib.suppress(Exception):
                    self.engine.abort(request_id)
                self._call(submission.stream.put, EngineFailed(f"the engine failed on this request: {error!r}"))
            self._live.clear()
            return
        by_request: dict[str, list[RequestOutput]] = {}
        for out in outputs:
            by_request.setdefault(out.request_id, []).append(out)
        for request_id, outs in by_request.items():
            submission = self._live.get(request_id)  # stays live until the handler closes its stream
            if submission is not None:
                self._call(submission.stream.put, outs)
        self.gauges = engine_gauges(self.engine)

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


class LocalEngineClient:
    """An ``LLMEngine`` in this process, run by an ``EngineLoop``. ``start`` within the running event loop."""

    def __init__(self, engine, num_threads: int | None = None) -> None:
        self.engine, self.num_threads = engine, num_threads
        self.tokenizer = engine.tokenizer
        self.max_model_len, self.vocab_size = engine.max_model_len, engine.vocab_size
        self.loop: EngineLoop | None = None

    def start(self) -> None:
        self.loop = EngineLoop(self.engine, asyncio.get_running_loop(), self.num_threads)
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()

    @property
    def is_alive(self) -> bool:
        return self.loop is not None and self.loop.is_alive

    def gauges(self) -> EngineGauges:
        return self.loop.gauges if self.loop is not None else engine_gauges(self.engine)

    async def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     affinity_key: str | None = None) -> RequestStream:
        """Queue a request; raises the engine's exception (ValueError naming the problem) if it refuses it."""
        if not self.is_alive:
            raise EngineFailed("the engine is down")
        stream = RequestStream(request_id, params.n, on_close=lambda: self.loop.abort(request_id))
        admitted = asyncio.get_running_loop().create_future()
        self.loop.add(_Submission(request_id, prompt_token_ids, params, stream, admitted))
        try:
            await admitted
        except asyncio.CancelledError:
            stream.close()
            raise
        return stream
