"""N engines behind one OpenAI endpoint on Ray Serve: ``cospec serve --replicas N`` on one machine, or the same
application on a Ray cluster::

    serve run cospec.serving.replicas:app_builder model=smollm2-135m replicas=4 prompt-lookup=3

(``app_builder`` takes the flags of ``cospec serve`` as ``key=value``; see the README for a config file.)

Two deployments:
- ``EngineReplica`` (``replicas`` of them): an ``LLMEngine`` with its engine thread (``LocalEngineClient``);
  ``generate`` streams one request's outputs, after a first item that says the engine admitted it.
- ``OpenAIIngress``: the HTTP app of ``cospec.serving.app`` behind Ray Serve's proxy, with a ``RayEngineClient``
  that submits each request to a replica through a deployment handle. It tokenizes, so replicas get token ids.

Routing: Ray Serve's router with ``PrefixAffinityRouter``: a request goes to the replica that ranks highest for its
affinity key (the client's ``user``, else the opening of the conversation: every turn of one chat maps to the same
replica, whose prefix cache holds the earlier turns), unless that replica is full (``max_num_seqs`` requests), then
to the next in its ranking. Rendezvous hashing keeps every other key in place when a replica comes or goes.

A replica that dies ends the requests it was running with an error (the others go on); Ray Serve starts a new one.
A request not yet admitted when its replica died is retried on another.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import signal
import socket
import sys
import threading

try:
    import ray
    from ray import serve
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.config import RequestRouterConfig
    from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
except ImportError as error:  # the optional extra
    raise ImportError("serving on replicas needs Ray Serve: pip install 'cospec[serve]' (or 'ray[serve]')") from error

from cospec.engine.sampling_params import SamplingParams
from cospec.serving.engine_client import EngineFailed, EngineGauges, LocalEngineClient, RequestStream
from cospec.serving.main import add_serve_arguments, build_engine, serve_options

logger = logging.getLogger("cospec.serving")

ADMISSION_ATTEMPTS = 3
"""Tries to get a request admitted when the replica it was routed to dies first."""


# ---- routing ----------------------------------------------------------------------------------------------------
class PrefixAffinityRouter(RequestRouter):
    """Ranks the replicas by rendezvous hashing of the request's ``affinity_key`` (highest random weight): the same
    key always prefers the same replica while it lives. Ray Serve takes the first replica in the ranking that is not
    full. Requests without a key may go to any replica (the least loaded)."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = pending_request.kwargs.get("affinity_key") if pending_request is not None else None
        if not key:
            return [candidate_replicas]
        ranked = sorted(candidate_replicas, key=lambda r: _weight(key, r.replica_id.unique_id), reverse=True)
        return [[replica] for replica in ranked]


def _weight(key: str, replica: str) -> bytes:
    return hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest()


# ---- the engine replicas ----------------------------------------------------------------------------------------
class EngineReplica:
    """One engine; Ray Serve runs ``replicas`` of these."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.engine = build_engine(args)
        self.client = LocalEngineClient(self.engine, args.threads)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._started = False

    def describe(self) -> dict:
        return {"max_model_len": self.engine.max_model_len, "vocab_size": self.engine.vocab_size}

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine thread died is replaced."""
        if self._started and not self.client.is_alive:
            raise RuntimeError("the engine thread died")

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       affinity_key: str | None = None):
        """Yields (replica name, gauges) once admitted, then (outputs, gauges) until every choice finished. Raises
        the engine's exception (ValueError naming the problem) if it refuses the request."""
        if not self._started:  # the engine thread needs this replica's event loop
            self.client.start()
            self._started = True
        stream = await self.client.submit(request_id, prompt_token_ids, params)
        try:
            yield self.name, self.client.gauges()
            while not stream.is_finished:
                outputs = await stream.next()
                yield list(outputs.values()), self.client.gauges()
        finally:  # finished, or the caller went away (a cancelled generator): abort in case it still runs
            stream.close()


# ---- the ingress ------------------------------------------------------------------------------------------------
class RayEngineClient:
    """The engine-client interface of ``cospec.serving.app`` over the ``EngineReplica`` deployment."""

    def __init__(self, engines, tokenizer, max_model_len: int, vocab_size: int) -> None:
        self.engines, self.tokenizer = engines, tokenizer
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.is_alive = True  # Ray Serve replaces replicas that die
        self._gauges: dict[str, EngineGauges] = {}  # the last gauges each replica reported

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def gauges(self) -> EngineGauges:
        return sum(self._gauges.values(), EngineGauges())

    async def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     affinity_key: str | None = None) -> RequestStream:
        for attempt in range(ADMISSION_ATTEMPTS):
            response = self.engines.options(stream=True).generate.remote(request_id, prompt_token_ids, params,
                                                                         affinity_key=affinity_key)
            try:
                replica, gauges = await response.__anext__()
                break
            except RayActorError as error:  # the replica died before it admitted the request: try another
                logger.warning("request %s: its replica died before admitting it (%s)", request_id, error)
                if attempt + 1 == ADMISSION_ATTEMPTS:
                    raise EngineFailed(f"no replica could admit the request: {error}") from None
            except RayTaskError as error:  # the engine refused it: re-raise what it raised (ValueError, ...)
                raise error.cause from None
        self._gauges[replica] = gauges
        pump = None

        def close() -> None:  # the handler is done: stop reading, and cancel the remote generator (which aborts)
            pump.cancel()
            if not stream.is_finished:
                response.cancel()

        stream = RequestStream(request_id, params.n, on_close=close)
        stream.replica = replica
        pump = asyncio.ensure_future(self._pump(response, stream))
        return stream

    async def _pump(self, response, stream: RequestStream) -> None:
        """Hands the replica's outputs to the stream; a replica that fails or dies ends it with EngineFailed."""
        try:
            async for outputs, gauges in response:
                self._gauges[stream.replica] = gauges
                stream.put(outputs)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - this request's replica is gone; the others go on
            if stream.is_closed:  # the cancellation of a request the handler is done with
                return
            self._gauges.pop(stream.replica, None)
            logger.error("request %s: replica %s failed: %r", stream.request_id, stream.replica, error)
            stream.put(EngineFailed(f"the replica serving this request failed ({type(error).__name__})"))


class OpenAIIngress:
    """The HTTP app, built once the replicas can describe the engine (context length, vocabulary)."""

    def __init__(self, engines, args: argparse.Namespace) -> None:
        self.engines, self.args = engines, args

    async def __serve_build_asgi_app__(self):
        from cospec.engine.models import load_tokenizer
        from cospec.serving.app import build_app

        info = await self.engines.describe.remote()
        client = RayEngineClient(self.engines, load_tokenizer(self.args.model), info["max_model_len"],
                                 info["vocab_size"])
        return build_app(client, serve_options(self.args))


# ---- the application --------------------------------------------------------------------------------------------
def build_application(args: argparse.Namespace):
    """The Ray Serve application for the flags of ``cospec serve`` (``--replicas`` engines, default 1)."""
    num_replicas = args.replicas or 1
    if num_replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {num_replicas}")
    engines = serve.deployment(
        name="EngineReplica", num_replicas=num_replicas,
        # A replica runs max_num_seqs requests at once; more wait in the router for whichever replica frees first.
        max_ongoing_requests=args.max_num_seqs,
        ray_actor_options={"num_cpus": args.threads or 1, "num_gpus": 1 if args.device.startswith("cuda") else 0},
        request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter),
        graceful_shutdown_timeout_s=args.drain_timeout,
    )(EngineReplica)
    ingress = serve.deployment(
        name="OpenAIIngress", ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=args.max_waiting + num_replicas * args.max_num_seqs,
        graceful_shutdown_timeout_s=args.drain_timeout,
    )(serve.ingress()(OpenAIIngress))
    return ingress.bind(engines.bind(args), args)


def app_builder(args: dict):
    """For ``serve run cospec.serving.replicas:app_builder model=M replicas=4 ...`` (or a Serve config file's
    ``import_path`` and ``args``): the flags of ``cospec serve`` as keys, with or without dashes."""
    argv = []
    for key, value in args.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return build_application(add_serve_arguments(argparse.ArgumentParser(prog="app_builder")).parse_args(argv))


def serve_replicas(args: argparse.Namespace) -> int:
    """``cospec serve --replicas N``: a local Ray instance, the application on ``--host:--port``, until a signal."""
    num_cpus = max(os.cpu_count() or 1, args.replicas * (args.threads or 1))  # every replica fits on this machine
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=256 << 20)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_application(args), name="cospec", route_prefix="/")
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):  # after Ray's own handlers are in place
            signal.signal(sig, lambda *_: stop.set())
        print(f"cospec: serving {args.served_model_name or args.model!r} at http://{args.host}:{args.port}/v1 "
              f"({args.replicas} replicas on Ray Serve)", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
        serve.shutdown()  # each deployment drains for up to --drain-timeout
    finally:
        ray.shutdown()
    return 0
