"""LoRAs for the DiT: read the three published formats, merge them into the weights or apply them live.

Formats (spec 13.1), told apart by their keys; every one maps onto the DiT's native Linear names:

- Genmo native: `blocks.{i}.attn.{qkv_x,qkv_y,proj_x,proj_y}.lora_{A,B}`, A (r, in), B (out, r); the safetensors
  metadata `kwargs` (JSON) holds `qkv_proj_lora_{rank,alpha}` and `out_proj_lora_{rank,alpha}`. `*_mask` tensors of
  older files are ignored.
- diffusers / peft: `transformer.transformer_blocks.{i}.attn1.{to_q,...}.lora_{A,B}.weight`; q, k, v are row
  blocks of the fused `qkv_x` / `qkv_y` (folded into one LoRA of rank r_q + r_k + r_v), the SwiGLU `w1` and the
  final modulation have their row halves swapped; alpha from the `lora_adapter_metadata` JSON, else alpha = r.
- ComfyUI: the native names, alpha from a `{layer}.alpha` tensor per layer.

A layer's update is W += strength * (B @ A) * alpha / r. `load_lora` merges it (in fp32, then cast back: no cost per
step). `LoraSet` applies LoRAs live (a forward hook adds strength * scale * B(A x) to the Linear's output), so
several can be switched and weighted between generations without reloading, on fp8 layers too; their tensors are
non-persistent buffers of the Linear they serve, so offloading moves them with it and state dicts are unchanged.
With the DiT's blocks sharded over ranks (`distributed.shard_dit`), a rank merges into and restores only the blocks
it holds (their broadcast carries the result); live adapters stay on every rank (sharding moves persistent tensors).
`LoraMixin` gives a pipeline diffusers' method names over `self.dit`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .checkpoint import CheckpointError, open_checkpoint, swap_halves
from .dit.fp8 import FP8Linear
from .dit.layers import linear
from .files import write_atomic

FORMATS = ("genmo", "diffusers", "comfyui")
KNOWN_LAYOUTS = (
    "Genmo native `blocks.{i}.attn.qkv_x.lora_A` (+ `kwargs` metadata), "
    "diffusers/peft `transformer.transformer_blocks.{i}.attn1.to_q.lora_A.weight`, "
    "ComfyUI `blocks.{i}.attn.qkv_x.lora_A` with `blocks.{i}.attn.qkv_x.alpha`"
)
GENMO_TARGETS = ("qkv_x", "qkv_y", "proj_x", "proj_y")  # Genmo's fine-tuner: the attention projections
# What our trainers can also adapt: each block's modulation and MLP Linears (native names under blocks.{i}).
BLOCK_TARGETS = ("mod_x", "mod_y", "mlp_x.w1", "mlp_x.w2", "mlp_y.w1", "mlp_y.w2")
TARGETS = GENMO_TARGETS + BLOCK_TARGETS
NATIVE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI's
DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.")  # diffusers, a bare peft save
# diffusers module (under transformer_blocks.{i}.) -> (native module under blocks.{i}., row block of 3 or transform)
DIFFUSERS_BLOCK = {
    "attn1.to_q": ("attn.qkv_x", 0),
    "attn1.to_k": ("attn.qkv_x", 1),
    "attn1.to_v": ("attn.qkv_x", 2),
    "attn1.add_q_proj": ("attn.qkv_y", 0),
    "attn1.add_k_proj": ("attn.qkv_y", 1),
    "attn1.add_v_proj": ("attn.qkv_y", 2),
    "attn1.to_out.0": ("attn.proj_x", None),
    "attn1.to_add_out": ("attn.proj_y", None),
    "ff.net.0.proj": ("mlp_x.w1", "swap"),
    "ff.net.2": ("mlp_x.w2", None),
    "ff_context.net.0.proj": ("mlp_y.w1", "swap"),
    "ff_context.net.2": ("mlp_y.w2", None),
    "norm1.linear": ("mod_x", None),
    "norm1_context.linear": ("mod_y", None),
    "norm1_context.linear_1": ("mod_y", None),  # the last block's
}
DIFFUSERS_TOP = {"proj_out": ("final_layer.linear", None), "norm_out.linear": ("final_layer.mod", "swap")}
# The writer's view of both tables: native module -> [(diffusers module, row block or transform)]
TO_DIFFUSERS: dict[str, list[tuple[str, object]]] = {}
for _diff, (_native, _how) in [*DIFFUSERS_BLOCK.items(), *DIFFUSERS_TOP.items()]:
    TO_DIFFUSERS.setdefault(_native, []).append((_diff, _how))


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this DiT; the message names the key and what was expected."""


@dataclass
class LayerLora:
    """One Linear's update: scale * B @ A, A (r, in) and B (out, r) in fp32."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    def delta(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale  # (out, in) fp32


@dataclass
class Lora:
    """A LoRA file read and checked against a DiT: its format and one update per native Linear name."""

    path: Path
    format: str
    layers: dict[str, LayerLora]
    sha256: str = ""
    bytes: int = 0

    @property
    def file(self) -> Path:
        """The safetensors file itself (a folder holding one resolves to it)."""
        return self.path if self.path.is_file() else _single_file(self.path)


def check_strength(strength) -> float:
    """A finite float, else a ValueError naming the setting."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or isinstance(strength, bool):
        raise ValueError(f"LoRA strength must be a finite number (e.g. 1.0, 0.5, -1); got {strength!r}")
    return value


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """`PATH[:STRENGTH]` (the CLI's --lora_path) -> (path, strength); the strength defaults to 1."""
    path, sep, tail = text.rpartition(":")
    if not sep or not path or tail.startswith(("/", "\\")):  # no strength (or "C:\\..." on Windows)
        return Path(text), 1.0
    try:
        value = float(tail)
    except ValueError:  # a ':' inside the file name
        return Path(text), 1.0
    return Path(path), check_strength(value)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---- reading ---------------------------------------------------------------------------------------------------


def _single_file(path: Path) -> Path:
    files = sorted(Path(path).glob("*.safetensors"))
    if len(files) != 1:
        raise CheckpointError(f"{path}: expected one .safetensors LoRA file in the folder; found {len(files)}")
    return files[0]


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def detect_format(keys: list[str], metadata: dict[str, str]) -> str:
    """ "genmo", "diffusers" or "comfyui" from the key names (and, for native names, the metadata)."""
    bare = [_strip(k, DIFFUSERS_PREFIXES) for k in keys]
    if any(k.startswith("transformer_blocks.") or k.split(".")[0] in ("proj_out", "norm_out") for k in bare):
        return "diffusers"
    native = [_strip(k, NATIVE_PREFIXES) for k in keys]
    if any(re.match(r"(blocks\.\d+|final_layer)\..*lora_[AB]", k) for k in native):
        return "genmo" if "kwargs" in metadata else "comfyui"  # Genmo's fine-tuner always writes `kwargs`
    shown = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise LoraError(f"unknown LoRA key layout (first keys: {shown}); the layouts read are: {KNOWN_LAYOUTS}")


def _linear(dit: nn.Module, name: str, key: str) -> nn.Linear:
    try:
        module = dit.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise LoraError(f"unknown LoRA key {key!r}: the DiT has no Linear layer {name!r}")
    return module


def _finite(key: str, t: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise LoraError(f"LoRA tensor {key!r} holds NaN or inf values: the file is damaged")
    return t


def _pair(reader, key_a: str, key_b: str, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) in fp32, checked for rank agreement and finite values."""
    if key_a not in reader or key_b not in reader:
        missing = key_b if key_a in reader else key_a
        raise LoraError(f"LoRA for {layer!r} lacks {missing!r} (each layer needs both lora_A and lora_B)")
    A, B = reader.read(key_a, torch.float32), reader.read(key_b, torch.float32)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise LoraError(
            f"LoRA for {layer!r}: rank mismatch between {key_a!r} {tuple(A.shape)} (rank, in) and {key_b!r} "
            f"{tuple(B.shape)} (out, rank)"
        )
    return _finite(key_a, A), _finite(key_b, B)


def _check_fit(layer: str, key: str, module: nn.Linear, A: torch.Tensor, B: torch.Tensor, rows: int) -> None:
    if A.shape[1] != module.in_features or B.shape[0] != rows:
        raise LoraError(
            f"LoRA {key!r} does not fit the DiT (a LoRA for another model?): its update is "
            f"({B.shape[0]}, {A.shape[1]}) (out, in) but the model's {layer!r} needs ({rows}, {module.in_features})"
        )


def _read_native(reader, metadata: dict[str, str], dit: nn.Module) -> dict[str, LayerLora]:
    kwargs = json.loads(metadata["kwargs"]) if "kwargs" in metadata else {}
    keys = {_strip(k, NATIVE_PREFIXES): k for k in reader.keys()}
    layers: dict[str, dict[str, str]] = {}
    for bare, key in keys.items():
        if bare.endswith("_mask"):  # qkv_proj_lora_mask of files older than Genmo's commit 519c424
            continue
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B|alpha)(\.weight)?", bare)
        if m is None:
            raise LoraError(f"unknown LoRA key {key!r}: native keys end in .lora_A, .lora_B or .alpha")
        layers.setdefault(m.group(1), {})[m.group(2)] = key
    out = {}
    for name, parts in sorted(layers.items()):
        module = _linear(dit, name, parts.get("lora_A", next(iter(parts.values()))))
        A, B = _pair(reader, parts.get("lora_A", f"{name}.lora_A"), parts.get("lora_B", f"{name}.lora_B"), name)
        _check_fit(name, parts["lora_A"], module, A, B, module.out_features)
        rank = A.shape[0]
        kind = "qkv_proj" if name.rsplit(".", 1)[-1].startswith("qkv") else "out_proj"
        if kwargs.get(f"{kind}_lora_rank", rank) != rank:
            raise LoraError(
                f"LoRA for {name!r} has rank {rank} but its `kwargs` metadata says {kind}_lora_rank="
                f"{kwargs[f'{kind}_lora_rank']}"
            )
        if "alpha" in parts:
            alpha = float(_finite(parts["alpha"], reader.read(parts["alpha"], torch.float32)).reshape(-1)[0])
        else:
            alpha = float(kwargs.get(f"{kind}_lora_alpha", rank))
        out[name] = LayerLora(A, B, alpha / rank)
    return out


def _peft_alpha(metadata: dict[str, str]) -> tuple[float | None, bool]:
    """(lora_alpha or None, use_rslora) from diffusers' `lora_adapter_metadata`."""
    raw = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    config = {_strip(k, ("transformer.",)): v for k, v in raw.items()}
    alpha = config.get("lora_alpha")
    if alpha is not None and not math.isfinite(float(alpha)):
        raise LoraError(f"lora_adapter_metadata has a non-finite lora_alpha {alpha!r}")
    return (None if alpha is None else float(alpha)), bool(config.get("use_rslora", False))


def _read_diffusers(reader, metadata: dict[str, str], dit: nn.Module) -> dict[str, LayerLora]:
    alpha, rslora = _peft_alpha(metadata)
    grouped: dict[str, list] = {}  # native layer -> [(row block or transform, A, B, scale, key)]
    names = {}
    for key in reader.keys():
        bare = _strip(key, DIFFUSERS_PREFIXES)
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", bare)
        if m is None:
            raise LoraError(f"unknown LoRA key {key!r}: diffusers keys end in .lora_A.weight or .lora_B.weight")
        names.setdefault(m.group(1), {})[m.group(2)] = key
    for module_name, parts in sorted(names.items()):
        key = parts.get("A", parts.get("B"))
        block = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module_name)
        target = DIFFUSERS_BLOCK.get(block.group(2)) if block else DIFFUSERS_TOP.get(module_name)
        if target is None:
            raise LoraError(f"unknown LoRA key {key!r}: no DiT layer corresponds to {module_name!r}")
        native = f"blocks.{block.group(1)}.{target[0]}" if block else target[0]
        module = _linear(dit, native, key)
        stem = key.rsplit(".lora_", 1)[0]
        A, B = _pair(reader, f"{stem}.lora_A.weight", f"{stem}.lora_B.weight", native)
        how = target[1]
        _check_fit(native, key, module, A, B, module.out_features // 3 if isinstance(how, int) else module.out_features)
        r = A.shape[0]
        a = float(r) if alpha is None else alpha
        grouped.setdefault(native, []).append(
            (how, A, swap_halves(B) if how == "swap" else B, a / (r**0.5 if rslora else r))
        )
    out = {}
    for native, parts in grouped.items():
        if not isinstance(parts[0][0], int):
            _, A, B, scale = parts[0]
            out[native] = LayerLora(A, B, scale)
            continue
        # q, k, v: one LoRA, scales folded into B; A shared when the parts share it (a converted native LoRA),
        # else stacked (rank r_q + r_k + r_v) with B block-diagonal over the row blocks.
        rows = parts[0][2].shape[0]
        shared = all(p[1].shape == parts[0][1].shape and torch.equal(p[1], parts[0][1]) for p in parts)
        if shared and len(parts) == 3 and len({p[3] for p in parts}) == 1:  # exactly a native LoRA: keep its scale
            blocks = sorted(parts, key=lambda p: p[0])
            out[native] = LayerLora(parts[0][1], torch.cat([p[2] for p in blocks]), parts[0][3])
            continue
        A = parts[0][1] if shared else torch.cat([p[1] for p in parts])
        B = torch.zeros(3 * rows, A.shape[0])
        col = 0
        for slot, _, b, scale in parts:
            B[slot * rows : (slot + 1) * rows, col : col + b.shape[1]] = b * scale
            col += 0 if shared else b.shape[1]
        out[native] = LayerLora(A, B, 1.0)
    return out


def check_lora_file(path: str | Path) -> str:
    """The LoRA file's format, from its header alone: for the CLI to refuse a missing file, a pickle or an unknown
    layout before any weights load (shapes are checked against the DiT by `read_lora`)."""
    path = Path(path)
    reader = open_checkpoint(path)
    return detect_format(reader.keys(), _metadata(path if path.is_file() else _single_file(path)))


def read_lora(path: str | Path, dit: nn.Module) -> Lora:
    """Read a LoRA file (or a folder holding one) and check every tensor against `dit`, before anything changes."""
    path = Path(path)
    reader = open_checkpoint(path)  # refuses pickles (.pt, .bin, ...) without unpickling them
    file = path if path.is_file() else _single_file(path)
    metadata = _metadata(file)
    fmt = detect_format(reader.keys(), metadata)
    read = _read_diffusers if fmt == "diffusers" else _read_native
    layers = read(reader, metadata, dit)
    return Lora(path, fmt, layers, file_sha256(file), file.stat().st_size)


# ---- merging ---------------------------------------------------------------------------------------------------


def _owned(module: nn.Linear) -> bool:
    """False for a block that lives on another rank (`distributed.shard_dit` leaves an empty placeholder)."""
    w = module.weight
    return not w.is_meta and w.shape == (module.out_features, module.in_features)


def _refuse_fp8(dit: nn.Module, names) -> None:
    fp8 = [n for n in names if isinstance(dit.get_submodule(n), FP8Linear)]
    if fp8:
        raise LoraError(
            f"{fp8[0]} holds fp8 weights, which a LoRA cannot be merged into without a second rounding; apply it "
            "live instead (pipe.load_lora_weights(path), or LoraSet(dit).load(path))"
        )


@torch.no_grad()
def merge_lora(dit: nn.Module, lora: Lora, strength: float = 1.0) -> nn.Module:
    """W += strength * scale * B @ A for every layer of `lora`, in fp32 then cast back to W's dtype, in place."""
    strength = check_strength(strength)
    _refuse_fp8(dit, lora.layers)
    for name, layer in lora.layers.items():
        module = dit.get_submodule(name)
        if strength and _owned(module):
            w = module.weight
            delta = LayerLora(layer.A.to(w.device), layer.B.to(w.device), layer.scale).delta()
            w.copy_((w.float() + strength * delta).to(w.dtype))
    return dit


def load_lora(dit: nn.Module, path: str | Path, strength: float = 1.0) -> nn.Module:
    """Merge the LoRA at `path` (any of the three formats) into a loaded DiT at `strength`; returns the DiT."""
    strength = check_strength(strength)
    return merge_lora(dit, read_lora(path, dit), strength)


# ---- live LoRAs ------------------------------------------------------------------------------------------------


def _live_hook(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    """Add strength * scale * B(A x) of every active adapter to the Linear's output."""
    x = args[0]
    for name, s in module.lora_scales.items():
        if s:
            h = linear(x, getattr(module, f"lora_A_{name}")) * s  # (..., r): the scale on the narrow side
            out = out + linear(h, getattr(module, f"lora_B_{name}"))
    return out


def attach(module: nn.Linear, name: str, A: torch.Tensor, B: torch.Tensor, scale: float, trainable: bool = False):
    """Give a Linear a live adapter `name`: buffers (or, `trainable`, parameters) lora_A_{name}, lora_B_{name}."""
    if not hasattr(module, "lora_scales"):
        module.lora_scales = {}
        module.lora_hook = module.register_forward_hook(_live_hook)
    for part, t in (("A", A), ("B", B)):
        if trainable:
            module.register_parameter(f"lora_{part}_{name}", nn.Parameter(t))
        else:
            module.register_buffer(f"lora_{part}_{name}", t, persistent=False)
    module.lora_scales[name] = scale


def detach(module: nn.Linear, name: str) -> None:
    """Remove adapter `name` from a Linear (and the hook with the last one)."""
    module.lora_scales.pop(name)
    for part in ("A", "B"):
        delattr(module, f"lora_{part}_{name}")
    if not module.lora_scales:
        module.lora_hook.remove()
        del module.lora_scales, module.lora_hook


@dataclass
class _Adapter:
    lora: Lora
    strength: float = 1.0
    active: bool = True


@dataclass
class LoraSet:
    """The LoRAs applied to one DiT: live (switchable), or fused into the weights with the originals kept."""

    dit: nn.Module
    adapters: dict[str, _Adapter] = field(default_factory=dict)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> its weight before fusing (CPU)
    fused: dict[str, float] = field(default_factory=dict)  # adapter -> strength fused into the weights

    def load(self, path: str | Path, name: str | None = None, strength: float = 1.0) -> str:
        """Read and apply a LoRA live at `strength`; returns its adapter name (default: "default_{n}")."""
        strength = check_strength(strength)
        if name is None:
            name = next(f"default_{i}" for i in range(len(self.adapters) + 1) if f"default_{i}" not in self.adapters)
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or name in self.adapters:
            taken = f"; in use: {sorted(self.adapters)}" if name in self.adapters else ""
            raise ValueError(f"adapter_name must be a new name of letters, digits, '_' or '-'; got {name!r}{taken}")
        lora = read_lora(path, self.dit)
        dtype = self.dit.dtype
        for layer_name, layer in lora.layers.items():
            module = self.dit.get_submodule(layer_name)
            device = module.bias.device if module.bias is not None else module.weight.device
            A, B = layer.A.to(device, dtype), layer.B.to(device, dtype)
            attach(module, name, A, B, layer.scale * strength)
        self.adapters[name] = _Adapter(lora, strength)
        return name

    def _apply_scales(self) -> None:
        for name, adapter in self.adapters.items():
            on = adapter.active and name not in self.fused
            for layer_name, layer in adapter.lora.layers.items():
                self.dit.get_submodule(layer_name).lora_scales[name] = layer.scale * adapter.strength if on else 0.0

    def set_adapters(self, names: str | list[str], weights=None) -> None:
        """Make exactly `names` active, at `weights` (one number for all, a list, or None: 1.0 each)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; loaded: {sorted(self.adapters)}")
        weights = [1.0] * len(names) if weights is None else weights
        weights = [weights] * len(names) if not isinstance(weights, (list, tuple)) else list(weights)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} weights")
        weights = [check_strength(w) for w in weights]
        if self.fused:
            raise ValueError(f"adapters {sorted(self.fused)} are fused into the weights: unfuse_lora() first")
        for name, adapter in self.adapters.items():
            adapter.active = name in names
            if adapter.active:
                adapter.strength = weights[names.index(name)]
        self._apply_scales()

    @torch.no_grad()
    def fuse(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        """Merge the active adapters (at strength * lora_scale) into the weights; the live path of those stops.

        Each touched weight is first copied to the CPU as it is, so `unfuse` restores it bit for bit; that costs
        the bytes of the touched weights in their dtype (for Genmo's four attention projections of the published
        model in bf16: 113 MB a block, 5.4 GB for all 48).
        """
        lora_scale = check_strength(lora_scale)
        names = [n for n, a in self.adapters.items() if a.active] if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; loaded: {sorted(self.adapters)}")
        names = [n for n in names if n not in self.fused]
        for name in names:
            _refuse_fp8(self.dit, self.adapters[name].lora.layers)
        for name in names:
            lora = self.adapters[name].lora
            for layer_name in lora.layers:
                w = self.dit.get_submodule(layer_name).weight
                if layer_name not in self.originals and _owned(self.dit.get_submodule(layer_name)):
                    self.originals[layer_name] = w.detach().to("cpu", copy=True)
            merge_lora(self.dit, lora, self.adapters[name].strength * lora_scale)
            self.fused[name] = self.adapters[name].strength * lora_scale
        self._apply_scales()

    @torch.no_grad()
    def unfuse(self) -> None:
        """Restore the weights as they were before `fuse` (exactly) and apply the adapters live again."""
        for layer_name, original in self.originals.items():
            module = self.dit.get_submodule(layer_name)
            if _owned(module):  # a block sharded away after fusing is restored by its owner, and broadcast
                module.weight.copy_(original)
        self.originals.clear()
        self.fused.clear()
        self._apply_scales()

    def unload(self) -> None:
        """Unfuse, then remove every adapter and its hooks."""
        self.unfuse()
        for name, adapter in self.adapters.items():
            for layer_name in adapter.lora.layers:
                detach(self.dit.get_submodule(layer_name), name)
        self.adapters.clear()

    def record(self) -> list[dict]:
        """For a sidecar: each LoRA's file name, size, sha256, format and strength (0 when inactive)."""
        return [
            {
                "adapter": name,
                "file": a.lora.file.name,
                "bytes": a.lora.bytes,
                "sha256": a.lora.sha256,
                "format": a.lora.format,
                "strength": a.strength if a.active else 0.0,
                "fused": name in self.fused,
            }
            for name, a in self.adapters.items()
        ]


class LoraMixin:
    """diffusers' LoRA methods for a pipeline holding its DiT as `self.dit`."""

    @property
    def loras(self) -> LoraSet:
        if getattr(self, "_loras", None) is None or self._loras.dit is not self.dit:
            self._loras = LoraSet(self.dit)
        return self._loras

    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None, strength: float = 1.0) -> str:
        """Apply a LoRA file live (Genmo native, diffusers/peft or ComfyUI) at `strength`; -> its adapter name."""
        return self.loras.load(path, adapter_name, strength)

    def set_adapters(self, adapter_names: str | list[str], adapter_weights=None) -> None:
        self.loras.set_adapters(adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        return [n for n, a in self.loras.adapters.items() if a.active]

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        self.loras.fuse(lora_scale, adapter_names)

    def unfuse_lora(self) -> None:
        self.loras.unfuse()

    def unload_lora_weights(self) -> None:
        self.loras.unload()

    def lora_record(self) -> list[dict]:
        return self.loras.record()


# ---- writing ---------------------------------------------------------------------------------------------------


def save_lora_native(
    path: str | Path, layers: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, alpha: float
) -> Path:
    """Write Genmo's format: `{layer}.lora_A` / `.lora_B` plus the `kwargs` metadata (read by Genmo's loader, by
    ComfyUI, and here). When alpha != rank, `{layer}.alpha` tensors are added too, for ComfyUI, which ignores
    `kwargs` (Genmo's loader reads the state dict non-strictly and ignores them)."""
    values = {"rank": rank, "alpha": alpha, "dropout": 0.0}
    kwargs = {f"{kind}_lora_{k}": v for kind in ("qkv_proj", "out_proj") for k, v in values.items()}
    tensors = {}
    for name, (A, B) in layers.items():
        tensors[f"{name}.lora_A"] = A.detach().float().cpu().contiguous()
        tensors[f"{name}.lora_B"] = B.detach().float().cpu().contiguous()
        if alpha != rank:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    metadata = {"kwargs": json.dumps(kwargs)}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_lora_diffusers(
    path: str | Path,
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    alpha: float,
    last_block: int | None = None,
) -> Path:
    """Write the diffusers/peft form of native LoRAs, with peft's `lora_adapter_metadata` (r, lora_alpha,
    target_modules): every layer `DIFFUSERS_BLOCK` / `DIFFUSERS_TOP` name (q, k, v share A, B split by rows; B's row
    halves swapped where diffusers orders them the other way). `last_block`: the DiT's last block, whose `mod_y`
    diffusers calls `norm1_context.linear_1` (needed only when `mod_y` is among the layers)."""
    tensors, targets = {}, set()
    for name, (A, B) in layers.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        pieces = TO_DIFFUSERS.get(m.group(2) if m else name, [])
        if m and m.group(2) == "mod_y":
            if last_block is None:
                raise ValueError(
                    f"{name}: give last_block (the DiT's last block index) to name mod_y in diffusers' form"
                )
            last = int(m.group(1)) == last_block
            pieces = [(d, how) for d, how in pieces if d.endswith("linear_1") == last]
        if not pieces:
            raise ValueError(
                f"no diffusers name for the LoRA layer {name!r}; known: {sorted(TO_DIFFUSERS)} (under blocks.i)"
            )
        for diff, how in pieces:
            if isinstance(how, int):  # one of q, k, v: its row block of the fused projection
                rows = B.shape[0] // 3
                b = B[how * rows : (how + 1) * rows]
            else:
                b = swap_halves(B) if how == "swap" else B
            prefix = f"transformer.transformer_blocks.{m.group(1)}.{diff}" if m else f"transformer.{diff}"
            tensors[f"{prefix}.lora_A.weight"] = A.detach().float().cpu().clone()  # one copy per module
            tensors[f"{prefix}.lora_B.weight"] = b.detach().float().cpu().contiguous()
            targets.add(diff.removeprefix("attn1."))
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(targets), "use_rslora": False}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
