"""Writing and reading MP4s (H.264, yuv420p, 30 fps like the reference); never leaving a half-written file."""

import json
import math
import time
from collections.abc import Sequence
from fractions import Fraction
from numbers import Real
from pathlib import Path
from typing import Any

import av
import numpy as np

from .files import write_atomic

try:  # swscale's default YUV->RGB rounding reads ~1/255 too dark; these flags make read_video unbiased
    from av.video.reformatter import Interpolation as _I

    _TO_RGB = {"interpolation": _I.BILINEAR | _I.ACCURATE_RND | _I.FULL_CHR_H_INT}
except (ImportError, AttributeError):  # older PyAV
    _TO_RGB = {}


def _as_frames(frames: Any) -> list[np.ndarray]:
    """Frames as a list of (H, W, 3) arrays, validated but not yet converted to uint8."""
    if hasattr(frames, "detach"):  # torch tensor; bf16 has no numpy dtype, so go through float32
        frames = frames.detach().cpu()
        frames = (frames.float() if frames.dtype.is_floating_point else frames).numpy()
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            hint = " (for a batch (B, T, H, W, 3) pass one video, e.g. frames[0])" if frames.ndim == 5 else ""
            raise ValueError(f"frames must be (T, H, W, 3); got shape {frames.shape}{hint}")
        seq = list(frames)
    elif isinstance(frames, Sequence) and not isinstance(frames, str | bytes):
        seq = [np.asarray(f.convert("RGB") if hasattr(f, "convert") else f) for f in frames]  # PIL or arrays
    else:
        raise TypeError(f"frames must be an array, a tensor or a list of images; got {type(frames).__name__}")
    if not seq:
        raise ValueError("no frames to write: the frame list is empty")
    first = seq[0]
    if first.ndim != 3 or first.shape[-1] != 3:
        raise ValueError(f"each frame must be (H, W, 3) RGB, channels last; got {first.shape}")
    height, width = first.shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs an even width and height; got {width}x{height} (crop or pad 1 px)")
    for i, f in enumerate(seq):
        if f.shape != first.shape:
            raise ValueError(f"frame {i} has shape {f.shape} but frame 0 has {first.shape}: sizes must match")
        if f.dtype != np.uint8 and not np.issubdtype(f.dtype, np.floating):
            raise TypeError(f"frames must be uint8 (0-255) or float (0-1); got {f.dtype}")
        if f.dtype != np.uint8 and not np.isfinite(f).all():
            raise ValueError(f"frame {i} contains NaN or infinite values")
    return seq


def _to_uint8(frame: np.ndarray) -> np.ndarray:
    """One frame as contiguous uint8; floats are clipped to [0, 1], x255 and truncated like the reference."""
    if frame.dtype != np.uint8:
        frame = (np.clip(frame, 0.0, 1.0) * 255).astype(np.uint8)
    return np.ascontiguousarray(frame)


def export_to_video(
    frames: Any, path: str | Path, fps: float = 30, metadata: dict | None = None, crf: float | None = None
) -> Path:
    """Write frames as H.264/yuv420p MP4; never overwrites `path` and never leaves a partial file.

    frames: numpy array or torch tensor (T, H, W, 3), or a list of (H, W, 3) arrays or PIL images; uint8
    (0-255) or float (0-1, clipped, then x255 and truncated like the reference).
    metadata: a JSON-able dict, stored as JSON in the MP4 "comment" tag (read_video returns it).
    crf: x264 quality, lower is better; None keeps x264's default (23), as the reference's moviepy writer did.
    """
    if not (isinstance(fps, Real) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number; got {fps!r}")
    seq = _as_frames(frames)
    comment = json.dumps(metadata, default=_json_default) if metadata is not None else None
    height, width = seq[0].shape[:2]

    def write(tmp: Path) -> None:
        with av.open(str(tmp), mode="w", format="mp4", container_options={"movflags": "+faststart"}) as out:
            if comment is not None:
                out.metadata["comment"] = comment
            options = {} if crf is None else {"crf": str(crf)}
            stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001), options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # swscale converts RGB with BT.601, limited range: tag it, or players may assume BT.709 for HD
            stream.codec_context.colorspace, stream.codec_context.color_range = 6, 1  # SMPTE170M, MPEG (tv)
            for frame in seq:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(_to_uint8(frame), format="rgb24")))
            out.mux(stream.encode(None))  # flush the encoder's delayed frames

    return write_atomic(path, write)


def read_video(path: str | Path) -> tuple[np.ndarray, dict]:
    """uint8 (T, H, W, 3) RGB frames and info: fps, codec, pix_fmt, width, height, frames, metadata, tags."""
    with av.open(str(path)) as src:
        stream = src.streams.video[0]
        frames = [f.to_ndarray(format="rgb24", **_TO_RGB) for f in src.decode(stream)]
        shape = (stream.codec_context.height, stream.codec_context.width, 3)
        frames = np.stack(frames) if frames else np.zeros((0, *shape), np.uint8)
        tags = dict(src.metadata)
        try:
            metadata = json.loads(tags.get("comment", "{}"))
        except json.JSONDecodeError:  # a comment that is not ours
            metadata = {}
        rate = stream.average_rate or stream.guessed_rate
        info = {
            "fps": float(rate) if rate else None,
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "frames": len(frames),
            "metadata": metadata if isinstance(metadata, dict) else {},
            "tags": tags,
        }
    return frames, info


def new_output_path(out_dir: str | Path, prefix: str = "output", suffix: str = ".mp4") -> Path:
    """A fresh `out_dir/<prefix>_<YYYYmmdd_HHMMSS>[_N]<suffix>` that does not exist yet; creates out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{prefix}_{time.strftime('%Y%m%d_%H%M%S')}"
    path, n = out_dir / f"{stem}{suffix}", 1
    while path.exists():
        path, n = out_dir / f"{stem}_{n}{suffix}", n + 1
    return path


def _json_default(obj: Any) -> Any:
    """JSON for the values a run record holds: numpy/torch scalars and arrays, paths."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON to `path` via a temporary file; never overwrites an existing file."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n"  # fails before any I/O
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
