"""DiT checkpoints: native `dit.safetensors` (optionally ComfyUI-prefixed, optionally fp8) and diffusers `transformer/`.

The model's own keys are the native ones (the empty layout); the diffusers layout rebuilds each native tensor (fusing
q/k/v, swapping the SwiGLU halves and the final layer's [scale; shift] back to [shift; scale]). Every DiT checkpoint
is read through `Fp8Reader`, which shows fp8 files (formats in `mochi_preview.checkpoint`) as ordinary ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import (
    FP8_DTYPES,
    CheckpointError,
    Fp8Reader,
    Source,
    concat_rows,
    load_module,
    native_shapes,
    native_sources,
    open_checkpoint,
    swap_halves,
)
from ..files import write_atomic
from .fp8 import FP8Linear, block_linears, fp8_scale, quantize_dit_fp8, quantize_fp8, replace_module
from .model import AsymmDiT, DiTConfig

COMFY_PREFIX = "model.diffusion_model."
FP8_MODES = (None, "tensor", "channel", "checkpoint")


def diffusers_layout(keys: list[str]) -> dict[str, Source]:
    """Native key -> source over diffusers `MochiTransformer3DModel` keys."""
    depth = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    layout = {
        "pos_frequencies": Source(("pos_frequencies",)),
        "final_layer.mod.weight": Source(("norm_out.linear.weight",), swap_halves),
        "final_layer.mod.bias": Source(("norm_out.linear.bias",), swap_halves),
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
            layout[f"{native}.{wb}"] = Source((f"{theirs}.{wb}",))
    for i in range(depth):
        n, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        last = i == depth - 1
        qkv = lambda *names, d=d: Source(tuple(f"{d}attn1.{x}.weight" for x in names), concat_rows)
        layout |= {
            n + "attn.qkv_x.weight": qkv("to_q", "to_k", "to_v"),
            n + "attn.qkv_y.weight": qkv("add_q_proj", "add_k_proj", "add_v_proj"),
            n + "attn.q_norm_x.weight": Source((d + "attn1.norm_q.weight",)),
            n + "attn.k_norm_x.weight": Source((d + "attn1.norm_k.weight",)),
            n + "attn.q_norm_y.weight": Source((d + "attn1.norm_added_q.weight",)),
            n + "attn.k_norm_y.weight": Source((d + "attn1.norm_added_k.weight",)),
            n + "mlp_x.w1.weight": Source((d + "ff.net.0.proj.weight",), swap_halves),
            n + "mlp_x.w2.weight": Source((d + "ff.net.2.weight",)),
        }
        for wb in ("weight", "bias"):
            layout[f"{n}mod_x.{wb}"] = Source((f"{d}norm1.linear.{wb}",))
            layout[f"{n}mod_y.{wb}"] = Source((f"{d}norm1_context.linear{'_1' if last else ''}.{wb}",))
            layout[f"{n}attn.proj_x.{wb}"] = Source((f"{d}attn1.to_out.0.{wb}",))
            if not last:
                layout[f"{n}attn.proj_y.{wb}"] = Source((f"{d}attn1.to_add_out.{wb}",))
        if not last:
            layout[n + "mlp_y.w1.weight"] = Source((d + "ff_context.net.0.proj.weight",), swap_halves)
            layout[n + "mlp_y.w2.weight"] = Source((d + "ff_context.net.2.weight",))
    return layout


def _dit_path(path: Path) -> Path:
    """A dit.safetensors file, a diffusers transformer/ folder, or a model folder holding either."""
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


def open_dit_checkpoint(path: str | Path) -> tuple[Fp8Reader, dict[str, Source], str]:
    """Open a DiT checkpoint in any supported layout -> (reader, native layout, layout name)."""
    reader = open_checkpoint(_dit_path(Path(path)), prefixes=(COMFY_PREFIX,))
    keys = reader.keys()
    if any(k.startswith("transformer_blocks.") for k in keys):
        layout, name = diffusers_layout(keys), "diffusers"
    elif any(k.startswith("blocks.") for k in keys):
        layout, name = {}, "native"
    else:
        raise CheckpointError(
            f"{path} does not look like a Mochi DiT: no 'blocks.*' (native) or 'transformer_blocks.*' (diffusers) "
            f"tensors; it holds e.g. {sorted(keys)[:3]}"
        )
    return Fp8Reader(reader, f"DiT checkpoint {path} ({name})"), layout, name


@dataclass(frozen=True)
class StoredFp8(Source):
    """An FP8Linear's `weight` or `scale` exactly as an fp8 checkpoint stores it, whatever dtype is asked for."""

    part: str = "weight"  # "weight" | "scale"

    def read(self, reader: Fp8Reader, dtype: torch.dtype | None = None) -> torch.Tensor:
        (key,) = self.keys
        return reader.raw(key) if self.part == "weight" else reader.scale(key)

    def meta(self, reader: Fp8Reader, dtype: torch.dtype | None = None) -> torch.Tensor:
        (key,) = self.keys
        if self.part == "weight":
            return torch.empty(reader.shape(key), dtype=reader.fp8[key], device="meta")
        return torch.empty(reader.scale_shape(key), device="meta")


def _quantized(source: Source, part: str, granularity: str) -> Source:
    """An FP8Linear's `weight` or `scale`, quantizing the native weight `source` builds (read it in fp32)."""
    build = source.transform or (lambda w: w)
    if part == "weight":
        return Source(source.keys, lambda *tensors: quantize_fp8(build(*tensors), granularity)[0])
    # The scale builds the weight again: one layer, little next to reading the file, and no state.
    return Source(source.keys, lambda *tensors: fp8_scale(build(*tensors), granularity))


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


def _fp8_layers(model: AsymmDiT, reader: Fp8Reader, fp8: str | None, what: str, layout_name: str) -> list[str]:
    """Swap the blocks' Linears that `fp8` asks for to FP8Linear shells (meta model); returns their names."""
    if fp8 in ("tensor", "channel"):
        layers = block_linears(model)
        quantize_dit_fp8(model, fp8)
        return layers
    if fp8 is None:
        return []
    if layout_name == "diffusers":
        raise CheckpointError(f"{what}: fp8='checkpoint' reads native or ComfyUI files; use fp8='tensor' here")
    layers = [n for n in block_linears(model) if f"{n}.weight" in reader.fp8]
    if not layers:
        raise CheckpointError(
            f"{what} stores no fp8 block weights, so fp8='checkpoint' has nothing to keep; use fp8='tensor' or "
            "'channel' to quantize it while loading"
        )
    for n in layers:
        lin, w = model.get_submodule(n), f"{n}.weight"
        kw = dict(scale_shape=reader.scale_shape(w), weight_dtype=reader.fp8[w], device="meta")
        replace_module(model, n, FP8Linear(lin.in_features, lin.out_features, lin.bias is not None, **kw))
    return layers


def load_dit(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attention_backend: str = "auto",
    fp8: str | None = None,
    keep_block: Callable[[int], bool] | None = None,
) -> AsymmDiT:
    """Load a DiT from `dit.safetensors`, a diffusers `transformer/` folder, or a model folder holding either.

    Sizes come from the tensors; each tensor is cast to `dtype` as it is read (RoPE frequencies and QK-norm weights
    stay fp32), so a fp32 file loads as bf16 without a full fp32 copy in memory. FP8 checkpoints (plain, ComfyUI
    fp8_scaled, ours) are recognised from their tensors. `fp8` chooses the blocks' Linears:

    - None: everything in `dtype`; fp8 weights are dequantized (fp8 value * scale).
    - "tensor" / "channel": quantized to float8_e4m3fn with per-tensor / per-output-channel scales (FP8Linear) as
      they are read, one layer at a time: the peak is the fp8 model plus one layer in fp32.
    - "checkpoint": the checkpoint's own fp8 weights and scales, unchanged (FP8Linear); an error if it has none.
    Embedders, the final layer and norms are always in `dtype` (fp32 for norms and RoPE).

    Blocks i for which `keep_block(i)` is false are never read: their parameters stay empty meta tensors of the
    right dtype and shape (for `distributed.shard_dit`). The whole file is still checked.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported DiT dtype {dtype}; use torch.bfloat16 or torch.float32")
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {FP8_MODES}; got {fp8!r}")
    from ..configs import check_dit_config  # configs imports the dit package

    reader, layout, name = open_dit_checkpoint(path)
    what = f"DiT checkpoint {path} ({name})"
    cfg = infer_dit_config(native_shapes(reader, layout))
    try:
        check_dit_config(cfg, what)
    except ValueError as e:
        raise CheckpointError(f"{e}; the file is damaged or not a Mochi 1 preview DiT") from e
    with torch.device("meta"):
        model = AsymmDiT(cfg, attention_backend=attention_backend)

    layers = _fp8_layers(model, reader, fp8, what, name)  # FP8Linear shells, on meta until loaded
    layout, kept = dict(layout), fp8 == "checkpoint"
    for n in layers:
        base = layout.get(f"{n}.weight", Source((f"{n}.weight",)))
        for part in ("weight", "scale"):
            layout[f"{n}.{part}"] = StoredFp8(base.keys, part=part) if kept else _quantized(base, part, fp8)
    # FP8 parts are quantized from fp32 (or kept as stored), never built from `dtype`.
    fp32_names = model.fp32_parameter_names() + [f"{n}.{part}" for n in layers for part in ("weight", "scale")]
    skip = None
    if keep_block is not None:
        skip = lambda key: key.startswith("blocks.") and not keep_block(int(key.split(".")[1]))
    load_module(model, reader, layout, dtype, device, fp32_names, what=what, skip=skip)
    return model.eval().requires_grad_(False)


def save_dit_native(path: str | Path, source: str | Path | AsymmDiT, dtype: torch.dtype | None = None) -> Path:
    """Write a native `dit.safetensors` from a model or from a checkpoint in any supported layout.

    Refuses to overwrite. With `dtype`, tensors are converted (QK-norm weights and RoPE frequencies stay fp32). An
    FP8 model's fp8 weights and scales are written as they are (`load_dit(..., fp8="checkpoint")` reads them back);
    a fp8 checkpoint is written dequantized (fp32, or `dtype`).
    """

    def write(tmp: Path) -> None:
        if isinstance(source, AsymmDiT):
            state = {k: v.detach().cpu() for k, v in source.state_dict().items()}
        else:
            reader, layout, _ = open_dit_checkpoint(source)
            state = {k: s.read(reader) for k, s in native_sources(reader, layout).items()}
        if dtype is not None:
            keep = lambda k, v: k == "pos_frequencies" or "_norm_" in k or k.endswith(".scale") or v.dtype in FP8_DTYPES
            state = {k: v if keep(k, v) else v.to(dtype) for k, v in state.items()}
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))

    return write_atomic(path, write)
