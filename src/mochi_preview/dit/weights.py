"""DiT checkpoints: native `dit.safetensors` (optionally ComfyUI-prefixed) and the diffusers `transformer/` folder.

The model's own keys are the native ones; the diffusers layout is a set of recipes that rebuild each native tensor
(fusing q/k/v, swapping the SwiGLU halves and the final layer's [scale; shift] back to [shift; scale]).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..weights import (
    CheckpointError,
    Recipe,
    SafetensorsFiles,
    concat_rows,
    identity_layout,
    load_into_module,
    native_shapes,
    open_checkpoint,
    swap_halves,
)
from .model import AsymmDiT, DiTConfig

COMFY_PREFIX = "model.diffusion_model."


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


def load_dit(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attention_backend: str = "sdpa",
) -> AsymmDiT:
    """Load a DiT from `dit.safetensors`, a diffusers `transformer/` folder, or a model folder holding either.

    Sizes come from the tensors; each tensor is cast to `dtype` as it is read (RoPE frequencies and QK-norm weights
    stay fp32), so a fp32 file loads as bf16 without a full fp32 copy in memory.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported DiT dtype {dtype}; use torch.bfloat16 or torch.float32")
    files, layout, name = open_dit_checkpoint(path)
    cfg = infer_dit_config(native_shapes(files, layout))
    with torch.device("meta"):
        model = AsymmDiT(cfg, attention_backend=attention_backend)
    load_into_module(
        model,
        files,
        layout,
        dtype,
        device,
        model.fp32_parameter_names(),
        what=f"DiT checkpoint {path} ({name})",
    )
    return model.eval().requires_grad_(False)


def save_dit_native(path: str | Path, source: str | Path | AsymmDiT, dtype: torch.dtype | None = None) -> Path:
    """Write a native `dit.safetensors` from a model or from a checkpoint in any supported layout.

    Refuses to overwrite. With `dtype`, tensors are converted (QK-norm weights and RoPE frequencies stay fp32).
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; not overwriting it")
    if isinstance(source, AsymmDiT):
        state = {k: v.detach().cpu() for k, v in source.state_dict().items()}
    else:
        files, layout, _ = open_dit_checkpoint(source)
        state = {k: r.build(files.get) for k, r in layout.items()}
    if dtype is not None:
        keep = lambda k: k == "pos_frequencies" or "_norm_" in k
        state = {k: v if keep(k) else v.to(dtype) for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.rename(path)
    return path
