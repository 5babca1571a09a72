"""benchmarks/bench_cpu.py runs and prints what it says (its speed is not tested here).

The numbers it prints are machine-dependent; these tests only check that each
mode runs end to end, on short measurements, that every measurement is a fresh
process of one engine, and that bad input is refused in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py"
QUICK = ("--rounds", "1", "--seconds", "0.01", "--warmup", "0")


def bench(*args, check=True):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, check=check)


def test_the_table_has_a_row_per_case_and_says_which_kernels_ran():
    out = bench("--models", "lenet", "--cases", "api-8", "fit-8", "infer-16", *QUICK).stdout
    lines = out.splitlines()
    assert "kernels" in lines[0] and "numpy" in lines[0]
    rows = [line.split() for line in lines if line.startswith("lenet")]
    assert [row[1] for row in rows] == ["api-8", "fit-8", "infer-16"]
    for row in rows:
        assert float(row[2].replace(",", "")) > 0                   # minicnn images/s


def test_baseline_measures_minicnn_against_another_checkout():
    """Here the other checkout is this one: both columns are minicnn's, from fresh
    processes of their own scripts."""
    out = bench("--models", "lenet", "--cases", "infer-16", "--baseline",
                str(SCRIPT.parents[1]), *QUICK).stdout
    header, row = (line for line in out.splitlines() if line.startswith(("model", "lenet")))
    assert "base img/s" in header and "torch" not in header
    assert float(row.split()[2].replace(",", "")) > 0 and float(row.split()[3].replace(",", "")) > 0


@pytest.mark.parametrize("engine", ["minicnn", "torch"])
def test_a_child_measures_one_engine_alone(engine):
    if engine == "torch":
        pytest.importorskip("torch", reason="PyTorch is not installed")
    out = bench("--child", engine, "lenet", "fit-16", "--seconds", "0.01", "--warmup", "0")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["images_per_second"] > 0 and result["steps"] >= 2
    assert 0 <= result["peak_mb"] < 500


def test_the_minicnn_child_never_imports_torch():
    code = ("import runpy, sys\n"
            f"sys.argv = ['bench', '--child', 'minicnn', 'lenet', 'api-8', '--seconds', '0.01',"
            f" '--warmup', '0']\n"
            "try:\n"
            f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_profile_lists_every_layer_and_the_total():
    out = bench("--models", "lenet", "--profile", "--profile-steps", "1").stdout
    assert out.count("total") == 2                                  # batch 64 and 256
    assert "Conv2d(3, 6) + ReLU + MaxPool2d" in out and "sgd" in out


def test_the_epoch_race_runs_both_training_commands(tiny_cifar):
    pytest.importorskip("torch", reason="PyTorch is not installed")
    out = bench("--epoch", "--rounds", "1", "--epochs", "1", "--batch-size", "16",
                "--data-dir", str(tiny_cifar)).stdout
    assert "round 1 minicnn" in out and "round 1 torch" in out
    assert "speed ratio minicnn / PyTorch" in out


@pytest.mark.parametrize("args,message", [
    (("--threads", "0"), "--threads needs at least 1"),
    (("--cases", "train-64"), "a case is api-N, fit-N or infer-N"),
    (("--models", "resnet"), "unknown model 'resnet'"),
    (("--rounds", "0"), "--rounds needs at least 1"),
    (("--baseline", "/nonexistent"), "not a minicnn checkout"),
    (("--baseline", ".", "--epoch"), "--baseline compares the step cases only"),
])
def test_bad_options_are_refused_in_one_line(args, message):
    result = bench(*args, check=False)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("exit_code", [1, 3])
def test_a_failing_child_stops_the_run_in_one_line(tmp_path, exit_code):
    """A baseline checkout whose benchmark cannot run (here: a missing module) ends the
    run with that reason on one line, not a traceback or a table of nothing."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bench_cpu.py").write_text(
        "import sys\n"
        "print(\"ModuleNotFoundError: No module named 'threadpoolctl'\", file=sys.stderr)\n"
        f"sys.exit({exit_code})\n")
    result = bench("--models", "lenet", "--cases", "infer-16", "--baseline", str(tmp_path),
                   *QUICK, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "bench_cpu.py: error: baseline lenet infer-16 failed: "
        "ModuleNotFoundError: No module named 'threadpoolctl'"]


# --- benchmarks/gemm_floor.py ---------------------------------------------------------

FLOOR = SCRIPT.parent / "gemm_floor.py"


def floor(*args, check=True):
    return subprocess.run([sys.executable, str(FLOOR), *args], capture_output=True,
                          text=True, timeout=120, check=check)


def test_the_gemm_floor_times_each_conv_and_adds_them_up():
    out = floor("--model", "lenet", "--batch-size", "2", "--repeats", "1").stdout
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["3->6", "6->16", "total"]
    first, second, total = rows
    assert float(first[6]) == 0.0 and float(second[6]) > 0     # the image needs no dx
    assert float(total[1]) == pytest.approx(                   # (each rounded to 0.01)
        sum(float(value) for row in rows[:2] for value in row[4:7]), abs=0.04)


@pytest.mark.parametrize("args,message", [(("--model", "resnet"), "unknown model 'resnet'"),
                                          (("--batch-size", "0"), "at least 1")])
def test_the_gemm_floor_refuses_bad_options(args, message):
    result = floor(*args, check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
