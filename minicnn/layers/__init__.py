"""Layers: each file holds one layer's forward and backward formulas."""

from minicnn.layers.activation import ReLU
from minicnn.layers.base import Module, Sequential
from minicnn.layers.conv import Conv2d
from minicnn.layers.linear import Linear
from minicnn.layers.pooling import MaxPool2d
from minicnn.layers.shape import Flatten

__all__ = ["Module", "Sequential", "Conv2d", "MaxPool2d", "Linear", "ReLU", "Flatten"]
