"""The same network in PyTorch, with minicnn's parameters and buffers copied in.

Used by bench_cpu.py (the reference it times) and by tests/test_vs_pytorch.py
(the reference it compares with). minicnn itself never imports PyTorch.
"""

from __future__ import annotations

import torch

from minicnn import backend
from minicnn.layers import (BatchNorm2d, Conv2d, Flatten, GlobalAvgPool2d, Linear, MaxPool2d,
                            PatchWhitening, ReLU, Residual, Scale, Sequential)

nn = torch.nn


class TorchScale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class TorchResidual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def _mirror_layer(layer):
    """A fresh PyTorch layer shaped like ``layer``, or None if this mirror does not know it."""
    if isinstance(layer, Sequential):
        parts = [_mirror_layer(child) for child in layer.layers]
        return None if any(p is None for p in parts) else nn.Sequential(*parts)
    if isinstance(layer, Residual):
        body = _mirror_layer(layer.body)
        return None if body is None else TorchResidual(body)
    if isinstance(layer, PatchWhitening):          # a Conv2d whose weight is not trained
        mirror = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size)
        mirror.weight.requires_grad_(False)
        mirror.bias.requires_grad_(layer.bias_trainable)
        return mirror
    if isinstance(layer, Conv2d):
        return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                         stride=layer.stride, padding=layer.padding, bias="bias" in layer.params)
    if isinstance(layer, Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params)
    if isinstance(layer, BatchNorm2d):
        mirror = nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
        if "weight" not in layer.params:
            mirror.weight.requires_grad_(False)     # gamma fixed at 1, as in minicnn
        if "bias" not in layer.params:
            mirror.bias.requires_grad_(False)
        return mirror
    if isinstance(layer, MaxPool2d):
        return nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding)
    if isinstance(layer, GlobalAvgPool2d):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if isinstance(layer, ReLU):
        return nn.ReLU()
    if isinstance(layer, Flatten):
        return nn.Flatten()
    if isinstance(layer, Scale):
        return TorchScale(layer.factor)
    return None


def torch_mirror(model, dtype=torch.float32):
    """PyTorch's version of a minicnn model, holding copies of its parameters and
    buffers under the same names. Returns None when it uses a layer not known here."""
    mirror = _mirror_layer(model)
    if mirror is None:
        return None
    mirror = mirror.to(dtype)
    tensors = dict(mirror.named_parameters()) | dict(mirror.named_buffers())
    with torch.no_grad():
        for name, value in model.state_dict().items():
            tensors[name].copy_(torch.from_numpy(backend.to_host(value)))
    return mirror


def trainable_parameters(mirror) -> list:
    return [p for p in mirror.parameters() if p.requires_grad]
