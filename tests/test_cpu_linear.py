"""The CPU linear fast path: every path and padding gives F.linear's results, the plan follows the spread rule, plans
are stored on disk under their key and loaded by later processes, the thread choice restores torch's setting, and
the model is left unchanged."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cospec.engine import cpu_linear, cpu_plans, cpu_threads
from cospec.engine.cpu_linear import (MEASURED_ROWS, PlanMeasurement, RowPlan, cpu_linears, fast_cpu_linears,
                                      fast_linear_forward, measure_row_plan, packing_available, plan_from_seconds)
from cospec.engine.cpu_plans import load_plan, plan_key, plans_dir, store_plan, stored_plans
from cospec.engine.cpu_threads import CpuLinears, Setting, ThreadChoice, better_setting

REPO = Path(__file__).resolve().parents[1]
MKL_PADDED_TO_16 = RowPlan(tuple(["linear"] + ["mkl"] * 32), tuple([0] + [max(r, 16) for r in range(1, 33)]))
needs_packing = pytest.mark.skipif(not packing_available(), reason="torch built without oneDNN")


def uniform_plan(path: str, rows: int = 64) -> RowPlan:
    return RowPlan(("linear",) + (path,) * rows, tuple(range(rows + 1)), path)


# ---- the paths ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 5, 11, 16, 17, 40])
def test_padded_rows_equal_f_linear(dtype, bias, rows):
    torch.manual_seed(rows)
    layer = nn.Linear(37, 23, bias=bias, dtype=dtype)
    x = torch.randn(1, rows, 37, dtype=dtype)
    expected = F.linear(x, layer.weight, layer.bias)
    for plan in (RowPlan(), MKL_PADDED_TO_16, uniform_plan("mkl")):
        out = fast_linear_forward(layer, x, plan)
        assert out.shape == expected.shape and out.is_contiguous()
        torch.testing.assert_close(out, expected)


@needs_packing
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 7, 16, 33, 70])
def test_prepacked_path_equals_f_linear(bias, rows):
    torch.manual_seed(rows)
    layer = nn.Linear(40, 29, bias=bias)
    x = torch.randn(1, rows, 40)
    padded = RowPlan(("linear",) + ("packed",) * 64, tuple([0] + [min(64, r + 3) for r in range(1, 65)]), "packed")
    for plan in (uniform_plan("packed"), padded):
        out = fast_linear_forward(layer, x, plan)
        assert out.shape == (1, rows, 29) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias))


@needs_packing
def test_prepacked_weights_follow_weight_changes():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    plan = uniform_plan("packed")
    torch.testing.assert_close(fast_linear_forward(layer, x, plan), layer(x))
    with torch.no_grad():
        layer.weight.mul_(2.0)  # in place: the version counter moves
    torch.testing.assert_close(fast_linear_forward(layer, x, plan), layer(x))
    layer.weight = nn.Parameter(torch.randn(8, 16))  # replaced
    torch.testing.assert_close(fast_linear_forward(layer, x, plan), layer(x))


def test_float64_never_takes_the_prepacked_path():
    layer = nn.Linear(16, 8, dtype=torch.float64)
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(fast_linear_forward(layer, x, uniform_plan("packed")), layer(x))
    assert not plan_key(cpu_linears(layer))["packed"]
    measurement = measure_row_plan([layer.weight.detach()], packed=False, repeats=3)
    assert "packed" not in measurement.plan.paths


@needs_packing
def test_inference_tensor_weights_are_packed_once():
    with torch.inference_mode():
        layer = nn.Linear(16, 8)  # its parameters are inference tensors: no version counter
    x = torch.randn(4, 16)
    with torch.inference_mode():
        torch.testing.assert_close(fast_linear_forward(layer, x, uniform_plan("packed")),
                                   F.linear(x, layer.weight, layer.bias))


def test_fast_linears_are_restored_after_the_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 8)
    expected = model(x)
    linears = cpu_linears(model)
    assert len(linears) == 2
    with fast_cpu_linears(linears, MKL_PADDED_TO_16):
        assert all("forward" in m.__dict__ for m in linears)
        torch.testing.assert_close(model(x), expected)
    assert all("forward" not in m.__dict__ for m in linears)
    torch.testing.assert_close(model(x), expected)


def test_row_plan_rejects_invalid_plans():
    with pytest.raises(ValueError, match="unknown path"):
        RowPlan(("linear", "fast"), (0, 1))
    with pytest.raises(ValueError, match="fewer rows"):
        RowPlan(("linear", "mkl", "mkl"), (0, 2, 1))
    with pytest.raises(ValueError, match="paths for"):
        RowPlan(("linear", "mkl"), (0,))


def test_row_plan_describes_its_ranges():
    # padding up to the next measured count (5 -> 6) goes without saying, beyond it (1 -> 2, 3 -> 4) not
    plan = RowPlan(("linear", "mkl", "mkl", "packed", "packed", "packed", "packed", "linear"),
                   (0, 2, 2, 4, 4, 6, 6, 7), "packed")
    assert plan.describe() == "1: mkl on 2 rows; 2: mkl; 3: packed on 4 rows; 4-6: packed; 7: linear; more: packed"
    assert RowPlan().describe() == "more: linear"


# ---- the measurement and the spread rule ----


@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=needs_packing)])
def test_measured_plan_pads_within_bounds(packed):
    weights = [torch.randn(48, 32), torch.randn(32, 48)]
    measurement = measure_row_plan(weights, repeats=3, packed=packed)
    plan = measurement.plan
    assert len(plan.paths) == len(plan.padded) == MEASURED_ROWS[-1] + 1 and plan.padded[0] == 0
    assert packed or "packed" not in plan.paths
    for rows in range(1, MEASURED_ROWS[-1] + 1):
        if plan.path_for(rows) == "linear":
            assert plan.rows_for(rows) == rows
        else:
            assert rows <= plan.rows_for(rows) <= 2 * rows + 8 and plan.rows_for(rows) in MEASURED_ROWS
    assert plan.path_for(500) == plan.large_path and plan.rows_for(500) == 500
    assert plan.large_path == ("packed" if plan.paths[-1] == "packed" else "linear")  # MKL is never extrapolated
    assert all(("mkl", 1) != key for key in measurement.seconds)  # MKL's one-column path is never timed


def test_measurement_stops_at_its_time_budget():
    measurement = measure_row_plan([torch.randn(32, 32)], repeats=3, budget_s=0.0)
    assert not measurement.complete and measurement.plan == plan_from_seconds({})
    assert set(measurement.plan.paths) == {"linear"}


def _timings(linear: list[float], **paths: dict[int, list[float]]) -> dict:
    """Synthetic timings: F.linear takes ``linear`` at every measured row count; ``paths[name][rows]`` the rest."""
    seconds = {("linear", rows): list(linear) for rows in MEASURED_ROWS}
    for path, per_rows in paths.items():
        for rows, times in per_rows.items():
            seconds[path, rows] = list(times)
    return seconds


def test_a_path_is_chosen_only_beyond_the_spread():
    linear = [1.0, 1.02, 1.05]
    clear_gain = _timings(linear, mkl={2: [0.5, 0.51, 0.52]})
    within_spread = _timings(linear, mkl={2: [0.9, 1.03, 1.2]})  # its median is above F.linear's best
    assert plan_from_seconds(clear_gain).path_for(2) == "mkl"
    assert plan_from_seconds(within_spread).path_for(2) == "linear"
    # one row runs as two on MKL: the only MKL timing within reach is at two rows
    assert plan_from_seconds(clear_gain).path_for(1) == "mkl" and plan_from_seconds(clear_gain).rows_for(1) == 2


def test_padding_is_chosen_when_a_larger_count_is_clearly_faster():
    # 12 rows are slow on this path, 16 are fast: 9-16 rows run as 16; 8 rows stay on 8 (16 <= 2 * 8 + 8 too, but
    # 8 is as fast as 16)
    seconds = _timings([1.0, 1.0, 1.0], packed={8: [0.4] * 3, 12: [0.9] * 3, 16: [0.4] * 3})
    plan = plan_from_seconds(seconds)
    assert [plan.rows_for(r) for r in (8, 9, 12, 16)] == [8, 16, 16, 16]
    counts = torch.arange(200)  # elementwise over a tensor, as the draft-length policy asks
    assert plan.rows_for(counts).tolist() == [plan.rows_for(r) for r in range(200)]
    assert RowPlan().rows_for(counts) is counts
    assert {plan.path_for(r) for r in (8, 9, 12, 16)} == {"packed"}
    assert plan.path_for(17) == "linear"  # no timing of the path at 24-42 rows


def test_too_few_samples_never_choose_a_path():
    seconds = _timings([1.0, 1.0], mkl={rows: [0.1, 0.1] for rows in MEASURED_ROWS})
    assert set(plan_from_seconds(seconds).paths) == {"linear"}


# ---- plans on disk ----


@pytest.fixture
def plan_cache(tmp_path, monkeypatch):
    """An empty cospec cache directory, no plans or thread choices in this process, measurements always clean."""
    monkeypatch.setenv("COSPEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_threads, "_choices", {})
    monkeypatch.setattr(cpu_plans, "_MAX_STORED_SPREAD", float("inf"))
    monkeypatch.setattr(cpu_linear, "MEASURE_BUDGET_S", 1e9)
    return tmp_path


def _two_layers(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64))


class CountingMeasurement:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = cpu_plans.measure_row_plan

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(cpu_plans, "measure_row_plan", counted)


def _run_once(linears: list[nn.Linear], rows: int = 4) -> ThreadChoice:
    """One forward through ``CpuLinears`` (which measures the plan when none is stored); returns its choice."""
    model = CpuLinears(linears)
    x = torch.randn(rows, linears[0].in_features)
    with model.forward(rows):
        out = linears[1](linears[0](x))
    torch.testing.assert_close(out, F.linear(F.linear(x, linears[0].weight, linears[0].bias),
                                             linears[1].weight, linears[1].bias))
    return model.choice


def test_plan_is_measured_once_then_loaded_from_disk(plan_cache, monkeypatch):
    counter = CountingMeasurement(monkeypatch)
    linears = cpu_linears(_two_layers())
    choice = _run_once(linears)
    assert counter.calls == 1 and choice.plan is not None
    files = list(plans_dir().glob("*.json"))
    assert len(files) == 1 and files[0].parent == plan_cache / "cpu_plans"
    assert json.loads(files[0].read_text())["key"] == plan_key(linears)
    assert load_plan(plan_key(linears)) == choice.plan

    monkeypatch.setattr(cpu_threads, "_choices", {})  # as a new process: the plan comes from disk
    assert _run_once(cpu_linears(_two_layers(seed=1))).plan == choice.plan and counter.calls == 1


def test_plan_is_loaded_in_a_second_process_without_measuring(plan_cache):
    linears = cpu_linears(_two_layers())
    stored = _run_once(linears).plan
    script = textwrap.dedent("""
        import json, torch
        from torch import nn
        from cospec.engine import cpu_plans
        from cospec.engine.cpu_linear import cpu_linears
        from cospec.engine.cpu_threads import CpuLinears

        def no_measurement(*args, **kwargs):
            raise AssertionError("the plan was measured again")

        cpu_plans.measure_row_plan = no_measurement
        torch.set_num_threads(1)
        model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64))
        fast = CpuLinears(cpu_linears(model))
        with fast.forward(3):
            model(torch.randn(3, 64))
        plan = fast.choice.plan
        print(json.dumps({"paths": plan.paths, "padded": plan.padded, "large_path": plan.large_path}))
    """)
    env = {**os.environ, "COSPEC_CACHE_DIR": str(plan_cache), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert RowPlan(tuple(loaded["paths"]), tuple(loaded["padded"]), loaded["large_path"]) == stored


def test_plan_key_names_what_the_plan_depends_on(monkeypatch):
    linears = cpu_linears(_two_layers())
    key = plan_key(linears)
    assert key["weights"] == [[64, 96, "float32"], [96, 64, "float32"]] and key["threads"] == torch.get_num_threads()
    assert key["packed"] == packing_available()
    assert plan_key(cpu_linears(_two_layers(seed=5))) == key  # values do not matter, shapes do
    others = [plan_key(cpu_linears(nn.Sequential(nn.Linear(64, 97), nn.Linear(97, 64)))),
              plan_key(linears, threads=key["threads"] + 1)]
    if packing_available():
        others.append(plan_key(linears, allow_packed=False))
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    others.append(plan_key(linears))
    monkeypatch.setattr(cpu_plans, "cpu_name", lambda: "another CPU")
    others.append(plan_key(linears))
    digests = [cpu_plans.plan_digest(k) for k in [key, *others]]
    assert all(other != key for other in others) and len(set(digests)) == len(digests)


def test_another_key_measures_anew(plan_cache, monkeypatch):
    counter = CountingMeasurement(monkeypatch)
    _run_once(cpu_linears(_two_layers()))
    _run_once(cpu_linears(nn.Sequential(nn.Linear(64, 80), nn.Linear(80, 64))))  # other shapes
    assert counter.calls == 2 and len(stored_plans()) == 2


def test_a_file_holding_another_key_is_measured_again(plan_cache, monkeypatch):
    counter = CountingMeasurement(monkeypatch)
    linears = cpu_linears(_two_layers())
    key = plan_key(linears)
    other = {**key, "cpu": "another CPU"}
    store_plan(other, PlanMeasurement(uniform_plan("mkl")))
    (plans_dir() / f"{cpu_plans.plan_digest(other)}.json").rename(plans_dir() / f"{cpu_plans.plan_digest(key)}.json")
    assert load_plan(key) is None
    choice = _run_once(linears)
    assert counter.calls == 1 and load_plan(key) == choice.plan


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", json.dumps({"key": 1}).encode(), None,
                                     "invalid plan"])
def test_a_corrupt_plan_file_is_measured_again(plan_cache, monkeypatch, content):
    counter = CountingMeasurement(monkeypatch)
    linears = cpu_linears(_two_layers())
    key = plan_key(linears)
    path = plans_dir() / f"{cpu_plans.plan_digest(key)}.json"
    path.parent.mkdir(parents=True)
    if content is None:
        path.mkdir()  # unreadable: a directory where the file should be
    elif content == "invalid plan":
        path.write_text(json.dumps({"key": key, "plan": {"paths": ["linear", "mkl"], "padded": [0, 0],
                                                         "large_path": "linear"}}))
    else:
        path.write_bytes(content)
    assert load_plan(key) is None
    choice = _run_once(linears)
    assert counter.calls == 1 and choice.plan is not None
    if content is not None:
        assert load_plan(key) == choice.plan  # rewritten
    assert any("error" in entry for entry in stored_plans()) == (content is None)
    assert not list(plans_dir().glob("*.tmp"))  # a file that could not be put in place is not left behind


def test_an_unclean_measurement_is_used_but_not_stored(plan_cache, monkeypatch):
    monkeypatch.setattr(cpu_linear, "MEASURE_BUDGET_S", 0.0)  # as when the machine is too busy to finish
    choice = _run_once(cpu_linears(_two_layers()))
    assert choice.plan is not None and set(choice.plan.paths) == {"linear"}
    assert stored_plans() == []


# ---- the thread choice ----


def test_better_setting_follows_the_spread_rule():
    assert better_setting(0, [[1.0, 1.1], [0.5, 0.6], [0.8, 0.9]]) == 1
    assert better_setting(0, [[1.0, 1.1], [0.5, 1.05], [0.95, 1.3]]) == 0  # overlapping: the current one stays
    assert better_setting(2, [[0.2, 0.3], [0.4, 0.5], [1.0, 2.0]]) == 0


def test_thread_choice_settings_and_check_schedule():
    key = {"threads": 2}
    plan = uniform_plan("mkl")
    choice = ThreadChoice(key, plan)
    assert choice.settings == [Setting(2, plan), Setting(2, RowPlan()), Setting(1, RowPlan())]
    assert ThreadChoice({"threads": 1}, RowPlan()).settings == [Setting(1, RowPlan())]
    assert ThreadChoice(key, None).settings == [Setting(2, RowPlan()), Setting(1, RowPlan())]
    assert ThreadChoice(key, uniform_plan("linear")).settings == [Setting(2, RowPlan()), Setting(1, RowPlan())]

    layers = cpu_linears(_two_layers())
    choice.setting_for(4, layers, layers)  # the first small forward is checked
    assert choice.num_checks == 1 and choice.interval in (16, 32)
    for _ in range(choice.interval - 1):
        choice.count_forward()
        choice.setting_for(4, layers, layers)
    assert choice.num_checks == 1
    choice.count_forward()
    choice.setting_for(200, layers, layers)  # due, but a large forward is never checked
    assert choice.num_checks == 1
    choice.setting_for(4, layers, layers)
    assert choice.num_checks == 2


def test_a_sudden_slowdown_calls_a_check(plan_cache):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        linears = cpu_linears(_two_layers())
        store_plan(plan_key(linears), PlanMeasurement(uniform_plan("mkl")))  # stored: nothing to measure
        fast = CpuLinears(linears)
        fast.choice.setting_for(1, fast.linears, fast.linears)
        assert fast.choice.num_checks == 1
        for seconds in (0.010, 0.011, 0.010, 0.012, 0.011):
            fast.observe(fast.choice.setting, 1, seconds)
            fast.observe(fast.choice.setting, 2, 5 * seconds)  # other sizes are compared among themselves
        fast.choice.setting_for(1, fast.linears, fast.linears)
        assert fast.choice.num_checks == 1
        fast.observe(fast.choice.setting, 1, 0.050)  # five times the last ones: the load changed
        fast.choice.setting_for(1, fast.linears, fast.linears)
        assert fast.choice.num_checks == 2
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("winner", [0, 1])
def test_plan_is_measured_only_when_torchs_threads_are_unhindered(plan_cache, monkeypatch, winner):
    counter = CountingMeasurement(monkeypatch)
    monkeypatch.setattr(cpu_linear, "MEASURE_BUDGET_S", 0.5)
    monkeypatch.setattr(cpu_threads, "better_setting", lambda current, seconds: winner)  # 1: one thread was faster
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = _two_layers()
        fast = CpuLinears(cpu_linears(model))
        assert fast.choice.plan is None and [s.threads for s in fast.choice.settings] == [2, 1]
        with fast.forward(4):
            model(torch.randn(4, 64))
    finally:
        torch.set_num_threads(previous)
    assert fast.choice.num_checks == 1
    if winner == 0:  # two threads held: the plan is measured now, on them, and preferred
        assert counter.calls == 1 and fast.choice.plan is not None and fast.choice.current == 0
    else:
        assert counter.calls == 0 and fast.choice.plan is None and fast.choice.setting == Setting(1, RowPlan())


def test_forward_runs_at_the_chosen_threads_and_restores_torchs(plan_cache):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = _two_layers()
        fast = CpuLinears(cpu_linears(model))
        x = torch.randn(6, 64)
        for setting in fast.choice.settings:
            fast.choice.current = fast.choice.settings.index(setting)
            fast.choice._until_check = 10**6  # no check: this setting runs
            with fast.forward(6):
                assert torch.get_num_threads() == setting.threads
                out = model(x)
            torch.testing.assert_close(out, F.linear(F.linear(x, model[0].weight, model[0].bias), model[1].weight,
                                                     model[1].bias))
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_info_lists_the_stored_plans(plan_cache, capsys):
    from cospec.cli import main

    plan = _run_once(cpu_linears(_two_layers())).plan
    (plans_dir() / "broken.json").write_text("{")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"{plans_dir()} (2 stored)" in out
    assert f"rows {plan.describe()}" in out and "1 thread(s), weights 64x96, 96x64 float32" in out
    assert "broken.json: unreadable" in out
