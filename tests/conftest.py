"""Shared fixtures: the backend parametrization and tiny CIFAR-10 look-alikes."""

from __future__ import annotations

import builtins
import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from minicnn import (BatchNorm2d, Conv2d, Flatten, GlobalAvgPool2d, Linear, MaxPool2d, ReLU,
                     Residual, Scale, Sequential, backend, kernels)

# The CuPy stand-in is imported as tests.fake_cupy (MINICNN_FAKE_CUPY names it), here
# and in the child processes that some tests start: the repository root is importable.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
ON_THE_CUPY_STAND_IN = bool(os.environ.get(backend.FAKE_CUPY_VARIABLE))
if ON_THE_CUPY_STAND_IN:
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)

REAL_DATA = Path(os.environ.get("MINICNN_DATA", "")) if os.environ.get("MINICNN_DATA") else None
if REAL_DATA is None:
    candidate = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10-batches-py"
    REAL_DATA = candidate if candidate.is_dir() else None

requires_real_data = pytest.mark.skipif(
    REAL_DATA is None or not (REAL_DATA / "test_batch").is_file(),
    reason="the real CIFAR-10 batches are not here (set MINICNN_DATA to the "
           "cifar-10-batches-py folder to run this test)")


def first_pass_only(reason: str):
    """Skip a test in CI's second pass, on the CuPy stand-in, where it would only repeat
    the first pass's work; reason says why."""
    return pytest.mark.skipif(ON_THE_CUPY_STAND_IN, reason=reason)


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """Run the test once per backend; CuPy cases skip cleanly without a GPU."""
    if request.param == "cupy" and not backend.cupy_available():
        pytest.skip("CuPy or a CUDA GPU is not available (CI runs these cases on a "
                    "stand-in: MINICNN_FAKE_CUPY=tests.fake_cupy)")
    backend.use(request.param, seed=0)
    yield backend.xp
    backend.use("numpy", seed=0)


@pytest.fixture
def without_cupy(monkeypatch):
    """As where CuPy is not installed: also on a GPU machine, and under the stand-in."""
    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy":
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.delenv(backend.FAKE_CUPY_VARIABLE, raising=False)
    monkeypatch.setattr(builtins, "__import__", no_cupy)


@pytest.fixture(autouse=True)
def numpy_backend_by_default():
    """Every test starts on NumPy, seed 0, with the default kernels (a CLI test's
    --kernels would otherwise stay the default for the tests after it)."""
    backend.use("numpy", seed=0)
    kernels.use(None)
    yield
    backend.use("numpy", seed=0)
    kernels.use(None)


def write_batch(path: Path, images: np.ndarray, labels, protocol: int = 2) -> None:
    """A pickle laid out like the official batches: bytes keys, uint8 (N, 3072) data."""
    content = {b"batch_label": b"test", b"labels": [int(v) for v in labels],
               b"data": images.reshape(len(images), -1), b"filenames": [b"x.png"] * len(images)}
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=protocol)


def make_cifar_folder(root: Path, per_batch: int = 20, seed: int = 0) -> Path:
    """A tiny cifar-10-batches-py folder: 5 training batches and a test batch.

    Images are learnable: each class has its own mean colour plus noise.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    colours = rng.integers(30, 226, size=(10, 3))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, per_batch)
        noise = rng.integers(-25, 26, size=(per_batch, 3, 32, 32))
        images = np.clip(colours[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)
        write_batch(folder / name, images, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
             b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    return folder


def make_tarball(folder: Path, tarball: Path) -> Path:
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(folder, arcname="cifar-10-batches-py")
    return tarball


@pytest.fixture
def tiny_cifar(tmp_path) -> Path:
    return make_cifar_folder(tmp_path / "data")


# --- models for the save, convert and export tests -----------------------------------

def readme_model():
    """The README's example model (the one its issue could not save)."""
    return Sequential(Conv2d(3, 8, 3, padding=1), ReLU(), MaxPool2d(2), Flatten(),
                      Linear(8 * 16 * 16, 10))


def every_layer_model():
    """Every layer minicnn has, nested every way, with non-default arguments."""
    return Sequential(
        Conv2d(3, 6, (3, 5), stride=2, padding=1, bias=False),
        BatchNorm2d(6, eps=1e-3, momentum=0.3, weight=False),
        ReLU(),
        Residual(Conv2d(6, 6, 3, padding=1), ReLU()),
        Residual(Sequential(BatchNorm2d(6, bias=False), Residual(ReLU()))),
        MaxPool2d(3, stride=2, padding=1),
        Sequential(Conv2d(6, 4, 1), ReLU()),
        GlobalAvgPool2d(),
        Linear(4, 7), Scale(0.25),
    )


def lived_in(model, seed: int = 0):
    """``model`` as training leaves it: BatchNorm's parameters moved off 1 and 0 and its
    running statistics those of a few batches, so that a copy which mixed two of them up
    or left one out gives other logits. Returns it in eval mode."""
    rng = np.random.default_rng(seed)
    for _, module in model.modules():
        if isinstance(module, BatchNorm2d):
            for key, value in module.params.items():
                noise = rng.normal(0, 0.2, value.shape).astype(np.float32)
                module.params[key] = value + backend.to_device(noise)
    model.train()
    for _ in range(3):
        x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32) * 2 + 0.5
        model.forward(backend.to_device(x))
    return model.eval()


def example_images(metadata: dict) -> np.ndarray:
    """The ten pictures of examples/images/, normalized as a weights file's metadata says."""
    from minicnn.data import normalize
    from minicnn.images import load_images
    folder = Path(__file__).resolve().parents[1] / "examples" / "images"
    _, pictures, _ = load_images(sorted(str(p) for p in folder.glob("*.png")))
    return normalize(pictures, **metadata["normalization"])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A tiny CIFAR-10 folder (100 training and 20 test images) shared by a module's tests."""
    return make_cifar_folder(tmp_path_factory.mktemp("data"), per_batch=20)


@pytest.fixture
def one_process(monkeypatch):
    """fit() trains in this process (no replica workers)."""
    monkeypatch.setenv("MINICNN_PROCESSES", "1")


def read_npz(path) -> tuple[dict, dict]:
    """({name: array}, metadata) of a minicnn .npz, every member read as it stands: for
    tests that craft a file from another (minicnn itself reads with checks and limits)."""
    import json

    from minicnn.checkpoint import METADATA_KEY
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return arrays, json.loads(str(arrays.pop(METADATA_KEY)))
