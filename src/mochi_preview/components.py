"""The pipeline's parts under diffusers' names: `pipe.vae`, `pipe.scheduler`, `pipe.video_processor`, output tuples.

These are thin views over what `MochiPipeline` owns (the VAE decoder, the sigma schedule, the decode options), so a
script written for diffusers' MochiPipeline finds the attributes it reaches into.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .sampling import check_sigmas, linear_quadratic_schedule
from .vae import LATENTS_MEAN, LATENTS_STD


class TupleOutput:
    """diffusers' output indexing: `out[0]`, `out["frames"]`, `out.to_tuple()` (the first field only)."""

    _tuple_fields: tuple[str, ...] = ()

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, name) for name in self._tuple_fields)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def __getitem__(self, key: int | slice | str):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{key!r}; this output has {self.keys()}")
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclass
class DecoderOutput(TupleOutput):
    """`pipe.vae.decode`'s result: `sample` is the video (B, 3, T, H, W) in [-1, 1]."""

    sample: torch.Tensor
    _tuple_fields = ("sample",)


@dataclass(frozen=True)
class VAEConfig:
    """What diffusers' `vae.config` holds for turning DiT latents into VAE latents: z * std / scaling_factor + mean."""

    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    scaling_factor: float = 1.0
    latent_channels: int = 12


class MochiVAE:
    """`pipe.vae`: the pipeline's VAE decoder with diffusers' methods (tiling, slicing, decode of VAE latents)."""

    def __init__(self, pipe):
        self._pipe = pipe
        self.use_slicing = False

    @property
    def decoder(self) -> torch.nn.Module:
        return self._pipe.decoder

    @property
    def config(self) -> VAEConfig:
        mean, std = self._pipe.latent_stats or (LATENTS_MEAN, LATENTS_STD)
        return VAEConfig(tuple(mean), tuple(std))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return self._pipe.device

    def enable_tiling(self, **options) -> None:
        """Decode in overlapping spatial tiles (options: tiles=(rows, cols), overlap, frames_per_chunk)."""
        self._pipe.enable_vae_tiling(**options)

    def disable_tiling(self) -> None:
        """Decode the whole frame at once (the "auto" mode may still stream through time)."""
        self._pipe.disable_vae_tiling()

    def enable_slicing(self) -> None:
        """Decode the videos of a batch one at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """VAE-space latents (B, 12, T, H, W) -> video (B, 3, 6T - 5, 8H, 8W) in [-1, 1] (clamped), float32."""
        frames = self._pipe.decode(z, output_type="pt", denormalize=False)  # (B, T, 3, H, W) in [0, 1]
        video = frames.permute(0, 2, 1, 3, 4).mul(2.0).sub(1.0)
        return DecoderOutput(video) if return_dict else (video,)


class VideoProcessor:
    """`pipe.video_processor.postprocess_video`: a decoded video in [-1, 1] -> "np", "pt" or "pil" frames."""

    def __init__(self, vae_scale_factor: int = 8):
        self.vae_scale_factor = vae_scale_factor  # pixels per latent pixel (diffusers' argument; Mochi's is 8)

    def postprocess_video(self, video: torch.Tensor, output_type: str = "np"):
        """(B, 3, T, H, W) in [-1, 1] -> "np" (B, T, H, W, 3) floats in [0, 1], "pt" (B, T, 3, H, W), "pil"."""
        from .pipeline import convert_frames

        frames = video.float().add(1.0).div(2.0).clamp(0.0, 1.0).permute(0, 2, 3, 4, 1)
        return convert_frames(frames, output_type)


class MochiScheduler:
    """`pipe.scheduler`: the linear-quadratic flow schedule of the latest (or next) call.

    `sigmas`: the num_inference_steps + 1 noise levels from 1 (noise) to 0 (clean); `timesteps`: what diffusers'
    scheduler holds for the same schedule and passes to `callback_on_step_end`: 1000 * (1 - sigma) of each step's
    starting noise level, float32 (0 = pure noise, Mochi's DiT convention).
    """

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, threshold_noise: float = 0.025, linear_steps: int | None = None):
        self.threshold_noise, self.linear_steps = threshold_noise, linear_steps
        self.sigmas = torch.tensor([1.0, 0.0], dtype=torch.float64)
        self.timesteps = torch.zeros(1)

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        threshold_noise: float | None = None,
        linear_steps: int | None = None,
    ) -> list[float]:
        """Set (and return, as floats) the schedule: `sigmas` if given, else linear-quadratic over the steps."""
        if sigmas is not None:
            values = check_sigmas(sigmas)
        else:
            tau = self.threshold_noise if threshold_noise is None else threshold_noise
            values = linear_quadratic_schedule(num_inference_steps, tau, linear_steps or self.linear_steps)
        self.sigmas = torch.tensor(values, dtype=torch.float64)
        # in float32 from the float32 sigmas, as diffusers' FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
        self.timesteps = ((1.0 - torch.tensor(values[:-1], dtype=torch.float32)) * 1000.0).to(device)
        return values


# ---- saving in diffusers' layout -------------------------------------------------------------------------------


def diffusers_dit_state(dit) -> dict[str, torch.Tensor]:
    """The DiT's tensors under diffusers' `MochiTransformer3DModel` names (the inverse of `dit.layout`'s mapping)."""
    from .checkpoint import Source, concat_rows, swap_halves
    from .dit.layout import diffusers_layout

    layout = diffusers_layout([f"transformer_blocks.{i}." for i in range(dit.cfg.depth)])
    state = {}
    for name, tensor in dit.state_dict().items():
        source = layout.get(name)
        if type(source) is not Source:  # unmapped, or an fp8 layer's weight and scale
            raise ValueError(f"the DiT's {name!r} has no diffusers name (an fp8 DiT? load it without fp8 to save it)")
        tensor = tensor.detach().cpu()
        if source.transform is concat_rows:
            state |= dict(zip(source.keys, tensor.chunk(len(source.keys))))
        else:
            state[source.keys[0]] = swap_halves(tensor) if source.transform is swap_halves else tensor
    return {k: v.contiguous() for k, v in state.items()}


def diffusers_dit_config(cfg) -> dict:
    """diffusers' config.json for a `MochiTransformer3DModel` of these sizes."""
    return {
        "_class_name": "MochiTransformer3DModel",
        "activation_fn": "swiglu",
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels,
        "max_sequence_length": 256,
        "num_attention_heads": cfg.num_heads,
        "num_layers": cfg.depth,
        "out_channels": None,
        "patch_size": cfg.patch_size,
        "pooled_projection_dim": cfg.dim_y,
        "qk_norm": "rms_norm",
        "text_embed_dim": cfg.text_dim,
        "time_embed_dim": cfg.timestep_freq_dim,
    }


def diffusers_dit_problems(cfg) -> list[str]:
    """What diffusers' `MochiTransformer3DModel` cannot describe about this DiT (empty: it loads it): it sizes each
    SwiGLU hidden layer as 8 * width // 3, where native Mochi rounds up to a multiple of 256 (equal at the published
    widths, spec section 12)."""
    widths = {"visual": (cfg.mlp_hidden_x, cfg.num_heads * cfg.head_dim), "text": (cfg.mlp_hidden_y, cfg.dim_y)}
    return [
        f"the {stream} MLP is {hidden} wide where diffusers makes it 8 * {dim} // 3 = {8 * dim // 3}"
        for stream, (hidden, dim) in widths.items()
        if hidden != 8 * dim // 3
    ]


SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True, "shift": 1.0}
MODEL_INDEX = {
    "_class_name": "MochiPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "MochiTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLMochi"],
}


def variant_name(name: str, variant: str | None) -> str:
    """`diffusion_pytorch_model.safetensors` -> `diffusion_pytorch_model.bf16.safetensors` (diffusers' naming)."""
    stem, _, suffix = name.partition(".")
    return f"{stem}.{variant}.{suffix}" if variant else name
