"""A run's output files: the name claimed when the run starts, the video and its sidecar published whole at the end.

A run claims its video's name (`output_x.mp4`) by creating the hidden per-run folder `.output_x.mp4.run/` in one
atomic rename: the folder is made under a random name with a lock file inside, locked (`flock`, held until the process
ends), then renamed to the claim's name, which fails when another run's folder is there. Any number of runs can
claim names in one folder at once and each gets its own. Every temporary file of the run lives in its folder.

Publishing: the video and its sidecar are written and fsynced in the run folder, then hard-linked under their final
names (atomic, and never replacing a file): the sidecar first, the video last, as the commit point; the run folder
is then removed. A failure at any step removes what this run published. A run killed outright (kill -9) leaves its
folder, whose lock the kernel released: the next claim in that folder removes it, and the sidecar it published
without its video.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

LOCK = "lock"
RUN_SUFFIX = ".run"
CLAIMING = ".mochi-claim-"  # prefix of a claim folder being set up (before its rename)
SETUP_GRACE = 60.0  # seconds: an unrenamed claim folder older than this belongs to a dead process
PARTIAL = re.compile(r"\..+\.partial-(\d+)-[0-9a-f]+")  # files.write_atomic's temporary names
MARGIN = 1 << 20  # bytes kept free beyond a video's estimated size
SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}

published: list[Path] = []  # every video this process published, in order (a signal handler can tell what exists)
_held: dict[Path, Claim] = {}  # claims of this process, by video path


def sidecar_of(video: Path) -> Path:
    return video.with_suffix(".json")


def run_dir_of(video: Path) -> Path:
    return video.parent / f".{video.name}{RUN_SUFFIX}"


@dataclass
class Claim:
    """A video name this process holds: `path` (the .mp4), its run folder and the lock on it."""

    path: Path
    run_dir: Path
    fd: int
    made_dirs: list[Path] = field(default_factory=list)  # folders the claim created (removed again when empty)

    def tmp(self, name: str) -> Path:
        """A temporary file's path in this run's folder."""
        return self.run_dir / name

    def publish(self, write_video: Callable[[Path], object], sidecar: Callable[[Path], dict]) -> Path:
        """Write the video (`write_video(tmp)`), then its sidecar (`sidecar(tmp video) -> dict`), and publish both;
        on any failure nothing of this run remains and the error says what exists. Releases the claim."""
        video, record = self.tmp(self.path.name), self.tmp(sidecar_of(self.path).name)
        try:
            write_video(video)
            _write_text(record, json.dumps(sidecar(video), indent=2, ensure_ascii=False, default=str) + "\n")
            for f in (video, record):
                _fsync(f)
            with signals_deferred():  # a signal now lands after the commit, or before the first link
                _link(record, sidecar_of(self.path))
                try:
                    _link(video, self.path)  # the commit point
                except BaseException:
                    _unlink_if_same(sidecar_of(self.path), record)
                    raise
                published.append(self.path)
        except OSError as e:
            self.release()
            raise OSError(e.errno, f"{_what_failed(e, self.path)}; {_left(self.path)}") from None
        except BaseException:
            self.release()
            raise
        self.release(keep_dirs=True)
        try:
            _fsync(self.path.parent)  # the new names on disk too
        except OSError:
            pass
        return self.path

    def release(self, keep_dirs: bool = False) -> None:
        """Give the name back: remove the run folder (and the folders the claim made, when empty), unlock."""
        if self.fd < 0:
            return
        _held.pop(self.path, None)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        os.close(self.fd)
        self.fd = -1
        if not keep_dirs:
            for d in reversed(self.made_dirs):
                try:
                    d.rmdir()
                except OSError:
                    break


def claim(path: str | Path) -> Claim:
    """Claim `path` (a .mp4) for this process: FileExistsError when it, its sidecar or another live run's claim is
    there. Creates the folder (and removes leftovers of dead runs in it)."""
    path = Path(path).absolute()
    if path in _held:
        raise FileExistsError(f"{path} is being written by another run of this process")
    made = _make_dirs(path.parent)
    clean(path.parent)  # first: a dead run's sidecar without its video must not hold the name
    try:
        for p in (path, sidecar_of(path)):
            if p.exists():
                raise FileExistsError(f"{p} exists; not overwriting it")
        c = _claim(path, made)
    except BaseException:
        for d in reversed(made):
            _rmdir_quietly(d)
        raise
    _held[path] = c
    return c


def claim_for(path: str | Path) -> Claim:
    """The claim this process holds on `path` (from `new_output_path`), or a new one."""
    return _held.get(Path(path).absolute()) or claim(path)


def release(path: str | Path) -> None:
    """Give back a name `new_output_path` or `claim` took, unused."""
    c = _held.get(Path(path).absolute())
    if c is not None:
        c.release()


def new_output_path(out_dir: str | Path, prefix: str = "output", suffix: str = ".mp4") -> Path:
    """Claim a fresh `out_dir/<prefix>_<YYYYmmdd_HHMMSS>[_N]<suffix>` and return it (concurrent runs get distinct
    names); `generate` publishes there and gives the name back on failure (`release` gives it back unused)."""
    out_dir = Path(out_dir)
    stem = f"{prefix}_{time.strftime('%Y%m%d_%H%M%S')}"
    for n in range(10_000):
        path = out_dir / (f"{stem}{suffix}" if n == 0 else f"{stem}_{n}{suffix}")
        try:
            return claim(path).path
        except FileExistsError:
            continue
    raise FileExistsError(f"{out_dir}: no free name {stem}_N{suffix} for N < 10000")


def clean(folder: Path) -> list[Path]:
    """Remove what dead runs left in `folder` (their run folders, and a sidecar published without its video);
    returns what was removed. A run's folder is dead when nobody holds its lock (the kernel drops it on kill -9)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if name.startswith(CLAIMING):
            if _age(entry) > SETUP_GRACE:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
        elif name.startswith(".") and name.endswith(RUN_SUFFIX) and entry.is_dir(follow_symlinks=False):
            run_dir = Path(entry.path)
            if _remove_if_dead(run_dir):
                removed.append(run_dir)
        elif (m := PARTIAL.fullmatch(name)) and not _alive(int(m[1])) and _age(entry) > SETUP_GRACE:
            Path(entry.path).unlink(missing_ok=True)  # files.write_atomic's temporary file of a dead process
            removed.append(Path(entry.path))
    return removed


def estimated_bytes(num_frames: int, height: int, width: int) -> int:
    """A generous size of a video's MP4 and sidecar: a tenth of its raw RGB frames, plus a MiB."""
    return num_frames * height * width * 3 // 10 + MARGIN


def check_space(folder: str | Path, needed: int, what: str = "--out_dir") -> None:
    """OSError(ENOSPC) naming `what` when the file system of `folder` (or of its nearest existing parent) has less
    than `needed` bytes free."""
    base = _existing_parent(Path(folder))
    free = shutil.disk_usage(base).free
    if free < needed:
        need = f"{_mib(free)} free on its disk, a video of this size needs about {_mib(needed)}"
        raise OSError(errno.ENOSPC, f"{what} {folder}: {need}")


def check_writable(folder: str | Path, what: str = "--out_dir") -> None:
    """ValueError naming `what` when files cannot be created in `folder` (or, if it does not exist yet, where it
    would be created); creates nothing."""
    folder = Path(folder)
    base = _existing_parent(folder)
    if not base.is_dir():
        raise ValueError(f"{what} {folder}: {base} is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        where = "" if base == folder else f" (it would be created in {base})"
        raise ValueError(f"{what} {folder} is not writable{where}")


@contextmanager
def signals_deferred():
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends (a short step that must finish once begun)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ---- helpers ---------------------------------------------------------------------------------------------------


def _claim(path: Path, made: list[Path]) -> Claim:
    setup = path.parent / f"{CLAIMING}{os.getpid()}-{secrets.token_hex(4)}"
    setup.mkdir()
    fd = os.open(setup / LOCK, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.rename(setup, run_dir_of(path))  # fails when another run's (never empty) folder holds the name
    except BaseException as e:
        shutil.rmtree(setup, ignore_errors=True)
        os.close(fd)
        if isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(f"{path} is being written by another run") from None
        raise
    c = Claim(path, run_dir_of(path), fd, made)
    if os.fstat(fd).st_nlink == 0:  # a cleaner removed the lock file while it was set up (not seen in practice)
        os.close(fd)
        raise FileExistsError(f"{path}: the claim was removed while it was made")
    if taken := [p for p in (path, sidecar_of(path)) if p.exists()]:  # published since the first check
        c.release(keep_dirs=True)
        raise FileExistsError(f"{taken[0]} exists; not overwriting it")
    return c


def _remove_if_dead(run_dir: Path) -> bool:
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except FileNotFoundError:  # a cleaner stopped half way: nobody owns it
        shutil.rmtree(run_dir, ignore_errors=True)
        return True
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live run
        video = run_dir.parent / run_dir.name[1 : -len(RUN_SUFFIX)]
        if not video.exists():  # killed between the sidecar's link and the video's: not committed
            _unlink_if_same(sidecar_of(video), run_dir / sidecar_of(video).name)
        shutil.rmtree(run_dir, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def _age(entry: os.DirEntry) -> float:
    return time.time() - entry.stat(follow_symlinks=False).st_mtime


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _link(src: Path, dst: Path) -> None:
    """Publish `src` as `dst` atomically, never replacing a file."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"{dst} exists; not overwriting it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if dst.exists():  # a file system without hard links: a checked rename (a tiny race window remains)
            raise FileExistsError(errno.EEXIST, f"{dst} exists; not overwriting it") from None
        os.rename(src, dst)


def _unlink_if_same(published_path: Path, ours: Path) -> None:
    try:
        if os.path.samefile(published_path, ours):
            published_path.unlink()
    except OSError:
        pass


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; the ones created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    made = []
    for d in reversed(missing):
        try:
            d.mkdir()
            made.append(d)
        except FileExistsError:
            pass
    return made


def _rmdir_quietly(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass


def _existing_parent(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _what_failed(e: OSError, path: Path) -> str:
    text = e.strerror or str(e)
    return text if str(path) in text or str(path.parent) in text else f"writing {path}: {text}"


def _left(path: Path) -> str:
    """What exists of a video and its sidecar after a failed publication (this run's part is removed)."""
    there = [str(p) for p in (path, sidecar_of(path)) if p.exists()]
    if not there:
        return f"nothing was written (neither {path.name} nor {sidecar_of(path).name} exists)"
    return f"nothing was written by this run ({' and '.join(there)} exist, from another writer)"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
