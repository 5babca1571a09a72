"""CIFAR-10: find, download (md5-verified), load and validate; batches; augmentation.

Where the data comes from, in order:
  1. ``data_dir`` (the ``--data-dir`` option), else
  2. the ``MINICNN_DATA`` environment variable, else
  3. ``~/.cache/minicnn``, where :func:`download_cifar10` puts it.
Each may name the ``cifar-10-batches-py`` folder itself, a folder holding it,
or the official ``cifar-10-python.tar.gz`` tarball.

Images are kept as uint8 (N, 3, 32, 32) arrays on the backend; batches are
augmented there (random flip, random crop with padding) and only then
normalized to float32.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy

from minicnn import backend
from minicnn.errors import MinicnnError
from minicnn.files import display, open_regular
from minicnn.validation import describe

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the training set on pixel/255.
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)
DEFAULT_CACHE = Path.home() / ".cache" / "minicnn"
MAX_BATCH_BYTES = 256 * 2**20    # an official batch file is 31 MB


class DataError(MinicnnError):
    """The data set is missing, corrupt or not in the expected format."""


@dataclass
class Dataset:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,), on the host."""
    images: numpy.ndarray
    labels: numpy.ndarray
    class_names: tuple

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, limit: int | None) -> Dataset:
        if limit is None or limit >= len(self):
            return self
        return Dataset(self.images[:limit], self.labels[:limit], self.class_names)


# --- finding and downloading ----------------------------------------------------

def _batches_folder(path: Path) -> Path | None:
    """The folder holding the batch files, if ``path`` is it or contains it."""
    for candidate in (path, path / FOLDER):
        if os.path.lexists(candidate / TEST_FILE):      # not a regular file: refused on reading
            return candidate
    return None


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _extract_safely(archive: tarfile.TarFile, dest: Path) -> None:
    """Unpack only plain files and folders that stay inside ``dest``."""
    if hasattr(tarfile, "data_filter"):            # Python >= 3.10.12 / 3.11.4
        archive.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in archive.getmembers():
        target = (dest / member.name).resolve()
        if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
            raise tarfile.TarError(f"refusing to unpack {member.name!r}")
    archive.extractall(dest)


def extract_tarball(tarball: Path, dest: Path, md5: str | None = CIFAR10_MD5) -> Path:
    """Verify ``tarball`` against ``md5`` and unpack it into ``dest``; return the batches folder."""
    if md5 is not None and (actual := md5sum(tarball)) != md5:
        raise DataError(f"{tarball}: md5 {actual} does not match the official {md5}; "
                        "the file is corrupt or not the CIFAR-10 python tarball")
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        try:
            with tarfile.open(tarball, "r:gz") as archive:
                _extract_safely(archive, staging)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{tarball}: cannot unpack ({exc})") from None
        found = _batches_folder(staging)
        if found is None:
            raise DataError(f"{tarball}: no {FOLDER}/{TEST_FILE} inside the tarball")
        target = dest / FOLDER
        if target.exists():
            shutil.rmtree(target)
        os.replace(found, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def download_cifar10(dest: Path = DEFAULT_CACHE, url: str = CIFAR10_URL,
                     md5: str | None = CIFAR10_MD5, progress: bool = True) -> Path:
    """Download the tarball from ``url``, verify its md5, unpack into ``dest``."""
    from tqdm import tqdm  # noqa: PLC0415 - only needed here

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"CIFAR-10 not found; downloading {url} into {dest}", file=sys.stderr)
    fd, partial = tempfile.mkstemp(prefix=".download-", suffix=".tar.gz", dir=dest)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=30) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc="CIFAR-10",
                              disable=not progress) as bar:
                        while block := response.read(1 << 20):
                            out.write(block)
                            bar.update(len(block))
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise DataError(
                    f"could not download CIFAR-10 from {url} ({reason}); without a network, "
                    f"put the official python batches ({FOLDER}/) or {Path(url).name} in "
                    f"{dest}, or point --data-dir / MINICNN_DATA at them") from None
        return extract_tarball(Path(partial), dest, md5)
    finally:
        Path(partial).unlink(missing_ok=True)


def find_cifar10(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The folder of CIFAR-10 python batches; unpack or download it if needed."""
    env = os.environ.get("MINICNN_DATA")
    if data_dir is not None:
        source, root = "--data-dir", Path(data_dir)
    elif env:
        source, root = "MINICNN_DATA", Path(env)
    else:
        source, root = "the default cache", DEFAULT_CACHE
    root = root.expanduser()
    if root.is_file():                      # a tarball: unpack it beside itself, once
        return (_batches_folder(root.parent / FOLDER)
                or extract_tarball(root, root.parent, CIFAR10_MD5))
    if (found := _batches_folder(root)) is not None:
        return found
    tarball = root / Path(CIFAR10_URL).name
    if tarball.is_file():
        return extract_tarball(tarball, root, CIFAR10_MD5)
    if source != "the default cache" and root.exists() and any(root.iterdir()):
        raise DataError(f"{root} (from {source}) has no CIFAR-10 python batches: expected "
                        f"{TEST_FILE} in it or in {root / FOLDER}")
    if not download:
        raise DataError(f"CIFAR-10 not found in {root} (from {source})")
    return download_cifar10(root)


# --- loading and validating -------------------------------------------------------

class _BatchUnpickler(pickle.Unpickler):
    """Unpickles the official batches and refuses anything but plain data and arrays."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),    # NumPy 1 pickles
               ("numpy._core.multiarray", "_reconstruct"),   # NumPy 2 pickles
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}   # how Python 3 writes bytes in protocol-2 pickles

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    """The dict in a batch file: a regular file of at most MAX_BATCH_BYTES, unpickled with
    the allow-list (its cost is linear in the file's size)."""
    name = display(path)
    if not os.path.lexists(path):
        raise DataError(f"{name}: missing; the CIFAR-10 folder is incomplete")
    with open_regular(path, DataError, "CIFAR-10 batch") as f:
        if os.fstat(f.fileno()).st_size > MAX_BATCH_BYTES:
            raise DataError(f"{name}: larger than any CIFAR-10 batch ({MAX_BATCH_BYTES:,} bytes "
                            "at most)")
        try:
            content = _BatchUnpickler(f, encoding="bytes").load()
        except Exception as exc:  # any unpickling failure means a corrupt file
            raise DataError(f"{name}: not a CIFAR-10 python batch ({exc})") from None
    if not isinstance(content, dict):
        raise DataError(f"{name}: not a CIFAR-10 python batch (no dict inside)")
    return content


def check_batch(content: dict, source: str) -> tuple[numpy.ndarray, numpy.ndarray]:
    """The images and labels of an unpickled batch, checked before any is converted:
    b"data" a uint8 array (N, 3072); b"labels" a list of N ints (or an integer array)
    in 0..9. Nothing is walked beyond the top-level list, so shared or nested
    references cannot make the check expensive."""
    if b"data" not in content or b"labels" not in content:
        raise DataError(f"{source}: missing b'data' or b'labels'")
    data, labels = content[b"data"], content[b"labels"]
    if (not isinstance(data, numpy.ndarray) or data.dtype != numpy.uint8 or data.ndim != 2
            or data.shape[1] != 3 * 32 * 32):
        found = (f"shape {data.shape} and dtype {data.dtype}" if isinstance(data, numpy.ndarray)
                 else type(data).__name__)
        raise DataError(f"{source}: b'data' has {found}, expected a uint8 array (N, 3072)")
    n = data.shape[0]
    if n == 0:
        raise DataError(f"{source}: holds no images")
    if isinstance(labels, numpy.ndarray):
        if labels.dtype.kind not in "iu" or labels.shape != (len(labels),):
            raise DataError(f"{source}: b'labels' is a {labels.dtype} array of shape "
                            f"{labels.shape}, expected a list of class indices")
        values = labels
    elif isinstance(labels, list):
        bad = next((v for v in labels if type(v) is not int), None)
        if bad is not None:
            raise DataError(f"{source}: a label is {describe(bad)}, expected class indices "
                            f"0..{len(CLASS_NAMES) - 1}")
        values = labels
    else:
        raise DataError(f"{source}: b'labels' is {type(labels).__name__}, expected a list")
    if len(values) != n:
        raise DataError(f"{source}: {len(values)} labels for {n} images")
    if len(values) and (min(values) < 0 or max(values) >= len(CLASS_NAMES)):
        raise DataError(f"{source}: labels outside 0..{len(CLASS_NAMES) - 1}")
    return data.reshape(-1, 3, 32, 32), numpy.asarray(values, dtype=numpy.int64)


def load_batch(path: Path) -> tuple[numpy.ndarray, numpy.ndarray]:
    """One batch file -> (uint8 images (N, 3, 32, 32), int64 labels (N,)), validated."""
    return check_batch(_read_pickle(path), display(path))


def load_class_names(folder: Path) -> tuple:
    path = folder / META_FILE
    if not path.is_file():
        return CLASS_NAMES
    names = _read_pickle(path).get(b"label_names")
    if (not isinstance(names, list) or len(names) != len(CLASS_NAMES)
            or not all(isinstance(n, (bytes, str)) and 0 < len(n) <= 100 for n in names)):
        raise DataError(f"{display(path)}: expected {len(CLASS_NAMES)} label names")
    names = tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)
    if not all(n.isprintable() for n in names):
        raise DataError(f"{display(path)}: label names must be printable text")
    return names


def load_cifar10(data_dir=None, download: bool = True,
                 train: bool = True) -> tuple[Dataset | None, Dataset]:
    """(train, test) datasets from the official python batches; with ``train`` False,
    (None, test): the training batches are not read."""
    folder = find_cifar10(data_dir, download=download)
    names = load_class_names(folder)
    training = None
    if train:
        parts = [load_batch(folder / name) for name in TRAIN_FILES]
        training = Dataset(numpy.concatenate([p[0] for p in parts]),
                           numpy.concatenate([p[1] for p in parts]), names)
    test = Dataset(*load_batch(folder / TEST_FILE), names)
    return training, test


# --- normalization, batches, augmentation ----------------------------------------

def normalize(images_uint8, mean=CIFAR10_MEAN, std=CIFAR10_STD, dtype=numpy.float32):
    """uint8 (N, 3, H, W) -> float (x/255 - mean) / std per channel, on the same backend."""
    xp = backend.array_module(images_uint8)
    out = images_uint8.astype(dtype)
    out *= dtype(1.0 / 255.0)
    out -= xp.asarray(mean, dtype=dtype).reshape(1, -1, 1, 1)
    out /= xp.asarray(std, dtype=dtype).reshape(1, -1, 1, 1)
    return out


def random_flip(images, flip):
    """Mirror images left-right where the boolean array ``flip`` (N,) is True."""
    xp = backend.array_module(images)
    return xp.where(flip[:, None, None, None], images[..., ::-1], images)


PAD_MODES = ("zeros", "reflect")


def random_crop(images, offsets, padding: int, mode: str = "zeros"):
    """Pad by ``padding`` and cut the original size at per-image offsets (N, 2): a random
    translation by offset - padding. ``mode``: pad with zeros (black borders), or
    "reflect": mirror the image at its edges without repeating the edge pixel
    (numpy.pad's and PyTorch's "reflect"; airbench's translation)."""
    xp = backend.array_module(images)
    n, c, h, w = images.shape
    if mode == "reflect":
        padded = xp.pad(images, ((0, 0), (0, 0), (padding, padding), (padding, padding)),
                        mode="reflect")
    elif mode == "zeros":
        padded = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=images.dtype)
        padded[:, :, padding:padding + h, padding:padding + w] = images
    else:
        raise ValueError(f"pad mode must be one of {', '.join(PAD_MODES)}, got {mode!r}")
    rows = offsets[:, 0, None] + xp.arange(h)          # (N, H)
    cols = offsets[:, 1, None] + xp.arange(w)          # (N, W)
    batch = xp.arange(n)[:, None, None, None]
    channel = xp.arange(c)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


@dataclass
class EpochPlan:
    """All the randomness of one epoch, drawn at its start: the order of the
    samples and each sample's flip and crop. Drawing it from a generator seeded
    with (seed, epoch) makes an interrupted epoch resumable exactly."""
    order: object
    flip: object
    offsets: object


def plan_epoch(n: int, seed: int, epoch: int, shuffle: bool = True, crop_padding: int = 0):
    """The EpochPlan of epoch ``epoch`` for ``n`` samples, on the backend."""
    rng = backend.make_rng([seed, epoch])
    xp = backend.xp
    order = xp.argsort(rng.random(n)) if shuffle else xp.arange(n)
    flip = rng.random(n) < 0.5
    offsets = rng.integers(0, 2 * crop_padding + 1, size=(n, 2)) if crop_padding else None
    return EpochPlan(order, flip, offsets)


def batch_slices(n: int, batch_size: int):
    """(start, stop) of each batch; the last one may be smaller."""
    return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
