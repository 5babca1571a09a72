"""minicnn: a from-scratch convolutional neural-net engine on NumPy, with CuPy for GPUs.

Every layer has an explicit, readable backward pass; see minicnn/layers/.
"""

__version__ = "0.1.0"

from minicnn import backend, kernels
from minicnn.checkpoint import load_model, save_model
from minicnn.layers import (BatchNorm2d, Conv2d, Flatten, GlobalAvgPool2d, Linear, MaxPool2d,
                            Module, PatchWhitening, ReLU, Residual, Scale, Sequential)
from minicnn.losses import SoftmaxCrossEntropy, softmax
from minicnn.models import MODELS, build_model, register
from minicnn.optim import SGD, make_schedule

__all__ = [
    "backend", "kernels", "Module", "Sequential", "Conv2d", "MaxPool2d", "Linear", "ReLU", "Flatten",
    "BatchNorm2d", "GlobalAvgPool2d", "Residual", "Scale", "PatchWhitening",
    "SoftmaxCrossEntropy", "softmax", "SGD", "make_schedule", "build_model", "register",
    "MODELS", "save_model", "load_model", "__version__",
]
