"""The fast kernels: the same layers as minicnn/layers/, computed faster on a CPU.

Each fast kernel is a subclass of the reference layer it computes that
overrides forward and backward (and keeps the parameters, grads and settings
of the layer), so a model switches kernels by switching the class of each of
its layers (:mod:`minicnn.kernels` does that; nothing else should):

    FastConv2d      chunks of images over threads, flat im2col, outputs in pairs,
                    scratch buffers kept between calls          (fast/conv.py)
    FastMaxPool2d   2x2 stride-2 windows as a knockout bracket, one part of the
                    batch per thread                            (fast/pooling.py)
    FastSequential  each conv -> ReLU -> 2x2 max-pool run fused into one pass
                    per chunk of images                         (fast/fused.py);
                    in eval mode each BatchNorm folded into the
                    conv before it                              (fast/folded.py)
    FastBatchNorm2d in training, the batch statistics summed over the threads'
                    parts of the batch and over the processes that share it
                    (replicas)                                  (fast/norm.py)

plus the helpers they share (fast/im2col.py, fast/parallel.py) and
data-parallel training over processes (fast/replicas.py). The tests compare
every kernel with its reference.
"""

from minicnn.fast.conv import FastConv2d
from minicnn.fast.fused import FastSequential
from minicnn.fast.norm import FastBatchNorm2d
from minicnn.fast.pooling import FastMaxPool2d

#: reference layer class -> its fast kernel
KERNELS = {kernel.reference_layer: kernel
           for kernel in (FastConv2d, FastMaxPool2d, FastSequential, FastBatchNorm2d)}

__all__ = ["FastBatchNorm2d", "FastConv2d", "FastMaxPool2d", "FastSequential", "KERNELS"]
