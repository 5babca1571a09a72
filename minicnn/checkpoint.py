"""Save and load models as one ``.npz``: arrays keyed by layer path plus JSON metadata.

File layout (loaded with ``allow_pickle=False``, so loading runs no code)::

    "0.weight", "0.bias", ...   parameter arrays, keyed as PyTorch's state_dict
    "__metadata__"              a 0-d unicode array holding a JSON object:
        format, format_version, model, config, architecture, class_names,
        normalization {mean, std}, training {...}, test_accuracy, ...

``model`` and ``config`` name a registered model (minicnn.models; ``model`` is
null for one built by hand). ``architecture`` is the model's structure
(minicnn.architecture.describe: layer types and constructor arguments), kept
for every model made of minicnn's layers: load_model rebuilds a registered
model by its name, and any other from its architecture.

Writes are atomic: the file is written beside the target and renamed over it,
so an interrupted save never leaves a half-written file. Saving copies arrays
to the host without moving the model itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import zipfile
from pathlib import Path

import numpy

from minicnn import architecture, backend, data
from minicnn.errors import MinicnnError
from minicnn.models import MODELS, build_model

FORMAT = "minicnn-weights"
FORMAT_VERSION = 1
METADATA_KEY = "__metadata__"


class CheckpointError(MinicnnError):
    """A weights file is missing, corrupt or does not fit its model."""


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file beside ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)        # the permissions a plain open() would give
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_npz_atomic(path, arrays: dict, metadata: dict) -> Path:
    """Write {name: array} and a JSON metadata entry to ``path`` atomically."""
    content = {name: backend.to_host(value) for name, value in arrays.items()}
    content[METADATA_KEY] = numpy.array(json.dumps(metadata, sort_keys=True))
    with atomic_write(path) as f:
        numpy.savez(f, **content)
    return Path(path)


def write_json_atomic(path, content) -> None:
    with atomic_write(path, "w") as f:
        json.dump(content, f, indent=1)


def read_npz(path) -> tuple[dict, dict]:
    """({name: host array}, metadata) from an ``.npz`` written by :func:`write_npz_atomic`."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a weights file")
    try:
        with numpy.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{path}: not a minicnn weights file ({exc})") from None
    if METADATA_KEY not in arrays:
        raise CheckpointError(f"{path}: not a minicnn weights file (no metadata)")
    try:
        metadata = json.loads(str(arrays.pop(METADATA_KEY)))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt metadata ({exc})") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt metadata (not a JSON object)")
    return arrays, metadata


def read_metadata(path) -> dict:
    """Only the metadata of a weights file (cheap: the arrays are not read)."""
    try:
        with numpy.load(path, allow_pickle=False) as npz:
            return json.loads(str(npz[METADATA_KEY]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{path}: not a minicnn weights file ({exc})") from None


def default_normalization() -> dict:
    """save_model's default normalization: CIFAR-10's per-channel statistics."""
    return {"mean": list(data.CIFAR10_MEAN), "std": list(data.CIFAR10_STD)}


def save_model(model, path, *, class_names=data.CLASS_NAMES, normalization=None,
               **metadata) -> Path:
    """Save ``model`` and ``metadata`` to one .npz, atomically.

    Any model built from minicnn's layers can be saved (its architecture goes in the
    file); a model with a layer of your own must be registered (minicnn.register) and
    made by build_model. ``class_names`` name the model's outputs in order (default:
    CIFAR-10's ten); ``normalization`` {"mean": [...], "std": [...]} is what images are
    normalized with before the model sees them (default: CIFAR-10's statistics, as
    minicnn.data.normalize and fit use).
    """
    header = model_header(model)
    metadata["class_names"] = _checked_class_names(class_names)
    metadata["normalization"] = _checked_normalization(normalization or default_normalization())
    return write_npz_atomic(path, model.state_dict(), {**metadata, **header})


def model_header(model) -> dict:
    """The metadata that says what model a file holds; ArchitectureError if it cannot say."""
    name = getattr(model, "name", None)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": name,
              "config": getattr(model, "config", {}) if name is not None else {}}
    try:
        header["architecture"] = architecture.describe(model)
    except architecture.ArchitectureError:
        if name is None:            # neither a name nor a structure: it could not be loaded
            raise
    return header


def _checked_class_names(names) -> list:
    names = list(names) if isinstance(names, (list, tuple)) else names
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise MinicnnError(f"class_names must be a non-empty list of strings, got {names!r:.80}")
    return names


def _checked_normalization(value) -> dict:
    try:
        mean, std = [float(v) for v in value["mean"]], [float(v) for v in value["std"]]
        extra = set(value) - {"mean", "std"}
    except (TypeError, KeyError, ValueError):
        mean, std, extra = [], [], set()
    finite = all(math.isfinite(v) for v in mean + std)
    if extra or not finite or not mean or len(mean) != len(std) or not all(s > 0 for s in std):
        raise MinicnnError('normalization must be {"mean": [...], "std": [...]}, one number '
                           f"per channel and every std > 0, got {value!r:.80}")
    return {"mean": mean, "std": std}


def load_model(path):
    """Rebuild a model from a weights file alone; returns (model, metadata).

    A registered model is built by its name and config, any other from the
    architecture in the file. The parameters are placed on the current backend.
    Names and shapes are checked against the rebuilt architecture. A file without
    class names or normalization gets save_model's defaults in ``metadata``.
    """
    arrays, metadata = read_npz(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a minicnn weights file (format "
                              f"{metadata.get('format')!r})")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {metadata['format_version']} is newer "
                              f"than this minicnn understands ({FORMAT_VERSION}); upgrade minicnn")
    model = model_from_metadata(metadata, source=str(path))
    load_parameters(model, arrays, source=str(path))
    metadata.setdefault("class_names", list(data.CLASS_NAMES))
    metadata.setdefault("normalization", default_normalization())
    return model, metadata


def model_from_metadata(metadata: dict, source: str = "metadata"):
    """A model of fresh parameters as ``metadata`` describes it: a registered model by its
    name and config, any other from its architecture (CheckpointError if neither)."""
    name = metadata.get("model")
    if isinstance(name, str) and name in MODELS:
        return build_model(name, **metadata.get("config", {}))
    if "architecture" not in metadata:
        raise CheckpointError(f"{source}: unknown model {name!r} (and no architecture saved)")
    try:
        model = architecture.build(metadata["architecture"])
    except architecture.ArchitectureError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    except MemoryError:
        raise CheckpointError(f"{source}: its architecture is too large to build") from None
    if isinstance(name, str):       # registered where it was saved, not here: keep the name
        model.name, model.config = name, metadata.get("config", {})
    return model


def load_parameters(model, arrays: dict, source: str = "state dict") -> None:
    """Copy {path: array} into the model's params and buffers, checking names and shapes."""
    expected = {name: (holder, key) for name, holder, key in model.named_arrays()}
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: parameters do not match the model "
                              f"(missing {missing}, unexpected {unexpected})")
    for name, (holder, key) in expected.items():
        old, new = holder[key], arrays[name]
        if tuple(new.shape) != tuple(old.shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(new.shape)}, "
                                  f"the model needs {tuple(old.shape)}")
        holder[key] = backend.to_device(new, dtype=old.dtype)
