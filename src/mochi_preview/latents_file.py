"""Latents files: a run's finished latents and everything needed to decode them later, in one safetensors file.

Written by `--save_latents PATH` once sampling ends, and by the CLI and the web UI when the VAE decode runs out of
memory twice (so a long sampling run is never lost). `python -m mochi_preview.infer --decode_latents PATH` loads only
the VAE decoder, decodes the file and writes the MP4 and sidecar the run would have written.

The file holds one tensor, "latents": (B, 12, T, H/8, W/8) float32 in DiT space (what the sampler ends with, before
the latent statistics are undone), and one metadata entry, "mochi", a JSON object:
* "format", "version": FORMAT and VERSION;
* "settings": the generation's settings under their file names (as in sweep lines and sidecars), with the seed used;
* "model_dir": the model folder the latents came from (its VAE decoder decodes them);
* "latent_stats": {"mean": [...], "std": [...]}, the per-channel statistics that take DiT space to VAE space;
* "decode": {"dtype": the decoder's dtype in the run ("float32", "bfloat16"), "vae": the run's decode options,
  "fps": the MP4's frame rate};
* "record": the sidecar the run would have written, less what only the decode knows (its time and memory).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .files import write_atomic

FORMAT = "mochi-preview-latents"
VERSION = 1
TENSOR = "latents"
METADATA_KEY = "mochi"
REQUIRED = ("settings", "model_dir", "latent_stats", "decode", "record")
SUFFIX = ".latents.safetensors"


def save_latents(path: str | Path, latents: torch.Tensor, metadata: dict) -> Path:
    """Write DiT-space `latents` (B, 12, T, H, W) and `metadata` (the keys in REQUIRED) to `path`, atomically;
    an existing file is never replaced."""
    if latents.ndim != 5:
        raise ValueError(f"latents must be shaped (B, C, T, H, W); got {tuple(latents.shape)}")
    if missing := [k for k in REQUIRED if k not in metadata]:
        raise ValueError(f"latents metadata lacks {missing}")
    header = json.dumps({"format": FORMAT, "version": VERSION, **metadata}, default=str)
    tensor = latents.detach().to("cpu", torch.float32).contiguous()
    return write_atomic(path, lambda tmp: save_file({TENSOR: tensor}, str(tmp), metadata={METADATA_KEY: header}))


def load_latents(path: str | Path) -> tuple[torch.Tensor, dict]:
    """(latents (B, 12, T, H, W) float32 in DiT space, metadata) from a file `save_latents` wrote."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latents file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(METADATA_KEY)
            keys = set(f.keys())
            latents = f.get_tensor(TENSOR) if TENSOR in keys else None
    except Exception as e:  # safetensors raises its own error types for files that are not safetensors
        raise ValueError(f"{path} is not a safetensors file ({e})") from None
    if header is None or latents is None:
        raise ValueError(f"{path} is not a Mochi latents file (no {METADATA_KEY!r} metadata or no {TENSOR!r} tensor)")
    metadata = json.loads(header)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a Mochi latents file (format {metadata.get('format')!r})")
    if metadata.get("version") != VERSION:
        raise ValueError(f"{path} is a version {metadata.get('version')} latents file; this code reads {VERSION}")
    if missing := [k for k in REQUIRED if k not in metadata]:
        raise ValueError(f"{path}: the metadata lacks {missing}")
    return latents, metadata


def latent_stats_of(metadata: dict) -> tuple[list[float], list[float]]:
    """The (mean, std) a latents file was made with."""
    stats = metadata["latent_stats"]
    return [float(x) for x in stats["mean"]], [float(x) for x in stats["std"]]


def latents_path_for(video: str | Path) -> Path:
    """Where a run's latents go when its decode fails: beside its video, `output_x.mp4` -> `output_x.latents...`."""
    video = Path(video)
    return video.with_name(video.name.removesuffix(video.suffix) + SUFFIX)


def decode_command(path: str | Path, model_dir: str | Path) -> str:
    """The command line that decodes a latents file into its MP4 and sidecar."""
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    return f"python -m mochi_preview.infer --decode_latents {q(path)} --model_dir {q(model_dir)}"
