"""GPU throughput of minicnn (CuPy) against PyTorch (CUDA) on the same GPU, model by model.

    python benchmarks/bench_gpu.py                          # every registered model
    python benchmarks/bench_gpu.py --models lenet --rounds 9
    python benchmarks/bench_gpu.py --smoke                  # no GPU: see below

What is timed, on random float32 data of shape (N, 3, 32, 32), the same in both
engines:

- train N (default 512): one step = forward, softmax cross-entropy, backward,
  SGD step (momentum 0.9, weight decay 5e-4).
- infer M (default 2048): forward only, eval mode (PyTorch under
  ``torch.inference_mode``).

Every measurement runs in a fresh process that holds one engine and one model,
so neither engine inherits the other's memory pool, caches or clocks. The
process warms up first (at least 3 steps and ``--warmup`` seconds: the CUDA
context, CuPy's kernel compilation, cuDNN's choice of algorithms), then times
a block of about ``--seconds`` seconds between two synchronisations of the
device: steps are queued asynchronously, so the clock is read only after the
GPU has finished them. Rounds alternate which engine runs first. Reported per
case: each engine's median images/s over the rounds, and the median and range
of the per-round ratios minicnn / PyTorch (> 1: minicnn is faster).

PyTorch runs with its defaults (``torch.backends.cudnn.benchmark`` off; cuDNN
may use TF32 for convolutions, as PyTorch allows by default; CuPy's matrix
products use full float32); the first line printed says so, and names the GPU.

``--smoke`` checks this script end to end where there is no GPU: minicnn runs
on the test suite's CuPy stand-in (tests/fake_cupy.py, NumPy underneath) and
PyTorch on the CPU, with tiny batches and blocks. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))          # torch_mirror and bench_cpu, beside this script

from bench_cpu import LR, MOMENTUM, WEIGHT_DECAY, fmt, random_batch  # noqa: E402

from minicnn import models  # noqa: E402

FAKE_CUPY = "tests.fake_cupy"


# --- one engine, one model: the child process ------------------------------------------

class MinicnnEngine:
    def __init__(self, name: str, kernels: str):
        from minicnn import backend
        from minicnn import kernels as kernel_switch
        from minicnn.losses import SoftmaxCrossEntropy
        from minicnn.optim import SGD
        from minicnn.train import forward_backward
        self.backend, self.forward_backward = backend, forward_backward
        backend.use("cupy", seed=0)
        kernel_switch.use(kernels)
        self.model = models.build_model(name)
        self.model.set_needs_input_grad(False)        # no gradient for the image itself
        self.criterion = SoftmaxCrossEntropy()
        self.optimizer = SGD(self.model, LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        properties = backend.xp.cuda.runtime.getDeviceProperties(0)
        self.device = properties["name"].decode()
        self.version = f"cupy {backend.xp.__version__}, {kernel_switch.of(self.model)} kernels"

    def batch(self, size: int):
        x, labels = random_batch(size)
        return self.backend.to_device(x), self.backend.to_device(labels)

    def train_step(self, x, labels):
        loss, _ = self.forward_backward(self.model, self.criterion, x, labels)
        self.optimizer.step()
        return loss

    def infer(self, x):
        return self.model.forward(x)

    def mode(self, training: bool) -> None:
        self.model.train(training)

    def synchronize(self) -> None:
        self.backend.synchronize()


class TorchEngine:
    def __init__(self, name: str, device: str):
        import torch
        from torch_mirror import torch_mirror, trainable_parameters
        self.torch = torch
        mirror = torch_mirror(models.build_model(name))       # built on NumPy, then copied
        if mirror is None:
            raise LookupError(f"no PyTorch mirror for {name}")
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("PyTorch sees no CUDA GPU (torch.cuda.is_available() is False)")
        self.device = torch.device(device)
        self.model = mirror.to(self.device)
        self.optimizer = torch.optim.SGD(trainable_parameters(self.model), lr=LR,
                                         momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        cudnn = torch.backends.cudnn
        self.version = (f"torch {torch.__version__} (CUDA {torch.version.cuda}, cudnn.benchmark="
                        f"{cudnn.benchmark}, cudnn TF32 {cudnn.allow_tf32})")
        self.device_name = (torch.cuda.get_device_name(self.device) if device == "cuda"
                            else "cpu")

    def batch(self, size: int):
        x, labels = random_batch(size)
        return (self.torch.from_numpy(x).to(self.device),
                self.torch.from_numpy(labels).to(self.device))

    def train_step(self, x, labels):
        loss = self.torch.nn.functional.cross_entropy(self.model(x), labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def infer(self, x):
        with self.torch.inference_mode():
            return self.model(x)

    def mode(self, training: bool) -> None:
        self.model.train(training)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)


def timed_rate(engine, step, batch_size: int, warmup: float, seconds: float) -> float:
    """Images/s of ``step()`` over a block of about ``seconds``, after warming up."""
    engine.synchronize()
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < warmup:
        step()
        steps += 1
        engine.synchronize()
    per_step = (time.perf_counter() - start) / steps
    block = max(3, math.ceil(seconds / per_step))
    engine.synchronize()
    start = time.perf_counter()
    for _ in range(block):
        step()
    engine.synchronize()                      # the GPU has finished every queued step
    return block * batch_size / (time.perf_counter() - start)


def child(args) -> None:
    """Run one engine on one model through every case; print one JSON line."""
    if args.child == "minicnn":
        engine = MinicnnEngine(args.model, args.kernels)
        device = engine.device
    else:
        engine = TorchEngine(args.model, "cpu" if args.smoke else "cuda")
        device = engine.device_name
    rates, losses = {}, []
    for mode, batch_size in cases(args):
        x, labels = engine.batch(batch_size)
        engine.mode(mode == "train")
        if mode == "train":
            def step():
                losses[:] = [engine.train_step(x, labels)]
        else:
            def step():
                engine.infer(x)
        rates[f"{mode} {batch_size}"] = timed_rate(engine, step, batch_size, args.warmup,
                                                   args.seconds)
    final_loss = float(losses[-1]) if losses else None
    if final_loss is not None and not math.isfinite(final_loss):
        raise FloatingPointError(f"{args.child}: the training loss is {final_loss}")
    print(json.dumps({"engine": args.child, "model": args.model, "device": device,
                      "version": engine.version, "rates": rates}))


# --- the parent: rounds of fresh processes ------------------------------------------------

def cases(args) -> list:
    return [("train", args.batch), ("infer", args.infer_batch)]


def run_child(engine: str, name: str, args) -> dict:
    """One measurement in a fresh process; {"error": ...} if it failed."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", engine,
               "--model", name, "--kernels", args.kernels, "--batch", str(args.batch),
               "--infer-batch", str(args.infer_batch), "--warmup", str(args.warmup),
               "--seconds", str(args.seconds)] + (["--smoke"] if args.smoke else [])
    env = dict(os.environ)
    if args.smoke:                                  # the CuPy stand-in, from the tests
        env["MINICNN_FAKE_CUPY"] = FAKE_CUPY
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env,
                                timeout=args.child_timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after --child-timeout {args.child_timeout:g} s", "stderr": ""}
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit code {result.returncode}: {last}", "stderr": result.stderr}
    return json.loads(result.stdout.strip().splitlines()[-1])


def benchmark(name: str, args, log) -> dict:
    """{case: {"minicnn": [rates], "torch": [rates], "ratios": [...]}} over the rounds."""
    results = {f"{mode} {size}": {"minicnn": [], "torch": [], "ratios": []}
               for mode, size in cases(args)}
    failures = []
    for index in range(args.rounds):
        order = ("minicnn", "torch") if index % 2 == 0 else ("torch", "minicnn")
        measured = {engine: run_child(engine, name, args) for engine in order}
        for engine, answer in measured.items():
            if "error" in answer:
                failures.append(f"{name} round {index + 1}, {engine}: {answer['error']}")
                log(f"  {failures[-1]}")
                if args.verbose_errors:
                    log(answer["stderr"])
        if index == 0:
            for engine in ("minicnn", "torch"):
                if "error" not in measured[engine]:
                    log(f"  {engine}: {measured[engine]['version']} on "
                        f"{measured[engine]['device']}")
        for case, values in results.items():
            rates = {e: measured[e]["rates"][case] for e in measured if "error" not in measured[e]}
            for engine, rate in rates.items():
                values[engine].append(rate)
            if len(rates) == 2:
                values["ratios"].append(rates["minicnn"] / rates["torch"])
    return {"cases": results, "failures": failures}


def median(values):
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=sorted(models.MODELS),
                        choices=sorted(models.MODELS), help="default: every registered model")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of fresh processes")
    parser.add_argument("--batch", type=int, default=512, help="training batch (default 512)")
    parser.add_argument("--infer-batch", type=int, default=2048, help="inference batch")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per case")
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per case")
    parser.add_argument("--kernels", choices=("reference", "fast"), default="fast",
                        help="minicnn's kernels (default fast)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("--child-timeout", type=float, default=300,
                        help="seconds before a measurement process is stopped")
    parser.add_argument("--smoke", action="store_true",
                        help="no GPU: minicnn on the CuPy stand-in, PyTorch on the CPU")
    parser.add_argument("--verbose-errors", action="store_true",
                        help="print a failed measurement's whole stderr")
    parser.add_argument("--child", choices=("minicnn", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for option in ("rounds", "batch", "infer_batch"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} needs at least 1, "
                         f"got {getattr(args, option)}")
    if args.child:
        child(args)
        return 0

    def log(line):
        print(line, flush=True)

    log(f"bench_gpu: {args.rounds} rounds, each engine in a fresh process per round; "
        f"train {args.batch}, infer {args.infer_batch}"
        + ("; SMOKE: CuPy stand-in and PyTorch on the CPU, the numbers mean nothing"
           if args.smoke else ""))
    report, failed = {}, []
    for name in args.models:
        log(f"{name}:")
        outcome = benchmark(name, args, log)
        failed += outcome["failures"]
        report[name] = outcome["cases"]
    log(f"\n{'model':<8}{'case':<12}{'minicnn img/s':>15}{'torch img/s':>13}"
        f"{'ratio':>7}  {'per-round ratios'}")
    for name, results in report.items():
        for case, values in results.items():
            ratios = values["ratios"]
            spread = (f"{min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)}"
                      if ratios else "-")
            log(f"{name:<8}{case:<12}{fmt(median(values['minicnn']), ',.0f'):>15}"
                f"{fmt(median(values['torch']), ',.0f'):>13}{fmt(median(ratios), '.2f'):>7}"
                f"  {spread}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": report,
                                               "failures": failed}, indent=1))
    if failed:
        log(f"{len(failed)} measurement(s) failed; first: {failed[0]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
