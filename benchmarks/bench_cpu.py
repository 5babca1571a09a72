"""CPU throughput and peak memory of minicnn (NumPy) against PyTorch, each engine in a
fresh process of its own.

    python benchmarks/bench_cpu.py                          # every model and case, 5 rounds
    python benchmarks/bench_cpu.py --models lenet --rounds 9
    python benchmarks/bench_cpu.py --cases fit-64 fit-256   # some of the cases
    python benchmarks/bench_cpu.py --threads 1              # both engines on one CPU
    python benchmarks/bench_cpu.py --epoch --data-dir DIR   # minicnn train against the
                                                            # PyTorch reference script
    python benchmarks/bench_cpu.py --profile                # minicnn's time per layer
    python benchmarks/bench_cpu.py --baseline ../old        # minicnn against minicnn at
                                                            # another checkout, not PyTorch

How it measures, and why: every measurement is a fresh Python process that
runs one engine only. Run in one process, the two engines' threads slow each
other (PyTorch's most: its lenet training step at batch 64 ran at 6,355
images/s beside minicnn and at 9,685 alone, on a 2-core machine), so ratios
measured that way are wrong. Each round runs both engines' processes one
after the other, in alternating order (minicnn first in even rounds, PyTorch
first in odd ones), so drift of the machine hits both. A process builds its
model, warms up for ``--warmup`` seconds (first-use allocations, caches,
clocks), then times steps for about ``--seconds``. Reported per case: the
median images/s of each engine over the rounds, the median and the range of
the per-round ratios minicnn / PyTorch (> 1: minicnn is faster), and the
median peak memory.

The cases, on random float32 data of shape (N, 3, 32, 32):

- ``api-N``: the public API loop a user writes (README, "The layer
  contract"): forward, softmax cross-entropy, backward, SGD step (momentum
  0.9, weight decay 5e-4) of a model from build_model on the default (fast)
  kernels, in one process, on minicnn's threads.
- ``fit-N``: the step fit() runs: minicnn.train.training_step (each batch
  split over processes where that helps, minicnn.fast.replicas) and the SGD
  step. PyTorch runs the same loop as in api-N: it has only one.
- ``infer-N``: forward only, eval mode (PyTorch under ``torch.inference_mode``).

Peak memory is the growth of peak resident memory (VmHWM, Linux) from just
before the first step to the end, summed over the process and minicnn's
worker processes: activations, caches, gradients, optimizer state and what
the libraries allocate on first use, not the libraries' code or the model's
parameters.

``--epoch`` races whole training runs: ``minicnn train`` against
``benchmarks/train_pytorch_reference.py`` (the same recipe in PyTorch; lenet
only), each in a fresh process, alternated over rounds, and reports the wall
time of each command and the seconds of its epochs.

``--baseline DIR`` measures minicnn against minicnn at another checkout DIR
(say ``git worktree add ../old COMMIT``) instead of PyTorch, the same way:
each in a fresh process of its own (DIR's own ``benchmarks/bench_cpu.py``,
with DIR's minicnn first on the path), alternated over rounds; the ratio is
this checkout's rate over DIR's. This is how a change to the fast kernels is
measured against the code before it.

The first line printed says what each engine computes with: PyTorch's CPU
kernels and NumPy's OpenBLAS kernels (and OPENBLAS_CORETYPE, if set).
PyTorch (``pip install torch``) is optional: without it only minicnn's
numbers are printed. minicnn itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CASES = ("api-64", "api-256", "fit-64", "fit-256", "infer-1000")
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
ENGINES = ("minicnn", "torch")


def random_batch(batch_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, 3, 32, 32), dtype=np.float32)
    labels = rng.integers(0, 10, batch_size)
    return x, labels


def parse_case(case: str) -> tuple[str, int]:
    kind, _, size = case.partition("-")
    if kind not in ("api", "fit", "infer") or not size.isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(f"a case is api-N, fit-N or infer-N, got {case!r}")
    return kind, int(size)


# --- the two engines, as run inside a child process -------------------------------------

def minicnn_step(name: str, kind: str, batch_size: int, stack):
    """A function that runs one step of ``kind``, and the pids of minicnn's processes."""
    from minicnn import models
    from minicnn.losses import SoftmaxCrossEntropy
    from minicnn.optim import SGD
    from minicnn.train import forward_backward, training_step

    model = models.build_model(name)
    x, labels = random_batch(batch_size)
    if kind == "infer":
        model.eval()
        return (lambda: model.forward(x)), []
    model.train().set_needs_input_grad(False)      # the image needs no gradient
    criterion = SoftmaxCrossEntropy()
    optimizer = SGD(model, LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    if kind == "api":
        def step():
            forward_backward(model, criterion, x, labels)
            optimizer.step()
        return step, []
    step_fn = stack.enter_context(training_step(model, criterion))
    replicas = getattr(step_fn, "__self__", None)          # the Replicas, if fit uses them

    def fit_step():
        step_fn(x, labels)
        optimizer.step()
    return fit_step, (replicas.worker_pids if replicas is not None else [])


def torch_step(name: str, kind: str, batch_size: int, stack):
    import torch

    sys.path.insert(0, str(HERE))
    from torch_mirror import torch_mirror, trainable_parameters

    from minicnn import models
    model = torch_mirror(models.build_model(name))
    if model is None:
        raise LookupError(f"no PyTorch mirror for {name}")
    x, labels = (torch.from_numpy(a) for a in random_batch(batch_size))
    if kind == "infer":
        model.eval()

        def infer():
            with torch.inference_mode():
                model(x)
        return infer, []
    model.train()
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=LR, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step, []


def status_mb(field: str, pid="self") -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of a process, in MB (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/{pid}/status")


def child(engine: str, name: str, case: str, warmup: float, seconds: float) -> dict:
    """One measurement in this (fresh) process: images/s and peak memory growth."""
    import contextlib
    kind, batch_size = parse_case(case)
    with contextlib.ExitStack() as stack:
        make = minicnn_step if engine == "minicnn" else torch_step
        step, workers = make(name, kind, batch_size, stack)
        pids = ["self", *workers]
        before = {pid: status_mb("VmRSS", pid) for pid in pids}
        start = time.perf_counter()
        while time.perf_counter() - start < warmup:
            step()
        steps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or steps < 2:
            step()
            steps += 1
        peak = sum(max(status_mb("VmHWM", pid) - before[pid], 0.0) for pid in pids)
    return {"images_per_second": steps * batch_size / elapsed, "peak_mb": peak, "steps": steps}


def run_child(engine: str, name: str, case: str, args) -> dict | None:
    """Measure in a fresh process; None if the engine is missing (torch not installed)."""
    script, env = Path(__file__).resolve(), child_env(args)
    if engine == "baseline":                  # minicnn at the other checkout, its own script
        script = Path(args.baseline) / "benchmarks" / "bench_cpu.py"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(args.baseline).resolve()),
                                                          env.get("PYTHONPATH")]))
    command = [sys.executable, str(script), "--child",
               "minicnn" if engine == "baseline" else engine, name, case,
               "--warmup", str(args.warmup), "--seconds", str(args.seconds)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode == 3 and engine == "torch":       # PyTorch is not installed
        return None
    if result.returncode != 0:
        raise RuntimeError(f"{engine} {name} {case} failed: {_last_line(result.stderr)}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def child_env(args) -> dict:
    """The children's environment: with --threads N, both engines on N CPUs (minicnn's
    threads and processes, NumPy's BLAS, PyTorch's intra-op threads)."""
    env = dict(os.environ)
    if args.threads is not None:
        for variable in ("MINICNN_THREADS", "MINICNN_PROCESSES", "OMP_NUM_THREADS"):
            env[variable] = str(args.threads)
    return env


# --- rounds, medians, ratios ---------------------------------------------------------

def engines(args) -> tuple[str, str]:
    """minicnn and what it is measured against: PyTorch, or minicnn at --baseline."""
    return ("minicnn", "baseline") if args.baseline else ENGINES


def measure(name: str, case: str, args, has_torch: bool) -> dict:
    """Both engines over args.rounds rounds, alternating which goes first."""
    results = {engine: [] for engine in engines(args)}
    for round_index in range(args.rounds):
        order = engines(args) if round_index % 2 == 0 else engines(args)[::-1]
        for engine in order:
            if engine == "torch" and not has_torch:
                continue
            results[engine].append(run_child(engine, name, case, args))
    return results


def summary(results: dict) -> dict:
    """Medians of minicnn and of the other engine ("torch" or "baseline"), keyed by name."""
    other = next(engine for engine in results if engine != "minicnn")
    ours = [r["images_per_second"] for r in results["minicnn"]]
    theirs = [r["images_per_second"] for r in results[other]]
    ratios = [a / b for a, b in zip(ours, theirs)]
    return {
        "minicnn": statistics.median(ours),
        other: statistics.median(theirs) if theirs else None,
        "ratio": statistics.median(ratios) if ratios else None,
        "ratios": ratios,
        "minicnn_mb": statistics.median(r["peak_mb"] for r in results["minicnn"]),
        f"{other}_mb": statistics.median(r["peak_mb"] for r in results[other]) if theirs else None,
    }


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(args, has_torch: bool) -> None:
    other = engines(args)[1]
    label = "base" if args.baseline else "torch"
    print(f"{'model':<8}{'case':<12}{'minicnn img/s':>14}{label + ' img/s':>13}{'ratio':>7}"
          f"{'ratio range':>14}{'minicnn MB':>12}{label + ' MB':>10}")
    report = []
    for name in args.models:
        for case in args.cases:
            row = summary(measure(name, case, args, has_torch))
            spread = (f"{min(row['ratios']):.2f}-{max(row['ratios']):.2f}"
                      if row["ratios"] else "-")
            print(f"{name:<8}{case:<12}{fmt(row['minicnn'], ',.0f'):>14}"
                  f"{fmt(row[other], ',.0f'):>13}{fmt(row['ratio'], '.2f'):>7}{spread:>14}"
                  f"{fmt(row['minicnn_mb'], '.1f'):>12}{fmt(row[other + '_mb'], '.1f'):>10}",
                  flush=True)
            report.append({"model": name, "case": case, **row})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


# --- whole training runs --------------------------------------------------------------

EPOCH_SECONDS = re.compile(r"epoch\s+\d+/\d+\b.*?\s(\d+(?:\.\d+)?)s \(")


def run_epoch_race(args, has_torch: bool) -> None:
    """minicnn train against train_pytorch_reference.py, fresh processes, alternated."""
    if not has_torch:
        raise SystemExit("bench_cpu.py: error: --epoch needs PyTorch (pip install torch)")
    common = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    times = {engine: [] for engine in ENGINES}
    epochs = {engine: [] for engine in ENGINES}
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(args.rounds):
            order = ENGINES if round_index % 2 == 0 else ENGINES[::-1]
            for engine in order:
                if engine == "minicnn":
                    out = Path(folder) / f"run{round_index}.npz"
                    command = [sys.executable, "-m", "minicnn", "train", "--no-progress",
                               "--out", str(out), *common]
                else:
                    command = [sys.executable, str(HERE / "train_pytorch_reference.py"),
                               *common]
                start = time.perf_counter()
                result = subprocess.run(command, capture_output=True, text=True,
                                        env=child_env(args), check=False)
                wall = time.perf_counter() - start
                if result.returncode != 0:
                    raise RuntimeError(f"{engine} failed: {_last_line(result.stderr)}")
                times[engine].append(wall)
                epochs[engine] += [float(s) for s in EPOCH_SECONDS.findall(result.stdout)]
                print(f"round {round_index + 1} {engine:<8} {wall:7.1f} s wall", flush=True)
    ratios = [b / a for a, b in zip(times["minicnn"], times["torch"])]
    for engine in ENGINES:
        print(f"{engine:<8} wall median {statistics.median(times[engine]):.1f} s, "
              f"epoch median {statistics.median(epochs[engine]):.1f} s")
    print(f"speed ratio minicnn / PyTorch (PyTorch's wall time / minicnn's): median "
          f"{statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}")


# --- per-layer profile (minicnn only, in this process) ----------------------------------

def profile(name: str, batch_size: int, steps: int) -> None:
    """Print mean milliseconds per step of the fast kernels' plan, forward and backward.
    A fused Conv2d, ReLU, MaxPool2d run (minicnn.fast.fused) is one line."""
    from minicnn import models
    from minicnn.fast.fused import ConvReluPool, plan
    from minicnn.losses import SoftmaxCrossEntropy
    from minicnn.optim import SGD

    model = models.build_model(name).set_needs_input_grad(False)
    criterion = SoftmaxCrossEntropy()
    optimizer = SGD(model, LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    x, labels = random_batch(batch_size)
    parts = plan(model.layers)
    labels_text, first = [], 0
    for part in parts:
        count = 3 if isinstance(part, ConvReluPool) else 1
        what = (f"Conv2d({part.conv.in_channels}, {part.conv.out_channels}) + ReLU + MaxPool2d"
                if count == 3 else repr(part))
        labels_text.append(f"{first:>2}{'-' + str(first + count - 1) if count > 1 else '':<3} "
                           f"{what}")
        first += count
    forward, backward = [0.0] * len(parts), [0.0] * len(parts)
    other = {"loss": 0.0, "sgd": 0.0}
    for step in range(steps + 2):                  # the first two steps warm up
        timing = step >= 2
        h = x
        for index, part in enumerate(parts):
            start = time.perf_counter()
            h = part.forward(h)
            forward[index] += (time.perf_counter() - start) * timing
        start = time.perf_counter()
        criterion.forward(h, labels)
        dy = criterion.backward()
        other["loss"] += (time.perf_counter() - start) * timing
        for index in reversed(range(len(parts))):
            start = time.perf_counter()
            dy = parts[index].backward(dy)
            backward[index] += (time.perf_counter() - start) * timing
        start = time.perf_counter()
        optimizer.step()
        other["sgd"] += (time.perf_counter() - start) * timing
    total = sum(forward) + sum(backward) + sum(other.values())
    print(f"\n{name}, training step at batch {batch_size}: mean ms per step over {steps} steps")
    print(f"{'layer':<40}{'forward':>9}{'backward':>10}{'share':>8}")
    for index, label in enumerate(labels_text):
        share = (forward[index] + backward[index]) / total
        print(f"{label:<40.40}{1e3 * forward[index] / steps:>9.3f}"
              f"{1e3 * backward[index] / steps:>10.3f}{share:>8.1%}")
    for key, seconds in other.items():
        print(f"      {key:<34}{1e3 * seconds / steps:>9.3f}{'':>10}{seconds / total:>8.1%}")
    print(f"      {'total':<34}{1e3 * total / steps:>9.3f} ms  "
          f"({steps * batch_size / total:,.0f} images/s)")


# --- main -------------------------------------------------------------------------------

def kernel_report(env: dict) -> str:
    """What each engine computes with, read in a child with the children's environment."""
    code = ("import numpy, os, threadpoolctl\n"
            "parts = [f'numpy {numpy.__version__}']\n"
            "for lib in threadpoolctl.threadpool_info():\n"
            "    if lib.get('user_api') == 'blas':\n"
            "        parts.append(f\"{lib.get('internal_api')} {lib.get('version')} "
            "{lib.get('architecture')} kernels, {lib.get('num_threads')} threads\")\n"
            "forced = os.environ.get('OPENBLAS_CORETYPE')\n"
            "parts += [f'OPENBLAS_CORETYPE={forced}'] if forced else []\n"
            "try:\n"
            "    import torch\n"
            "    parts.append(f'torch {torch.__version__} ({torch.get_num_threads()} threads, '\n"
            "                 f'{torch.backends.cpu.get_cpu_capability()} kernels)')\n"
            "except ImportError:\n"
            "    parts.append('torch not installed')\n"
            "print(', '.join(parts) + f', {os.cpu_count()} CPUs')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, check=False)
    return result.stdout.strip() or "kernels unknown: " + _last_line(result.stderr)


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["no output"])[-1]


def torch_installed() -> bool:
    from importlib.util import find_spec
    return find_spec("torch") is not None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet", "airnet"],
                        help="registered models (default: lenet airnet)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), type=str,
                        help=f"default: {' '.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per case (default 5)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="seconds of timed steps per measurement (default 2)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of steps before timing (default 1)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="run both engines on N CPUs (default: each engine's own default)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--epoch", action="store_true",
                        help="race minicnn train against benchmarks/train_pytorch_reference.py")
    parser.add_argument("--epochs", type=int, default=1, help="--epoch: epochs per run")
    parser.add_argument("--batch-size", type=int, default=64, help="--epoch: batch size")
    parser.add_argument("--data-dir", help="--epoch: CIFAR-10 folder (default: $MINICNN_DATA)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="measure against minicnn at the checkout DIR, not PyTorch")
    parser.add_argument("--profile", action="store_true",
                        help="print minicnn's time per layer (forward, backward) instead")
    parser.add_argument("--profile-steps", type=int, default=50)
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "MODEL", "CASE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    for option in ("rounds", "epochs", "batch_size", "profile_steps"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} needs at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads needs at least 1, got {args.threads}")
    if args.baseline and (args.epoch or args.profile):
        parser.error("--baseline compares the step cases only, not --epoch or --profile")
    if args.baseline and not (Path(args.baseline) / "benchmarks" / "bench_cpu.py").is_file():
        parser.error(f"--baseline {args.baseline}: not a minicnn checkout "
                     "(no benchmarks/bench_cpu.py there)")
    if args.seconds <= 0 or args.warmup < 0:
        parser.error("--seconds must be > 0 and --warmup >= 0")
    try:
        for case in args.cases:
            parse_case(case)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    from minicnn import models
    unknown = [name for name in args.models if name not in models.MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; registered: {', '.join(models.MODELS)}")

    if args.child:
        engine, name, case = args.child
        try:
            result = child(engine, name, case, args.warmup, args.seconds)
        except ImportError as exc:
            if engine == "torch":
                return 3                      # PyTorch is optional: its column shows "-"
            print(f"bench_cpu.py: error: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(result))
        return 0
    has_torch = torch_installed()
    print(kernel_report(child_env(args)), flush=True)
    if args.profile:
        for name in args.models:
            for batch_size in (64, 256):
                profile(name, batch_size, args.profile_steps)
        return 0
    try:
        if args.epoch:
            run_epoch_race(args, has_torch)
        else:
            print_table(args, has_torch)
    except RuntimeError as exc:                # a child failed: its last line says why
        print(f"bench_cpu.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
