"""Writing files and folders whole or not at all: the one place outputs are published.

A file is written to a hidden temporary name beside its destination, flushed to disk, then published: by a hard link
(atomic, and refused if the destination exists) when it must not replace anything, by `os.replace` when it may.
Any failure removes the temporary file, so a reader sees the old state or the new one, never a half-written file.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _temporary_name(path: Path) -> Path:
    return path.parent / f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"


def _publish(tmp: Path, path: Path, replace: bool) -> None:
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails if `path` exists
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; not overwriting it") from None
    except OSError:  # a filesystem without hard links: a checked rename (a tiny race window remains)
        if path.exists():
            raise FileExistsError(f"{path} already exists; not overwriting it") from None
        os.rename(tmp, path)


def write_atomic(path: str | Path, write: Callable[[Path], object], *, replace: bool = False) -> Path:
    """Run `write(tmp)` on a hidden temporary file beside `path`, fsync it, then publish it as `path`.

    replace=False (default) refuses an existing `path`, before any work and again at publication.
    """
    path = Path(path)
    if not replace and path.exists():
        raise FileExistsError(f"{path} already exists; not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # unlike mkstemp, respects the umask
    mode = tmp.stat().st_mode & 0o777
    try:
        write(tmp)
        if tmp.stat().st_mode & 0o777 != mode:  # a writer that re-created the file (safetensors: 0600) gets the umask's
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:  # on disk before it becomes visible under its real name
            os.fsync(f.fileno())
        _publish(tmp, path, replace)
    finally:
        tmp.unlink(missing_ok=True)  # after a link `path` keeps the data; after an error nothing is left
    return path


@contextmanager
def atomic_dir(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `path`; on success it becomes `path` (a folder appears whole).

    An existing `path` is replaced only with replace=True; a concurrent writer that finished first wins otherwise.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if replace and path.exists():
            shutil.rmtree(path)
        try:
            tmp.rename(path)
        except OSError:
            if not path.is_dir():
                raise
            # another process published the same folder first: keep theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
