"""Checkpoints: one reader interface, the safetensors reader, the fp8 view, layouts and the one loading function.

A `CheckpointReader` gives a checkpoint's tensors by name: keys, shapes and dtypes from the header alone, and each
tensor read on its own, memory-mapped and cast while reading, so loading a 40 GB fp32 DiT as bf16 never holds more
than one fp32 tensor at once. Every tensor is checked for NaN / Inf as it is copied (an error names the file and the
tensor). `SafetensorsReader` reads files (pickles are refused: they can run code); `PickleReader` reads the one
pickle accepted, T5's `pytorch_model.bin`, with `torch.load(weights_only=True)` (no code runs); `Fp8Reader` wraps any
reader and shows fp8 checkpoints as ordinary ones.

A *layout* maps the model's own (native) tensor names to a `Source`: the reader keys a tensor is built from and the
transform that builds it (a concatenation, a half swap). A name the layout does not list is read under its own name,
so the native layout is `{}`. `Source.shape` runs the transform on meta tensors: shapes, and the configs inferred from
them, come without reading any data. `load_module` fills a module through a layout, strictly.

FP8 checkpoints (DiT files with native keys) that `Fp8Reader` reads:

- plain "fp8_e4m3fn" (Kijai's and ComfyUI's ~10 GB repacks): weights stored as float8_e4m3fn, no scale: the stored
  value is the weight (scale 1).
- ComfyUI "fp8_scaled": float8_e4m3fn weights, a fp32 `<layer>.scale_weight` per quantized Linear (weight = fp8 *
  scale_weight) and a marker tensor `scaled_fp8`. Facts from ComfyUI's source (comfyanonymous/ComfyUI):
  comfy/ops.py `scaled_fp8_ops` gives each Linear a `scale_weight` (default `ones(())`) and computes with
  `weight * scale_weight`; comfy/model_detection.py `model_config_from_unet` pops `{prefix}scaled_fp8`, whose dtype
  names the weights' fp8 dtype (a fp32 marker meaning e4m3fn). An optional `<layer>.scale_input` is ignored: it is
  the static activation scale of ComfyUI's fp8 x fp8 matmul (`fp8_linear` casts input / scale_input to fp8 for
  `torch._scaled_mm`); we never quantize activations, so it plays no part in the result.
- ComfyUI's newer per-layer format, into which comfy/utils.py `convert_old_quants` rewrites the one above
  (scale_weight -> `weight_scale`, scale_input -> `input_scale`, plus `<layer>.comfy_quant`, JSON bytes such as
  {"format": "float8_e4m3fn"}; comfy/ops.py `MixedPrecisionOps` loads them): read the same way.
- ours (`save_dit_native` of a model from `quantize_dit_fp8`): fp8 `<layer>.weight`, fp32 `<layer>.scale` of
  shape () or (out_features, 1).

float8_e5m2 weights are read too (ComfyUI's marker dtype allows them); other 8-bit float formats are refused.
"""

from __future__ import annotations

import json
import math
import mmap
import pickle
import struct
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # the fp8 formats read, and kept by FP8Linear
SCALE_SUFFIXES = ("scale", "scale_weight", "weight_scale")  # ours, ComfyUI fp8_scaled, ComfyUI comfy_quant
IGNORED_SUFFIXES = ("scale_input", "input_scale", "comfy_quant")  # activation scales, per-layer format tags
SCALED_MARKER = "scaled_fp8"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}  # fmt: skip
_STORED_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be loaded; the message says what is wrong and what was expected."""


class CheckpointReader(ABC):
    """A checkpoint's tensors by name: shapes and dtypes without reading data, each tensor read on its own."""

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def __contains__(self, key: str) -> bool: ...

    @abstractmethod
    def shape(self, key: str) -> torch.Size: ...

    @abstractmethod
    def dtype(self, key: str) -> torch.dtype:
        """The dtype `read(key)` returns (for a file: the stored one), without reading the data."""

    @abstractmethod
    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh tensor (never a view of the file), cast to `dtype` while it is read if given."""


# ---------------------------------------------------------------------------------------------------------------
# Safetensors files


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


CHUNK = 1 << 20  # elements copied, then checked while still in the CPU's cache


def copy_checked(source: torch.Tensor, out: torch.Tensor, path: Path | str, name: str) -> torch.Tensor:
    """Copy flat `source` into flat `out` (casting), checking for NaN / Inf on the way; an error names file and
    tensor. Chunk by chunk, each chunk summed while in cache (a NaN or Inf makes the sum so; only an overflowing sum
    of finite values, e.g. in fp16, needs the exact count that confirms it): a few percent of the copy."""
    suspect = False
    for i in range(0, source.numel(), CHUNK):
        part = source[i : i + CHUNK]
        out[i : i + CHUNK].copy_(part)
        if part.is_floating_point():
            suspect |= not math.isfinite((part if part.itemsize > 1 else part.float()).sum())
    if suspect:
        values = source.float()
        nan, inf = int(values.isnan().sum()), int(values.isinf().sum())
        if nan or inf:
            raise CheckpointError(
                f"{path}: tensor {name!r} holds {nan:,} NaN and {inf:,} Inf values (of {values.numel():,}): the file "
                "is corrupt or was saved from a diverged model. Download it again (`python -m mochi_preview.verify "
                "FOLDER` checks a downloaded folder against its manifest)."
            )
    return out


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

    def dtype(self, name: str) -> torch.dtype:
        stored = self.entries[name]["dtype"]
        if stored not in _DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is stored as {stored}, which is not supported (supported: "
                f"{', '.join(_DTYPES)})"
            )
        return _DTYPES[stored]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        stored, entry = self.dtype(name), self.entries[name]
        begin, end = (self._data_start + o for o in entry["data_offsets"])
        with warnings.catch_warnings():  # the mapping is read-only; we only read from the view
            warnings.simplefilter("ignore", UserWarning)
            view = torch.frombuffer(self._map, dtype=stored, count=(end - begin) // stored.itemsize, offset=begin)
        tensor = torch.empty(entry["shape"], dtype=dtype or stored)
        copy_checked(view, tensor.view(-1), self.path, name)
        del view
        page = mmap.PAGESIZE
        start = begin - begin % page
        if hasattr(self._map, "madvise") and end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)  # drop the file pages from our RSS
        return tensor


class SafetensorsReader(CheckpointReader):
    """One or more safetensors files (a sharded checkpoint) read as a single key space."""

    def __init__(self, where: Mapping[str, tuple[_MappedFile, str]]):
        self._where = dict(where)  # key -> (file, name in the file)

    @classmethod
    def from_files(cls, paths: Iterable[str | Path]) -> SafetensorsReader:
        where = {}
        for path in map(Path, paths):
            if not path.is_file():
                raise CheckpointError(f"checkpoint file not found: {path}")
            if (problem := _describe_non_safetensors(path)) is not None:
                raise CheckpointError(problem)
            mapped = _MappedFile(path)
            where |= {name: (mapped, name) for name in mapped.entries}
        return cls(where)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> torch.Size:
        file, name = self._where[key]
        return file.shape(name)

    def dtype(self, key: str) -> torch.dtype:
        file, name = self._where[key]
        return file.dtype(name)

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        file, name = self._where[key]
        return file.read(name, dtype)

    def select(self, prefix: str) -> SafetensorsReader:
        """The tensors whose names start with `prefix`, named without it (ComfyUI's prefix, one half of a VAE)."""
        return SafetensorsReader({k[len(prefix) :]: w for k, w in self._where.items() if k.startswith(prefix)})


class PickleReader(CheckpointReader):
    """PyTorch pickles (`pytorch_model.bin`, one file or shards) read with `torch.load(weights_only=True)`: only
    tensors and plain containers are rebuilt, so no code in the file runs; a file that needs more is refused."""

    def __init__(self, paths: Iterable[str | Path]):
        self._where: dict[str, tuple[Path, torch.Tensor]] = {}
        for path in map(Path, paths):
            if not path.is_file():
                raise CheckpointError(f"checkpoint file not found: {path}")
            self._where |= {k: (path, t) for k, t in _load_weights_only(path).items()}

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> torch.Size:
        return self._where[key][1].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key][1].dtype

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        path, tensor = self._where[key]
        out = torch.empty(tensor.shape, dtype=dtype or tensor.dtype)
        copy_checked(tensor.reshape(-1), out.view(-1), path, key)
        return out


class SubsetReader(CheckpointReader):
    """The tensors of another reader whose names `keep` accepts (e.g. the encoder half of a full T5 checkpoint)."""

    def __init__(self, reader: CheckpointReader, keep: Callable[[str], bool]):
        self.inner, self.keep = reader, keep

    def keys(self) -> list[str]:
        return [k for k in self.inner.keys() if self.keep(k)]

    def __contains__(self, key: str) -> bool:
        return key in self.inner and self.keep(key)

    def shape(self, key: str) -> torch.Size:
        return self.inner.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.inner.dtype(key)

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.inner.read(key, dtype)


def _load_weights_only(path: Path) -> dict[str, torch.Tensor]:
    """A pickle's name -> tensor mapping, memory-mapped when the file's format allows it."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (pre-zip) format cannot be mapped: read it whole
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), str(e))
        reason = reason.split(" Please use")[0]  # not torch's advice to allow-list the callable
        if "Unsupported global" not in reason:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint ({reason}); download it again") from e
        raise CheckpointError(
            f"{path} holds more than tensors ({reason}); loading it needs full unpickling, which can run arbitrary "
            "code, so it is refused. Use a safetensors copy of the weights, or a file of plain tensors."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch file ({e}). It may be truncated (an interrupted download: "
            f"{path.stat().st_size:,} bytes on disk) or corrupt; download it again."
        ) from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{path} is not a flat name -> tensor mapping (a state dict); cannot read it")
    return state


def open_checkpoint(path: str | Path, prefixes: Iterable[str] = ()) -> SafetensorsReader:
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
    reader = SafetensorsReader.from_files(files)
    keys = reader.keys()
    for prefix in prefixes:
        if keys and all(k.startswith(prefix) for k in keys):
            return reader.select(prefix)
    return reader


# ---------------------------------------------------------------------------------------------------------------
# FP8 checkpoints


def _few(names: Iterable[str], n: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


class Fp8Reader(CheckpointReader):
    """Another reader's tensors, fp8 ones dequantized (fp8 value * scale, in fp32) and scales hidden."""

    def __init__(self, reader: CheckpointReader, what: str = "checkpoint"):
        """Wrap `reader`, checking its fp8 tensors: formats, scale shapes, and a scale for each fp8 tensor in a
        checkpoint that stores scales (ComfyUI would silently use 1; here it means a damaged or mixed-up file).

        `fp8` (key -> stored fp8 dtype), `raw`, `scale` and `scale_shape` give the stored parts, for FP8Linear.
        """
        self.inner = reader
        keys = set(reader.keys())
        weight_of = lambda k: k.rpartition(".")[0] + ".weight"
        with_suffix = lambda suffixes: {k for k in keys if k.rpartition(".")[2] in suffixes and weight_of(k) in keys}
        self.scale_keys = {weight_of(k): k for k in with_suffix(SCALE_SUFFIXES)}  # weight key -> its scale's key
        ignored = with_suffix(IGNORED_SUFFIXES)
        self.hidden = set(self.scale_keys.values()) | ignored | (keys & {SCALED_MARKER})
        stored = {k: reader.dtype(k) for k in keys - self.hidden}
        small_floats = {d for d in stored.values() if d.is_floating_point and d.itemsize == 1}
        if odd := sorted(_STORED_NAMES.get(d, str(d)) for d in small_floats - set(FP8_DTYPES)):
            raise CheckpointError(
                f"{what} stores weights as {', '.join(odd)}; the supported fp8 formats are float8_e4m3fn (F8_E4M3) "
                "and float8_e5m2 (F8_E5M2)"
            )
        self.fp8 = {k: d for k, d in stored.items() if d in FP8_DTYPES}
        if self.scale_keys or SCALED_MARKER in keys:
            unscaled = sorted(k for k in self.fp8 if k not in self.scale_keys)
            if unscaled:
                raise CheckpointError(
                    f"{what} stores fp8 scales, but {len(unscaled)} fp8 tensors have none ({_few(unscaled)}); "
                    f"expected e.g. {unscaled[0].removesuffix('weight')}scale_weight next to each"
                )
        for w, s in self.scale_keys.items():
            shape, w_shape = reader.shape(s), reader.shape(w)
            if shape.numel() != 1 and (len(w_shape) != 2 or tuple(shape) != (w_shape[0], 1)):
                raise CheckpointError(
                    f"{what}: scale {s!r} has shape {tuple(shape)}, but weight {w!r} of shape {tuple(w_shape)} "
                    f"needs one value (per tensor) or ({w_shape[0]}, 1) (per output channel)"
                )
        for k in sorted(k for k in ignored if k.endswith(".comfy_quant")):
            try:
                fmt = json.loads(bytes(reader.read(k).tolist())).get("format")
            except (ValueError, AttributeError) as e:
                raise CheckpointError(f"{what}: {k!r} is not ComfyUI's JSON layer description") from e
            if fmt not in ("float8_e4m3fn", "float8_e5m2"):
                raise CheckpointError(f"{what}: {k!r} names format {fmt!r}; only float8_e4m3fn/e5m2 are supported")

    def _scaled(self, key: str) -> bool:
        return key in self.fp8 or key in self.scale_keys

    def keys(self) -> list[str]:
        return [k for k in self.inner.keys() if k not in self.hidden]

    def __contains__(self, key: str) -> bool:
        return key in self.inner and key not in self.hidden

    def shape(self, key: str) -> torch.Size:
        return self.inner.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return torch.float32 if self._scaled(key) else self.inner.dtype(key)

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if not self._scaled(key):
            return self.inner.read(key, dtype)
        return (self.inner.read(key, torch.float32) * self.scale(key)).to(dtype or torch.float32)

    def scale_shape(self, key: str) -> tuple[int, ...]:
        """() for a per-tensor scale (or none), (out_features, 1) per channel."""
        s = self.scale_keys.get(key)
        return () if s is None or self.inner.shape(s).numel() == 1 else (self.inner.shape(key)[0], 1)

    def scale(self, key: str) -> torch.Tensor:
        """The fp32 scale of a weight, in `scale_shape(key)`; 1 for a weight stored without one."""
        s = self.scale_keys.get(key)
        return torch.ones(()) if s is None else self.inner.read(s, torch.float32).reshape(self.scale_shape(key))

    def raw(self, key: str) -> torch.Tensor:
        """The tensor as stored (fp8 weights without their scale)."""
        return self.inner.read(key)


# ---------------------------------------------------------------------------------------------------------------
# Layouts: native name -> Source over a reader's keys


@dataclass(frozen=True)
class Source:
    """How one native tensor is built: the reader keys it comes from and the transform that combines them."""

    keys: tuple[str, ...]
    transform: Callable[..., torch.Tensor] | None = None  # None: the single key's tensor as it is

    def read(self, reader: CheckpointReader, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The native tensor, each source tensor cast to `dtype` as it is read."""
        return self._build([reader.read(k, dtype) for k in self.keys])

    def meta(self, reader: CheckpointReader, dtype: torch.dtype | None = None) -> torch.Tensor:
        """What `read` would return, as a meta tensor (its shape and dtype): no data read."""
        empty = lambda k: torch.empty(reader.shape(k), dtype=dtype or reader.dtype(k), device="meta")
        return self._build([empty(k) for k in self.keys])

    def shape(self, reader: CheckpointReader) -> torch.Size:
        return self.meta(reader, torch.float32).shape

    def _build(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0] if self.transform is None else self.transform(*tensors)


def concat_rows(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """[a; b] -> [b; a] along dim 0 (its own inverse)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def native_sources(reader: CheckpointReader, layout: Mapping[str, Source]) -> dict[str, Source]:
    """Every native tensor `reader` holds: the layout's whose keys are all there, and the keys no layout entry
    uses, under their own names."""
    used = {k for source in layout.values() for k in source.keys}
    sources = {name: s for name, s in layout.items() if all(k in reader for k in s.keys)}
    return sources | {k: Source((k,)) for k in reader.keys() if k not in used and k not in sources}


def native_shapes(reader: CheckpointReader, layout: Mapping[str, Source]) -> dict[str, torch.Size]:
    """The shapes of `native_sources`, computed on meta tensors (no data read): what configs are inferred from."""
    return {name: source.shape(reader) for name, source in native_sources(reader, layout).items()}


def load_module(
    module: nn.Module,
    reader: CheckpointReader,
    layout: Mapping[str, Source],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    fp32_names: Iterable[str] = (),
    what: str = "checkpoint",
    skip: Callable[[str], bool] | None = None,
) -> nn.Module:
    """Fill `module` (which may live on the meta device) from `reader` through `layout`, strictly.

    The checks cover the whole module and the whole reader, skipped names included: missing, unexpected and
    mis-shaped tensors are reported by name. Then each tensor is read in `dtype` (fp32 for `fp32_names`), built by
    its source and moved to `device` before the next is read; names with the same source (tied weights) share one
    tensor. Names for which `skip(name)` is true are never read: they become empty meta tensors of the dtype and
    shape they would have (e.g. blocks another rank holds).
    """
    expected = module.state_dict(keep_vars=True)
    sources = {name: layout.get(name, Source((name,))) for name in expected}
    used = {k for source in sources.values() for k in source.keys}
    missing = sorted(k for k in used if k not in reader)
    unexpected = sorted(set(reader.keys()) - used)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors ({_few(unexpected)})")
        raise CheckpointError(
            f"{what} does not match the model: " + "; ".join(parts) + ". Is this the right file for this model?"
        )
    for name, param in expected.items():
        if (shape := sources[name].shape(reader)) != param.shape:
            raise CheckpointError(
                f"{what}: tensor {name!r} has shape {tuple(shape)} in the file but the model expects "
                f"{tuple(param.shape)}"
            )

    fp32_names = set(fp32_names)
    state, built = {}, {}  # built: one tensor for names with the same source (tied weights share it)
    for name, source in sources.items():
        target = torch.float32 if name in fp32_names else dtype
        if skip is not None and skip(name):
            state[name] = source.meta(reader, target)
        else:
            if (source, target) not in built:
                built[source, target] = source.read(reader, target).to(device)
            state[name] = built[source, target]
    module.load_state_dict(state, strict=True, assign=True)
    return module
