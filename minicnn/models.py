"""Named architectures, built by ``build_model(name, **config)``.

Register a new one with the ``@register("name")`` decorator; its keyword
arguments are its config, saved in weights files so ``load_model`` can
rebuild it. A builder returns a model of reference layers; build_model sets it
up on the default kernels (minicnn.kernels). A config value must have the type
of the keyword's default, and lie within CONFIG_LIMITS where that names the
keyword (a weights file or an option cannot ask for a model too large to build).
"""

from __future__ import annotations

import inspect

from minicnn import kernels
from minicnn.errors import MinicnnError
from minicnn.validation import describe, is_finite_number, is_whole
from minicnn.layers import (BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Scale,
                            Sequential)

MODELS: dict = {}
CONFIG_LIMITS = {"width": (1, 256), "num_classes": (1, 1000), "in_channels": (1, 64),
                 "bn_momentum": (0.0, 1.0)}


def register(name: str):
    def decorator(builder):
        MODELS[name] = builder
        return builder
    return decorator


def check_config(name: str, config: dict) -> None:
    """Raise MinicnnError unless ``name`` is registered and takes the keywords ``config``
    (checked against the builder's signature, without building anything)."""
    if name not in MODELS:
        raise MinicnnError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    signature = inspect.signature(MODELS[name])
    try:
        signature.bind(**config)
    except TypeError as exc:
        raise MinicnnError(f"bad config for model {name!r}: {exc}") from None
    for key, value in config.items():
        default = signature.parameters[key].default
        low, high = CONFIG_LIMITS.get(key, (None, None))
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, kind = is_whole(value), "a whole number"
        elif isinstance(default, float):
            ok, kind = is_finite_number(value), "a finite number"
        else:
            continue
        if not ok or (low is not None and not low <= value <= high):
            within = f" between {low} and {high}" if low is not None else ""
            raise MinicnnError(f"bad config for model {name!r}: {key} must be {kind}{within}, "
                               f"got {describe(value)}")


def build_model(name: str, **config):
    """Build a registered model with fresh parameters from the backend's generator, set
    up on the default kernels (minicnn.kernels.default())."""
    check_config(name, config)
    try:
        model = MODELS[name](**config)
    except (ValueError, TypeError) as exc:    # a value the builder refuses, e.g. width=0
        raise MinicnnError(f"bad config for model {name!r}: {exc}") from None
    model.name, model.config = name, dict(config)
    return kernels.prepare(model)


@register("lenet")
def lenet(num_classes: int = 10, in_channels: int = 3) -> Sequential:
    """The seed network for 32x32 images (LeNet-5 style), without a ReLU on the logits.

    conv 3->6 5x5, ReLU, maxpool 2, conv 6->16 5x5, ReLU, maxpool 2, flatten,
    fc 400->128, ReLU, fc 128->84, ReLU, fc 84->num_classes.
    """
    return Sequential(
        Conv2d(in_channels, 6, 5), ReLU(), MaxPool2d(2),
        Conv2d(6, 16, 5), ReLU(), MaxPool2d(2),
        Flatten(),
        Linear(16 * 5 * 5, 128), ReLU(),
        Linear(128, 84), ReLU(),
        Linear(84, num_classes),
    )


def _conv_block(in_channels: int, out_channels: int, bn_momentum: float) -> list:
    """conv3x3 -> maxpool 2 -> BN -> ReLU -> conv3x3 -> BN -> ReLU (pooling early is cheaper)."""
    return [
        Conv2d(in_channels, out_channels, 3, padding=1, bias=False), MaxPool2d(2),
        BatchNorm2d(out_channels, momentum=bn_momentum, weight=False), ReLU(),
        Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        BatchNorm2d(out_channels, momentum=bn_momentum, weight=False), ReLU(),
    ]


@register("airnet")
def airnet(width: int = 32, num_classes: int = 10, in_channels: int = 3,
           bn_momentum: float = 0.2) -> Sequential:
    """A small fast net after the airbench speed records (Keller Jordan, 2024).

    A 2x2 stem conv (3 -> 24 channels, 32x32 -> 31x31), then three blocks of
    conv3x3 -> maxpool 2 -> BN -> ReLU -> conv3x3 -> BN -> ReLU with widths
    (width, 4*width, 4*width) at 15x15, 7x7 and 3x3, a global max-pool, and
    a linear layer whose logits are scaled by 1/9. width=64 is airbench94's
    size. The BatchNorm layers learn a shift only (their scale stays 1), the
    convolutions have no bias (BN's shift replaces it).
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    widths = (width, 4 * width, 4 * width)
    stem = 24
    return Sequential(
        Conv2d(in_channels, stem, 2, bias=False),
        BatchNorm2d(stem, momentum=bn_momentum, weight=False), ReLU(),
        *_conv_block(stem, widths[0], bn_momentum),
        *_conv_block(widths[0], widths[1], bn_momentum),
        *_conv_block(widths[1], widths[2], bn_momentum),
        MaxPool2d(3), Flatten(),
        Linear(widths[2], num_classes, bias=False), Scale(1 / 9),
    )
