"""Turning raw benchmark records into a summary, a Markdown table and PNG plots."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(records: list[dict]) -> list[dict]:
    """One row per (workload, batch size, system), in first-seen order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["workload"], r["batch_size"], r["system"])].append(r)
    hf = {(r["workload"], r["batch_size"], r["batch_start"]): r for r in records
          if r["system"] == "hf" and "unsupported" not in r}
    from benchmarks.systems import SYSTEMS

    order = {name: i for i, name in enumerate(SYSTEMS)}
    rows = []
    for (workload, batch_size, system), runs in sorted(
            groups.items(), key=lambda item: (item[0][0], item[0][1], order.get(item[0][2], len(order)))):
        row = {"workload": workload, "batch_size": batch_size, "system": system}
        done = [r for r in runs if "unsupported" not in r]
        if not done:
            row["unsupported"] = runs[0]["unsupported"]
            rows.append(row)
            continue
        speeds = [r["tokens_per_s"] for r in done]
        ratios, identical, compared = [], 0, 0
        for r in done:
            base = hf.get((workload, batch_size, r["batch_start"]))
            if base is None:
                continue
            ratios.append(r["tokens_per_s"] / base["tokens_per_s"])
            for mine, theirs in zip(r["outputs"], base["outputs"]):
                compared += 1
                identical += mine == theirs
        drafted = sum(r.get("num_drafted", 0) for r in done)
        accepted = sum(r.get("num_accepted", 0) for r in done)
        windows = sum(sum(r.get("acceptance_histogram") or []) for r in done)
        forwards = [r["target_forwards"] * r["num_prompts"] / max(r["num_tokens"], 1) for r in done
                    if r.get("target_forwards") is not None]
        row.update({
            "tokens_per_s": _median(speeds), "tokens_per_s_min": min(speeds), "tokens_per_s_max": max(speeds),
            "speedup_vs_hf": _median(ratios), "ttft_s": _median([r["ttft_s"] for r in done]),
            "tpot_s": _median([r["tpot_s"] for r in done]),
            "mean_accepted_length": (accepted + windows) / windows if windows else None,
            "acceptance_rate": accepted / drafted if drafted else None,
            "target_forwards_per_token": _median(forwards),
            "identical_to_hf": f"{identical}/{compared}" if compared else None,
            "peak_rss_increase_mb": max(r["rss_increase_bytes"] for r in done) / 2**20,
        })
        rows.append(row)
    return rows


# (system, baseline): cospec methods against the HF method they replace and against cospec's own plain decoding.
PAIRS = (("cospec_prompt_lookup", "hf_prompt_lookup"), ("cospec_draft", "hf_assisted"),
         ("cospec_prompt_lookup", "cospec"), ("cospec_self_spec", "cospec"), ("cospec_draft", "cospec"),
         ("cospec_eagle", "cospec"),
         ("cospec_fusion_ngram_lookup", "cospec_fusion_ngram"))


def pairwise(records: list[dict]) -> list[dict]:
    """For each pair of ``PAIRS`` run on the same prompts: the median over batches of the tokens/s ratio."""
    speed = {(r["workload"], r["batch_size"], r["batch_start"], r["system"]): r["tokens_per_s"] for r in records
             if "unsupported" not in r}
    cells = dict.fromkeys((w, b) for w, b, _, _ in speed)
    rows = []
    for system, baseline in PAIRS:
        for workload, batch_size in cells:
            ratios = [speed[w, b, start, system] / speed[w, b, start, baseline]
                      for (w, b, start, name) in speed
                      if (w, b, name) == (workload, batch_size, system) and (w, b, start, baseline) in speed]
            if ratios:
                rows.append({"system": system, "baseline": baseline, "workload": workload, "batch_size": batch_size,
                             "median_ratio": _median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
                             "num_batches": len(ratios)})
    return rows


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def markdown(results: dict) -> str:
    env = results["environment"]
    args = results["arguments"]
    lines = [
        f"### cospec bench: {args['model']}, greedy, {args['max_new_tokens']} new tokens, "
        f"{args['num_prompts']} prompts per workload",
        "",
        f"{env.get('cpu', env.get('device', ''))} · torch {env.get('torch')} · transformers {env.get('transformers')} · "
        f"threads {env.get('threads')}",
        "",
        "| workload | batch | system | tokens/s median (min–max) | speedup vs HF | TTFT ms | TPOT ms | mean accepted length "
        "| acceptance | target fwd / token | identical to HF | peak RSS +MB |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["summary"]:
        head = f"| {row['workload']} | {row['batch_size']} | {row['system']} |"
        if "unsupported" in row:
            lines.append(head + f" unsupported ({row['unsupported'].split(': ', 1)[-1]}) | | | | | | | | |")
            continue
        lines.append(
            head + f" {row['tokens_per_s']:.1f} ({row['tokens_per_s_min']:.1f}–{row['tokens_per_s_max']:.1f}) |"
            f" {_fmt(row['speedup_vs_hf'], '.2f')}x | {_fmt(row['ttft_s'], '.0f', 1e3)} | {_fmt(row['tpot_s'], '.0f', 1e3)} |"
            f" {_fmt(row['mean_accepted_length'], '.2f')} | {_fmt(row['acceptance_rate'], '.2f')} |"
            f" {_fmt(row['target_forwards_per_token'], '.2f')} | {row['identical_to_hf'] or '–'} |"
            f" {row['peak_rss_increase_mb']:.0f} |")
    lines += ["", f"Process peak RSS: {results['process_peak_rss_bytes'] / 2**20:.0f} MB."]
    lines += [f"cospec's CPU setting at the end: {setting}" for setting in results.get("cospec_cpu_settings", [])]
    pairs = pairwise(results["records"])
    if pairs:
        lines += ["", "Pairwise (tokens/s ratio per batch of prompts, median (min–max)):", "",
                  "| workload | batch | system | baseline | ratio | batches |", "|---|---:|---|---|---|---:|"]
        lines += [f"| {p['workload']} | {p['batch_size']} | {p['system']} | {p['baseline']} |"
                  f" {p['median_ratio']:.2f}x ({p['min_ratio']:.2f}–{p['max_ratio']:.2f}) | {p['num_batches']} |"
                  for p in pairs]
    return "\n".join(lines) + "\n"


def plots(results: dict, out_dir: Path) -> list[Path]:
    """speedup.png, acceptance.png, throughput_vs_batch.png in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["summary"] if "unsupported" not in r]
    paths = []
    batch_sizes = sorted({r["batch_size"] for r in rows})
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    systems = [s for s in dict.fromkeys(r["system"] for r in rows) if s != "hf"]

    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(6 * len(batch_sizes), 4), squeeze=False)
    width = 0.8 / max(len(systems), 1)
    for ax, batch_size in zip(axes[0], batch_sizes):
        for i, system in enumerate(systems):
            values = [next((r["speedup_vs_hf"] or 0 for r in rows if r["workload"] == w and r["system"] == system
                            and r["batch_size"] == batch_size), 0) for w in workloads]
            ax.bar([x + i * width for x in range(len(workloads))], values, width, label=system)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(workloads))], workloads)
        ax.set_title(f"speedup over HF generate, batch {batch_size}")
        ax.set_ylabel("tokens/s ratio (median)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "speedup.png"))

    histograms: dict[str, list[int]] = defaultdict(list)
    for r in results["records"]:
        for m, count in enumerate(r.get("acceptance_histogram") or []):
            hist = histograms[r["system"]]
            hist += [0] * (m + 1 - len(hist))
            hist[m] += count
    fig, ax = plt.subplots(figsize=(6, 4))
    for system, hist in histograms.items():
        total = sum(hist)
        if total:
            ax.plot(range(len(hist)), [c / total for c in hist], marker="o", label=system)
    ax.set_xlabel("drafts accepted per verify window")
    ax.set_ylabel("fraction of windows")
    ax.set_title("accepted lengths")
    if histograms:
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "acceptance.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for system in dict.fromkeys(r["system"] for r in rows):
        points = [(b, _median([r["tokens_per_s"] for r in rows if r["system"] == system and r["batch_size"] == b]))
                  for b in batch_sizes]
        points = [(b, v) for b, v in points if v is not None]
        ax.plot([b for b, _ in points], [v for _, v in points], marker="o", label=system)
    ax.set_xlabel("batch size")
    ax.set_ylabel("aggregate tokens/s (median over workloads)")
    ax.set_title("throughput against batch size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "throughput_vs_batch.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
