"""DiT checkpoints: native `dit.safetensors` (optionally ComfyUI-prefixed) and the diffusers `transformer/` folder.

The model's own keys are the native ones; the diffusers layout is a set of recipes that rebuild each native tensor
(fusing q/k/v, swapping the SwiGLU halves and the final layer's [scale; shift] back to [shift; scale]).

FP8 checkpoints (native keys, optionally ComfyUI-prefixed), read by `Fp8Checkpoint`:

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
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..weights import (
    CheckpointError,
    Recipe,
    SafetensorsFiles,
    _few,
    concat_rows,
    identity_layout,
    load_into_module,
    native_shapes,
    open_checkpoint,
    swap_halves,
)
from .fp8 import FP8_DTYPES, FP8Linear, block_linears, fp8_scale, quantize_dit_fp8, quantize_fp8, replace_module
from .model import AsymmDiT, DiTConfig

COMFY_PREFIX = "model.diffusion_model."
SCALE_SUFFIXES = ("scale", "scale_weight", "weight_scale")  # ours, ComfyUI fp8_scaled, ComfyUI comfy_quant
IGNORED_SUFFIXES = ("scale_input", "input_scale", "comfy_quant")  # activation scales, per-layer format tags
SCALED_MARKER = "scaled_fp8"
FP8_STORAGE = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # safetensors dtype names
FP8_MODES = (None, "tensor", "channel", "checkpoint")


def diffusers_layout(keys: list[str]) -> dict[str, Recipe]:
    """Native key -> recipe over diffusers `MochiTransformer3DModel` keys."""
    depth = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    layout = {
        "pos_frequencies": Recipe(("pos_frequencies",)),
        "final_layer.mod.weight": Recipe(("norm_out.linear.weight",), swap_halves),
        "final_layer.mod.bias": Recipe(("norm_out.linear.bias",), swap_halves),
    }
    for wb in ("weight", "bias"):
        for native, theirs in [
            ("x_embedder.proj", "patch_embed.proj"),
            ("t_embedder.mlp.0", "time_embed.timestep_embedder.linear_1"),
            ("t_embedder.mlp.2", "time_embed.timestep_embedder.linear_2"),
            ("t5_y_embedder.to_kv", "time_embed.pooler.to_kv"),
            ("t5_y_embedder.to_q", "time_embed.pooler.to_q"),
            ("t5_y_embedder.to_out", "time_embed.pooler.to_out"),
            ("t5_yproj", "time_embed.caption_proj"),
            ("final_layer.linear", "proj_out"),
        ]:
            layout[f"{native}.{wb}"] = Recipe((f"{theirs}.{wb}",))
    for i in range(depth):
        n, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        last = i == depth - 1
        qkv = lambda *names, d=d: Recipe(tuple(f"{d}attn1.{x}.weight" for x in names), concat_rows)
        layout |= {
            n + "attn.qkv_x.weight": qkv("to_q", "to_k", "to_v"),
            n + "attn.qkv_y.weight": qkv("add_q_proj", "add_k_proj", "add_v_proj"),
            n + "attn.q_norm_x.weight": Recipe((d + "attn1.norm_q.weight",)),
            n + "attn.k_norm_x.weight": Recipe((d + "attn1.norm_k.weight",)),
            n + "attn.q_norm_y.weight": Recipe((d + "attn1.norm_added_q.weight",)),
            n + "attn.k_norm_y.weight": Recipe((d + "attn1.norm_added_k.weight",)),
            n + "mlp_x.w1.weight": Recipe((d + "ff.net.0.proj.weight",), swap_halves),
            n + "mlp_x.w2.weight": Recipe((d + "ff.net.2.weight",)),
        }
        for wb in ("weight", "bias"):
            layout[f"{n}mod_x.{wb}"] = Recipe((f"{d}norm1.linear.{wb}",))
            layout[f"{n}mod_y.{wb}"] = Recipe((f"{d}norm1_context.linear{'_1' if last else ''}.{wb}",))
            layout[f"{n}attn.proj_x.{wb}"] = Recipe((f"{d}attn1.to_out.0.{wb}",))
            if not last:
                layout[f"{n}attn.proj_y.{wb}"] = Recipe((f"{d}attn1.to_add_out.{wb}",))
        if not last:
            layout[n + "mlp_y.w1.weight"] = Recipe((d + "ff_context.net.0.proj.weight",), swap_halves)
            layout[n + "mlp_y.w2.weight"] = Recipe((d + "ff_context.net.2.weight",))
    return layout


def resolve_dit_path(path: str | Path) -> Path:
    """A dit.safetensors file, a diffusers transformer/ folder, or a model folder holding either."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"DiT checkpoint not found: {path}")
    if path.is_file():
        return path
    for candidate in (path / "dit.safetensors", path / "transformer"):
        if candidate.exists():
            return candidate
    if any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        return path
    raise CheckpointError(
        f"no DiT in {path}: expected dit.safetensors (native layout) or a transformer/ folder (diffusers layout)"
    )


def open_dit_checkpoint(path: str | Path) -> tuple[SafetensorsFiles, dict[str, Recipe], str]:
    """Open a DiT checkpoint in any supported layout -> (files, native layout, layout name)."""
    files = open_checkpoint(resolve_dit_path(path), prefixes=(COMFY_PREFIX,))
    keys = files.keys()
    if any(k.startswith("transformer_blocks.") for k in keys):
        return files, diffusers_layout(keys), "diffusers"
    if any(k.startswith("blocks.") for k in keys):
        return files, identity_layout(keys), "native"
    raise CheckpointError(
        f"{path} does not look like a Mochi DiT: no 'blocks.*' (native) or 'transformer_blocks.*' (diffusers) "
        f"tensors; it holds e.g. {sorted(keys)[:3]}"
    )


class Fp8Checkpoint:
    """A checkpoint whose fp8 tensors read dequantized: the SafetensorsFiles interface, scale tensors hidden.

    `get` returns fp8 tensors as fp8 value * scale (fp32, or the dtype asked for); `raw` and `scale` give the stored
    parts for FP8Linear. Non-fp8 checkpoints pass through unchanged. Checked when opened: an unsupported fp8 format,
    a scale shaped neither () / (1,) nor (out_features, 1), and, in a checkpoint that stores scales, a fp8 tensor
    without one (ComfyUI would silently use 1; here it means a damaged or mixed-up file).
    """

    def __init__(self, files: SafetensorsFiles, what: str = "checkpoint"):
        self.files = files
        keys = set(files.keys())
        weight_of = lambda k: k.rpartition(".")[0] + ".weight"
        with_suffix = lambda suffixes: {k for k in keys if k.rpartition(".")[2] in suffixes and weight_of(k) in keys}
        self.scale_keys = {weight_of(k): k for k in with_suffix(SCALE_SUFFIXES)}  # weight key -> its scale's key
        ignored = with_suffix(IGNORED_SUFFIXES)
        self.hidden = set(self.scale_keys.values()) | ignored | (keys & {SCALED_MARKER})
        stored = {k: files.stored_dtype(k) for k in keys - self.hidden}
        odd = sorted({d for d in stored.values() if d.startswith(("F8", "F6", "F4")) and d not in FP8_STORAGE})
        if odd:
            raise CheckpointError(
                f"{what} stores weights as {', '.join(odd)}; the supported fp8 formats are float8_e4m3fn (F8_E4M3) "
                "and float8_e5m2 (F8_E5M2)"
            )
        self.fp8 = {k: FP8_STORAGE[d] for k, d in stored.items() if d in FP8_STORAGE}  # key -> torch fp8 dtype
        if self.scale_keys or SCALED_MARKER in keys:
            unscaled = sorted(k for k in self.fp8 if k not in self.scale_keys)
            if unscaled:
                raise CheckpointError(
                    f"{what} stores fp8 scales, but {len(unscaled)} fp8 tensors have none ({_few(unscaled)}); "
                    f"expected e.g. {unscaled[0].removesuffix('weight')}scale_weight next to each"
                )
        for w, s in self.scale_keys.items():
            shape, w_shape = files.shape(s), files.shape(w)
            if shape.numel() != 1 and (len(w_shape) != 2 or tuple(shape) != (w_shape[0], 1)):
                raise CheckpointError(
                    f"{what}: scale {s!r} has shape {tuple(shape)}, but weight {w!r} of shape {tuple(w_shape)} "
                    f"needs one value (per tensor) or ({w_shape[0]}, 1) (per output channel)"
                )
        for k in sorted(k for k in ignored if k.endswith(".comfy_quant")):
            try:
                fmt = json.loads(bytes(files.get(k).tolist())).get("format")
            except (ValueError, AttributeError) as e:
                raise CheckpointError(f"{what}: {k!r} is not ComfyUI's JSON layer description") from e
            if fmt not in ("float8_e4m3fn", "float8_e5m2"):
                raise CheckpointError(f"{what}: {k!r} names format {fmt!r}; only float8_e4m3fn/e5m2 are supported")

    def keys(self) -> list[str]:
        return [k for k in self.files.keys() if k not in self.hidden]

    def __contains__(self, key: str) -> bool:
        return key in self.files and key not in self.hidden

    def shape(self, key: str) -> torch.Size:
        return self.files.shape(key)

    def meta(self, key: str) -> torch.Tensor:
        return self.files.meta(key)

    def scale_shape(self, key: str) -> tuple[int, ...]:
        """() for a per-tensor scale (or none), (out_features, 1) per channel."""
        s = self.scale_keys.get(key)
        return () if s is None or self.files.shape(s).numel() == 1 else (self.files.shape(key)[0], 1)

    def scale(self, key: str) -> torch.Tensor:
        """The fp32 scale of a weight, in `scale_shape(key)`; 1 for a weight stored without one."""
        s = self.scale_keys.get(key)
        return torch.ones(()) if s is None else self.files.get(s, torch.float32).reshape(self.scale_shape(key))

    def raw(self, key: str) -> torch.Tensor:
        """The tensor as stored (fp8 weights without their scale)."""
        return self.files.get(key)

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor in `dtype` (None: as stored, fp8 ones in fp32), fp8 ones dequantized with their scale."""
        if key not in self.fp8 and key not in self.scale_keys:
            return self.files.get(key, dtype)
        return (self.files.get(key, torch.float32) * self.scale(key)).to(dtype or torch.float32)


@dataclass(frozen=True)
class Fp8Recipe:
    """The `weight` or `scale` of an FP8Linear, built from the native weight's recipe.

    granularity "tensor" / "channel": the native weight is built in fp32 (dequantized if stored in fp8) and
    quantized; the scale's recipe builds it again (one layer: little next to reading the file, and no state).
    granularity None: the checkpoint's own fp8 weight and scale, bytes unchanged. load_into_module asks for the
    compute dtype, which neither part is stored in; dtype None is a shape query on meta tensors (`native_shapes`).
    """

    base: Recipe
    part: str  # "weight" | "scale"
    granularity: str | None
    checkpoint: Fp8Checkpoint

    @property
    def sources(self) -> tuple[str, ...]:
        return self.base.sources

    def build(self, read: Callable[..., torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.granularity is not None:
            weight = self.base.build(read, None if dtype is None else torch.float32)  # (out, in)
            if self.part == "scale":
                return fp8_scale(weight, self.granularity)
            return quantize_fp8(weight, self.granularity)[0]
        (key,) = self.base.sources  # native layout: the weight is one stored tensor
        if self.part == "weight":
            return self.base.build(read) if dtype is None else self.checkpoint.raw(key)
        if dtype is None:
            return torch.empty(self.checkpoint.scale_shape(key), device="meta")
        return self.checkpoint.scale(key)


def infer_dit_config(shapes: dict[str, torch.Size]) -> DiTConfig:
    """Read the model's sizes off its native tensor shapes (depth, widths, heads from the QK-norm size)."""

    def shape(key: str) -> torch.Size:
        if key not in shapes:
            raise CheckpointError(f"cannot infer the DiT's sizes: tensor {key!r} is missing")
        return shapes[key]

    depth = sum(1 for k in shapes if re.fullmatch(r"blocks\.\d+\.mod_x\.weight", k))
    if depth == 0:
        raise CheckpointError("cannot infer the DiT's sizes: no blocks.*.mod_x.weight tensors")
    dim_x, in_channels, patch, _ = shape("x_embedder.proj.weight")
    head_dim = shape("blocks.0.attn.q_norm_x.weight")[0]
    if dim_x % head_dim:
        raise CheckpointError(f"visual width {dim_x} is not a multiple of the QK-norm size {head_dim}")
    dim_y, text_dim = shape("t5_yproj.weight")
    # The last block has no text MLP: any other block gives its width; a one-block model never uses it.
    mlp_hidden_y = shapes["blocks.0.mlp_y.w2.weight"][1] if depth > 1 else 2 * dim_y
    return DiTConfig(
        depth=depth,
        num_heads=dim_x // head_dim,
        head_dim=head_dim,
        dim_y=dim_y,
        mlp_hidden_x=shape("blocks.0.mlp_x.w2.weight")[1],
        mlp_hidden_y=mlp_hidden_y,
        text_dim=text_dim,
        in_channels=in_channels,
        patch_size=patch,
        timestep_freq_dim=shape("t_embedder.mlp.0.weight")[1],
    )


def _make_fp8_layers(model: AsymmDiT, checkpoint: Fp8Checkpoint, fp8: str | None, what: str, layout_name: str):
    """Swap the blocks' Linears that `fp8` asks for to FP8Linear shells (meta model); returns their names."""
    if fp8 in ("tensor", "channel"):
        layers = block_linears(model)
        quantize_dit_fp8(model, fp8)
        return layers
    if fp8 is None:
        return []
    if layout_name == "diffusers":
        raise CheckpointError(f"{what}: fp8='checkpoint' reads native or ComfyUI files; use fp8='tensor' here")
    layers = [n for n in block_linears(model) if f"{n}.weight" in checkpoint.fp8]
    if not layers:
        raise CheckpointError(
            f"{what} stores no fp8 block weights, so fp8='checkpoint' has nothing to keep; use fp8='tensor' or "
            "'channel' to quantize it while loading"
        )
    for n in layers:
        lin, w = model.get_submodule(n), f"{n}.weight"
        kw = dict(scale_shape=checkpoint.scale_shape(w), weight_dtype=checkpoint.fp8[w], device="meta")
        replace_module(model, n, FP8Linear(lin.in_features, lin.out_features, lin.bias is not None, **kw))
    return layers


def load_dit(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attention_backend: str = "auto",
    fp8: str | None = None,
) -> AsymmDiT:
    """Load a DiT from `dit.safetensors`, a diffusers `transformer/` folder, or a model folder holding either.

    Sizes come from the tensors; each tensor is cast to `dtype` as it is read (RoPE frequencies and QK-norm weights
    stay fp32), so a fp32 file loads as bf16 without a full fp32 copy in memory. FP8 checkpoints (plain, ComfyUI
    fp8_scaled, ours: see the module docstring) are recognised from their tensors. `fp8` chooses the blocks' Linears:

    - None: everything in `dtype`; fp8 weights are dequantized (fp8 value * scale).
    - "tensor" / "channel": quantized to float8_e4m3fn with per-tensor / per-output-channel scales (FP8Linear) as
      they are read, one layer at a time: the peak is the fp8 model plus one layer in fp32.
    - "checkpoint": the checkpoint's own fp8 weights and scales, unchanged (FP8Linear); an error if it has none.
    Embedders, the final layer and norms are always in `dtype` (fp32 for norms and RoPE).
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported DiT dtype {dtype}; use torch.bfloat16 or torch.float32")
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {FP8_MODES}; got {fp8!r}")
    files, layout, name = open_dit_checkpoint(path)
    what = f"DiT checkpoint {path} ({name})"
    checkpoint = Fp8Checkpoint(files, what)
    cfg = infer_dit_config(native_shapes(checkpoint, layout))
    with torch.device("meta"):
        model = AsymmDiT(cfg, attention_backend=attention_backend)

    layers = _make_fp8_layers(model, checkpoint, fp8, what, name)  # FP8Linear shells, on meta until loaded
    layout = dict(layout)
    for n in layers:
        base = layout.get(f"{n}.weight", Recipe((f"{n}.weight",)))
        for part in ("weight", "scale"):
            layout[f"{n}.{part}"] = Fp8Recipe(base, part, None if fp8 == "checkpoint" else fp8, checkpoint)
    fp32_names = model.fp32_parameter_names() + [f"{n}.scale" for n in layers]
    load_into_module(model, checkpoint, layout, dtype, device, fp32_names, what=what)
    return model.eval().requires_grad_(False)


def save_dit_native(path: str | Path, source: str | Path | AsymmDiT, dtype: torch.dtype | None = None) -> Path:
    """Write a native `dit.safetensors` from a model or from a checkpoint in any supported layout.

    Refuses to overwrite. With `dtype`, tensors are converted (QK-norm weights and RoPE frequencies stay fp32). An
    FP8 model's fp8 weights and scales are written as they are (`load_dit(..., fp8="checkpoint")` reads them back);
    a fp8 checkpoint is written dequantized (fp32, or `dtype`).
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; not overwriting it")
    if isinstance(source, AsymmDiT):
        state = {k: v.detach().cpu() for k, v in source.state_dict().items()}
    else:
        files, layout, _ = open_dit_checkpoint(source)
        checkpoint = Fp8Checkpoint(files, f"DiT checkpoint {source}")
        state = {k: r.build(checkpoint.get) for k, r in layout.items() if all(s in checkpoint for s in r.sources)}
    if dtype is not None:
        keep = lambda k, v: k == "pos_frequencies" or "_norm_" in k or k.endswith(".scale") or v.dtype in FP8_DTYPES
        state = {k: v if keep(k, v) else v.to(dtype) for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.rename(path)
    return path
