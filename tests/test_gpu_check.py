"""benchmarks/gpu_check.sh and bench_gpu.py, in their smoke mode: every step runs end to
end without a GPU (the CuPy stand-in, PyTorch on the CPU, tiny sizes). What only a
GPU can show (speed, CUDA itself) is left to a run on one."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import first_pass_only

from minicnn import backend, load_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
BENCH = ROOT / "benchmarks" / "bench_gpu.py"
STEPS = ("0-environment", "1-install", "2-cupy-tests", "3-bench", "4-train-lenet",
         "4-train-airnet")


def environment(**changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MINICNN_DATA", "OUT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHON"] = sys.executable
    return {**env, **changes}


@pytest.mark.slow
@first_pass_only("its smoke mode selects the CuPy stand-in itself; the first pass of the "
                 "suite runs it")
def test_smoke_run_goes_through_every_step_and_gathers_the_staged_data(tiny_cifar, tmp_path):
    staged = tmp_path / "staged"                # as ../shared/tools/device-data lays it out
    files = sorted(p.name for p in tiny_cifar.iterdir())
    for number, names in enumerate((files[:4], files[4:]), start=1):
        part = staged / f"p{number}" / "cifar-10-batches-py"
        part.mkdir(parents=True)
        for name in names:
            shutil.copy(tiny_cifar / name, part / name)
    out = tmp_path / "logs"
    result = subprocess.run(["bash", str(SCRIPT), "--smoke"], capture_output=True, text=True,
                            env=environment(OUT=str(out), DEVICE_DATA=str(staged)),
                            timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]

    summary = (out / "summary.txt").read_text()
    for name in STEPS:
        assert f"{name}: passed" in summary
        assert (out / f"{name}.log").is_file()
    assert f"CIFAR-10 from {staged}/cifar-10-batches-py" in summary
    assert sorted(p.name for p in (staged / "cifar-10-batches-py").iterdir()) == files
    assert "installed: minicnn" in (out / "1-install.log").read_text()
    assert "passed" in (out / "2-cupy-tests.log").read_text()
    assert not (out / "smoke-venv").exists()          # the throwaway environment is gone

    bench = json.loads((out / "bench.json").read_text())
    assert bench["failures"] == [] and sorted(bench["results"]) == ["airnet", "lenet"]
    for cases in bench["results"].values():
        assert sorted(cases) == ["infer 4", "train 4"]
        for values in cases.values():
            assert len(values["minicnn"]) == len(values["torch"]) == len(values["ratios"]) == 1
            assert values["ratios"] == pytest.approx(
                [a / b for a, b in zip(values["minicnn"], values["torch"])])

    backend.use("numpy")
    for name in ("lenet", "airnet"):
        model, metadata = load_model(out / f"{name}_gpu.npz")
        assert metadata["training"]["backend"] == "cupy" and model.name == name
        assert metadata["training"]["epochs_completed"] == 1
        assert 0.0 <= metadata["test_accuracy"] <= 1.0
        assert "test accuracy" in (out / f"4-train-{name}.log").read_text()


def test_without_a_gpu_it_refuses_before_installing_or_writing_anything(tmp_path):
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here: the check would run for real")
    out = tmp_path / "logs"
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True,
                            env=environment(OUT=str(out)), timeout=60, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "CuPy sees no GPU here" in result.stderr and "--smoke" in result.stderr
    assert not out.exists()


def test_unknown_option_is_one_line():
    result = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True,
                            env=environment(), timeout=60, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "unknown option --gpu" in result.stderr


def test_bench_reports_failed_measurements_and_exits_1(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH), "--smoke", "--models", "lenet",
                             "--rounds", "1", "--child-timeout", "0.001", "--json",
                             str(tmp_path / "b.json")], capture_output=True, text=True,
                            env=environment(), timeout=120, check=False)
    assert result.returncode == 1
    assert "2 measurement(s) failed" in result.stdout and "--child-timeout" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("lenet ")]
    assert [row[1:3] for row in rows] == [["train", "512"], ["infer", "2048"]]
    assert all(row[3:6] == ["-", "-", "-"] for row in rows)
    assert len(json.loads((tmp_path / "b.json").read_text())["failures"]) == 2


def test_bench_refuses_zero_rounds_in_one_line():
    result = subprocess.run([sys.executable, str(BENCH), "--rounds", "0"], capture_output=True,
                            text=True, env=environment(), timeout=60, check=False)
    assert result.returncode == 2 and "--rounds needs at least 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_rounds_alternate_which_engine_goes_first_and_ratios_are_per_round(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    import bench_gpu
    calls = []

    def fake_child(engine, name, args):
        calls.append(engine)
        rate = {"minicnn": 100.0, "torch": 50.0}[engine] * len(calls)
        return {"engine": engine, "version": "v", "device": "d",
                "rates": {"train 8": rate, "infer 16": 2 * rate}}

    monkeypatch.setattr(bench_gpu, "run_child", fake_child)
    args = bench_gpu.argparse.Namespace(rounds=3, batch=8, infer_batch=16, verbose_errors=False)
    outcome = bench_gpu.benchmark("lenet", args, log=lambda line: None)
    assert calls == ["minicnn", "torch", "torch", "minicnn", "minicnn", "torch"]
    train = outcome["cases"]["train 8"]
    assert train["minicnn"] == [100, 400, 500] and train["torch"] == [100, 150, 300]
    assert train["ratios"] == [1.0, 400 / 150, 500 / 300] and outcome["failures"] == []
