"""``cospec serve`` (also ``python -m cospec.serving``): load the model, serve the OpenAI API until SIGTERM/SIGINT.

One engine runs in this process; with ``--replicas N``, N engines run on Ray Serve replicas behind one endpoint
(``cospec.serving.replicas``).

Shutdown: the first SIGTERM (or Ctrl-C) starts draining: new requests get 503, running ones have
``--drain-timeout`` seconds to finish, then their streams end with an error event and ``data: [DONE]``; the process
exits when none is left. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from cospec.engine.config import SCHEDULING_POLICIES

def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``serve`` flags (``cospec serve`` and ``python -m cospec.serving`` share them)."""
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name, model directory or .gguf file")
    parser.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    parser.add_argument("--dtype", default="float32", help="model dtype (float32, bfloat16, float16, float64)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    spec = parser.add_argument_group("speculative decoding").add_mutually_exclusive_group()
    spec.add_argument("--draft", default=None, metavar="MODEL", help="a draft model on the same vocabulary")
    spec.add_argument("--prompt-lookup", type=int, default=None, metavar="N", help="draft by n-gram lookup (n <= N)")
    spec.add_argument("--self-spec", type=int, default=None, metavar="L", help="the target's first L layers draft")
    spec.add_argument("--draft-head", default=None, metavar="PATH", help="an EAGLE-3 draft head (a directory, or "
                      "'default': the model's head from `cospec train-draft`)")
    parser.add_argument("--num-draft-tokens", type=int, default=8, metavar="K", help="most drafts per step")
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    net.add_argument("--port", type=int, default=8000)
    net.add_argument("--api-key", default=os.environ.get("COSPEC_API_KEY"),
                     help="require 'Authorization: Bearer KEY' (default: $COSPEC_API_KEY; unset: no key)")
    net.add_argument("--log-level", default="warning", help="uvicorn log level")
    net.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                     help="on SIGTERM, seconds running requests may go on before their streams are ended")
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
    engine.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                        help="prefill every prompt in full instead of reusing cached KV blocks of its prefix")
    engine.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES, default="fair",
                        help="fair: new requests' first chunks and decodes go first, long prefills share what is left; "
                             "fcfs: running prefills first")
    engine.add_argument("--replicas", type=int, default=None, metavar="N",
                        help="run N engines on Ray Serve replicas behind this endpoint (needs the 'serve' extra: "
                             "pip install 'cospec[serve]')")
    return parser


def serve_options(args: argparse.Namespace):
    from cospec.serving.app import ServeOptions

    return ServeOptions(args.served_model_name or args.model, args.api_key, args.max_waiting, args.max_tokens_limit,
                        args.max_prompt_tokens, args.max_request_bytes, args.drain_timeout)


def build_engine(args: argparse.Namespace):
    """The ``LLMEngine`` the flags describe."""
    import torch

    from cospec.engine.config import EngineConfig, choose_speculation
    from cospec.engine.llm_engine import LLMEngine

    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        raise ValueError(f"--dtype {args.dtype!r} is not a torch dtype")
    speculative = choose_speculation(args.num_draft_tokens, args.draft, args.prompt_lookup, args.self_spec,
                                     draft_head=args.draft_head)
    config = EngineConfig(kv_cache_memory_bytes=args.kv_cache_memory_bytes, max_num_seqs=args.max_num_seqs,
                          max_model_len=args.max_model_len, enable_prefix_caching=args.prefix_caching,
                          scheduling_policy=args.scheduling_policy)
    return LLMEngine(args.model, config, dtype=args.dtype, device=args.device, speculative=speculative)


def serve_main(args: argparse.Namespace) -> int:
    """Serve until a signal; returns the exit status."""
    if args.replicas is not None:
        from cospec.serving.replicas import serve_replicas

        return serve_replicas(args)
    import uvicorn

    from cospec.serving.app import build_app
    from cospec.serving.engine_client import LocalEngineClient

    options = serve_options(args)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    engine = build_engine(args)
    app = build_app(LocalEngineClient(engine, args.threads), options)
    print(f"cospec: serving {options.served_model_name!r} at http://{args.host}:{args.port}/v1 "
          f"({engine.block_manager.num_blocks} KV blocks, context {engine.max_model_len})", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    DrainingServer(config, app.server).run()
    return 0


def _uvicorn_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, with a drain before its own shutdown: the first SIGTERM/SIGINT makes the app refuse new
        requests and gives running ones the drain time; uvicorn's shutdown starts once none is left."""

        def __init__(self, config, app_server) -> None:
            super().__init__(config)
            self.app_server = app_server

        def handle_exit(self, sig: int, frame) -> None:
            if self.app_server.draining or sig not in (signal.SIGTERM, signal.SIGINT):
                return super().handle_exit(sig, frame)  # a second signal: exit now
            self._captured_signals.append(sig)
            self.app_server.begin_drain()  # sets flags only: safe in a signal handler

        async def on_tick(self, counter: int) -> bool:
            if self.app_server.draining and not self.should_exit and self.app_server.drain_step():
                self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer


def DrainingServer(config, app_server):  # noqa: N802 - builds the class lazily: no uvicorn at import
    return _uvicorn_server_class()(config, app_server)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = add_serve_arguments(argparse.ArgumentParser(prog="python -m cospec.serving",
                                                         description=__doc__.splitlines()[0]))
    return serve_main(parser.parse_args(argv))
