"""`partita plan` and `partita simulate` with --profile (no torch needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from partita.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "examples" / "clusters" / "tiny-2.yaml")
PLAN_KEYS = {"objective", "planner", "period_s", "throughput_rps", "latency_s", "lower_bound_period_s", "stages"}
STAGE_KEYS = {"kind", "devices", "start", "end", "compute_s", "memory_bytes", "in_bytes", "out_bytes"}


@pytest.fixture
def profile_file(tmp_path) -> str:
    segments = [{"name": f"block{i}", "flops": (i + 1) * 10**9, "param_bytes": 20 * 2**20, "act_bytes": 2**20,
                 "out_bytes": 200_000} for i in range(6)]
    path = tmp_path / "toy.json"
    path.write_text(json.dumps({"model": "toy", "input_bytes": 600_000, "segments": segments}))
    return str(path)


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_prints_a_stage_table_and_the_prediction(capsys, profile_file):
    code, out, _ = run(capsys, "plan", "--profile", profile_file, "--cluster", TINY)
    assert code == 0
    assert "fast" in out and "period" in out and "req/s" in out and "latency" in out
    assert "block0" in out


def test_plan_json_has_exactly_the_issue_keys(capsys, profile_file):
    code, out, _ = run(capsys, "plan", "--profile", profile_file, "--cluster", TINY, "--json",
                       "--objective", "latency")
    assert code == 0
    data = json.loads(out)
    assert PLAN_KEYS <= set(data)
    assert data["objective"] == "latency" and data["planner"] == "optimal"
    assert all(STAGE_KEYS == set(stage) for stage in data["stages"])


def test_planner_all_compares_every_planner(capsys, profile_file):
    code, out, _ = run(capsys, "plan", "--profile", profile_file, "--cluster", TINY, "--planner", "all", "--json")
    assert code == 0
    data = json.loads(out)
    assert [entry["planner"] for entry in data] == ["optimal", "single", "even", "memory", "flops", "seifer"]
    code, out, _ = run(capsys, "plan", "--profile", profile_file, "--cluster", TINY, "--planner", "all")
    assert code == 0 and "ratios are to optimal" in out and "1.00×" in out


def test_planner_all_exits_2_with_the_reason_when_nothing_fits(capsys, profile_file, tmp_path):
    small = tmp_path / "small.yaml"
    small.write_text("source: c\ndevices: [{name: a, memory: 8MiB, compute: 1GFLOPS}]\nlinks: {default: wifi5}\n")
    for extra in ((), ("--json",)):
        code, out, err = run(capsys, "plan", "--profile", profile_file, "--cluster", str(small), "--planner", "all",
                             *extra)
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1
        assert "MiB" in err and "Add a device" in err


def test_simulate_planner_all_exits_2_with_the_reason_when_nothing_fits(capsys, profile_file, tmp_path):
    small = tmp_path / "small.yaml"
    small.write_text("source: c\ndevices: [{name: a, memory: 8MiB, compute: 1GFLOPS}]\nlinks: {default: wifi5}\n")
    code, out, err = run(capsys, "simulate", "--profile", profile_file, "--cluster", str(small), "--planner", "all")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Add a device" in err


def test_planner_seifer_plans_on_its_own(capsys, profile_file):
    code, out, _ = run(capsys, "plan", "--profile", profile_file, "--cluster", TINY, "--planner", "seifer", "--json")
    assert code == 0
    assert json.loads(out)["planner"] == "seifer"


def test_a_bad_cluster_file_is_one_line_and_exit_code_2(capsys, profile_file, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: c\ndevices: [{name: a, memory: 1GiB}]\nlinks: {default: wifi5}\n")
    code, out, err = run(capsys, "plan", "--profile", profile_file, "--cluster", str(bad))
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert str(bad) in err.replace("\n", "") and "devices[0]" in err


def test_model_and_profile_together_are_refused(capsys, profile_file):
    code, _, err = run(capsys, "plan", "torchvision:resnet50", "--profile", profile_file, "--cluster", TINY)
    assert code == 2 and "either MODEL" in err


def test_plot_writes_a_png(capsys, profile_file, tmp_path):
    target = tmp_path / "plan.png"
    code, _, _ = run(capsys, "plan", "--profile", profile_file, "--cluster", TINY, "--plot", str(target))
    assert code == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_reports_throughput_near_the_prediction(capsys, profile_file):
    code, out, _ = run(capsys, "simulate", "--profile", profile_file, "--cluster", TINY, "--requests", "500",
                       "--json")
    assert code == 0
    data = json.loads(out)
    report = data["report"]
    assert report["completed"] == 500
    assert report["throughput_rps"] == pytest.approx(data["plan"]["throughput_rps"], rel=0.02)
    code, out, _ = run(capsys, "simulate", "--profile", profile_file, "--cluster", TINY, "--requests", "300",
                       "--rate", "1")
    assert code == 0 and "poisson" in out


def test_run_refuses_a_detection_time_that_is_not_positive(capsys):
    code, _, err = run(capsys, "run", "resnet18", "--cluster", TINY, "--detection", "0")
    assert code == 2
    assert "--detection must be > 0 seconds" in err and "Traceback" not in err


def test_run_refuses_standby_without_replanning(capsys):
    code, _, err = run(capsys, "run", "resnet18", "--cluster", TINY, "--standby", "--no-replan")
    assert code == 2
    assert "--standby" in err and "--no-replan" in err and "Traceback" not in err
