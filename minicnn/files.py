"""Files read and written safely, and file names shown safely.

- :func:`open_regular` opens a file for reading only if it is a regular file: a
  FIFO would block forever, a device such as /dev/zero would never end.
- :func:`atomic_write` writes beside the target and renames over it, so an
  interrupted write never leaves a half-written file; :func:`remove_stray_temp_files`
  removes what a killed process (SIGKILL, power loss) left of such a write.
- :func:`printable` / :func:`display` turn any text or file name into one line
  of printable text, whatever its bytes (a name that is not UTF-8, a newline).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path

from minicnn.errors import MinicnnError

TEMP_SUFFIX = ".tmp"


def printable(text: str) -> str:
    """``text`` as one line of printable characters: bytes of a file name that were not
    UTF-8 (Python keeps them as surrogates) become \\xNN, control characters \\n, \\x1b, ..."""
    out = []
    for char in text:
        if "\udc80" <= char <= "\udcff":                # an undecodable byte of a file name
            out.append(f"\\x{ord(char) - 0xdc00:02x}")
        elif char.isprintable():
            out.append(char)
        else:
            out.append(char.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def display(path) -> str:
    """A file name as printable text (see :func:`printable`); unchanged for ordinary names."""
    name = path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else os.fspath(path)
    return printable(name)


def open_regular(path, error=MinicnnError, what: str = "file"):
    """Open ``path`` for reading in binary mode if it is a regular file; otherwise raise
    ``error`` with one line naming it (missing, a folder, a pipe or device, unreadable)."""
    name = display(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; regular files ignore it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except OSError as exc:
        raise error(f"{name}: cannot open ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise error(f"{name}: is a folder, not a {what}")
        if not stat.S_ISREG(mode):
            raise error(f"{name}: not a regular file (a pipe, device or socket); "
                        "refusing to read it")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sha256(path) -> str:
    """The SHA-256 of a regular file's bytes, as hex."""
    digest = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file beside ``path``; rename it over ``path`` only on success.

    The data and the rename are flushed to disk (fsync of the file, then of the
    folder), so after a crash the file is either the old one or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
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
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:              # some file systems cannot sync a folder; the data is synced
        pass
    finally:
        os.close(fd)


def stray_temp_files(path) -> list[Path]:
    """The temporary files :func:`atomic_write` made for ``path`` and never renamed (the
    process was killed during the write): ``.NAME.<8 random characters>.tmp``."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [path.parent / name for name in names if pattern.fullmatch(name)]


def remove_stray_temp_files(path) -> list[Path]:
    """Remove :func:`stray_temp_files` of ``path``; returns what was removed."""
    removed = []
    for stray in stray_temp_files(path):
        with contextlib.suppress(FileNotFoundError):
            stray.unlink()
            removed.append(stray)
    return removed
