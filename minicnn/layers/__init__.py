"""Layers: each file holds one layer's forward and backward formulas."""

from minicnn.layers.activation import ReLU
from minicnn.layers.base import Module, Sequential
from minicnn.layers.conv import Conv2d
from minicnn.layers.linear import Linear, Scale
from minicnn.layers.norm import BatchNorm2d
from minicnn.layers.pooling import GlobalAvgPool2d, MaxPool2d
from minicnn.layers.residual import Residual
from minicnn.layers.shape import Flatten
from minicnn.layers.whitening import PatchWhitening

__all__ = ["Module", "Sequential", "Conv2d", "MaxPool2d", "GlobalAvgPool2d", "Linear", "Scale",
           "ReLU", "Flatten", "BatchNorm2d", "Residual", "PatchWhitening"]
