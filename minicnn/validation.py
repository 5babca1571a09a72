"""Checks at the boundary: values that come from files, the environment and callers.

Every check says in one line where the value came from (a file and a field, an
environment variable, a layer), what was expected and what was found:

- :class:`Record`: the fields of a JSON object read from a file (weights
  metadata, a resume point, a training history), each checked for type and range.
- :func:`env_int`: a whole-number environment variable (MINICNN_THREADS, ...).
- :func:`check_input`, :func:`check_backward`, :func:`check_sizes`: the
  library API's misuses (a list or integer array as input, an empty batch,
  backward before forward, a kernel size of 0), as TypeError / ValueError /
  RuntimeError naming the layer. A layer calls them in one line.
"""

from __future__ import annotations

import math
import numbers
import os
import re

from minicnn import backend
from minicnn.errors import MinicnnError
from minicnn.files import printable

MISSING = object()        # "no default": the field is required


def describe(value) -> str:
    """A short description of any value for an error message, at a cost that does not
    depend on its size: containers are not walked (a crafted file can hold a list of
    10**11 shared references), long text and huge numbers are cut."""
    kind = type(value).__name__
    if value is None:
        return "null"
    if isinstance(value, (bool, float)) or (is_whole(value) and abs(value) < 10**30):
        return f"{kind} {value!r}"
    if isinstance(value, (str, bytes)):
        text = repr(value[:40]) + ("..." if len(value) > 40 else "")
        return f"{kind} {printable(text)}"
    if hasattr(value, "__len__"):
        return f"{kind} of {len(value)} items"
    return kind


def is_whole(value) -> bool:
    """An int that is not a bool (JSON true is not a number here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    if is_whole(value):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _bounds(low, high) -> str:
    if low is not None and high is not None:
        return f" between {low} and {high}"
    if low is not None:
        return f" >= {low}"
    return f" <= {high}" if high is not None else ""


def _within(value, low, high) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


class Record:
    """A JSON object read from ``source`` (a file name); each accessor returns one field
    after checking its type and range, or raises ``error`` naming the file and the field.
    ``default`` (any accessor): the value when the field is absent; without it the field
    is required. ``none_ok``: JSON null is accepted and returned as None."""

    def __init__(self, values, source: str, error=MinicnnError, prefix: str = ""):
        self.source, self.error, self.prefix = source, error, prefix
        if not isinstance(values, dict):
            what = f"field {prefix[:-1]}" if prefix else "its metadata"
            raise error(f"{source}: {what} must be a JSON object, got {describe(values)}")
        self.values = values

    def fail(self, name, expected: str, value=MISSING):
        got = "it is missing" if value is MISSING else f"got {describe(value)}"
        raise self.error(f"{self.source}: field {self.prefix}{name} must be {expected}; {got}")

    def field(self, name, accept, expected: str, default=MISSING, none_ok: bool = False):
        """The field ``name`` if ``accept(value)``; see the class docstring."""
        if name not in self.values:
            if default is MISSING:
                self.fail(name, expected)
            return default
        value = self.values[name]
        if value is None and none_ok:
            return None
        if not accept(value):
            self.fail(name, expected + (" or null" if none_ok else ""), value)
        return value

    def integer(self, name, low=None, high=None, **options) -> int:
        return self.field(name, lambda v: is_whole(v) and _within(v, low, high),
                          "a whole number" + _bounds(low, high), **options)

    def number(self, name, low=None, high=None, **options) -> float:
        return self.field(name, lambda v: is_finite_number(v) and _within(v, low, high),
                          "a finite number" + _bounds(low, high), **options)

    def boolean(self, name, **options) -> bool:
        return self.field(name, lambda v: isinstance(v, bool), "true or false", **options)

    def string(self, name, choices=None, **options) -> str:
        if choices is None:
            return self.field(name, lambda v: isinstance(v, str) and v.isprintable(),
                              "a printable string", **options)
        choices = tuple(choices)
        return self.field(name, lambda v: isinstance(v, str) and v in choices,
                          "one of " + ", ".join(map(repr, choices)), **options)

    def sequence(self, name, **options) -> list:
        return self.field(name, lambda v: isinstance(v, list), "a list", **options)

    def strings(self, name, **options) -> list:
        return self.field(name, lambda v: isinstance(v, list) and v and all(
            isinstance(s, str) and s and s.isprintable() for s in v),
            "a list of printable, non-empty strings", **options)

    def numbers(self, name, low=None, **options) -> list:
        return self.field(name, lambda v: isinstance(v, list) and v and all(
            is_finite_number(x) and (low is None or x > low) for x in v),
            "a list of finite numbers" + (f" > {low}" if low is not None else ""), **options)

    def record(self, name, **options) -> Record | None:
        value = self.field(name, lambda v: isinstance(v, dict), "a JSON object", **options)
        return None if value is None else Record(value, self.source, self.error,
                                                 f"{self.prefix}{name}.")


def env_int(name: str, low: int = 1, high: int = 1024) -> int | None:
    """The environment variable ``name`` as a whole number in [low, high]; None if it is
    unset or empty; MinicnnError (one line) for anything else."""
    value = os.environ.get(name, "")
    if not value.strip():
        return None
    if not re.fullmatch(r"\s*[0-9]{1,9}\s*", value) or not low <= int(value) <= high:
        raise MinicnnError(f"{name} must be a whole number between {low} and {high}, "
                           f"got {printable(repr(value))}")
    return int(value)


# --- the library API: layers -----------------------------------------------------------

def _name(layer) -> str:
    """The layer's name for a message: the reference layer's for a fast kernel."""
    if isinstance(layer, str):
        return layer
    return layer.layer_name() if hasattr(layer, "layer_name") else type(layer).__name__


def check_input(layer, x, ndim: int | None = None, expected: str = "") -> None:
    """TypeError unless ``x`` is a floating-point NumPy or CuPy array; ValueError if it
    does not have ``ndim`` dimensions or holds an empty batch. ``expected``: the shape
    for the message, e.g. "(N, 400)"."""
    name = _name(layer)
    wanted = f" {expected}" if expected else ""
    if not backend.is_array(x):
        raise TypeError(f"{name} expects a NumPy or CuPy array{wanted}, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name} expects a floating-point array{wanted}, got dtype {x.dtype} "
                        "(convert with .astype(numpy.float32))")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} expects a {ndim}-d array{wanted}, got shape {tuple(x.shape)}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} got an empty batch (shape {tuple(x.shape)}); "
                         "pass at least one sample")


def check_backward(layer, ready: bool, dy=None) -> None:
    """RuntimeError if backward comes before a forward pass (``ready`` False); TypeError
    unless ``dy`` (when given) is a floating-point array."""
    name = _name(layer)
    if not ready:
        raise RuntimeError(f"{name}.backward needs a forward pass (in training mode) first")
    if dy is None:
        return
    if not backend.is_array(dy) or dy.dtype.kind != "f":
        raise TypeError(f"{name}.backward expects a floating-point array dL/dy, got "
                        f"{type(dy).__name__} {getattr(dy, 'dtype', '')}".rstrip())


MAY_BE_ZERO = ("padding",)


def check_sizes(layer, kernel_pairs: bool = True, **sizes) -> None:
    """Constructor arguments that are sizes: whole numbers >= 1 (those named in
    MAY_BE_ZERO >= 0), or for kernel_size a pair of them where kernel_pairs;
    None is skipped (a default applies)."""
    for key, value in sizes.items():
        if value is None:
            continue
        low = 0 if key in MAY_BE_ZERO else 1
        pairs_allowed = key == "kernel_size" and kernel_pairs
        pair = pairs_allowed and isinstance(value, (tuple, list)) and len(value) == 2
        parts = value if pair else (value,)
        if not all(is_whole(v) and v >= low for v in parts):
            raise ValueError(f"{_name(layer)}: {key} must be a whole number >= {low}"
                             + (" or a pair of them" if pairs_allowed else "")
                             + f", got {value!r}")


def check_labels(layer, labels, n: int, classes: int) -> None:
    """Integer class indices (N,) in 0..classes-1. The range is checked for labels on
    the host only: on the GPU that would wait for the device every step (the data
    loader has validated the data set's labels already)."""
    name = _name(layer)
    if not backend.is_array(labels) or labels.dtype.kind not in "iu":
        raise TypeError(f"{name} expects labels as an integer array (N,), got "
                        f"{type(labels).__name__} {getattr(labels, 'dtype', '')}".rstrip())
    if tuple(labels.shape) != (n,):
        raise ValueError(f"{name} expects labels of shape ({n},) for {n} rows of logits, "
                         f"got {tuple(labels.shape)}")
    if backend.on_cpu(labels) and n and (labels.min() < 0 or labels.max() >= classes):
        bad = labels[(labels < 0) | (labels >= classes)][0]
        raise ValueError(f"{name}: labels must be class indices 0..{classes - 1}, got {bad}")


# --- training histories -----------------------------------------------------------------

def check_history(entries, source: str, field: str = "history", error=MinicnnError) -> list:
    """A training history: a list with one JSON object per epoch, in order, each with
    "epoch" (1, 2, ...), "train_loss" (>= 0) and "train_accuracy" (0..1) as finite
    numbers, and "test_accuracy" or "holdout_accuracy" (0..1) where the epoch was
    evaluated; other keys are kept as they are."""
    if not isinstance(entries, list):
        raise error(f"{source}: field {field} must be a list with one entry per epoch; "
                    f"got {describe(entries)}")
    for index, entry in enumerate(entries):
        record = Record(entry, source, error, f"{field}[{index}].")
        record.integer("epoch", index + 1, index + 1)
        record.number("train_loss", 0)
        record.number("train_accuracy", 0, 1)
        for key in ("test_accuracy", "holdout_accuracy"):    # null: an epoch not evaluated
            record.number(key, 0, 1, default=None, none_ok=True)
    return entries
