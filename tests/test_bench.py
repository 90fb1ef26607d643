"""The benchmark suite: workload loaders on the real packages, the report writer, and a --quick smoke run."""

import json
import subprocess
import sys

import pytest

from benchmarks import report, workloads
from cospec.training.corpora import complete_array_items


def test_humaneval_loader_reads_the_package_data():
    problems = workloads.humaneval_problems()
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0"
    assert "def has_close_elements" in problems[0]["prompt"]
    prompts = workloads.humaneval(3)
    assert len(prompts) == 3 and "has_close_elements" in prompts[0]


def test_rewrite_prompts_contain_the_code_they_ask_to_rewrite():
    prompts = workloads.rewrite(4)
    first = workloads.humaneval_problems()[0]
    assert first["canonical_solution"].strip() in prompts[0]
    assert len({p.split("\n")[0] for p in prompts}) > 1  # instructions vary


def test_mtbench_loader_reads_first_turns():
    questions = workloads.mtbench(80)
    assert len(questions) == 80
    assert questions[0].startswith("Compose an engaging travel blog post about a recent trip to Hawaii")


def test_sharegpt_loader_samples_first_human_turns_reproducibly():
    a = workloads.sharegpt(5, seed=1)
    assert a == workloads.sharegpt(5, seed=1)
    assert a != workloads.sharegpt(5, seed=2)
    assert all(16 <= len(text) <= 2000 for text in a)


def test_truncated_sharegpt_file_is_read_up_to_the_cut():
    items = list(complete_array_items('[{"a": 1}, {"b": [2, 3]}, {"c": "unterminated'))
    assert items == [{"a": 1}, {"b": [2, 3]}]


def test_unknown_workload_is_rejected():
    with pytest.raises(ValueError, match="unknown workload"):
        workloads.load("gsm8k", 1)


def _record(system, start, tokens_per_s, outputs, **extra):
    record = {"system": system, "workload": "rewrite", "batch_size": 1, "batch_start": start, "num_prompts": 1,
              "seconds": 1.0, "num_tokens": sum(len(o) for o in outputs), "tokens_per_s": tokens_per_s,
              "ttft_s": 0.1, "tpot_s": 0.05, "outputs": outputs, "target_forwards": None, "num_drafted": 0,
              "num_accepted": 0, "acceptance_histogram": [], "rss_increase_bytes": 2**20, "rss_peak_bytes": 2**30}
    record.update(extra)
    return record


def test_report_summarizes_pairwise_speedups_and_identity(tmp_path):
    records = [
        _record("hf", 0, 10.0, [[1, 2, 3]]), _record("hf", 1, 20.0, [[4, 5]]),
        _record("cospec_prompt_lookup", 0, 30.0, [[1, 2, 3]], num_drafted=10, num_accepted=6,
                acceptance_histogram=[1, 0, 2], target_forwards=3),
        _record("cospec_prompt_lookup", 1, 30.0, [[4, 6]], num_drafted=0, num_accepted=0),
        {"system": "hf_assisted", "workload": "rewrite", "batch_size": 1, "batch_start": 0, "num_prompts": 1,
         "unsupported": "hf_assisted: batch size 1 only"},
    ]
    summary = report.summarize(records)
    rows = {r["system"]: r for r in summary}
    assert [r["system"] for r in summary] == ["hf", "hf_assisted", "cospec_prompt_lookup"]
    assert rows["cospec_prompt_lookup"]["speedup_vs_hf"] == pytest.approx((3.0 + 1.5) / 2)
    assert rows["cospec_prompt_lookup"]["identical_to_hf"] == "1/2"
    assert rows["cospec_prompt_lookup"]["mean_accepted_length"] == pytest.approx((6 + 3) / 3)
    assert rows["cospec_prompt_lookup"]["acceptance_rate"] == pytest.approx(0.6)
    assert "unsupported" in rows["hf_assisted"]

    results = {"environment": {"torch": "x", "transformers": "y", "threads": 2},
               "arguments": {"model": "m", "max_new_tokens": 8, "num_prompts": 2}, "records": records,
               "summary": summary, "process_peak_rss_bytes": 2**30}
    table = report.markdown(results)
    assert "| rewrite | 1 | cospec_prompt_lookup | 30.0 (30.0–30.0) | 2.25x |" in table
    assert "unsupported (batch size 1 only)" in table
    assert report.pairwise(records) == []  # no pair of PAIRS ran here
    records += [_record("hf_prompt_lookup", 0, 15.0, [[1, 2, 3]]), _record("hf_prompt_lookup", 1, 10.0, [[4, 5]])]
    pairs = report.pairwise(records)
    assert [(p["system"], p["baseline"]) for p in pairs] == [("cospec_prompt_lookup", "hf_prompt_lookup")]
    assert pairs[0]["median_ratio"] == pytest.approx((2.0 + 3.0) / 2) and pairs[0]["num_batches"] == 2
    assert "| rewrite | 1 | cospec_prompt_lookup | hf_prompt_lookup | 2.50x (2.00–3.00) | 2 |" in report.markdown(
        dict(results, records=records))
    for path in report.plots(results, tmp_path):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_bench_runs_and_writes_valid_output(tmp_path):
    """The CI smoke run of ``cospec bench --quick`` on the embedded model (checks output, not speed)."""
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "cospec.cli", "bench", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    systems = {r["system"] for r in results["summary"]}
    assert {"hf", "cospec", "cospec_prompt_lookup"} <= systems
    # greedy outputs equal HF's at batch 1 (batched fp32 HF runs pad inside the model, so they may round differently)
    batch_one = [r for r in results["summary"] if r["batch_size"] == 1 and "unsupported" not in r]
    assert batch_one and all(r["identical_to_hf"] == "2/2" for r in batch_one)
    assert (out / "results.md").read_text().count("| rewrite |") >= 4
    assert results["cospec_cpu_settings"] and "CPU setting at the end" in (out / "results.md").read_text()
    for name in ("speedup.png", "acceptance.png", "throughput_vs_batch.png"):
        assert (out / name).stat().st_size > 1000


def test_fusion_systems_decode_the_fused_distribution():
    """The fusion systems of `cospec bench` run the model fused with an n-gram member (plain and with prompt lookup,
    which is verified against the fused distribution, so both give the same greedy tokens)."""
    from _tiny_models import tiny_model

    from benchmarks.systems import make_system
    from cospec import FusionConfig, FusionSpec, LLMEngine, SamplingParams
    from cospec.decoding.ngram_model import NgramLM

    model = tiny_model(vocab_size=64, logit_scale=4.0)
    ngram = NgramLM.build([[5, 6, 7, 8, 9] * 20], vocab_size=64, order=3)
    prompts = [[5, 6, 7, 8, 9, 5, 6], [10, 11, 12]]
    engine = LLMEngine(model, fusion=FusionConfig([ngram], FusionSpec.mixture([0.9, 0.1])))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=12, temperature=0))
    expected = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            expected[out.request_id] = out.output_token_ids
    for name in ("cospec_fusion_ngram", "cospec_fusion_ngram_lookup"):
        result = make_system(name, model, None, max_batch=2, ngram=ngram).run(prompts, 12)
        assert result.outputs == [expected["0"], expected["1"]], name


def test_fusion_quality_skips_license_headers_of_heldout_files():
    from benchmarks.bench_fusion_quality import strip_leading_comments

    text = "# Copyright 2025\n#\n# Licensed under ...\n\n\"\"\"Docs.\"\"\"\nimport os  # not a header\n# later comment\n"
    assert strip_leading_comments(text) == "\"\"\"Docs.\"\"\"\nimport os  # not a header\n# later comment\n"
    assert strip_leading_comments("# only a comment\n\n") == ""
    assert strip_leading_comments("x = 1\n") == "x = 1\n"


def test_bench_batches_are_full():
    from benchmarks.suite import batches

    assert batches(["a", "b"], 4) == [(0, ["a", "b", "a", "b"])]
    assert batches(["a", "b", "c"], 2) == [(0, ["a", "b"]), (2, ["c", "a"])]
    assert batches(["a", "b"], 1) == [(0, ["a"]), (1, ["b"])]


def test_prefix_cache_summary_reports_the_turns_after_the_first_apart():
    from benchmarks.bench_prefix_cache import Replay, RunResult, summary

    # First turns take 1 s either way; later turns 4 s without the cache and 1 s with it.
    on = RunResult(ttfts=[1.0, 1.0, 1.0, 1.0], turns=[0, 1, 0, 1], num_output_tokens=40, seconds=10.0, hit_rate=0.5)
    off = RunResult(ttfts=[1.0, 4.0, 1.0, 4.0], turns=[0, 1, 0, 1], num_output_tokens=40, seconds=20.0, hit_rate=0.0)
    row = summary(Replay("chat", [["a", "b"]] * 2, None, 0.5), {True: [on], False: [off]})
    assert row["ttft_ratio"] == 2.5 / 1.0  # medians over every request
    assert row["later_turns_ttft_ratio"] == 4.0
    assert row["throughput_ratio"] == 2.0
    one_turn = RunResult(ttfts=[1.0], turns=[0], num_output_tokens=1, seconds=1.0, hit_rate=0.0)
    assert summary(Replay("system", [["q"]], "s", 1.0), {True: [one_turn], False: [one_turn]})[
        "later_turns_ttft_ratio"] is None
