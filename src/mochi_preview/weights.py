"""Checkpoint files: safe opening, key layouts (native, ComfyUI, diffusers) and loading into a target dtype.

Every loader here reads safetensors only, memory-mapped, one tensor at a time, and casts each tensor to its target
dtype as it is read: loading a 40 GB fp32 DiT as bf16 never holds more than one fp32 tensor at once.

A *layout* maps each native key of a model to a `Recipe`: the source keys in the file and the transform that builds
the native tensor from them (identity, a concatenation, a half swap). The same recipes, run on meta tensors, give
the native shapes without reading any data, which is how configs are inferred from checkpoints.
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be loaded; the message says what is wrong and what was expected."""


def _describe_non_safetensors(path: Path) -> str | None:
    """A message if `path` is a pickle rather than safetensors (which starts: header length, then '{')."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= path.stat().st_size:
        return None
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or path.suffix in PICKLE_SUFFIXES:
        return (
            f"{path} is a PyTorch pickle, not a safetensors file. Pickles can run arbitrary code when loaded, so "
            "they are refused. Convert it once, in an environment you trust, with "
            "`safetensors.torch.save_file(torch.load(p, weights_only=True), 'model.safetensors')`."
        )
    return None


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class _MappedFile:
    """One safetensors file, memory-mapped; pages are released after each read so RSS stays flat."""

    def __init__(self, path: Path):
        try:
            with safe_open(str(path), framework="pt") as handle:  # the library validates header and coverage
                names = list(handle.keys())
        except SafetensorError as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({e}). It may be truncated (an interrupted "
                f"download: {path.stat().st_size:,} bytes on disk) or corrupt; download it again."
            ) from e
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.path, self._data_start = path, 8 + header_len
        self.entries = {name: header[name] for name in names}

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self.entries[name]["shape"])

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh tensor (cast to `dtype` straight from the mapping), never a view of the file."""
        entry = self.entries[name]
        stored = _DTYPES.get(entry["dtype"])
        if stored is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = (self._data_start + o for o in entry["data_offsets"])
        with warnings.catch_warnings():  # the mapping is read-only; we only read from the view
            warnings.simplefilter("ignore", UserWarning)
            view = torch.frombuffer(self._map, dtype=stored, count=(end - begin) // stored.itemsize, offset=begin)
        tensor = view.reshape(entry["shape"]).to(dtype or stored, copy=True)
        del view
        page = mmap.PAGESIZE
        start = begin - begin % page
        if hasattr(self._map, "madvise") and end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)  # drop the file pages from our RSS
        return tensor


class SafetensorsFiles:
    """Read-only view of one or more safetensors files (a sharded checkpoint) as a single key space."""

    def __init__(self, paths: Iterable[str | Path], strip_prefix: str = ""):
        self._files: dict[Path, _MappedFile] = {}
        self._where: dict[str, tuple[Path, str]] = {}  # key without prefix -> (file, key in file)
        for path in map(Path, paths):
            if not path.is_file():
                raise CheckpointError(f"checkpoint file not found: {path}")
            if (problem := _describe_non_safetensors(path)) is not None:
                raise CheckpointError(problem)
            mapped = self._files[path] = _MappedFile(path)
            for key in mapped.entries:
                name = key[len(strip_prefix) :] if strip_prefix and key.startswith(strip_prefix) else key
                self._where[name] = (path, key)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> torch.Size:
        path, name = self._where[key]
        return self._files[path].shape(name)

    def stored_dtype(self, key: str) -> str:
        """The safetensors dtype name in the file header ("F16", "F8_E4M3", ...), without reading the data."""
        path, name = self._where[key]
        return self._files[path].entries[name]["dtype"]

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor with the stored shape: for shape arithmetic without reading data."""
        return torch.empty(self.shape(key), device="meta")

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, in `dtype` if given (cast while reading: no full-precision copy is kept)."""
        path, name = self._where[key]
        return self._files[path].read(name, dtype)

    def select(self, prefix: str) -> SafetensorsFiles:
        """The tensors whose names start with `prefix`, named without it (e.g. one half of a diffusers VAE)."""
        view = object.__new__(SafetensorsFiles)
        view._files = self._files
        view._where = {k[len(prefix) :]: where for k, where in self._where.items() if k.startswith(prefix)}
        return view

    def dtypes(self) -> set[str]:
        return {self._files[p].entries[k]["dtype"] for p, k in self._where.values()}


def peek_keys(path: str | Path) -> list[str]:
    """The tensor names in one safetensors file, validating it on the way."""
    return SafetensorsFiles([path]).keys()


def open_checkpoint(path: str | Path, prefixes: Iterable[str] = ()) -> SafetensorsFiles:
    """Open a safetensors file, or a folder holding one file or a sharded `*.safetensors.index.json` set.

    A key prefix among `prefixes` (e.g. ComfyUI's `model.diffusion_model.`) that every key carries is stripped.
    """
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        singles = sorted(path.glob("*.safetensors"))
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{indexes[0]} is not a valid safetensors index (no weight_map)") from e
            files = [path / name for name in sorted(set(weight_map.values()))]
        elif len(singles) == 1:
            files = singles
        elif not singles:
            pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            hint = f" (found pickles {pickles}: these are refused; convert them to safetensors)" if pickles else ""
            raise CheckpointError(f"no .safetensors file in {path}{hint}")
        else:
            raise CheckpointError(
                f"{path} holds several .safetensors files {[p.name for p in singles]} but no "
                "*.safetensors.index.json saying which tensors each holds"
            )
    else:
        files = [path]
    files_view = SafetensorsFiles(files)
    keys = files_view.keys()
    for prefix in prefixes:
        if keys and all(k.startswith(prefix) for k in keys):
            return SafetensorsFiles(files, strip_prefix=prefix)
    return files_view


# ---------------------------------------------------------------------------------------------------------------
# Layouts: native key -> recipe over the file's keys


@dataclass(frozen=True)
class Recipe:
    """How one native tensor is built from tensors of a file."""

    sources: tuple[str, ...]
    combine: Callable[..., torch.Tensor] | None = None  # None: the single source as it is

    def build(self, read: Callable[..., torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        tensors = [read(k, dtype) if dtype is not None else read(k) for k in self.sources]
        return tensors[0] if self.combine is None else self.combine(*tensors)


def concat_rows(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """[a; b] -> [b; a] along dim 0 (its own inverse)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def identity_layout(keys: Iterable[str]) -> dict[str, Recipe]:
    return {k: Recipe((k,)) for k in keys}


def native_shapes(files: SafetensorsFiles, layout: Mapping[str, Recipe]) -> dict[str, torch.Size]:
    """Shapes of the native tensors the layout would build, computed on meta tensors (no data read)."""
    return {
        name: recipe.build(files.meta).shape
        for name, recipe in layout.items()
        if all(k in files for k in recipe.sources)
    }


def _few(names: Iterable[str], n: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_into_module(
    module: nn.Module,
    files: SafetensorsFiles,
    layout: Mapping[str, Recipe],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    fp32_names: Iterable[str] = (),
    what: str = "checkpoint",
) -> nn.Module:
    """Fill `module` (which may live on the meta device) from `files` through `layout`, strictly.

    Keys the layout does not list are read under their own name.

    Each tensor is read from the memory map, cast to `dtype` (or fp32 for names in `fp32_names`) and moved to
    `device` before the next is read. Missing, unexpected and mis-shaped tensors are reported by name.
    """
    expected = dict(module.state_dict(keep_vars=True))
    layout = {name: layout.get(name, Recipe((name,))) for name in expected}  # unlisted keys keep their name
    needed_sources = {k for name in expected for k in layout[name].sources}
    missing = sorted(k for k in needed_sources if k not in files)
    unexpected = sorted(set(files.keys()) - needed_sources)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors ({_few(unexpected)})")
        raise CheckpointError(
            f"{what} does not match the model: " + "; ".join(parts) + ". Is this the right file for this model?"
        )
    shapes = native_shapes(files, layout)
    for name, param in expected.items():
        if shapes[name] != param.shape:
            raise CheckpointError(
                f"{what}: tensor {name!r} has shape {tuple(shapes[name])} in the file but the model expects "
                f"{tuple(param.shape)}"
            )

    fp32_names = set(fp32_names)
    state = {}
    for name in expected:
        target = torch.float32 if name in fp32_names else dtype
        state[name] = layout[name].build(files.get, target).to(device)
    module.load_state_dict(state, strict=True, assign=True)
    return module
