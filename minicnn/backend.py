"""The array backend: NumPy on the CPU or CuPy on an NVIDIA GPU.

This is the one module of the engine that imports numpy or cupy by name.
Layers ask it for the array module (``xp``) that matches their input::

    xp = backend.array_module(x)     # numpy or cupy, whichever owns x
    y = xp.maximum(x, 0)

The backend is chosen at run time with :func:`use` ("numpy", "cupy" or
"auto"). Each backend has its own seeded random generator (:func:`rng`);
NumPy's global random state is never used.

Only a small, common subset of the generator API is used so that NumPy's
``numpy.random.Generator`` and CuPy's ``cupy.random.Generator`` are
interchangeable: ``random``, ``integers``, ``uniform``, ``standard_normal``.
"""

from __future__ import annotations

import importlib
import os

import numpy

from minicnn.errors import MinicnnError

NAMES = ("numpy", "cupy", "auto")

CUPY_INSTALL_HINT = (
    "install it with: pip install 'minicnn[cupy]' (CuPy for CUDA 12; "
    "see https://docs.cupy.dev/en/stable/install.html for other CUDA versions)"
)


class BackendError(MinicnnError):
    """The requested backend cannot be used here."""


_name = "numpy"
xp = numpy
_rng = numpy.random.default_rng(0)
_cupy = None  # the cupy module once it has been imported successfully

#: For the test suite only: the name of a module to import in place of cupy
#: (``MINICNN_FAKE_CUPY=tests.fake_cupy``, a strict NumPy-backed stand-in that
#: is not shipped), so that the CuPy code paths run on machines without a GPU.
FAKE_CUPY_VARIABLE = "MINICNN_FAKE_CUPY"


def _import_cupy():
    """Import CuPy and check that a GPU is usable; raise BackendError if not."""
    global _cupy
    if _cupy is not None:
        return _cupy
    try:
        if os.environ.get(FAKE_CUPY_VARIABLE):
            cupy = importlib.import_module(os.environ[FAKE_CUPY_VARIABLE])
        else:
            import cupy  # noqa: PLC0415 - optional dependency, imported on demand
    except ImportError as exc:
        raise BackendError(f"the cupy backend needs CuPy, which is not installed ({exc}); "
                           + CUPY_INSTALL_HINT) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken
        raise BackendError(f"CuPy is installed but no CUDA GPU is usable ({exc}); "
                           "use --backend numpy") from None
    if count < 1:
        raise BackendError("CuPy is installed but no CUDA GPU was found; use --backend numpy")
    _cupy = cupy
    return cupy


def cupy_available() -> bool:
    """True if CuPy imports and sees at least one GPU."""
    try:
        _import_cupy()
    except BackendError:
        return False
    return True


def use(name: str = "numpy", seed: int | None = 0) -> str:
    """Select the backend ("numpy", "cupy" or "auto") and seed its generator.

    "auto" picks CuPy when it is installed and a GPU is present, else NumPy.
    Returns the name of the backend in use.
    """
    global _name, xp
    if name not in NAMES:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    if name == "auto":
        name = "cupy" if cupy_available() else "numpy"
    xp = _import_cupy() if name == "cupy" else numpy
    _name = name
    seed_rng(seed)
    return name


def name() -> str:
    """The name of the backend in use: "numpy" or "cupy"."""
    return _name


def seed_rng(seed: int | None) -> None:
    """Re-seed the current backend's random generator."""
    global _rng
    _rng = xp.random.default_rng(seed)


def rng():
    """The current backend's seeded random generator."""
    return _rng


def make_rng(seed):
    """A fresh generator of the current backend, seeded with ``seed``
    (an int, or a sequence of ints on NumPy)."""
    if _name == "cupy" and not isinstance(seed, int):
        seed = int(numpy.random.SeedSequence(seed).generate_state(1)[0])
    return xp.random.default_rng(seed)


def array_module(x):
    """numpy or cupy: the module that owns array ``x``."""
    if _cupy is not None:
        return _cupy.get_array_module(x)
    return numpy


def on_cpu(x) -> bool:
    """True if ``x`` is a NumPy array (host memory), False for a CuPy array."""
    return array_module(x) is numpy


def to_device(x, dtype=None):
    """Copy a host (NumPy) array to the current backend; a no-op on NumPy."""
    out = xp.asarray(x)
    return out if dtype is None else out.astype(dtype, copy=False)


def to_host(x):
    """A NumPy array with the values of ``x`` (a NumPy or CuPy array)."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy.asnumpy(x)
    return numpy.asarray(x)


def is_array(x) -> bool:
    """True for NumPy and CuPy arrays."""
    if isinstance(x, numpy.ndarray):
        return True
    return _cupy is not None and isinstance(x, _cupy.ndarray)


def synchronize() -> None:
    """Wait for queued GPU work to finish (for timing); a no-op on NumPy."""
    if _name == "cupy":
        _cupy.cuda.Device().synchronize()


float32 = numpy.float32
float64 = numpy.float64
