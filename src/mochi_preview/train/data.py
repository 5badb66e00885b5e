"""Fine-tuning data: a folder of videos with same-name `.txt` captions, encoded once into a per-clip cache.

The layout is Genmo's (`clip.mp4` + `clip.txt`), subfolders included. Each clip is read with PyAV (its frame rate
from the stream), resampled to `fps` when one is set, centre-cropped to the training aspect, resized and cut to its
first `num_frames` (6k + 1) frames; then the VAE encoder's posterior (mean, logvar) and T5's features of the caption
are stored in one safetensors file per clip, already normalised to the DiT's latent space (as `encode_latent_data`
makes them). Files are written whole or not at all, and a rerun reuses every file made from the same video, caption,
settings and model, so a killed preprocessing resumes where it stopped. A clip that cannot be read, is too short or
has no caption is reported by name and skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..files import write_atomic
from ..video import TO_RGB
from .dit import LatentData, encode_latent_data

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")
CACHE_FORMAT = 1


class ClipError(ValueError):
    """A clip that cannot serve as training data (unreadable, too short); the message says why."""


@dataclass(frozen=True)
class ClipSpec:
    """The size clips are trained at; fps None keeps each clip's own frames."""

    width: int
    height: int
    num_frames: int
    fps: float | None = 30.0


@dataclass
class PrepareReport:
    """What preprocessing did: cache files made, reused, and the clips skipped with the reason."""

    encoded: list[Path] = field(default_factory=list)
    reused: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (clip, reason)

    @property
    def files(self) -> list[Path]:
        """Every usable cache file, in the clips' order."""
        return sorted(self.encoded + self.reused)


def find_clips(folder: str | Path) -> list[Path]:
    """Video files under `folder` (subfolders included, hidden names left out), sorted."""
    folder = Path(folder)
    found = [
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in VIDEO_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def centre_crop_resize(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, height, width, 3) uint8: the largest centred crop of the target aspect, resized
    (bilinear with antialiasing when shrinking)."""
    h, w = frames.shape[1:3]
    if w * height > h * width:  # too wide: keep the full height
        cw = round(h * width / height)
        frames = frames[:, :, (w - cw) // 2 : (w - cw) // 2 + cw]
    else:
        ch = round(w * height / width)
        frames = frames[:, (h - ch) // 2 : (h - ch) // 2 + ch]
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, h, w)
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def read_clip(path: str | Path, spec: ClipSpec) -> np.ndarray:
    """The clip's first spec.num_frames frames (at spec.fps, picking the nearest source frames), cropped and resized:
    (T, H, W, 3) uint8. Raises ClipError saying why a clip cannot be used."""
    try:
        with av.open(str(path)) as src:
            if not src.streams.video:
                raise ClipError("no video stream")
            stream = src.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            source_fps = float(rate) if rate else None
            if spec.fps is not None and not source_fps:
                raise ClipError("the video records no frame rate (set data.fps: null to use its frames as they are)")
            step = source_fps / spec.fps if spec.fps is not None else 1.0
            wanted = [round(i * step) for i in range(spec.num_frames)]  # source frame of each training frame
            frames = []
            for i, frame in enumerate(src.decode(stream)):
                while len(frames) < len(wanted) and wanted[len(frames)] == i:
                    frames.append(frame.to_ndarray(format="rgb24", **TO_RGB))
                if len(frames) == len(wanted):
                    break
    except ClipError:
        raise
    except Exception as e:  # any decoding failure (damaged file, not a video): the clip is skipped, not the run
        raise ClipError(f"cannot be read: {type(e).__name__}: {e}") from None
    if len(frames) < spec.num_frames:
        at = f" at {spec.fps:g} fps" if spec.fps is not None else ""
        raise ClipError(f"too short: {len(frames)} frames{at}, {spec.num_frames} needed")
    return centre_crop_resize(np.stack(frames), spec.width, spec.height)


def _fingerprint(video: Path, caption: str, spec: ClipSpec, model: str) -> str:
    """What a cache file was made from: a changed video, caption, size or model makes it stale."""
    stat = video.stat()
    return json.dumps(
        {
            "format": CACHE_FORMAT,
            "video_bytes": stat.st_size,
            "video_mtime_ns": stat.st_mtime_ns,
            "caption_sha256": hashlib.sha256(caption.encode()).hexdigest(),
            "spec": [spec.width, spec.height, spec.num_frames, spec.fps],
            "model": model,
        },
        sort_keys=True,
    )


def _cached(path: Path, fingerprint: str) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("source") == fingerprint
    except Exception:  # unreadable: made again
        return False


def prepare(
    data_dir: str | Path,
    cache_dir: str | Path,
    spec: ClipSpec,
    load_models: Callable[[], tuple],
    model_key: str,
    log: Callable[[str], object] = print,
) -> PrepareReport:
    """Encode every captioned clip under `data_dir` into `cache_dir` (one `<relative path>.safetensors` each),
    reusing up-to-date files. `load_models()` -> (VAE encoder, TextEncoder, latent mean (12,), latent std (12,),
    device) is called only if some clip needs encoding; `model_key` names the model in the fingerprints."""
    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    report, models = PrepareReport(), None
    for video in find_clips(data_dir):
        name = video.relative_to(data_dir).as_posix()
        caption_file = video.with_suffix(".txt")
        if not caption_file.is_file():
            report.skipped.append((name, f"no caption: {caption_file.name} is missing"))
            log(f"skipped {name}: no caption ({caption_file.name} is missing)")
            continue
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
        out = cache_dir / f"{name}.safetensors"
        fingerprint = _fingerprint(video, caption, spec, model_key)
        if _cached(out, fingerprint):
            report.reused.append(out)
            continue
        try:
            frames = read_clip(video, spec)
        except ClipError as e:
            report.skipped.append((name, str(e)))
            log(f"skipped {name}: {e}")
            continue
        models = models or load_models()
        encode_clip(out, frames, caption, fingerprint, *models)
        report.encoded.append(out)
    return report


@torch.no_grad()
def encode_clip(path: Path, frames: np.ndarray, caption: str, fingerprint: str, encoder, text, mean, std, device):
    """Write one clip's cache file: posterior mean and logvar (12, T, h, w) and caption features (L, D), mask (L,)."""
    video = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].to(device)  # (1, 3, T, H, W) uint8
    with torch.autocast("cuda", torch.bfloat16, enabled=torch.device(device).type == "cuda"):  # as the reference
        data = encode_latent_data(encoder, text, [(video, [caption])], mean.to(device), std.to(device), True)
    tensors = {"mean": data.mean[0], "logvar": data.logvar[0], "features": data.features[0], "mask": data.mask[0]}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"source": fingerprint, "caption": caption}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), replace=True)


def load_cache(files: list[Path]) -> LatentData:
    """The cache files as one LatentData (text padded to the longest caption), in the given order."""
    if not files:
        raise ValueError("no usable clips: every clip was skipped (see the messages above)")
    parts, captions = [], []
    for path in files:
        with safe_open(str(path), "pt") as f:
            parts.append({k: f.get_tensor(k) for k in f.keys()})
            captions.append(f.metadata()["caption"])
    n_text = max(p["features"].shape[0] for p in parts)
    pad = lambda t: F.pad(t, (0, 0, 0, n_text - t.shape[0])) if t.ndim == 2 else F.pad(t, (0, n_text - t.shape[0]))
    shapes = {tuple(p["mean"].shape) for p in parts}
    if len(shapes) > 1:
        raise ValueError(f"cache files of different latent shapes {sorted(shapes)}: they were made at other sizes")
    return LatentData(
        torch.stack([p["mean"] for p in parts]),
        torch.stack([pad(p["features"]) for p in parts]),
        torch.stack([pad(p["mask"].bool()) for p in parts]),
        torch.stack([p["logvar"] for p in parts]),
        captions,
    )
