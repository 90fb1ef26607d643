"""Training the default draft head: time, peak memory, and held-out acceptance against the number of training tokens.

    python -m benchmarks.bench_draft_training [--results DIR] [--log training_log.json] [train-draft flags ...]

Trains a head as ``cospec train-draft`` does with the same flags (by default the default head of SmolLM2-135M, saved
in ``RESULTS/head``; ``--log`` plots an existing run instead, e.g. the log ``cospec train-draft`` leaves beside the
head) and writes into ``--results``: ``acceptance_vs_tokens.png`` (held-out acceptance at each draft position,
and the mean accepted length of a 4- and a 5-draft chain, against the tokens trained on so far), ``summary.md``
(training time, peak RSS, final acceptance per position) and a copy of ``training_log.json``. The acceptance figures
are teacher-forced on held-out training-distribution text; ``cospec bench --methods cospec cospec_eagle`` measures
the head on MT-Bench and HumanEval prompts.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def plot(log: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    thousands = FuncFormatter(lambda value, _: f"{value / 1000:g}k")
    evaluations = log["evaluations"]
    tokens = [e["train_tokens"] for e in evaluations]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for position in range(len(evaluations[-1]["acceptance"])):
        left.plot(tokens, [e["acceptance"][position] for e in evaluations], marker=".", label=f"draft {position + 1}")
    left.set_xlabel("training tokens (repeated epochs count again)")
    left.xaxis.set_major_formatter(thousands)
    left.set_ylabel("held-out acceptance (drafts 1..s all right)")
    left.set_title("acceptance per draft position")
    left.legend(fontsize=8)
    for chain in sorted({min(4, len(evaluations[-1]["acceptance"])), len(evaluations[-1]["acceptance"])}):
        right.plot(tokens, [1 + sum(e["acceptance"][:chain]) for e in evaluations], marker=".", label=f"{chain} drafts")
    right.set_xlabel("training tokens (repeated epochs count again)")
    right.xaxis.set_major_formatter(thousands)
    right.set_ylabel("mean accepted length (tokens per target forward)")
    right.set_title("mean accepted length of a chain")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(log: dict) -> str:
    final = log["final"]
    lines = [f"### Draft head training: {log['config']['model']}", "",
             f"{log['train_tokens']} trained tokens ({log['num_train_examples']} examples) in "
             f"{log['seconds'] / 60:.1f} min, peak RSS {log['peak_rss_bytes'] / 2**30:.2f} GiB", "",
             "| draft position | held-out acceptance | top-1 agreement |", "|---:|---:|---:|"]
    lines += [f"| {s + 1} | {a:.3f} | {g:.3f} |"
              for s, (a, g) in enumerate(zip(final["acceptance"], final["agreement"]))]
    lines += ["", f"Mean accepted length (teacher-forced, chain of {len(final['acceptance'])}): "
              f"{1 + sum(final['acceptance']):.2f}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from cospec.training.train_draft import add_arguments, config_from_args, train_draft

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_draft_training",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="bench_results/draft_training", help="results folder")
    parser.add_argument("--log", default=None, help="plot this training_log.json instead of training")
    add_arguments(parser)  # cospec train-draft's flags; --out defaults to RESULTS/head
    args = parser.parse_args(argv)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    if args.log is None:
        args.out = args.out or str(out / "head")
        args.log = train_draft(config_from_args(args)) / "training_log.json"
    log = json.loads(Path(args.log).read_text())
    if Path(args.log).resolve() != (out / "training_log.json").resolve():
        shutil.copy(args.log, out / "training_log.json")
    plot(log, out / "acceptance_vs_tokens.png")
    text = summary(log)
    (out / "summary.md").write_text(text)
    print(text)
    print(f"results in {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
