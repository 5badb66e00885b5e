"""Manifests: a model folder's files with their sizes and SHA-256, and checking a folder against its manifest.

`mochi_manifest.json` (written by `python -m mochi_preview.download`, shipped with the demo model) lists each file by
its path in the folder: {"files": {"dit.safetensors": {"size": 123, "sha256": "..."}, ...}}, plus where the files
came from. Files the manifest does not name are not checked. Loading calls `check_sizes` (cheap: a stat per file)
and, on request, `check_hashes` (reads every byte), over the weight files (settings files such as
mochi_defaults.json may be edited); both do nothing for a folder without a manifest. The command checks every file.

    python -m mochi_preview.verify DIR            check every file's size and SHA-256; exit 1 naming each bad file
    python -m mochi_preview.verify DIR --sizes    sizes only
    python -m mochi_preview.verify DIR --write    write a manifest of the files DIR holds now
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from .files import write_atomic

MANIFEST = "mochi_manifest.json"
FORMAT = 1
WEIGHTS = (".safetensors", ".bin", ".model")  # what loading checks; settings files (json) may be edited


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file and what is wrong."""


class CorruptFolderError(ValueError):
    """Files that do not match the folder's manifest; the message names each."""


@dataclass(frozen=True)
class Entry:
    """One file of a manifest."""

    size: int
    sha256: str


def sha256_of(path: str | Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _relative(name: str, manifest: Path) -> str:
    """A manifest path, refused if it could point outside the folder."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise ManifestError(f"{manifest}: {name!r} is not a path inside the folder")
    return name


def read_manifest(folder: str | Path) -> dict[str, Entry]:
    """The manifest of `folder`: relative path -> Entry."""
    path = Path(folder) / MANIFEST
    shape = '{"files": {"PATH": {"size": BYTES, "sha256": "HEX"}, ...}}'
    try:
        files = json.loads(path.read_text())["files"]
        named = {name: Entry(int(e["size"]), str(e["sha256"])) for name, e in files.items()}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"{path} is not a readable manifest ({type(e).__name__}: {e}); expected {shape}") from e
    entries = {_relative(name, path): entry for name, entry in named.items()}
    for name, entry in entries.items():
        if entry.size < 0 or len(entry.sha256) != 64 or set(entry.sha256) - set("0123456789abcdef"):
            raise ManifestError(f"{path}: {name!r} needs a size >= 0 and a 64-digit lowercase hex sha256")
    return entries


def write_manifest(folder: str | Path, entries: dict[str, Entry], source: dict | None = None) -> Path:
    """Write (or replace) `folder`'s manifest, whole or not at all."""
    doc = {"format": FORMAT, **({"source": source} if source else {})}
    doc["files"] = {name: asdict(entries[name]) for name in sorted(entries)}
    text = json.dumps(doc, indent=1) + "\n"
    return write_atomic(Path(folder) / MANIFEST, lambda tmp: tmp.write_text(text), replace=True)


def manifest_of(folder: str | Path) -> dict[str, Entry]:
    """Entries for every file in `folder` (hidden files and the manifest itself left out)."""
    folder = Path(folder)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    names = [n for n in names if n != MANIFEST and not any(part.startswith(".") for part in n.split("/"))]
    return {n: Entry((folder / n).stat().st_size, sha256_of(folder / n)) for n in names}


def problems(
    folder: str | Path,
    hashes: bool = True,
    progress: Callable[[str], object] | None = None,
    suffixes: tuple[str, ...] | None = None,
) -> list[str]:
    """One line per file that is missing, has the wrong size or (with `hashes`) the wrong SHA-256; [] if all match.
    Only files ending in `suffixes` when given. Raises FileNotFoundError without a manifest, ManifestError for an
    unreadable one."""
    folder = Path(folder)
    found = []
    for name, want in read_manifest(folder).items():
        if suffixes is not None and not name.endswith(suffixes):
            continue
        path = folder / name
        if not path.is_file():
            found.append(f"{name}: missing")
            continue
        if (size := path.stat().st_size) != want.size:
            found.append(f"{name}: {size:,} bytes, expected {want.size:,} (an interrupted or damaged download?)")
            continue
        if hashes:
            if progress is not None and size > 100 << 20:
                progress(f"hashing {name} ({size / 1e9:.2f} GB)")
            if (digest := sha256_of(path)) != want.sha256:
                found.append(f"{name}: SHA-256 {digest} differs from the manifest's {want.sha256} (corrupt file)")
    return found


def _check(folder: str | Path, hashes: bool) -> None:
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return
    if bad := problems(folder, hashes, suffixes=WEIGHTS):
        raise CorruptFolderError(
            f"{folder} does not match its manifest ({MANIFEST}): " + "; ".join(bad) + ". Download the named files "
            "again (python -m mochi_preview.download resumes), then check with `python -m mochi_preview.verify "
            f"{folder}`."
        )


def check_sizes(folder: str | Path) -> None:
    """Raise CorruptFolderError naming each weight file (WEIGHTS) whose size differs from the folder's manifest, or
    that is missing. A stat per file: for every load. Nothing happens for a folder without a manifest."""
    _check(folder, hashes=False)


def check_hashes(folder: str | Path) -> None:
    """Like `check_sizes`, and each weight file's SHA-256 too (reads all the bytes: for --verify)."""
    _check(folder, hashes=True)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mochi_preview.verify",
        description=f"Check a model folder against its manifest ({MANIFEST}): exit 0 if every file matches, 1 "
        "naming each bad file, 2 for usage errors.",
    )
    parser.add_argument("folder", type=Path, help="the model folder (it holds the manifest)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sizes", action="store_true", help="check sizes only (fast), not SHA-256")
    mode.add_argument("--write", action="store_true", help="write a manifest of the files the folder holds now")
    args = parser.parse_args(None if argv is None else list(argv))
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    if args.write:
        path = write_manifest(args.folder, manifest_of(args.folder))
        print(f"wrote {path} ({len(read_manifest(args.folder))} files)")
        return 0
    try:
        bad = problems(args.folder, hashes=not args.sizes, progress=lambda line: print(line, file=sys.stderr))
    except FileNotFoundError:
        parser.error(f"{args.folder} has no {MANIFEST}; `--write` makes one from the files it holds now")
    except ManifestError as e:
        parser.error(str(e))
    for line in bad:
        print(f"BAD {line}")
    if bad:
        print(f"{len(bad)} bad file(s) in {args.folder}", file=sys.stderr)
        return 1
    what = "sizes" if args.sizes else "sizes and SHA-256"
    print(f"OK: all {len(read_manifest(args.folder))} files in {args.folder} match the manifest ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
