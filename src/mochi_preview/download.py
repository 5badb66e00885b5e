"""Download Mochi's weights from the Hugging Face Hub into a folder, only the files its layout needs.

    python -m mochi_preview.download DIR [--layout native|diffusers] [--variant bf16] [--fast]

- native (default): dit.safetensors, decoder.safetensors, encoder.safetensors (what Genmo's download script
  fetches) and T5 as diffusers stores it in the same repo (text_encoder/ + tokenizer/; safetensors, encoder only).
  `--fast`: the DiT of FastVideo/FastMochi (8-step distilled) instead; the VAE and T5 stay Genmo's.
- diffusers: model_index.json and the component folders, each component's weights in `--variant` (e.g. bf16) when
  it has them, else its plain ones. `--fast`: FastVideo/FastMochi-diffusers.

Sizes come from the Hub's file metadata first: the free disk space is checked before any byte is fetched. Downloads
resume where an interrupted one stopped (hidden `.NAME.part` files beside each file). Each file is hashed
once fetched and compared with the Hub's SHA-256 (its LFS hash); DIR/mochi_manifest.json then records every file's
size and SHA-256, for `python -m mochi_preview.verify DIR`. The Hub is `HF_ENDPOINT` when set.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .verify import MANIFEST, Entry, read_manifest, sha256_of, write_manifest

GENMO = "genmo/mochi-1-preview"
FAST_NATIVE = "FastVideo/FastMochi"
FAST_DIFFUSERS = "FastVideo/FastMochi-diffusers"
NATIVE_FILES = ("dit.safetensors", "decoder.safetensors", "encoder.safetensors")
T5_FOLDERS = ("text_encoder", "tokenizer")
ALWAYS_WHOLE = ("tokenizer", "scheduler")  # component folders fetched whole (small files, no weights)
SPARE_BYTES = 1 << 30  # free space to leave on the disk beyond the files


class DownloadError(RuntimeError):
    """A download that cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class HubFile:
    """A file to fetch: where it comes from, its size, and its SHA-256 when the Hub has it (LFS files)."""

    repo: str
    revision: str  # the commit it was listed at
    name: str
    size: int
    sha256: str | None


def weights_variant(name: str) -> str | None | bool:
    """The variant of a safetensors weight file ("bf16" for model.bf16-00001-of-00002.safetensors, None for a plain
    one), or False for a file that holds no weights."""
    m = re.fullmatch(r"[^/.]+(?:\.([^/.-]+))?(?:-\d+-of-\d+)?\.safetensors", name)
    if m:
        return m.group(1)
    m = re.fullmatch(r"[^/.]+\.safetensors\.index(?:\.([^/.]+))?\.json", name)
    return m.group(1) if m else False


def select_files(
    names: Iterable[str], variant: str | None, only: tuple[str, ...] | None = None, log=print
) -> list[str]:
    """The diffusers files of a repo listing: model_index.json and each component folder's (only those in `only`,
    e.g. T5's for a native folder); a component without `variant` weights gets its plain ones, which `log` says."""
    names = sorted(names)
    folders: dict[str, list[str]] = {}
    for name in names:
        if "/" in name:
            folders.setdefault(name.split("/")[0], []).append(name)
    wanted = only if only is not None else tuple(folders)
    chosen = [n for n in names if n == "model_index.json" and only is None]
    for folder in wanted:
        files = folders.get(folder, [])
        if folder in ALWAYS_WHOLE:
            chosen += [f for f in files if not f.split("/")[-1].startswith(".")]
            continue
        chosen += [f for f in files if f.count("/") == 1 and f.endswith("config.json")]
        weights = {f: weights_variant(f.split("/", 1)[1]) for f in files if f.count("/") == 1}
        mine = [f for f, v in weights.items() if v is not False and v == variant]
        if not mine and variant is not None:
            mine = [f for f, v in weights.items() if v is None]
            if mine:
                log(f"{folder}/ has no {variant} weights; fetching its plain ones")
        chosen += mine
    return chosen


def plan(
    layout: str, variant: str | None, fast: bool, endpoint: str | None, revision: str | None, log=print
) -> list[HubFile]:
    """Every file to fetch, with sizes and hashes from the Hub's metadata (one request per repo)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint)

    def listing(repo: str, rev: str | None = None) -> dict[str, HubFile]:
        info = api.model_info(repo, revision=rev, files_metadata=True)
        files = {}
        for s in info.siblings or []:
            size, sha256 = (s.lfs.size, s.lfs.sha256) if s.lfs is not None else (s.size, None)
            files[s.rfilename] = HubFile(repo, info.sha, s.rfilename, int(size or 0), sha256)
        return files

    if layout == "diffusers":
        repo = FAST_DIFFUSERS if fast else GENMO
        files = listing(repo, revision)
        names = select_files(files, variant, log=log)
        if "model_index.json" not in names or not any(n.startswith("transformer/") for n in names):
            raise DownloadError(f"{repo} does not look like a diffusers Mochi repo (no model_index.json/transformer/)")
        return [files[n] for n in names]
    genmo = listing(GENMO, None if fast else revision)
    dits = listing(FAST_NATIVE, revision) if fast else genmo  # FastMochi: its DiT; the VAE and T5 are Genmo's
    chosen = [dits[n] for n in NATIVE_FILES[:1] if n in dits] + [genmo[n] for n in NATIVE_FILES[1:] if n in genmo]
    missing = [n for n in NATIVE_FILES if n not in {f.name for f in chosen}]
    if missing:
        raise DownloadError(f"no {', '.join(missing)} in {FAST_NATIVE if fast else GENMO}: is it Mochi's native repo?")
    return chosen + [genmo[n] for n in select_files(genmo, None, only=T5_FOLDERS)]


def _have(folder: Path, f: HubFile) -> int:
    """Bytes of `f` already in `folder`: all of it when the file is there whole, else what an interrupted run left."""
    path = folder / f.name
    if path.is_file() and path.stat().st_size == f.size:
        return f.size
    part = path.parent / f".{path.name}.part"
    return min(part.stat().st_size, f.size) if part.is_file() else 0


def check_space(folder: Path, files: list[HubFile]) -> int:
    """Bytes still to fetch; DownloadError if the disk of `folder` cannot hold them (plus SPARE_BYTES)."""
    need = sum(f.size - _have(folder, f) for f in files)
    probe = folder if folder.exists() else next(p for p in folder.parents if p.exists())
    free = shutil.disk_usage(probe).free
    if need + SPARE_BYTES > free:
        raise DownloadError(
            f"not enough disk space in {probe}: {need / 1e9:.1f} GB to fetch (+{SPARE_BYTES / 1e9:.1f} GB spare), "
            f"{free / 1e9:.1f} GB free. Free some space or choose another folder (--variant bf16 halves the weights "
            "of the diffusers layout)."
        )
    return need


def fetch_file(url: str, dest: Path, size: int, attempts: int = 5) -> None:
    """GET `url` into `dest`, resuming from the hidden `.NAME.part` that an interrupted run left; `dest` appears
    only whole (renamed after fsync)."""
    from huggingface_hub.utils import build_hf_headers, get_session

    part = dest.parent / f".{dest.name}.part"
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        headers = build_hf_headers() | ({"Range": f"bytes={have}-"} if have else {})
        try:
            with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=60) as r:
                r.raise_for_status()
                with open(part, "ab" if r.status_code == 206 else "wb") as f:  # 200: the server sent it all
                    for chunk in r.iter_bytes():  # as it arrives: an error loses nothing received
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
        except Exception as e:  # network errors come from several libraries; all mean the same here
            if attempt == attempts - 1:
                raise DownloadError(
                    f"{dest.name}: the download stopped ({type(e).__name__}: {e}) with {part.stat().st_size:,} of "
                    f"{size:,} bytes. Run the command again: it resumes where it stopped."
                ) from e
            continue
        if part.stat().st_size == size:
            os.replace(part, dest)
            return
    raise DownloadError(f"{dest.name}: the server sent {part.stat().st_size:,} bytes, the Hub lists {size:,}")


def fetch(folder: Path, files: list[HubFile], endpoint: str | None, log=print) -> dict[str, Entry]:
    """Download each file not yet whole (resuming), check it against the Hub's size and SHA-256; the manifest."""
    from huggingface_hub import hf_hub_url

    known = {}
    if (folder / MANIFEST).is_file():
        try:
            known = read_manifest(folder)
        except ValueError:
            known = {}
    entries = {}
    for f in files:
        path = folder / f.name
        if not (path.is_file() and path.stat().st_size == f.size):
            log(f"{f.repo}: {f.name} ({f.size / 1e9:.2f} GB)")
            path.unlink(missing_ok=True)
            fetch_file(hf_hub_url(f.repo, f.name, revision=f.revision, endpoint=endpoint), path, f.size)
        entry = known.get(f.name)
        if entry is None or entry.size != f.size or (f.sha256 and entry.sha256 != f.sha256):
            entry = Entry(path.stat().st_size, sha256_of(path))
        if f.sha256 is not None and entry.sha256 != f.sha256:
            path.unlink()
            raise DownloadError(
                f"{f.name} from {f.repo} does not match the Hub's SHA-256 ({entry.sha256}, the Hub lists "
                f"{f.sha256}); it was removed. Run the command again to fetch it anew."
            )
        entries[f.name] = entry
    return entries


def download(
    folder: str | Path,
    layout: str = "native",
    variant: str | None = None,
    fast: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
    log=print,
) -> Path:
    """Fetch the files `layout` needs into `folder` and write its manifest; returns the manifest's path."""
    if layout not in ("native", "diffusers"):
        raise ValueError(f"layout must be 'native' or 'diffusers', not {layout!r}")
    if variant is not None and layout != "diffusers":
        raise ValueError(f"--variant {variant} applies to --layout diffusers (the native files have no variants)")
    folder = Path(folder)
    endpoint = endpoint or os.environ.get("HF_ENDPOINT")
    files = plan(layout, variant, fast, endpoint, revision, log)
    need = check_space(folder, files)
    total = sum(f.size for f in files)
    log(f"{len(files)} files, {total / 1e9:.2f} GB ({need / 1e9:.2f} GB still to fetch) into {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    entries = fetch(folder, files, endpoint, log)
    source = {f.repo: f.revision for f in files}
    return write_manifest(folder, entries, source={"hub": endpoint or "https://huggingface.co", "repos": source})


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mochi_preview.download",
        description="Download Mochi 1 preview's weights from the Hugging Face Hub (only the files the layout "
        "needs; resumable; free space checked first) and write a manifest for `python -m mochi_preview.verify`.",
    )
    parser.add_argument("folder", type=Path, help="where the model folder goes")
    parser.add_argument("--layout", choices=("native", "diffusers"), default="native", help="default: native")
    parser.add_argument("--variant", help="diffusers layout: weights variant, e.g. bf16 (half the size)")
    parser.add_argument("--fast", action="store_true", help="FastVideo's 8-step distilled FastMochi DiT")
    parser.add_argument("--revision", help="a branch, tag or commit of the main repo (default: main)")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.variant is not None and args.layout != "diffusers":
        parser.error(f"--variant {args.variant} applies to --layout diffusers (the native files have no variants)")
    if args.folder.exists() and not args.folder.is_dir():
        parser.error(f"{args.folder} exists and is not a folder")
    from huggingface_hub.errors import HfHubHTTPError

    try:
        manifest = download(args.folder, args.layout, args.variant, args.fast, args.revision)
    except (DownloadError, HfHubHTTPError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: {args.folder} (manifest {manifest.name}; check it any time with python -m mochi_preview.verify)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
