"""The plain-decoding benchmark's busy-machine mode: the competing load runs beside the block and reports its
throughput; a busy run writes the comparison, the load and cospec's CPU setting (no timed assertions)."""

import json
import time

from _tiny_models import save_tiny_llama_dir
from benchmarks import bench_plain
from benchmarks.busy_load import CompetingLoad

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def test_competing_load_runs_beside_the_block_and_reports():
    with CompetingLoad(1) as load:
        assert load.process.poll() is None  # started, and running before the block begins
        time.sleep(1.0)  # long enough for a few products, even on a busy machine
    assert load.process.poll() is not None
    assert load.stats["threads"] == 1 and load.stats["products_per_s"] > 0
    with CompetingLoad(0) as nothing:
        assert nothing.process is None
    assert nothing.stats is None


def test_busy_mode_runs_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COSPEC_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = save_tiny_llama_dir(tmp_path / "tiny", ["the cat sat on the mat", "a dog ran in the park"],
                                    chat_template=CHAT_TEMPLATE)
    out = tmp_path / "plain.json"
    results = bench_plain.main(["--model", str(model_dir), "--max-new-tokens", "4", "--prompts", "1", "--repeats", "1",
                                "--batch-sizes", "1", "2", "--warmup-tokens", "2", "--busy-threads", "1",
                                "--out", str(out)])
    assert json.loads(out.read_text())["competing_load"] == results["competing_load"]
    assert results["competing_load"]["threads"] == 1 and results["competing_load"]["products_per_s"] > 0
    assert results["cospec_cpu_settings"] and all("thread" in s for s in results["cospec_cpu_settings"])
    for b in (1, 2):
        assert all(p["identical"] for p in results["summary"]["per_batch_size"][b]["identical_to_hf"])
    printed = capsys.readouterr().out
    assert "busy machine: a competing process" in printed and "batch 1 speedup" in printed
    assert "(target >= 1.0x)" in printed and "cospec's CPU setting at the end" in printed
