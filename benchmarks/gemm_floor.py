"""How fast a training step of an im2col engine on NumPy could be at best: the time of
its convolutions' matrix products alone, on one CPU core.

    python benchmarks/gemm_floor.py                        # airnet, batch 32
    python benchmarks/gemm_floor.py --model lenet --batch-size 64

A convolution computed by im2col (minicnn's reference and fast kernels alike) is
three matrix products per training step: Y = W @ cols, dW = dY @ cols.T and
dcols = W.T @ dY (the last one only where the layer's input needs a gradient),
with W (OC, C*kh*kw), cols (C*kh*kw, N*OH*OW) and dY (OC, N*OH*OW). This script
times exactly those products, on random float32 matrices of each conv layer's
shapes at the whole batch, with NumPy's BLAS held to one thread, and nothing
else: no im2col copies, no col2im, no pooling, BatchNorm, ReLU or SGD. Their sum
is a floor under minicnn's step on one core; compare it with both engines' whole
step on one core, measured each in its own process by

    python benchmarks/bench_cpu.py --threads 1 --models airnet --cases api-32

If the floor is near PyTorch's whole step, no rearrangement of the copies
around the products can make minicnn faster than PyTorch at that model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["OPENBLAS_NUM_THREADS"] = "1"     # before NumPy loads OpenBLAS: one core
os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402


def conv_shapes(model, batch_size: int) -> list:
    """[(conv, its input's shape), ...] for every Conv2d of ``model``, from one forward
    pass in training mode on a random batch."""
    from minicnn.layers import Conv2d
    shapes = []
    for _, module in model.modules():
        if isinstance(module, Conv2d):
            forward = module.forward

            def recording(x, module=module, forward=forward):
                shapes.append((module, x.shape))
                return forward(x)
            module.forward = recording
    x = np.random.default_rng(0).standard_normal((batch_size, 3, 32, 32), dtype=np.float32)
    model.train().forward(x)
    return shapes


def product_seconds(m: int, k: int, n: int, repeats: int) -> float:
    """Median seconds of one (m, k) @ (k, n) float32 product, into a kept output."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    out = np.empty((m, n), np.float32)
    np.matmul(a, b, out=out)                                  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="airnet")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats need at least 1")
    from minicnn import kernels, models
    from minicnn.errors import MinicnnError
    try:
        model = kernels.prepare(models.build_model(args.model), "reference")
    except MinicnnError as exc:
        parser.error(str(exc))
    print(f"{args.model}, batch {args.batch_size}, one core: the convolutions' matrix "
          f"products alone, ms per training step")
    print(f"{'layer':<28}{'Y=W@cols':>10}{'dW':>8}{'dcols':>8}{'GMAC/s':>8}")
    total = 0.0
    for index, (conv, shape) in enumerate(conv_shapes(model, args.batch_size)):
        kh, kw = conv.kernel_size
        oh, ow, _, _ = conv.geometry(np.empty(shape, np.float32))
        m, k, n = conv.out_channels, conv.in_channels * kh * kw, shape[0] * oh * ow
        times = [product_seconds(m, k, n, args.repeats),                # Y = W @ cols
                 product_seconds(m, n, k, args.repeats)]                # dW = dY @ cols.T
        needs_dx = index > 0                          # the image itself needs no gradient
        times.append(product_seconds(k, m, n, args.repeats) if needs_dx else 0.0)
        products = (2 + needs_dx) * m * k * n
        seconds = sum(times)
        total += seconds
        label = f"{conv.in_channels}->{conv.out_channels} {kh}x{kw} on {oh}x{ow}"
        print(f"{label:<28}" + "".join(f"{1e3 * t:>{w}.2f}" for t, w in zip(times, (10, 8, 8)))
              + f"{products / seconds / 1e9:>8.1f}")
    print(f"{'total':<28}{1e3 * total:>10.2f} ms  (at most "
          f"{args.batch_size / total:,.0f} images/s on one core)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
