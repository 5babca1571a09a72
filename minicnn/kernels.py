"""The one switch between the reference layers and the fast kernels.

minicnn computes every layer in one of two ways:

- ``reference``: the layers of minicnn/layers/, each the formulas of its
  docstring and nothing else: what a student reads, what the gradient checks
  test, what docs/backprop.md walks through.
- ``fast`` (the default): the kernels of minicnn/fast/, subclasses of the
  reference layers that compute the same results in chunks over threads, with
  fused conv-ReLU-pool passes and scratch buffers; training on several CPUs
  also splits each batch over processes (minicnn.fast.replicas). The tests
  compare every fast kernel with its reference.

Choose them here, and only here::

    minicnn.kernels.prepare(model, "reference")   # set one model up on these kernels
    minicnn.kernels.use("reference")              # the default for prepare() from now on
    MINICNN_KERNELS=reference                     # the default, from the environment
    minicnn train --kernels reference             # the CLI (also evaluate, classify,
                                                  # trace, visualize)

A model built from the layers by hand runs the reference until it is
prepared; build_model and load_model prepare the models they make with the
default kernels. prepare() switches the class of each layer in place, so the
model keeps its parameters, and it may be called again to switch back.
"""

from __future__ import annotations

import os

from minicnn import fast
from minicnn.errors import MinicnnError

NAMES = ("reference", "fast")
VARIABLE = "MINICNN_KERNELS"

_REFERENCE = {kernel: layer for layer, kernel in fast.KERNELS.items()}   # fast -> reference
_default: str | None = None          # set by use(); None: MINICNN_KERNELS, else "fast"


def check(name: str, source: str = "kernels") -> str:
    """``name`` if it names kernels; else a MinicnnError saying which names there are."""
    if name not in NAMES:
        raise MinicnnError(f"{source} must be one of {', '.join(NAMES)}, got {name!r}")
    return name


def default() -> str:
    """The kernels prepare() uses when none are named: use()'s, else $MINICNN_KERNELS,
    else "fast"."""
    if _default is not None:
        return _default
    return check(os.environ.get(VARIABLE) or "fast", VARIABLE)


def use(name: str | None) -> None:
    """Make ``name`` the default kernels from now on (None: back to $MINICNN_KERNELS)."""
    global _default
    _default = None if name is None else check(name)


def prepare(model, name: str | None = None):
    """Set ``model`` up to run on the kernels ``name`` (default: :func:`default`), in place;
    returns the model. Layers with no fast kernel, and classes minicnn does not know
    (your own subclasses), are left as they are."""
    name = check(name) if name is not None else default()
    for _, module in model.modules():
        reference = _REFERENCE.get(type(module), type(module))
        target = fast.KERNELS.get(reference) if name == "fast" else reference
        if target is not None and type(module) is not target:
            left_behind = type(module).transient
            module.__class__ = target
            for attribute in left_behind:   # what the other kernels cached is not read
                if attribute in module.__dict__ and attribute != "grads":
                    if attribute in target.transient:
                        setattr(module, attribute, target.transient[attribute]())
                    else:
                        delattr(module, attribute)
    return model


def of(model) -> str:
    """Which kernels ``model`` runs on: "fast" if any of its layers is a fast kernel."""
    return "fast" if any(type(m) in _REFERENCE for _, m in model.modules()) else "reference"
