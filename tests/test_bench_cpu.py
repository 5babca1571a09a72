"""benchmarks/bench_cpu.py runs and prints what it says (its speed is not tested here).

The numbers it prints are machine-dependent; these tests only check that each
mode runs end to end, on short blocks, and that bad input is refused in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py"


def bench(*args, check=True):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, check=check)


def test_the_table_has_a_row_per_case_and_says_which_blas_kernels_ran():
    out = bench("--models", "lenet", "--rounds", "1", "--seconds", "0.02", "--threads", "1",
                "--no-memory").stdout
    lines = out.splitlines()
    assert "kernels" in lines[0] and "numpy" in lines[0]
    rows = [line.split() for line in lines if line.startswith("lenet")]
    assert [row[1] + " " + row[2] for row in rows] == ["train 64", "train 256", "infer 1000"]
    for row in rows:
        assert float(row[3].replace(",", "")) > 0                   # minicnn images/s


def test_a_memory_child_reports_the_growth_of_its_peak_memory():
    out = bench("--memory-child", "minicnn", "lenet", "train", "64").stdout
    peak = json.loads(out.splitlines()[-1])["peak_mb"]
    assert 1 < peak < 500               # activations and grads of 64 images: a few MB


def test_profile_lists_every_layer_and_the_total():
    out = bench("--models", "lenet", "--profile", "--profile-steps", "1", "--threads", "1").stdout
    assert out.count("total") == 2                                  # batch 64 and 256
    assert "Conv2d(3, 6) + ReLU + MaxPool2d" in out and "sgd" in out


def test_zero_threads_is_refused_in_one_line():
    result = bench("--threads", "0", check=False)
    assert result.returncode != 0
    assert "--threads needs at least 1" in result.stderr and "Traceback" not in result.stderr


def test_scaling_prints_both_thread_counts_for_each_engine_and_case():
    out = bench("--models", "lenet", "--scaling", "--rounds", "1", "--seconds", "0.02").stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("lenet")]
    minicnn = [row for row in rows if row[3] == "minicnn"]
    assert [row[1] + " " + row[2] for row in minicnn] == ["train 64", "train 256", "infer 1000"]
    for row in rows:
        one, many, speedup = (float(value.replace(",", "")) for value in row[4:7])
        assert one > 0 and many > 0
        assert abs(speedup - many / one) < 0.01 + 0.01 * speedup      # rounded figures


def test_scaling_refuses_a_thread_count_in_one_line():
    result = bench("--scaling", "--threads", "2", check=False)
    assert result.returncode != 0
    assert "drop --threads" in result.stderr and "Traceback" not in result.stderr
