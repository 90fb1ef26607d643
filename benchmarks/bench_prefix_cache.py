"""Prefix caching on chat traffic: time to first token and throughput with and without it, at the same load.

Two workloads, replayed against the engine in this process at a fixed arrival rate (conversation c starts at
c / rate seconds; each next turn is sent as soon as the previous answer is complete, holding the model's own
earlier answers, as a chat client does):
- ``chat``: ShareGPT conversations, turn by turn (each turn's prompt starts with the whole previous turn);
- ``system``: one-turn requests that share a long system prompt (``--system-tokens``, 1,000 by default), each
  with its own ShareGPT question.

The two engines (prefix caching on and off) share one model and run the same replay, interleaved over
``--repeats`` runs, each on a fresh engine (a cold cache). Time to first token is measured from each request's
scheduled arrival. Greedy decoding: both engines see the same answers, hence the same next turns.

    python -m benchmarks.bench_prefix_cache [--workload chat system] [--rate-chat 0.5] [--rate-system 1.0]
        [--num-conversations 16] [--num-turns 3] [--num-requests 24] [--max-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks import workloads
from benchmarks.common import environment
from cospec import EngineConfig, LLMEngine, SamplingParams


@dataclass
class Replay:
    """One workload: conversations of user messages (and an optional shared system prompt) and their rate."""

    name: str
    conversations: list[list[str]]
    system: str | None
    rate: float  # conversations started per second


@dataclass
class RunResult:
    ttfts: list[float]  # seconds, per request
    turns: list[int]  # per request: its turn in the conversation (0: the first)
    num_output_tokens: int
    seconds: float  # first arrival to last answer
    hit_rate: float  # prefix-cache hit tokens / looked-up tokens

    @property
    def tokens_per_s(self) -> float:
        return self.num_output_tokens / self.seconds


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def replay(engine: LLMEngine, workload: Replay, max_tokens: int) -> RunResult:
    tokenizer = engine.tokenizer
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    histories = {c: ([{"role": "system", "content": workload.system}] if workload.system else [])
                 for c in range(len(workload.conversations))}
    arrivals = [(c / workload.rate, c, 0) for c in range(len(workload.conversations))]  # (seconds, conv, turn)
    heapq.heapify(arrivals)
    arrived: dict[str, float] = {}
    ttfts, turns, num_output_tokens, last_finish = [], [], 0, 0.0
    total = sum(len(turns) for turns in workload.conversations)
    start = time.perf_counter()
    with tqdm(total=total, desc=f"{workload.name}, prefix caching "
              f"{'on' if engine.block_manager.enable_prefix_caching else 'off'}", leave=False) as bar:
        while arrivals or engine.has_unfinished_requests():
            now = time.perf_counter() - start
            while arrivals and arrivals[0][0] <= now:
                at, c, turn = heapq.heappop(arrivals)
                histories[c].append({"role": "user", "content": workload.conversations[c][turn]})
                prompt = encode_chat(tokenizer, histories[c])
                if len(prompt) + max_tokens > engine.max_model_len:  # the conversation outgrew the context
                    bar.update(len(workload.conversations[c]) - turn)
                    continue
                request_id = f"{c}-{turn}"
                engine.add_request(request_id, prompt, params)
                arrived[request_id] = start + at
            if not engine.has_unfinished_requests():
                if arrivals:
                    time.sleep(max(0.0, arrivals[0][0] - now))
                continue
            for out in engine.step():
                if not out.finished:
                    continue
                c, turn = map(int, out.request_id.split("-"))
                ttfts.append(out.stats.first_token_time - arrived[out.request_id])
                turns.append(turn)
                num_output_tokens += len(out.output_token_ids)
                last_finish = out.stats.finish_time - start
                bar.update()
                answer = tokenizer.decode(out.output_token_ids, skip_special_tokens=True)
                histories[c].append({"role": "assistant", "content": answer})
                if turn + 1 < len(workload.conversations[c]):
                    heapq.heappush(arrivals, (time.perf_counter() - start, c, turn + 1))
    bm = engine.block_manager
    hit_rate = bm.num_prefix_hit_tokens / bm.num_prefix_query_tokens if bm.num_prefix_query_tokens else 0.0
    return RunResult(ttfts, turns, num_output_tokens, last_finish, hit_rate)


def system_prompt(tokenizer, num_tokens: int) -> str:
    """A shared system prompt of about ``num_tokens`` tokens: guidelines followed by ShareGPT text."""
    text = "You are a helpful assistant. Read the following reference material before you answer.\n\n"
    text += "\n\n".join(workloads.sharegpt(64, seed=1, max_chars=4000))
    return tokenizer.decode(tokenizer(text)["input_ids"][:num_tokens])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workload", nargs="+", default=["chat", "system"], choices=["chat", "system"])
    parser.add_argument("--num-conversations", type=int, default=16, help="chat: conversations replayed")
    parser.add_argument("--num-turns", type=int, default=3, help="chat: user turns per conversation")
    parser.add_argument("--max-chars", type=int, default=1000, help="chat: longest user message, in characters")
    parser.add_argument("--rate-chat", type=float, default=0.5, help="chat: conversations started per second")
    parser.add_argument("--num-requests", type=int, default=24, help="system: requests")
    parser.add_argument("--system-tokens", type=int, default=1000, help="system: tokens of the shared system prompt")
    parser.add_argument("--rate-system", type=float, default=1.0, help="system: requests per second")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-cache-mb", type=int, default=512, help="KV memory of each engine")
    parser.add_argument("--out", default="bench_results/prefix_cache")
    args = parser.parse_args(argv)

    from cospec.engine.models import load_model

    model, tokenizer = load_model(args.model)
    replays = []
    if "chat" in args.workload:
        replays.append(Replay("chat", workloads.sharegpt_conversations(args.num_conversations, args.num_turns,
                                                                       max_chars=args.max_chars), None, args.rate_chat))
    if "system" in args.workload:
        questions = workloads.sharegpt(args.num_requests, seed=2, max_chars=300)
        replays.append(Replay("system", [[q] for q in questions], system_prompt(tokenizer, args.system_tokens),
                              args.rate_system))

    def engine(caching: bool) -> LLMEngine:
        config = EngineConfig(kv_cache_memory_bytes=args.kv_cache_mb << 20, enable_prefix_caching=caching)
        return LLMEngine(model, config, tokenizer=tokenizer)

    rows = []
    for workload in replays:
        runs = {True: [], False: []}
        for repeat in tqdm(range(args.repeats), desc=workload.name):
            for caching in ((True, False) if repeat % 2 == 0 else (False, True)):  # interleaved, order alternating
                runs[caching].append(replay(engine(caching), workload, args.max_tokens))
        rows.append(summary(workload, runs))
    table = report(rows, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_cache.json").write_text(json.dumps({"environment": environment(), "arguments": vars(args),
                                                        "rows": rows}, indent=1))
    (out / "prefix_cache.md").write_text(table)
    print(table)
    return 0


def summary(workload: Replay, runs: dict[bool, list[RunResult]]) -> dict:
    """Medians over runs; ratios paired run by run (caching off / on), then their median."""
    def median_of(caching: bool, value) -> float:
        return statistics.median(value(r) for r in runs[caching])

    def later_turns(r: RunResult) -> list[float]:
        return [t for t, turn in zip(r.ttfts, r.turns) if turn > 0]

    pairs = list(zip(runs[True], runs[False]))
    has_later_turns = all(later_turns(r) for r in runs[True] + runs[False])
    return {
        "workload": workload.name, "rate": workload.rate, "num_requests": len(runs[True][0].ttfts),
        "ttft_median_on": median_of(True, lambda r: statistics.median(r.ttfts)),
        "ttft_median_off": median_of(False, lambda r: statistics.median(r.ttfts)),
        "ttft_mean_on": median_of(True, lambda r: statistics.mean(r.ttfts)),
        "ttft_mean_off": median_of(False, lambda r: statistics.mean(r.ttfts)),
        "tokens_per_s_on": median_of(True, lambda r: r.tokens_per_s),
        "tokens_per_s_off": median_of(False, lambda r: r.tokens_per_s),
        "hit_rate": median_of(True, lambda r: r.hit_rate),
        "ttft_ratio": statistics.median(statistics.median(off.ttfts) / statistics.median(on.ttfts) for on, off in pairs),
        "throughput_ratio": statistics.median(on.tokens_per_s / off.tokens_per_s for on, off in pairs),
        # The turns after the first: the requests that have an earlier turn of their own to reuse.
        "later_turns_ttft_ratio": statistics.median(
            statistics.median(later_turns(off)) / statistics.median(later_turns(on)) for on, off in pairs)
        if has_later_turns else None,
    }


def report(rows: list[dict], args) -> str:
    lines = [f"### Prefix caching: {args.model}, greedy, {args.max_tokens} new tokens per turn, median of "
             f"{args.repeats} interleaved runs", "",
             "| workload | rate (/s) | requests | TTFT median off / on (s) | TTFT mean off / on (s) | TTFT off / on | "
             "tokens/s off / on | throughput on / off | prefix-cache hit rate | TTFT off / on, turns after the first |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['rate']:g} | {r['num_requests']} | {r['ttft_median_off']:.2f} / "
                     f"{r['ttft_median_on']:.2f} | {r['ttft_mean_off']:.2f} / {r['ttft_mean_on']:.2f} | "
                     f"{r['ttft_ratio']:.1f}x | {r['tokens_per_s_off']:.1f} / {r['tokens_per_s_on']:.1f} | "
                     f"{r['throughput_ratio']:.2f}x | {r['hit_rate']:.0%} | "
                     + ("" if r["later_turns_ttft_ratio"] is None else f"{r['later_turns_ttft_ratio']:.1f}x") + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
