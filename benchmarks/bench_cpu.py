"""CPU throughput and peak memory of minicnn (NumPy) against PyTorch, model by model.

    python benchmarks/bench_cpu.py                    # every registered model
    python benchmarks/bench_cpu.py --models lenet --rounds 9
    python benchmarks/bench_cpu.py --profile          # time per layer, forward and backward
    python benchmarks/bench_cpu.py --threads 1        # both engines on one thread
    python benchmarks/bench_cpu.py --scaling          # each engine on 1 CPU against all

What is timed, on random float32 data of shape (N, 3, 32, 32):

- train N=64 and N=256: one step = forward, softmax cross-entropy, backward,
  SGD step (momentum 0.9, weight decay 5e-4), the same in both engines.
- infer N=1000: forward only, eval mode (PyTorch under ``torch.inference_mode``).

The two engines run interleaved in one process: each round times a block of
minicnn steps, then the same number of PyTorch steps, so drift of the
machine (other load, clock changes) hits both. Reported: the median over the
rounds of images/s, and ratio = minicnn / PyTorch (> 1 means minicnn is
faster).

Peak memory is measured in a fresh child process per engine and case: the
growth of peak resident memory (VmHWM, Linux) over three steps above the
resident memory just before the first step: activations, caches, gradients,
optimizer state and whatever the libraries allocate on first use, but not
the libraries' code or the model's parameters.

The first line printed says what each engine computes with: PyTorch's CPU
kernels (AVX2, AVX512) and which kernels NumPy's OpenBLAS loaded. OpenBLAS
picks them for the CPU, unless the environment variable OPENBLAS_CORETYPE
names them: on an AVX-512 CPU, OPENBLAS_CORETYPE=Haswell holds NumPy's matrix
products to AVX2 while PyTorch still uses AVX-512.

minicnn trains as fit() does: on a CPU with several cores, each batch split
over processes (minicnn.replicas), one per CPU; with ``--threads N``, N of them.
Peak memory then adds up the growth of every process.

``--scaling`` asks what the other CPUs are worth: for each engine and case,
rounds alternate between one CPU and the default (all of them), in one
process, and it prints both medians and their ratio, the speedup. On one CPU
both engines run one thread; on all, PyTorch runs its threads, and minicnn its
processes (training) or threads (inference). NumPy's BLAS is held to one
thread throughout, as minicnn holds it whenever it runs its own threads or
processes.

PyTorch (``pip install torch``) is optional: without it only minicnn's own
numbers are printed. minicnn itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from minicnn import models
from minicnn.fast import parallel
from minicnn.layers import Sequential
from minicnn.fast.fused import ConvReluPool, plan
from minicnn.losses import SoftmaxCrossEntropy
from minicnn.optim import SGD
from minicnn.fast.replicas import Replicas, default_processes
from minicnn.train import forward_backward

CASES = (("train", 64), ("train", 256), ("infer", 1000))
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


def random_batch(batch_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, 3, 32, 32), dtype=np.float32)
    labels = rng.integers(0, 10, batch_size)
    return x, labels


# --- minicnn -------------------------------------------------------------------

class MinicnnRunner:
    """One model and one batch; ``step()`` runs one training step or one inference.

    Training splits the batch over processes (minicnn.replicas) where fit() does
    (default_processes), else runs forward and backward here, on minicnn's threads."""

    def __init__(self, name: str, mode: str, batch_size: int):
        self.model = models.build_model(name)
        self.model.train(mode == "train")
        self.model.set_needs_input_grad(False)      # no gradient for the image itself
        self.mode = mode
        self.x, self.labels = random_batch(batch_size)
        self.criterion = SoftmaxCrossEntropy()
        self.optimizer = SGD(self.model, LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.replicas, self.split = None, False
        self.set_threads(parallel.workers())

    def set_threads(self, count: int) -> None:
        """Use ``count`` CPUs: that many threads, or for training that many processes."""
        parallel.set_workers(count)
        self.split = self.mode == "train" and count > 1 and default_processes(self.model) > 1
        if self.split and (self.replicas is None or self.replicas.processes != count):
            if self.replicas is not None:
                self.replicas.close()
            self.replicas = Replicas(self.model, self.criterion, count)

    def step(self) -> None:
        if self.mode != "train":
            self.model.forward(self.x)
            return
        if self.split:
            self.replicas.forward_backward(self.x, self.labels)
        else:
            forward_backward(self.model, self.criterion, self.x, self.labels)
        self.optimizer.step()


# --- PyTorch -----------------------------------------------------------------

class TorchRunner:
    def __init__(self, name: str, mode: str, batch_size: int):
        import torch
        from torch_mirror import torch_mirror, trainable_parameters   # beside this script
        self.torch = torch
        model = models.build_model(name)
        if not isinstance(model, Sequential) or (mirror := torch_mirror(model)) is None:
            raise LookupError(f"no PyTorch mirror for {name}")
        self.model = mirror.train(mode == "train")
        self.mode = mode
        x, labels = random_batch(batch_size)
        self.x, self.labels = torch.from_numpy(x), torch.from_numpy(labels)
        self.optimizer = torch.optim.SGD(trainable_parameters(self.model), lr=LR, momentum=MOMENTUM,
                                         weight_decay=WEIGHT_DECAY)

    def step(self) -> None:
        if self.mode == "train":
            loss = self.torch.nn.functional.cross_entropy(self.model(self.x), self.labels)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        else:
            with self.torch.inference_mode():
                self.model(self.x)


def torch_runner(name: str, mode: str, batch_size: int):
    try:
        return TorchRunner(name, mode, batch_size)
    except (ImportError, LookupError):
        return None


# --- timing ----------------------------------------------------------------------

def time_steps(runner, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        runner.step()
    return time.perf_counter() - start


def warm_up(runner, seconds: float = 1.0) -> float:
    """Run steps for about ``seconds`` (first-use allocations, caches, clocks); return s/step."""
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or steps < 3:
        runner.step()
        steps += 1
    return elapsed / steps


def interleaved(name: str, mode: str, batch_size: int, rounds: int, seconds: float) -> dict:
    """Median images/s of both engines over ``rounds`` alternating blocks."""
    ours = MinicnnRunner(name, mode, batch_size)
    theirs = torch_runner(name, mode, batch_size)
    steps = max(1, round(seconds / warm_up(ours)))
    if theirs is not None:
        warm_up(theirs)
    rates = {"minicnn": [], "torch": []}
    for _ in range(rounds):
        rates["minicnn"].append(steps * batch_size / time_steps(ours, steps))
        if theirs is not None:
            rates["torch"].append(steps * batch_size / time_steps(theirs, steps))
    return {engine: statistics.median(r) if r else None for engine, r in rates.items()}


def thread_scaling(name: str, mode: str, batch_size: int, rounds: int, seconds: float) -> dict:
    """{engine: (images/s on 1 thread, on the default count)}: medians over ``rounds``
    rounds, each timing a block on 1 thread, then one on all (the order alternates)."""
    many = parallel.workers()
    runners = {"minicnn": MinicnnRunner(name, mode, batch_size),
               "torch": torch_runner(name, mode, batch_size)}
    out = {}
    for engine, runner in runners.items():
        if runner is None:
            continue
        set_threads = runner.set_threads if engine == "minicnn" else runner.torch.set_num_threads
        rates = {1: [], many: []}
        set_threads(many)
        steps = max(1, round(seconds / warm_up(runner)))
        for index in range(rounds):
            for count in ((1, many) if index % 2 == 0 else (many, 1)):
                set_threads(count)
                warm_up(runner, 0.1)
                rates[count].append(steps * batch_size / time_steps(runner, steps))
        set_threads(many)
        out[engine] = (statistics.median(rates[1]), statistics.median(rates[many]))
    return out


def print_scaling(names, rounds: int, seconds: float) -> None:
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")       # as minicnn holds it with several threads
    many = parallel.workers()
    print(f"{'model':<10}{'case':<12}{'engine':<9}{'1 CPU':>10}{f'{many} CPUs':>12}"
          f"{'speedup':>9}")
    for name in names:
        for mode, batch_size in CASES:
            for engine, (one, all_) in thread_scaling(name, mode, batch_size, rounds,
                                                      seconds).items():
                print(f"{name:<10}{f'{mode} {batch_size}':<12}{engine:<9}{one:>10,.0f}"
                      f"{all_:>12,.0f}{all_ / one:>9.2f}", flush=True)


# --- peak memory, in child processes ---------------------------------------------

def _status_mb(field: str, pid="self") -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of a process, in MB (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/{pid}/status")


def memory_child(engine: str, name: str, mode: str, batch_size: int, steps: int = 3) -> None:
    """Run in a fresh process: print the growth of peak RSS over ``steps`` steps, in MB,
    summed over this process and minicnn's worker processes (minicnn.replicas), if any."""
    runner = (MinicnnRunner if engine == "minicnn" else TorchRunner)(name, mode, batch_size)
    replicas = getattr(runner, "replicas", None)
    pids = ["self"] + (replicas.worker_pids if replicas is not None else [])
    before = {pid: _status_mb("VmRSS", pid) for pid in pids}
    for _ in range(steps):
        runner.step()
    growth = sum(max(_status_mb("VmHWM", pid) - before[pid], 0.0) for pid in pids)
    print(json.dumps({"peak_mb": growth}))


def peak_memory_mb(engine: str, name: str, mode: str, batch_size: int):
    command = [sys.executable, __file__, "--memory-child", engine, name, mode, str(batch_size)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


# --- per-layer profile -------------------------------------------------------------

def profile(name: str, batch_size: int, steps: int) -> None:
    """Print mean milliseconds per layer, forward and backward, over ``steps`` steps.

    A fused Conv2d, ReLU, MaxPool2d run (minicnn.fast.fused) is one line."""
    runner = MinicnnRunner(name, "train", batch_size)
    parts = plan(runner.model.layers)      # what FastSequential.forward runs, in order
    labels, first = [], 0
    for part in parts:
        count = 3 if isinstance(part, ConvReluPool) else 1
        if count == 3:
            conv = part.conv
            what = f"Conv2d({conv.in_channels}, {conv.out_channels}) + ReLU + MaxPool2d"
        else:
            what = repr(part)
        labels.append(f"{first:>2}{'-' + str(first + count - 1) if count > 1 else '':<3} {what}")
        first += count
    forward = [0.0] * len(parts)
    backward = [0.0] * len(parts)
    other = {"loss": 0.0, "sgd": 0.0}
    warm_up(runner)
    for _ in range(steps):
        x = runner.x
        for index, part in enumerate(parts):
            start = time.perf_counter()
            x = part.forward(x)
            forward[index] += time.perf_counter() - start
        start = time.perf_counter()
        runner.criterion.forward(x, runner.labels)
        dy = runner.criterion.backward()
        other["loss"] += time.perf_counter() - start
        for index in reversed(range(len(parts))):
            start = time.perf_counter()
            dy = parts[index].backward(dy)
            backward[index] += time.perf_counter() - start
        start = time.perf_counter()
        runner.optimizer.step()
        other["sgd"] += time.perf_counter() - start
    total = sum(forward) + sum(backward) + sum(other.values())
    print(f"\n{name}, training step at batch {batch_size}: mean ms per step over {steps} steps")
    print(f"{'layer':<40}{'forward':>9}{'backward':>10}{'share':>8}")
    for index, label in enumerate(labels):
        ms_f, ms_b = 1e3 * forward[index] / steps, 1e3 * backward[index] / steps
        share = (forward[index] + backward[index]) / total
        print(f"{label:<40.40}{ms_f:>9.3f}{ms_b:>10.3f}{share:>8.1%}")
    for key, seconds in other.items():
        print(f"      {key:<34}{1e3 * seconds / steps:>9.3f}{'':>10}{seconds / total:>8.1%}")
    print(f"      {'total':<34}{1e3 * total / steps:>9.3f} ms  "
          f"({steps * batch_size / total:,.0f} images/s)")


# --- main ----------------------------------------------------------------------------

def use_threads(count: int) -> None:
    """Both engines on ``count`` threads, here and in the memory children: minicnn's
    workers and NumPy's BLAS, and PyTorch's intra-op threads (read when torch is
    first imported, which is after this)."""
    for variable in ("MINICNN_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(count)
    parallel.set_workers(count)
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=count, user_api="blas")


def thread_report() -> str:
    parts = [f"numpy {np.__version__}"]
    try:
        import torch
        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads, "
                     f"{torch.backends.cpu.get_cpu_capability()} kernels)")
    except ImportError:
        parts.append("torch not installed")
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    parts.append(f"OPENBLAS_NUM_THREADS={blas}, {os.cpu_count()} CPUs")
    parts.append(blas_kernels())
    return ", ".join(parts)


def blas_kernels() -> str:
    """Which kernels NumPy's BLAS runs: OpenBLAS picks them for the CPU when it loads,
    unless OPENBLAS_CORETYPE names them (on an AVX-512 CPU, "Haswell" means AVX2 only)."""
    from threadpoolctl import threadpool_info
    for library in threadpool_info():
        if library.get("user_api") == "blas":
            kernels = f"{library.get('internal_api')} {library.get('version')} " \
                      f"{library.get('architecture')} kernels"
            forced = os.environ.get("OPENBLAS_CORETYPE")
            return kernels + (f" (OPENBLAS_CORETYPE={forced})" if forced else "")
    return "BLAS not found by threadpoolctl"


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=sorted(models.MODELS),
                        choices=sorted(models.MODELS), help="default: every registered model")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per case")
    parser.add_argument("--seconds", type=float, default=0.5,
                        help="approximate length of one engine's block in a round")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="run both engines on N threads (default: minicnn's and PyTorch's "
                             "own defaults, one per CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="print time per layer (forward, backward) instead")
    parser.add_argument("--profile-steps", type=int, default=50)
    parser.add_argument("--scaling", action="store_true",
                        help="each engine on 1 CPU against all of them")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_child:
        engine, name, mode, batch_size = args.memory_child
        memory_child(engine, name, mode, int(batch_size))
        return
    if args.scaling and args.threads is not None:
        parser.error("--scaling compares 1 thread with the default; drop --threads")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads needs at least 1, got {args.threads}")
        use_threads(args.threads)
    print(thread_report())
    if args.scaling:
        print_scaling(args.models, args.rounds, args.seconds)
        return
    if args.profile:
        for name in args.models:
            for batch_size in (64, 256):
                profile(name, batch_size, args.profile_steps)
        return

    header = (f"{'model':<10}{'case':<12}{'minicnn img/s':>14}{'torch img/s':>13}{'ratio':>7}"
              f"{'minicnn MB':>12}{'torch MB':>10}")
    print(header)
    for name in args.models:
        for mode, batch_size in CASES:
            rates = interleaved(name, mode, batch_size, args.rounds, args.seconds)
            ratio = rates["minicnn"] / rates["torch"] if rates["torch"] else None
            memory = {engine: None for engine in ("minicnn", "torch")}
            if not args.no_memory:
                memory["minicnn"] = peak_memory_mb("minicnn", name, mode, batch_size)
                if rates["torch"]:
                    memory["torch"] = peak_memory_mb("torch", name, mode, batch_size)
            print(f"{name:<10}{f'{mode} {batch_size}':<12}{fmt(rates['minicnn'], ',.0f'):>14}"
                  f"{fmt(rates['torch'], ',.0f'):>13}{fmt(ratio, '.2f'):>7}"
                  f"{fmt(memory['minicnn'], '.1f'):>12}{fmt(memory['torch'], '.1f'):>10}",
                  flush=True)


if __name__ == "__main__":
    main()
