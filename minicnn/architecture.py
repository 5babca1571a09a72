"""A model's structure as plain JSON, so a weights file can rebuild any model of minicnn's layers.

``describe(model)`` gives a tree of plain dicts: each layer's type (its
``layer_name()``) and its constructor arguments; containers hold their
children::

    {"type": "Sequential", "layers": [
        {"type": "Conv2d", "in_channels": 3, "out_channels": 8, "kernel_size": [3, 3],
         "stride": 1, "padding": 1, "bias": true},
        {"type": "ReLU"},
        {"type": "Residual", "body": {"type": "Sequential", "layers": [...]}},
        ...]}

``build(spec)`` makes the model again, with fresh parameters (load_model
then copies the saved ones in), set up on the default kernels. It reads no
code and trusts nothing: every field is checked, and a bad one is an
:class:`ArchitectureError` naming it (``architecture.layers[3].kernel_size:
...``). Optional arguments may be left out and take the constructor's
defaults.
"""

from __future__ import annotations

import math

from minicnn import backend, kernels
from minicnn.errors import MinicnnError
from minicnn.layers import (BatchNorm2d, Conv2d, Flatten, GlobalAvgPool2d, Linear, MaxPool2d,
                            ReLU, Residual, Scale, Sequential)

MAX_DEPTH = 64          # nesting of Sequential / Residual a spec may have


class ArchitectureError(MinicnnError):
    """A model that cannot be described, or a description that cannot be built."""


# --- field checks: each returns the value to pass on, or raises naming the field -------

REQUIRED = object()


def _whole(value, where: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ArchitectureError(f"{where}: must be a whole number >= {least}, got {value!r}")
    return value


def positive(value, where):
    return _whole(value, where, 1)


def non_negative(value, where):
    return _whole(value, where, 0)


def kernel_size(value, where):
    """An int, or [kh, kw]: a list of two positive ints."""
    if isinstance(value, list):
        if len(value) != 2:
            raise ArchitectureError(f"{where}: must be a whole number or a list of two, "
                                    f"got {value!r}")
        return tuple(positive(v, f"{where}[{i}]") for i, v in enumerate(value))
    return positive(value, where)


def flag(value, where):
    if not isinstance(value, bool):
        raise ArchitectureError(f"{where}: must be true or false, got {value!r}")
    return value


def number(value, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ArchitectureError(f"{where}: must be a finite number, got {value!r}")
    return float(value)


# --- the layers: class, fields (check, default) and how to read them off a layer ------

LEAVES = {
    "Conv2d": (Conv2d, {"in_channels": (positive, REQUIRED), "out_channels": (positive, REQUIRED),
                        "kernel_size": (kernel_size, REQUIRED), "stride": (positive, 1),
                        "padding": (non_negative, 0), "bias": (flag, True)},
               lambda m: {"in_channels": m.in_channels, "out_channels": m.out_channels,
                          "kernel_size": list(m.kernel_size), "stride": m.stride,
                          "padding": m.padding, "bias": "bias" in m.params}),
    "Linear": (Linear, {"in_features": (positive, REQUIRED), "out_features": (positive, REQUIRED),
                        "bias": (flag, True)},
               lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                          "bias": "bias" in m.params}),
    "MaxPool2d": (MaxPool2d, {"kernel_size": (positive, REQUIRED), "stride": (positive, None),
                              "padding": (non_negative, 0)},
                  lambda m: {"kernel_size": m.kernel_size, "stride": m.stride,
                             "padding": m.padding}),
    "BatchNorm2d": (BatchNorm2d, {"num_features": (positive, REQUIRED), "eps": (number, 1e-5),
                                  "momentum": (number, 0.1), "weight": (flag, True),
                                  "bias": (flag, True)},
                    lambda m: {"num_features": m.num_features, "eps": m.eps,
                               "momentum": m.momentum, "weight": "weight" in m.params,
                               "bias": "bias" in m.params}),
    "Scale": (Scale, {"factor": (number, REQUIRED)}, lambda m: {"factor": m.factor}),
    "ReLU": (ReLU, {}, lambda m: {}),
    "Flatten": (Flatten, {}, lambda m: {}),
    "GlobalAvgPool2d": (GlobalAvgPool2d, {}, lambda m: {}),
}
CONTAINERS = {"Sequential": Sequential, "Residual": Residual}
TYPES = (*CONTAINERS, *LEAVES)


def known_layer(module) -> str | None:
    """The name of the minicnn layer ``module`` is (a fast kernel counts as its reference
    layer), or None for anything else, such as a layer class of your own."""
    name = module.layer_name()
    cls = CONTAINERS.get(name) or LEAVES.get(name, (None,))[0]
    reference = getattr(type(module), "reference_layer", type(module))
    return name if cls is not None and reference is cls else None


def describe(model, where: str = "model") -> dict:
    """The architecture of ``model`` as plain JSON-ready dicts; ArchitectureError if some
    layer is not one of minicnn's (such a model can be saved only by registering it)."""
    name = known_layer(model)
    if name is None:
        raise ArchitectureError(f"{where} is {model.layer_name()}, not one of minicnn's layers "
                                f"({', '.join(TYPES)}); register a builder for the model "
                                "(minicnn.register) to save it")
    if name == "Sequential":
        return {"type": name, "layers": [describe(layer, f"{where}[{i}]")
                                         for i, layer in enumerate(model.layers)]}
    if name == "Residual":
        return {"type": name, "body": describe(model.body, f"{where}.body")}
    return {"type": name, **LEAVES[name][2](model)}


def build(spec, where: str = "architecture"):
    """A model of fresh parameters from ``describe``'s output, on the default kernels."""
    return kernels.prepare(_build(spec, where, 0))


def _build(spec, where: str, depth: int):
    if depth > MAX_DEPTH:
        raise ArchitectureError(f"{where}: nested more than {MAX_DEPTH} deep")
    if not isinstance(spec, dict):
        raise ArchitectureError(f"{where}: must be an object with a \"type\", got {spec!r:.60}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise ArchitectureError(f"{where}.type: must be one of {', '.join(TYPES)}, "
                                f"got {kind!r:.60}")
    if kind == "Sequential":
        _only_fields(spec, {"type", "layers"}, where)
        layers = spec.get("layers")
        if not isinstance(layers, list) or not layers:
            raise ArchitectureError(f"{where}.layers: must be a non-empty list of layers")
        return Sequential(*(_build(layer, f"{where}.layers[{i}]", depth + 1)
                            for i, layer in enumerate(layers)))
    if kind == "Residual":
        _only_fields(spec, {"type", "body"}, where)
        if "body" not in spec:
            raise ArchitectureError(f"{where}.body: missing")
        return Residual(_build(spec["body"], f"{where}.body", depth + 1))
    cls, fields, _ = LEAVES[kind]
    _only_fields(spec, {"type", *fields}, where)
    arguments = {}
    for field, (check, default) in fields.items():
        if field in spec:
            arguments[field] = check(spec[field], f"{where}.{field}")
        elif default is REQUIRED:
            raise ArchitectureError(f"{where}.{field}: missing (a {kind} needs it)")
    try:
        return cls(**arguments)
    except ValueError as exc:               # a combination the layer refuses
        raise ArchitectureError(f"{where}: {exc}") from None


def _only_fields(spec: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ArchitectureError(f"{where}.{unknown[0]}: not a field of {spec['type']} "
                                f"(it has {', '.join(sorted(allowed - {'type'})) or 'none'})")


def output_shape(model, input_shape) -> tuple:
    """The shape of the model's output for one input of ``input_shape`` (e.g. (3, 32, 32)),
    found by running a batch of one zero image in eval mode; ArchitectureError if the
    model cannot take such an input. The model's modes are left as they were."""
    modes = [(module, module.training) for _, module in model.modules()]
    try:
        y = model.eval().forward(backend.xp.zeros((1, *input_shape), dtype=backend.float32))
    except ValueError as exc:
        shown = "x".join(str(n) for n in input_shape)
        raise ArchitectureError(f"the model cannot take {shown} inputs: {exc}") from None
    finally:
        for module, mode in modes:
            module.training = mode
    return tuple(y.shape[1:])
