"""Backend selection, its errors, and the import discipline."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from minicnn import backend
from minicnn.backend import BackendError

PACKAGE = Path(backend.__file__).parent
# The backend is the only module that imports numpy or cupy for computing; the
# I/O modules use numpy for host-side file formats (npz, pickled batches, images,
# PyTorch's state dicts, ONNX initializers), study/figures.py for drawing host arrays
# with matplotlib, replicas.py for arrays in host shared memory (it runs on the NumPy
# backend only), and holdout.py to split the data set on the host, where it is loaded,
# before any backend.
ALLOWED_NUMPY = {"backend.py", "data.py", "checkpoint.py", "images.py", "study/figures.py",
                 "interop.py", "onnx_export.py", "fast/replicas.py", "holdout.py"}
ALLOWED_CUPY = {"backend.py"}


def imported_modules(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_backend_and_io_modules_import_numpy_or_cupy():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    for path in files:
        imports = imported_modules(path)
        relative = str(path.relative_to(PACKAGE))
        if "numpy" in imports:
            assert relative in ALLOWED_NUMPY, f"{relative} imports numpy"
        if "cupy" in imports:
            assert relative in ALLOWED_CUPY, f"{relative} imports cupy"


def test_numpy_backend_and_generators():
    assert backend.use("numpy", seed=1) == "numpy"
    assert backend.xp is np and backend.name() == "numpy"
    a = backend.rng().random(3)
    backend.use("numpy", seed=1)
    np.testing.assert_array_equal(a, backend.rng().random(3))
    np.testing.assert_array_equal(backend.make_rng([1, 2]).random(2),
                                  backend.make_rng([1, 2]).random(2))


def test_unknown_backend():
    with pytest.raises(BackendError, match="unknown backend"):
        backend.use("tpu")


def test_cupy_missing_gives_one_line_install_hint(without_cupy):
    with pytest.raises(BackendError) as info:
        backend.use("cupy")
    message = str(info.value)
    assert "\n" not in message and "pip install 'minicnn[cupy]'" in message
    assert backend.use("auto") == "numpy"


def test_host_device_round_trip(xp):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    on_device = backend.to_device(a)
    assert backend.array_module(on_device) is xp
    np.testing.assert_array_equal(backend.to_host(on_device), a)
