"""Save and load models as one ``.npz``: arrays keyed by layer path plus JSON metadata.

File layout (read without pickles, so loading runs no code)::

    "0.weight", "0.bias", ...   parameter arrays, keyed as PyTorch's state_dict
    "__metadata__"              a 0-d unicode array holding a JSON object:
        format, format_version, model, config, architecture, class_names,
        normalization {mean, std}, training {...}, test_accuracy, tta, ...

``model`` and ``config`` name a registered model (minicnn.models; ``model`` is
null for one built by hand). ``architecture`` is the model's structure
(minicnn.architecture.describe: layer types and constructor arguments), kept
for every model made of minicnn's layers: load_model rebuilds a registered
model by its name, and any other from its architecture.

Writes are atomic (minicnn.files.atomic_write): an interrupted save never
leaves a half-written file. Saving copies arrays to the host without moving
the model itself.

Reading has bounded cost whatever the file holds (:class:`NpzReader`): the
members are listed from the zip directory and checked by name, compression
and declared size before any is decompressed, each array's header (dtype,
shape) before its data, and the metadata has a size limit. Every metadata
field minicnn uses is checked for type and range (:func:`check_metadata`),
and NaN or infinite parameters are refused.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
import zlib
from pathlib import Path

import numpy
from numpy.lib import format as npy_format

from minicnn import architecture, augment, backend
from minicnn.data import CIFAR10_MEAN, CIFAR10_STD, CLASS_NAMES
from minicnn.errors import MinicnnError
from minicnn.files import atomic_write, display, open_regular
from minicnn.layers.base import Module
from minicnn.models import MODELS, build_model
from minicnn.validation import Record

FORMAT = "minicnn-weights"
FORMAT_VERSION = 1
METADATA_KEY = "__metadata__"
MAX_METADATA_BYTES = 16 * 2**20    # the JSON of a 1,000-epoch history is well below 1 MB
NPY_HEADER_BYTES = 4096            # room for an array member's .npy header
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)    # what numpy.savez(_compressed) use
# what a damaged or crafted zip can raise while it is read
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError,
              NotImplementedError, RuntimeError, struct.error, KeyError, OverflowError)


class CheckpointError(MinicnnError):
    """A weights file is missing, corrupt or does not fit its model."""


class _WrongShape(Exception):
    """An array member whose shape is not the model's (a readable file, another model)."""


def write_npz_atomic(path, arrays: dict, metadata: dict) -> Path:
    """Write {name: array} and a JSON metadata entry to ``path`` atomically."""
    content = {name: backend.to_host(value) for name, value in arrays.items()}
    content[METADATA_KEY] = numpy.array(json.dumps(metadata, sort_keys=True, allow_nan=False))
    with atomic_write(path) as f:
        numpy.savez(f, **content)
    return Path(path)


class NpzReader:
    """An ``.npz`` file opened for reading with bounded cost (see the module docstring).

    ``metadata()`` reads the JSON entry; ``arrays(shapes)`` reads exactly the arrays
    named in ``shapes`` ({name: shape}), each a finite float array of that shape.
    Errors are ``error`` with one line naming the file.
    """

    def __init__(self, path, error=CheckpointError, what: str = "weights file"):
        self.name, self.error, self.what = display(path), error, what
        self._file = open_regular(path, error, what)
        try:
            self._zip = zipfile.ZipFile(self._file)
            members = self._zip.infolist()
        except ZIP_ERRORS as exc:
            self._file.close()
            raise self.corrupt(exc) from None
        self.members = {}
        for info in members:
            key = info.filename.removesuffix(".npy")
            if key == info.filename or key in self.members or info.compress_type not in ZIP_METHODS:
                self.close()
                raise self.corrupt(f"unexpected member {info.filename!r}")
            self.members[key] = info

    def corrupt(self, detail) -> MinicnnError:
        return self.error(f"{self.name}: not a minicnn {self.what} ({detail})")

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def __enter__(self) -> NpzReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def names(self) -> set:
        """The names of the arrays (not the metadata entry)."""
        return set(self.members) - {METADATA_KEY}

    def metadata(self) -> dict:
        if METADATA_KEY not in self.members:
            raise self.corrupt("no metadata")
        text = str(self._read(METADATA_KEY, kind="U", shape=(), limit=MAX_METADATA_BYTES))
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise self.error(f"{self.name}: corrupt metadata ({exc})") from None
        if not isinstance(value, dict):
            raise self.error(f"{self.name}: corrupt metadata (not a JSON object)")
        return value

    def arrays(self, shapes: dict) -> dict:
        missing = sorted(set(shapes) - self.names())
        unexpected = sorted(self.names() - set(shapes))
        if missing or unexpected:
            raise self.error(f"{self.name}: parameters do not match the model "
                             f"(missing {missing}, unexpected {unexpected})")
        return {name: self._read(name, kind="f", shape=tuple(shape)) for name, shape in
                shapes.items()}

    def _read(self, name: str, kind: str, shape: tuple, limit: int | None = None):
        """One member: its declared size, then its header (dtype kind, shape), then its data."""
        info = self.members[name]
        if limit is None:
            limit = math.prod(shape) * 8 + NPY_HEADER_BYTES      # float64 at most
        if info.file_size > limit:
            raise self.corrupt(f"{name} declares {info.file_size:,} bytes, more than the "
                               f"{limit:,} it can need")
        try:
            with self._zip.open(info) as f:
                version = npy_format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"unsupported .npy version {version}")
                read_header = (npy_format.read_array_header_1_0 if version == (1, 0)
                               else npy_format.read_array_header_2_0)
                found_shape, fortran, dtype = read_header(f)
                if dtype.hasobject or dtype.kind != kind:
                    what = {"f": "floating-point numbers", "U": "text"}[kind]
                    raise ValueError(f"{name} holds {dtype}, expected {what}")
                if found_shape != shape:
                    needs = "the model needs" if kind == "f" else "expected"
                    raise _WrongShape(f"{self.name}: {name} has shape {found_shape}, {needs} "
                                      f"{shape}")
                nbytes = math.prod(found_shape) * dtype.itemsize
                if nbytes > limit:
                    raise ValueError(f"{name} needs {nbytes:,} bytes")
                data = f.read(nbytes)
                if len(data) != nbytes or f.read(1):
                    raise ValueError(f"{name} has {len(data):,} bytes of data, expected {nbytes:,}")
        except _WrongShape as exc:
            raise self.error(str(exc)) from None
        except ZIP_ERRORS as exc:
            raise self.corrupt(exc) from None
        array = numpy.frombuffer(data, dtype).reshape(found_shape, order="F" if fortran else "C")
        array = array.astype(dtype.newbyteorder("="))            # a writable, native copy
        if kind == "f" and not numpy.isfinite(array).all():
            raise self.error(f"{self.name}: {name} holds NaN or infinite values; refusing to "
                             "load it")
        return array


def read_metadata(path, error=CheckpointError, what: str = "weights file") -> dict:
    """Only the metadata of an .npz written by minicnn (cheap: no array is read)."""
    with NpzReader(path, error, what) as npz:
        return npz.metadata()


def check_metadata(metadata: dict, source: str) -> dict:
    """The weights-file fields minicnn reads, each checked for type and range; raises
    CheckpointError naming ``source`` and the field. Returns a copy with the optional
    fields filled in: class_names None (load_model fills them from the model),
    normalization CIFAR-10's, tta False, test_accuracy None, training {}."""
    record = Record(metadata, source, CheckpointError)
    kind = metadata.get("format")
    if kind != FORMAT:
        if kind == "minicnn-resume":
            raise CheckpointError(f"{source}: is the resume point of a training run (for "
                                  "train --resume), not a weights file")
        raise CheckpointError(f"{source}: not a minicnn weights file (format {kind!r})")
    version = record.integer("format_version", low=1)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{source}: format version {version} is newer than this minicnn "
                              f"understands ({FORMAT_VERSION}); upgrade minicnn")
    checked = dict(metadata)
    checked["model"] = record.string("model", default=None, none_ok=True)
    if "architecture" in metadata:                  # architecture.build checks the rest
        record.record("architecture", none_ok=True)
    config = record.record("config", default=None, none_ok=True)
    checked["config"] = {} if config is None else config.values
    checked["class_names"] = record.strings("class_names", default=None)
    normalization = record.record("normalization", default=None)
    if normalization is None:
        checked["normalization"] = {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    else:
        mean, std = normalization.numbers("mean"), normalization.numbers("std", low=0)
        if len(mean) != len(std):
            record.fail("normalization", "mean and std of the same length", normalization.values)
        checked["normalization"] = {"mean": mean, "std": std}
    tta = record.field("tta", lambda v: isinstance(v, bool) or v in augment.TTA_MODES,
                       "true, false or one of " + ", ".join(augment.TTA_MODES), default="none")
    checked["tta"] = augment.tta_mode(tta)       # true in files before the modes: flips
    checked["test_accuracy"] = record.number("test_accuracy", 0, 1, default=None, none_ok=True)
    training = record.record("training", default=None)
    checked["training"] = {} if training is None else training.values
    return checked


def model_io(model) -> tuple[int | None, int | None]:
    """(input channels, number of outputs) of a model: the first layer that has
    ``in_channels`` and the last that has ``out_features`` (None where none has)."""
    modules = [module for _, module in model.modules()]
    channels = next((m.in_channels for m in modules if hasattr(m, "in_channels")), None)
    outputs = next((m.out_features for m in reversed(modules) if hasattr(m, "out_features")), None)
    return channels, outputs


def default_normalization() -> dict:
    """save_model's default normalization: CIFAR-10's per-channel statistics."""
    return {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}


def default_class_names(outputs: int | None) -> list:
    """The class names of a model that was given none: CIFAR-10's for ten outputs (or
    an unknown number), else "0", "1", ... one per output."""
    if outputs is None or outputs == len(CLASS_NAMES):
        return list(CLASS_NAMES)
    return [str(i) for i in range(outputs)]


def save_model(model, path, *, class_names=None, normalization=None, **metadata) -> Path:
    """Save ``model`` and ``metadata`` to one .npz, atomically.

    Any model built from minicnn's layers can be saved (its architecture goes in the
    file); a model with a layer of your own must be registered (minicnn.register) and
    made by build_model. ``class_names`` name the model's outputs in order (default:
    CIFAR-10's ten for a model with ten outputs, else "0", "1", ...); ``normalization`` {"mean": [...], "std": [...]} is what images are
    normalized with before the model sees them (default: CIFAR-10's statistics, as
    minicnn.data.normalize and fit use). NaN or infinite parameters are refused
    (ValueError): load_model would refuse the file.
    """
    if not isinstance(model, Module):
        raise TypeError(f"save_model needs a minicnn Module, got {type(model).__name__}")
    header = model_header(model)
    outputs = model_io(model)[1]
    if class_names is None:
        class_names = default_class_names(outputs)
    metadata["class_names"] = _checked_class_names(class_names)
    if outputs is not None and len(metadata["class_names"]) != outputs:
        raise ValueError(f"{len(metadata['class_names'])} class names for a model with "
                         f"{outputs} outputs")
    metadata["normalization"] = _checked_normalization(normalization or default_normalization())
    arrays = model.state_dict()
    for name, value in arrays.items():
        if not bool(backend.array_module(value).isfinite(value).all()):
            raise ValueError(f"cannot save {display(path)}: parameter {name} holds NaN or "
                             "infinite values")
    return write_npz_atomic(path, arrays, {**metadata, **header})


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
    architecture in the file. The parameters are placed on the current backend. The
    metadata is checked (:func:`check_metadata`; missing class_names default to
    :func:`default_class_names`, missing normalization to CIFAR-10's statistics), the names, shapes and
    values of the arrays against the rebuilt model.
    """
    name = display(path)
    with NpzReader(path) as npz:
        metadata = check_metadata(npz.metadata(), name)
        model = model_from_metadata(metadata, source=name)
        _fill_and_check_io(model, metadata, name)
        load_parameters(model, npz.arrays(_shapes(model)), source=name)
    return model, metadata


def model_from_metadata(metadata: dict, source: str = "metadata"):
    """A model of fresh parameters as ``metadata`` describes it: a registered model by its
    name and config, any other from its architecture (CheckpointError if neither)."""
    name = metadata.get("model")
    if isinstance(name, str) and name in MODELS:
        try:
            return build_model(name, **(metadata.get("config") or {}))
        except MinicnnError as exc:
            raise CheckpointError(f"{source}: field config: {exc}") from None
    if metadata.get("architecture") is None:
        available = ", ".join(sorted(MODELS))
        raise CheckpointError(f"{source}: unknown model {name!r} and no architecture saved "
                              f"(registered models: {available}); build the same layers and "
                              "call minicnn.checkpoint.load_weights(model, path)")
    try:
        model = architecture.build(metadata["architecture"])
    except architecture.ArchitectureError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    except MemoryError:
        raise CheckpointError(f"{source}: its architecture is too large to build") from None
    if isinstance(name, str):       # registered where it was saved, not here: keep the name
        model.name, model.config = name, metadata.get("config") or {}
    return model


def load_weights(model, path) -> dict:
    """Load a weights file's parameters into ``model`` (the same layers as were saved,
    e.g. a hand-built Sequential); returns the file's checked metadata."""
    name = display(path)
    with NpzReader(path) as npz:
        metadata = check_metadata(npz.metadata(), name)
        _fill_and_check_io(model, metadata, name)
        load_parameters(model, npz.arrays(_shapes(model)), source=name)
    return metadata


def _shapes(model) -> dict:
    return {name: tuple(holder[key].shape) for name, holder, key in model.named_arrays()}


def _fill_and_check_io(model, metadata: dict, source: str) -> None:
    """class_names against the model's outputs (default: default_class_names),
    normalization against its input channels."""
    channels, outputs = model_io(model)
    names = metadata["class_names"]
    if names is None:
        metadata["class_names"] = default_class_names(outputs)
    elif names is not None and outputs is not None and len(names) != outputs:
        raise CheckpointError(f"{source}: field class_names has {len(names)} names, but the "
                              f"model has {outputs} outputs")
    if channels is not None and len(metadata["normalization"]["mean"]) != channels:
        raise CheckpointError(f"{source}: field normalization has "
                              f"{len(metadata['normalization']['mean'])} channels, the model "
                              f"takes {channels}")


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
