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
from minicnn.layers import (BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, PatchWhitening,
                            ReLU, Scale, Sequential)
from minicnn.layers.init import dirac_
from minicnn.validation import describe, is_finite_number, is_whole

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
        if key == "widths" and value is not None:       # three block widths, each a width
            low, high = CONFIG_LIMITS["width"]
            if not (isinstance(value, (list, tuple)) and len(value) == 3
                    and all(is_whole(v) and low <= v <= high for v in value)):
                raise MinicnnError(f"bad config for model {name!r}: widths must be three whole "
                                   f"numbers between {low} and {high}, got {describe(value)}")
            continue
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


def _conv_block(in_channels: int, out_channels: int, bn: dict, dirac: bool) -> list:
    """conv3x3 -> maxpool 2 -> BN -> ReLU -> conv3x3 -> BN -> ReLU (pooling early is cheaper).
    ``bn``: BatchNorm2d's momentum and eps; ``dirac``: identity init of both convs."""
    convs = [Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
             Conv2d(out_channels, out_channels, 3, padding=1, bias=False)]
    if dirac:
        for conv in convs:
            dirac_(conv.params["weight"])
    return [
        convs[0], MaxPool2d(2), BatchNorm2d(out_channels, weight=False, **bn), ReLU(),
        convs[1], BatchNorm2d(out_channels, weight=False, **bn), ReLU(),
    ]


STEMS = ("conv", "whiten")


@register("airnet")
def airnet(width: int = 32, num_classes: int = 10, in_channels: int = 3,
           bn_momentum: float = 0.2, widths=None, stem: str = "conv", bn_eps: float = 1e-5,
           dirac: bool = False) -> Sequential:
    """A small fast net after the airbench speed records (Keller Jordan, 2024).

    A 2x2 stem (3 -> 24 channels, 32x32 -> 31x31), then three blocks of
    conv3x3 -> maxpool 2 -> BN -> ReLU -> conv3x3 -> BN -> ReLU with widths
    (width, 4*width, 4*width), or ``widths`` given as three numbers, at 15x15,
    7x7 and 3x3, a global max-pool, and a linear layer whose logits are scaled by
    1/9. width=64 is airbench94's size, widths=(64, 128, 128) airbench93's. The
    BatchNorm layers learn a shift only (their scale stays 1), the convolutions
    have no bias (BN's shift replaces it).

    stem: "conv", a learned 2x2 conv followed by BN and ReLU; or "whiten", airbench's
    fixed patch-whitening conv (layers/whitening.py, its filters set from the
    training images before training) with a bias, then ReLU. dirac: identity init
    of the blocks' convs (layers/init.py), as airbench.
    """
    if widths is None and width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    widths = (width, 4 * width, 4 * width) if widths is None else tuple(widths)
    if len(widths) != 3 or min(widths) < 1:
        raise ValueError(f"widths must be three numbers >= 1, got {list(widths)}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
    bn = {"momentum": bn_momentum, "eps": bn_eps}
    if stem == "whiten":
        whitening = PatchWhitening(in_channels, 2)
        stem_layers, stem_width = [whitening, ReLU()], whitening.out_channels
    else:
        stem_width = 24
        stem_layers = [Conv2d(in_channels, stem_width, 2, bias=False),
                       BatchNorm2d(stem_width, weight=False, **bn), ReLU()]
    return Sequential(
        *stem_layers,
        *_conv_block(stem_width, widths[0], bn, dirac),
        *_conv_block(widths[0], widths[1], bn, dirac),
        *_conv_block(widths[1], widths[2], bn, dirac),
        MaxPool2d(3), Flatten(),
        Linear(widths[2], num_classes, bias=False), Scale(1 / 9),
    )
