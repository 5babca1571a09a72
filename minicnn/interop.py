"""PyTorch weights in and out, without PyTorch as a dependency of minicnn.

A minicnn model's state_dict has the names and shapes of the same layers in
PyTorch (``Sequential`` -> ``nn.Sequential``, ``Residual(body)`` -> a module
whose ``body`` is the branch; benchmarks/torch_mirror.py builds that model),
so converting is reading and writing arrays, not renaming them::

    load_torch_weights(model, "resnet.safetensors")   # PyTorch's state_dict -> model
    save_torch_weights(model, "mine.safetensors")     # model -> PyTorch's state_dict

Two file kinds:

- ``.safetensors``: read and written with the ``safetensors`` package's NumPy
  API (``pip install "minicnn[safetensors]"``); no torch, no pickle. minicnn
  also writes its own metadata into the file's header (architecture, class
  names, normalization), so converting the file back needs nothing else.
- ``.pt`` / ``.pth``: what ``torch.save(model.state_dict(), path)`` writes;
  only where torch is installed, and read with ``weights_only=True`` (no code
  runs). A checkpoint dict that holds the state dict under "state_dict",
  "model_state_dict" or "model" is unwrapped.

What differs between the two engines, and how it is bridged: PyTorch's
BatchNorm2d always has a weight (gamma) and a bias (beta), and counts batches
in ``num_batches_tracked``. minicnn's may have neither parameter (airnet's
learns its shift only, gamma fixed at 1). Written out, a missing gamma is ones,
a missing beta zeros, and the counter 0; read in, the counter is dropped and
so is a gamma of all ones or a beta of all zeros where the minicnn layer has
none (any other value is an error: the layer could not use it).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy

from minicnn import backend
from minicnn.architecture import ArchitectureError, describe
from minicnn.checkpoint import CheckpointError, atomic_write, load_parameters
from minicnn.errors import MinicnnError
from minicnn.layers import BatchNorm2d

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth")
SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
METADATA_KEY = "minicnn"            # the safetensors header entry minicnn writes


def _batch_norms(model):
    """(prefix of its state_dict names, layer) for every BatchNorm2d of ``model``."""
    for path, module in model.modules():
        if isinstance(module, BatchNorm2d):
            yield (f"{path}." if path else ""), module


def torch_state_dict(model) -> dict:
    """{name: host array}: the state_dict PyTorch's model of the same layers loads with
    ``load_state_dict(..., strict=True)``."""
    arrays = {name: numpy.ascontiguousarray(backend.to_host(value))
              for name, value in model.state_dict().items()}
    for prefix, layer in _batch_norms(model):
        dtype = arrays[prefix + "running_mean"].dtype
        arrays.setdefault(prefix + "weight", numpy.ones(layer.num_features, dtype))
        arrays.setdefault(prefix + "bias", numpy.zeros(layer.num_features, dtype))
        arrays[prefix + "num_batches_tracked"] = numpy.array(0, dtype=numpy.int64)
    return arrays


def load_torch_state_dict(model, arrays: dict, source: str = "state dict") -> None:
    """Copy a PyTorch state_dict ({name: array}) into ``model``, checking names and shapes
    (CheckpointError naming what does not fit)."""
    arrays = dict(arrays)
    for prefix, layer in _batch_norms(model):
        arrays.pop(prefix + "num_batches_tracked", None)
        for key, fixed, what in (("weight", 1.0, "a fixed scale of 1"),
                                 ("bias", 0.0, "a fixed shift of 0")):
            name = prefix + key
            if key not in layer.params and name in arrays:
                if not numpy.all(arrays.pop(name) == fixed):
                    raise CheckpointError(f"{source}: {name} is not all {fixed:g}, but the "
                                          f"model's BatchNorm2d {prefix[:-1]!r} has {what}")
    expected = set(model.state_dict())
    for name, value in arrays.items():
        if name in expected and value.dtype.kind != "f":
            raise CheckpointError(f"{source}: {name} holds {value.dtype} values, not floats")
    load_parameters(model, arrays, source=source)


def minicnn_metadata(model, **metadata) -> dict:
    """What minicnn writes into a safetensors header: the model's name, config and
    architecture (where it has them) and ``metadata`` (class names, normalization)."""
    header = {"model": getattr(model, "name", None), "config": getattr(model, "config", {})}
    try:
        header["architecture"] = describe(model)
    except ArchitectureError:         # a layer of your own: the arrays still convert
        pass
    return {**metadata, **header}


# --- files -------------------------------------------------------------------------

def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise MinicnnError(f"{path}: a PyTorch weights file ends in {', '.join(SUFFIXES)}")
    return suffix


def optional_import(module: str, message: str):
    """Import ``module`` (e.g. "safetensors.numpy") and return its top-level package, or
    raise MinicnnError(message) where it is not installed."""
    parts = module.split(".")
    try:
        for end in range(1, len(parts) + 1):       # the package first, then its submodules
            importlib.import_module(".".join(parts[:end]))
    except ImportError:
        raise MinicnnError(message) from None
    return sys.modules[parts[0]]


def _import_torch(path: Path):
    return optional_import("torch", f"{path}: .pt and .pth files need PyTorch (pip install "
                                    "torch); without it, use the state dict saved as .safetensors")


def _import_safetensors(path: Path):
    return optional_import("safetensors.numpy", f"{path}: .safetensors files need the "
                                                'safetensors package (pip install '
                                                '"minicnn[safetensors]")')


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_torch_weights(path) -> tuple[dict, dict | None]:
    """({name: host array}, minicnn's metadata or None) of a PyTorch weights file."""
    path = Path(path)
    suffix = _suffix(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a weights file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    return _read_pickle(path), None


def _read_safetensors(path: Path) -> tuple[dict, dict | None]:
    safetensors = _import_safetensors(path)
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, TypeError) as exc:
        # TypeError: a dtype NumPy lacks, such as bfloat16
        raise CheckpointError(f"{path}: not a safetensors file minicnn can read "
                              f"({_first_line(exc)})") from None
    if METADATA_KEY not in header:
        return arrays, None
    try:
        metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt minicnn metadata ({exc})") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt minicnn metadata (not a JSON object)")
    return arrays, metadata


def _read_pickle(path: Path) -> dict:
    torch = _import_torch(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:      # torch raises many kinds here (UnpicklingError, RuntimeError...)
        raise CheckpointError(f"{path}: not a file torch.load reads with weights_only=True "
                              f"({_first_line(exc)})") from None

    def is_state_dict(value) -> bool:
        return (isinstance(value, dict) and bool(value)
                and all(isinstance(v, torch.Tensor) for v in value.values()))

    if isinstance(content, dict) and not is_state_dict(content):
        content = next((content[key] for key in ("state_dict", "model_state_dict", "model")
                        if is_state_dict(content.get(key))), content)
    if not is_state_dict(content):
        raise CheckpointError(f"{path}: holds no state_dict (a dict of tensors)")
    return {str(name): (tensor.detach().cpu().float() if tensor.is_floating_point()
                        else tensor.detach().cpu()).numpy()
            for name, tensor in content.items()}


def write_torch_weights(path, arrays: dict, metadata: dict | None = None) -> Path:
    """Write {name: host array} as a PyTorch state_dict file, atomically; a .safetensors
    file also gets ``metadata`` (JSON) in its header."""
    path = Path(path)
    if _suffix(path) in SAFETENSORS_SUFFIXES:
        content = _import_safetensors(path).numpy.save(
            arrays, metadata={METADATA_KEY: json.dumps(metadata or {}, sort_keys=True)})
        with atomic_write(path) as f:
            f.write(content)
        return path
    torch = _import_torch(path)
    with atomic_write(path) as f:
        torch.save({name: torch.from_numpy(numpy.array(value)) for name, value in arrays.items()},
                   f)
    return path


def load_torch_weights(model, path) -> dict | None:
    """Load a PyTorch state_dict file (.safetensors, .pt, .pth) into ``model``; returns the
    minicnn metadata the file holds (a .safetensors written by minicnn), else None."""
    arrays, metadata = read_torch_weights(path)
    load_torch_state_dict(model, arrays, source=str(path))
    return metadata


def save_torch_weights(model, path, **metadata) -> Path:
    """Write ``model``'s parameters as the state_dict of the same layers in PyTorch."""
    return write_torch_weights(path, torch_state_dict(model), minicnn_metadata(model, **metadata))
