"""Load test of the OpenAI-compatible server: throughput, TTFT and TPOT under Poisson arrivals, with and without
speculation, on one engine or on Ray Serve replicas, with single-turn or multi-turn chat.

    python -m benchmarks.bench_serve --model smollm2-135m [--prompt-lookup 3] --rates 0.5 1 --num-requests 16 \
        --max-tokens 64
    python -m benchmarks.bench_serve --workload multiturn --replicas 1 2 --rates 0.5 --num-requests 8
    python -m benchmarks.bench_serve --url http://127.0.0.1:8000 --concurrency 4 --num-requests 16

Without ``--url`` it starts ``python -m cospec.serving`` on a free loopback port for each configuration, one server at
a time: plain and with the speculation flag given (``--prompt-lookup``, ``--self-spec`` or ``--draft``;
``--no-baseline`` skips the plain one), each with every ``--replicas`` count (1: one engine in the server process;
N > 1: ``cospec serve --replicas N`` on Ray Serve) and every ``--prefix-caching`` setting (``on off`` compares time
to first token with and without the engine's prefix cache at the same load). Each run sends ``--num-requests``
sessions of chat requests, streaming, through the ``openai`` async client: sessions arrive as a Poisson process at
each ``--rate`` (sessions/s), or as a closed loop of ``--concurrency`` clients, each load with sessions of its own
(one server runs the loads in turn: replaying a load's sessions at the next would find them in the prefix cache);
a session's turns follow one another
(``benchmarks.serve_workloads``: ``single`` first user turns of ShareGPT, ``multiturn`` ShareGPT conversations
replayed turn by turn with the server's own answers between the turns, as a chat client sends them (``--replies
recorded``: ShareGPT's recorded answers instead), ``system-prompt`` first user turns after one shared
``--system-prompt-tokens`` system prompt).
Greedy by default, so every server configuration produces the same tokens and does the same work.

Reported per configuration and rate: completed / failed requests, output tokens/s (all output tokens over the
run's wall time), TTFT (request sent to first content chunk) and TPOT ((latency - TTFT) / (output tokens - 1)) at
p50 and p99, and from the server's ``/metrics`` over the run: the draft acceptance rate and the prefix-cache hit
rate (prompt tokens found in the cache / prompt tokens looked up). A Markdown table on stdout, everything in JSON at
``--out``. Each run is bounded by ``--max-duration``: requests still open then are cancelled and counted as failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import environment
from benchmarks.serve_workloads import WORKLOADS, Session, build_sessions, system_prompt_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("COSPEC_API_KEY", "none"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    spec = parser.add_mutually_exclusive_group()
    spec.add_argument("--prompt-lookup", type=int, default=None, metavar="N")
    spec.add_argument("--self-spec", type=int, default=None, metavar="L")
    spec.add_argument("--draft", default=None, metavar="MODEL")
    parser.add_argument("--num-draft-tokens", type=int, default=None, metavar="K")
    parser.add_argument("--no-baseline", action="store_true", help="with a speculation flag: skip the plain server")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1],
                        help="engine counts to run each configuration with (> 1: Ray Serve replicas)")
    parser.add_argument("--prefix-caching", choices=("on", "off"), nargs="+", default=["on"],
                        help="run each configuration with the engine's prefix caching on, off, or both")
    parser.add_argument("--workload", choices=WORKLOADS, default="single")
    parser.add_argument("--max-turns", type=int, default=4, help="multiturn: user turns per conversation at most")
    parser.add_argument("--replies", choices=("generated", "recorded"), default="generated",
                        help="multiturn: the assistant turns sent back, the server's answers (as a chat client) or "
                        "ShareGPT's recorded ones")
    parser.add_argument("--system-prompt-tokens", type=int, default=1000, help="system-prompt: its length")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--rates", type=float, nargs="+", default=None, help="Poisson arrival rates (requests/s)")
    load.add_argument("--concurrency", type=int, default=None, help="closed loop of this many clients instead")
    parser.add_argument("--num-requests", type=int, default=16, help="sessions per run (one request each but in "
                        "multiturn)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-prompt-chars", type=int, default=1200, help="longest ShareGPT turn used")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompt choice and the arrival times")
    parser.add_argument("--max-duration", type=float, default=600.0, help="seconds per run at most")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds for a server to come up")
    parser.add_argument("--out", type=Path, default=Path("bench_results/serve.json"))
    args = parser.parse_args(argv)
    if args.rates is None and args.concurrency is None:
        args.rates = [1.0]
    if args.num_requests < 1 or args.max_tokens < 1 or args.max_turns < 1 or min(args.replicas) < 1:
        parser.error("--num-requests, --max-tokens, --max-turns and --replicas must be >= 1")
    if (args.rates and min(args.rates) <= 0) or (args.concurrency is not None and args.concurrency < 1):
        parser.error("rates must be > 0 and --concurrency >= 1")
    return args


# ---- the server under test ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m cospec.serving SERVER_ARGS`` on a free loopback port, its output in ``log_path`` (a
    temporary file if None), ``HF_HUB_OFFLINE=1`` and ``env`` added to the environment. Shared with the server
    tests."""

    def __init__(self, server_args: list[str], log_path: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (open(log_path, "w+") if log_path is not None else
                    tempfile.NamedTemporaryFile("w+", prefix="cospec-serve-", suffix=".log", delete=False))
        command = [sys.executable, "-m", "cospec.serving", "--port", str(self.port), *server_args]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})))

    def wait_ready(self, timeout_s: float) -> None:
        """Poll ``/health`` until it answers 200; stop the server and raise with its log if it does not in time."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not come up; its log ({self.log.name}):\n{Path(self.log.name).read_text()}")

    def stop(self, timeout_s: float = 15) -> None:
        """SIGTERM, and SIGKILL if it has not exited after ``timeout_s``."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def metrics(self, **headers: str) -> dict[str, float]:
        return scrape(self.url, headers)


def server_args(args: argparse.Namespace, flags: list[str]) -> list[str]:
    """The server's command-line arguments for this load test's model and one configuration's ``flags``."""
    command = ["--model", args.model, "--dtype", args.dtype, "--max-tokens-limit", str(max(args.max_tokens, 4096)),
               *flags]
    return command + (["--threads", str(args.threads)] if args.threads is not None else [])


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """The server's Prometheus ``/metrics`` as {series: value}."""
    import httpx

    text = httpx.get(url + "/metrics", headers=headers or {}, timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


# ---- load ---------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class RequestResult:
    ok: bool
    ttft_s: float | None = None
    latency_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None
    text: str = ""  # the answer
    cached_tokens: int = 0  # prompt tokens the server found in its prefix cache (usage.prompt_tokens_details)
    turn: int = 0  # the request's turn in its session (0: the first)

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


async def send(client, model: str, messages: list[dict], max_tokens: int, temperature: float,
               user: str) -> RequestResult:
    import openai

    start = time.perf_counter()
    first = None
    usage = None
    pieces = []
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=temperature, user=user, stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
    except openai.APIError as error:
        return RequestResult(False, error=f"{type(error).__name__}: {str(error)[:200]}")
    end = time.perf_counter()
    tokens = (0, 0) if usage is None else (usage.completion_tokens, usage.prompt_tokens)
    details = getattr(usage, "prompt_tokens_details", None)
    return RequestResult(True, (first or end) - start, end - start, *tokens, text="".join(pieces),
                         cached_tokens=getattr(details, "cached_tokens", None) or 0)


async def run_load(url: str, api_key: str, model: str, sessions: list[Session], max_tokens: int,
                   temperature: float, rate: float | None, concurrency: int | None, max_duration: float,
                   seed: int, own_answers: bool = False) -> tuple[list[RequestResult], float]:
    """Run every session (Poisson arrivals at ``rate``, or ``concurrency`` clients); (results of all requests,
    wall seconds). A session's requests go one after the other; each session is its own ``user`` (the server
    routes one user's requests to one replica). ``own_answers``: each turn carries the answers received to the
    earlier ones (a session stops at a failed turn: there is no answer to send back)."""
    import openai

    rng = random.Random(seed)
    delays, t = [], 0.0
    for _ in sessions:
        delays.append(t)
        t += rng.expovariate(rate) if rate else 0.0
    gate = asyncio.Semaphore(concurrency or len(sessions))
    results: dict[tuple[int, int], RequestResult] = {}

    async def one(i: int, session: Session, delay: float) -> None:
        await asyncio.sleep(delay)
        async with gate:
            answers = [] if own_answers else None
            for turn in range(len(session.requests)):
                result = await send(client, model, session.messages(turn, answers), max_tokens, temperature,
                                    session.id)
                result.turn = turn
                results[i, turn] = result
                if own_answers:
                    if not result.ok:
                        break
                    answers.append(result.text)

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=max_duration) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(one(i, s, d)) for i, (s, d) in enumerate(zip(sessions, delays))]
        _, pending = await asyncio.wait(tasks, timeout=max_duration)
        for task in pending:
            task.cancel()
        wall = time.perf_counter() - start
    return [results.get((i, turn), RequestResult(False, error="cut at --max-duration or after a failed turn"))
            for i, session in enumerate(sessions) for turn in range(len(session.requests))], wall


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return None
    values = sorted(values)
    x = (len(values) - 1) * q / 100
    low = int(x)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (x - low)


def summarize_run(label: str, load: str, results: list[RequestResult], wall: float, before: dict | None,
                  after: dict | None) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s * 1000 for r in ok]
    tpot = [r.tpot_s * 1000 for r in ok if r.tpot_s is not None]
    output_tokens = sum(r.output_tokens for r in ok)
    row = {"config": label, "load": load, "completed": len(ok), "failed": len(results) - len(ok),
           "wall_s": wall, "requests_per_s": len(ok) / wall, "output_tokens": output_tokens,
           "output_tokens_per_s": output_tokens / wall,
           "mean_prompt_tokens": sum(r.prompt_tokens for r in ok) / len(ok) if ok else None,
           "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
           # Multi-turn: first turns have no earlier turn to reuse; later turns are where a prefix cache can help.
           "ttft_p50_first_turns_ms": percentile([r.ttft_s * 1000 for r in ok if r.turn == 0], 50),
           "ttft_p50_later_turns_ms": percentile([r.ttft_s * 1000 for r in ok if r.turn > 0], 50),
           "mean_cached_prompt_tokens": sum(r.cached_tokens for r in ok) / len(ok) if ok else None,
           "tpot_p50_ms": percentile(tpot, 50), "tpot_p99_ms": percentile(tpot, 99), "acceptance_rate": None,
           "prefix_cache_hit_rate": None, "errors": sorted({r.error for r in results if r.error})[:5]}
    if before is not None and after is not None:
        def delta(name: str) -> float:
            return after.get(name, 0) - before.get(name, 0)

        drafted, accepted = delta("cospec_spec_draft_tokens_total"), delta("cospec_spec_accepted_tokens_total")
        row["acceptance_rate"] = accepted / drafted if drafted else None
        row["drafted_tokens"] = drafted
        queries, hits = delta("cospec_prefix_cache_queries_total"), delta("cospec_prefix_cache_hits_total")
        row["prefix_cache_hit_rate"] = hits / queries if queries else None
    return row


def markdown_table(rows: list[dict]) -> str:
    def fmt(value, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| config | load | done/failed | output tok/s | req/s | TTFT p50 / p99 (ms) | TTFT p50 first / later "
             "turns (ms) | TPOT p50 / p99 (ms) | acceptance | prefix hit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['load']} | {r['completed']}/{r['failed']} "
                     f"| {fmt(r['output_tokens_per_s'])} | {fmt(r['requests_per_s'], 2)} "
                     f"| {fmt(r['ttft_p50_ms'], 0)} / {fmt(r['ttft_p99_ms'], 0)} "
                     f"| {fmt(r.get('ttft_p50_first_turns_ms'), 0)} / {fmt(r.get('ttft_p50_later_turns_ms'), 0)} "
                     f"| {fmt(r['tpot_p50_ms'], 0)} / {fmt(r['tpot_p99_ms'], 0)} | {fmt(r['acceptance_rate'], 2)} "
                     f"| {fmt(r['prefix_cache_hit_rate'], 2)} |")
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------------------
def configurations(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(label, server flags) per server to start: each speculation setting with each replica count and prefix-caching
    setting."""
    spec: list[str] = []
    if args.prompt_lookup is not None:
        spec = ["--prompt-lookup", str(args.prompt_lookup)]
    elif args.self_spec is not None:
        spec = ["--self-spec", str(args.self_spec)]
    elif args.draft is not None:
        spec = ["--draft", args.draft]
    if spec and args.num_draft_tokens is not None:
        spec += ["--num-draft-tokens", str(args.num_draft_tokens)]
    engines = [] if (spec and args.no_baseline) else [("plain", [])]
    if spec:
        engines.append((" ".join(spec).replace("--", ""), spec))
    configs = []
    for label, flags in engines:
        for n in args.replicas:
            for caching in args.prefix_caching:
                configs.append((label + ("" if n == 1 else f", {n} replicas") + ("" if caching == "on" else
                                                                               ", no prefix cache"),
                                flags + ([] if n == 1 else ["--replicas", str(n)])
                                + ([] if caching == "on" else ["--no-prefix-caching"])))
    return configs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loads = [(f"{r:g} sessions/s", r, None) for r in args.rates] if args.rates else \
        [(f"concurrency {args.concurrency}", None, args.concurrency)]
    configs = [("url", [])] if args.url else configurations(args)
    rows, served, sessions_per_load, source = [], set(), None, None
    for label, flags in configs:
        server = None
        if args.url:
            url = args.url.rstrip("/").removesuffix("/v1")
        else:
            print(f"bench_serve: starting the server ({label}) ...", file=sys.stderr)
            server = ServerProcess(server_args(args, flags))
            url = server.url
        try:
            if server is not None:
                server.wait_ready(args.startup_timeout)
            model = _served_model(url, args.api_key)
            served.add(model)
            if sessions_per_load is None:  # built once, with the first server (which counts the system prompt's tokens)
                system_prompt = None
                if args.workload == "system-prompt":
                    system_prompt = system_prompt_text(args.system_prompt_tokens,
                                                       lambda text: _count_tokens(url, args.api_key, model, text))
                sessions_per_load, source = sessions_for_loads(args, len(loads), system_prompt)
            # Warm-up: one short request, not measured (a prompt no session shares: it leaves no useful prefix).
            warm_up = [Session("warm-up", [[{"role": "user", "content": "Say hello."}]])]
            asyncio.run(run_load(url, args.api_key, model, warm_up, 8, args.temperature, None, 1, 120, 0))
            for (load_label, rate, concurrency), sessions in zip(loads, sessions_per_load):
                before = _try_scrape(url, args.api_key)
                results, wall = asyncio.run(run_load(url, args.api_key, model, sessions, args.max_tokens,
                                                     args.temperature, rate, concurrency, args.max_duration, args.seed,
                                                     own_answers=args.replies == "generated"))
                rows.append(summarize_run(label, load_label, results, wall, before, _try_scrape(url, args.api_key)))
                print(markdown_table(rows[-1:]).splitlines()[-1], file=sys.stderr)
        finally:
            if server is not None:
                server.stop(timeout_s=60)
    num_requests = sum(len(s.requests) for s in sessions_per_load[0])
    print(f"\nmodel {', '.join(sorted(served))}, {args.num_requests} sessions ({num_requests} requests) per run, "
          f"max_tokens {args.max_tokens}, temperature {args.temperature}, prompts: {source}\n")
    print(markdown_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "prompt_source": source, "environment": environment(), "results": rows}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


def sessions_for_loads(args: argparse.Namespace, num_loads: int, system_prompt: str | None
                       ) -> tuple[list[list[Session]], str]:
    """The sessions of each load: ``--num-requests`` each, other conversations (or questions) for every load. One
    server runs every load in turn, so a load that replayed the sessions of an earlier one would find their prompts
    in the prefix cache; each configuration replays the same sessions at the same load."""
    sessions, source = build_sessions(args.workload, args.num_requests * num_loads, args.seed, args.max_prompt_chars,
                                      args.max_turns, system_prompt)
    n = args.num_requests
    return [sessions[i * n: (i + 1) * n] for i in range(num_loads)], source


def _served_model(url: str, api_key: str) -> str:
    import httpx

    response = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def _count_tokens(url: str, api_key: str, model: str, text: str) -> int:
    """The server's token count of ``text`` (a one-token completion's usage)."""
    import httpx

    response = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {api_key}"}, timeout=120,
                          json={"model": model, "prompt": text, "max_tokens": 1})
    response.raise_for_status()
    return response.json()["usage"]["prompt_tokens"]


def _try_scrape(url: str, api_key: str) -> dict | None:
    try:
        return scrape(url, {"Authorization": f"Bearer {api_key}"})
    except Exception:  # noqa: BLE001 - a server without /metrics: no acceptance rate
        return None


if __name__ == "__main__":
    sys.exit(main())
