"""cospec: speculative decoding and co-decoding engine for Hugging Face models.

``generate`` streams a completion, ``bench`` compares cospec with Hugging Face, ``serve`` runs an OpenAI-compatible
server, ``train-draft`` trains an EAGLE-3 draft head for a model, ``info`` describes the setup.

Flags map one to one onto ``SamplingParams`` fields (``--max-tokens`` -> ``max_tokens``) and ``load_model``
arguments. A failure the user can fix (a missing model, a bad flag value) prints one line to stderr and exits 2;
set ``COSPEC_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_USAGE = 2

# SamplingParams fields that `generate` exposes as flags of the same name.
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cospec", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="stream a completion of PROMPT to stdout")
    gen.add_argument("prompt", help="the prompt (a user message when the tokenizer has a chat template)")
    gen.add_argument("--model", default="smollm2-135m", help="embedded model name, model directory or .gguf file")
    gen.add_argument("--dtype", default="float32", help="model dtype (float32, bfloat16, float16, float64)")
    gen.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    gen.add_argument("--no-chat", dest="chat", action="store_false", help="feed the prompt as plain text")
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=128, help="most new tokens")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    sampling.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    sampling.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * the top probability")
    sampling.add_argument("--seed", type=int, default=None, help="seed of the request's random generator")
    spec = gen.add_argument_group("speculative decoding (choose one)")
    spec.add_argument("--draft", metavar="MODEL", help="draft model (name, directory or .gguf) with the same vocabulary")
    spec.add_argument("--prompt-lookup", type=int, metavar="N", help="draft by n-gram lookup, n-grams up to N tokens")
    spec.add_argument("--self-spec", type=int, metavar="L", help="draft with the model's own first L layers")
    spec.add_argument("--draft-head", metavar="PATH", help="draft with an EAGLE-3 head: its directory, or 'default' "
                      "(the model's head from `cospec train-draft`)")
    spec.add_argument("--num-draft-tokens", type=int, default=8, metavar="K", help="most drafts per step (adaptive)")
    spec.add_argument("--defer", type=float, metavar="TAU", help="with --draft: confidence deferral (lossy): the draft "
                      "model's tokens are kept while its top probability is >= TAU")
    spec.add_argument("--defer-rollback", type=float, metavar="P", help="with --defer: the target replaces a deferred "
                      "token it gives probability < P")
    fuse = gen.add_argument_group("token-level fusion")
    fuse.add_argument("--fuse-with", nargs="+", metavar="MEMBER", help="fusion members after the model: model names or "
                      "paths, or ngram:DIR for a saved n-gram model")
    fuse.add_argument("--fusion", metavar="SPEC", help="how to fuse, e.g. mixture:0.7,0.3  proxy:1.0  "
                      "contrastive:0.5,0.1  loglinear:1,0.5,-0.5")
    gen.set_defaults(run=_generate)

    bench = commands.add_parser("bench", help="benchmark cospec against Hugging Face generate on real workloads "
                                "(`cospec bench serve --help`: load-test a cospec server)")
    from benchmarks.suite import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(run=_bench)

    serve = commands.add_parser("serve", help="serve an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)")
    from cospec.serving.main import add_serve_arguments  # starlette/uvicorn load only in serve_main

    add_serve_arguments(serve)
    serve.set_defaults(run=_serve)

    train = commands.add_parser("train-draft", help="train an EAGLE-3 draft head for a model on your data "
                                "(no --data: the default head, on ShareGPT and standard-library data)")
    from cospec.training.train_draft import add_arguments as add_train_draft_arguments

    add_train_draft_arguments(train)
    train.set_defaults(run=_train_draft)

    info = commands.add_parser("info", help="print versions, the device, the kernel backends and stored CPU row plans")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "serve"]:  # `cospec bench serve ...`: the load generator against a cospec server
        from benchmarks.bench_serve import main as bench_serve_main

        return bench_serve_main(argv[2:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI edge: one line for the user, not a traceback
        if os.environ.get("COSPEC_DEBUG", "0") == "1":
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"cospec: error: {message}", file=sys.stderr)
        return EXIT_USAGE


# ---- generate ----------------------------------------------------------------------------------------------
def _generate(args: argparse.Namespace) -> int:
    import torch

    from cospec.engine.llm import LLM
    from cospec.engine.sampling_params import SamplingParams

    params = SamplingParams(**{name: getattr(args, name) for name in _SAMPLING_FIELDS})
    if not hasattr(torch, args.dtype) or not isinstance(getattr(torch, args.dtype), torch.dtype):
        raise ValueError(f"--dtype {args.dtype!r} is not a torch dtype")
    _quiet_transformers()
    speculative = None
    if args.defer is not None:
        from cospec.engine.config import SpeculativeConfig

        if args.draft is None:
            raise ValueError("--defer needs --draft MODEL (the small model that decides where it is confident)")
        speculative = SpeculativeConfig("draft", num_draft_tokens=args.num_draft_tokens, draft_model=args.draft,
                                        deferral_threshold=args.defer, deferral_rollback=args.defer_rollback)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_num_seqs=1, draft=None if speculative else args.draft,
              prompt_lookup=args.prompt_lookup, self_spec_layers=args.self_spec, num_draft_tokens=args.num_draft_tokens,
              speculative=speculative, fusion=_fusion_config(args), draft_head=args.draft_head)
    engine, tokenizer = llm.engine, llm.tokenizer
    prompt_ids = llm.encode(args.prompt, chat=None if args.chat else False)
    engine.add_request("cli", prompt_ids, params)

    out, printed = None, ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            printed = _stream(tokenizer.decode(out.output_token_ids, skip_special_tokens=True), printed, out.finished)
    print(flush=True)

    stats = out.stats
    elapsed = stats.finish_time - stats.arrival_time
    ttft = stats.time_to_first_token
    print(f"{stats.num_output_tokens} tokens in {elapsed:.2f} s ({stats.num_output_tokens / elapsed:.1f} tokens/s), "
          f"time to first token {ttft * 1000:.0f} ms, prompt {stats.num_prompt_tokens} tokens, "
          f"finish reason {out.finish_reason}", file=sys.stderr)
    if stats.num_drafted_tokens:
        print(f"speculation: {stats.num_accepted_tokens}/{stats.num_drafted_tokens} drafts accepted, "
              f"{stats.mean_accepted_length:.2f} tokens per target forward", file=sys.stderr)
    return 0


def _fusion_config(args: argparse.Namespace):
    if args.fuse_with is None and args.fusion is None:
        return None
    if args.fuse_with is None or args.fusion is None:
        raise ValueError("fusion needs both --fuse-with MEMBER... and --fusion SPEC")
    from cospec.decoding.fusion import parse_fusion
    from cospec.decoding.ngram_model import NgramLM
    from cospec.engine.config import FusionConfig

    members = [NgramLM.load(m[len("ngram:"):]) if m.startswith("ngram:") else m for m in args.fuse_with]
    return FusionConfig(members, parse_fusion(args.fusion))


# ---- train-draft -------------------------------------------------------------------------------------------
def _train_draft(args: argparse.Namespace) -> int:
    from cospec.training.train_draft import config_from_args, train_draft

    _quiet_transformers()
    out = train_draft(config_from_args(args))
    print(f"draft head saved in {out}; use it with --draft-head {out}")
    return 0


# ---- bench and serve ---------------------------------------------------------------------------------------
def _bench(args: argparse.Namespace) -> int:
    from benchmarks.suite import run

    _quiet_transformers()
    run(args)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from cospec.serving.main import serve_main

    _quiet_transformers()
    return serve_main(args)


def _quiet_transformers() -> None:
    """Keep stderr for the stats line: no weight-loading progress bars."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _stream(text: str, printed: str, finished: bool) -> str:
    """Write the part of ``text`` not yet on stdout; return what is now printed.

    Decoding all output ids each step (rather than token by token) keeps pieces that span tokens intact; a
    trailing U+FFFD is an incomplete UTF-8 sequence, held back until the next token completes it."""
    if not finished:
        text = text.rstrip("\ufffd")
    if text.startswith(printed):
        sys.stdout.write(text[len(printed):])
    else:  # a later token changed the decoding of earlier ones (rare): print the rest from where they differ
        common = os.path.commonprefix([text, printed])
        sys.stdout.write(text[len(common):])
    sys.stdout.flush()
    return text


# ---- info ----------------------------------------------------------------------------------------------
def _info(args: argparse.Namespace) -> int:
    from cospec.engine.cpu_plans import plans_dir, stored_plans
    from cospec.environment import environment

    rows = environment()
    plans = stored_plans()
    rows["cpu row plans"] = f"{plans_dir()} ({len(plans)} stored)"
    width = max(map(len, rows))
    for name, value in rows.items():
        print(f"{name:<{width}}  {value}")
    for entry in plans:
        print("\n".join(f"  {line}" for line in _plan_lines(entry)))
    return 0


def _plan_lines(entry: dict) -> list[str]:
    """A stored row plan in two lines: its key and measurement, then its paths by row count."""
    if "error" in entry:
        return [f"{entry['file'].name}: unreadable ({entry['error']}); it is measured again when needed"]
    key, measured = entry["key"], entry["measured"]
    shapes = [f"{out_features}x{in_features}" for out_features, in_features, _ in key["weights"]]
    dtypes = "/".join(sorted({dtype for *_, dtype in key["weights"]}))
    shown = ", ".join(shapes[:6]) + (f" and {len(shapes) - 6} more" if len(shapes) > 6 else "")
    return [f"{key['threads']} thread(s), weights {shown} {dtypes}, torch {key['torch']}, {key['isa']}, {key['cpu']}; "
            f"measured {measured.get('at', '?')} in {measured.get('seconds', '?')} s",
            f"  rows {entry['plan'].describe()}"]


if __name__ == "__main__":
    sys.exit(main())
