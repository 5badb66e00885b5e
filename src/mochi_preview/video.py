"""Writing and reading videos: H.264/yuv420p MP4s that are byte-reproducible, GIFs, and diffusers' video utilities."""

import hashlib
import io
import json
import math
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import partial
from numbers import Real
from pathlib import Path
from typing import Any

import av
import numpy as np

from .files import write_atomic

# One encoder thread: x264's output then depends on the frames and options only, not on the machine's core count or
# on thread timing (10 encodes of the same frames give one stream; the thread count is also written into the stream).
X264 = {"threads": "1"}

try:  # swscale's default YUV->RGB rounding reads ~1/255 too dark; these flags make read_video unbiased
    from av.video.reformatter import Interpolation as _I

    TO_RGB = {"interpolation": _I.BILINEAR | _I.ACCURATE_RND | _I.FULL_CHR_H_INT}
except (ImportError, AttributeError):  # older PyAV
    TO_RGB = {}


def _as_frames(frames: Any) -> list[np.ndarray]:
    """Frames as a list of (H, W, 3) arrays, validated but not yet converted to uint8."""
    if hasattr(frames, "detach"):
        frames = _as_array(frames)
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            hint = " (for a batch (B, T, H, W, 3) pass one video, e.g. frames[0])" if frames.ndim == 5 else ""
            raise ValueError(f"frames must be (T, H, W, 3); got shape {frames.shape}{hint}")
        seq = list(frames)
    elif isinstance(frames, Sequence) and not isinstance(frames, str | bytes):
        seq = [_as_array(f) for f in frames]
    else:
        raise TypeError(f"frames must be an array, a tensor or a list of images; got {type(frames).__name__}")
    if not seq:
        raise ValueError("no frames to write: the frame list is empty")
    first = seq[0]
    if first.ndim != 3 or first.shape[-1] != 3:
        raise ValueError(f"each frame must be (H, W, 3) RGB, channels last; got {first.shape}")
    for i, f in enumerate(seq):
        if f.shape != first.shape:
            raise ValueError(f"frame {i} has shape {f.shape} but frame 0 has {first.shape}: sizes must match")
        if f.dtype != np.uint8 and not np.issubdtype(f.dtype, np.floating):
            raise TypeError(f"frames must be uint8 (0-255) or float (0-1); got {f.dtype}")
        if f.dtype != np.uint8 and not np.isfinite(f).all():
            raise ValueError(f"frame {i} contains NaN or infinite values")
    return seq


def _as_array(frame: Any) -> np.ndarray:
    """One frame (PIL image, array or tensor) as an array; PIL images become RGB uint8."""
    if hasattr(frame, "convert"):
        return np.asarray(frame.convert("RGB"))
    if hasattr(frame, "detach"):  # torch tensor; bf16 has no numpy dtype, so go through float32
        frame = frame.detach().cpu()
        return (frame.float() if frame.dtype.is_floating_point else frame).numpy()
    return np.asarray(frame)


def _to_uint8(frame: np.ndarray) -> np.ndarray:
    """One frame as contiguous uint8; floats are clipped to [0, 1], x255 and truncated like the reference."""
    if frame.dtype != np.uint8:
        frame = (np.clip(frame, 0.0, 1.0) * 255).astype(np.uint8)
    return np.ascontiguousarray(frame)


def _check_fps(fps: Any) -> None:
    if not (isinstance(fps, Real) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number; got {fps!r}")


def _check_even(height: int, width: int) -> None:
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs an even width and height; got {width}x{height} (crop or pad 1 px)")


def _write_mp4(
    seq: list[np.ndarray],
    path: Path,
    fps: float,
    metadata: dict | None,
    options: dict[str, str],
    size: tuple[int, int] | None = None,
    bit_rate: int | None = None,
) -> None:
    """Encode validated frames to `path` with x264 `options`; `size` (height, width) rescales (bicubic, like ffmpeg)."""
    comment = json.dumps(metadata, default=_json_default) if metadata is not None else None
    height, width = size or seq[0].shape[:2]
    with av.open(str(path), mode="w", format="mp4", container_options={"movflags": "+faststart"}) as out:
        if comment is not None:
            out.metadata["comment"] = comment
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001), options={**options, **X264})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        # swscale converts RGB with BT.601, limited range: tag it, or players may assume BT.709 for HD
        stream.codec_context.colorspace, stream.codec_context.color_range = 6, 1  # SMPTE170M, MPEG (tv)
        for frame in seq:
            frame = av.VideoFrame.from_ndarray(_to_uint8(frame), format="rgb24")
            if size is not None:
                frame = frame.reformat(width, height, "yuv420p", interpolation="BICUBIC")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))  # flush the encoder's delayed frames


def encode_video(frames: Any, path: str | Path, fps: float, metadata: dict | None = None, *, crf: float | None = None):
    """Write frames as an H.264/yuv420p MP4 at exactly `path` (replacing it; not atomic); returns `path`.

    The same frames always give the same video stream, packet for packet (see X264 and stream_digest).
    frames: numpy array or torch tensor (T, H, W, 3), or a list of (H, W, 3) arrays, tensors or PIL images; uint8
    (0-255) or float (0-1, clipped, then x255 and truncated like the reference).
    metadata: a JSON-able dict, stored as JSON in the MP4 "comment" tag (read_video returns it).
    crf: x264 quality, lower is better; None keeps x264's default (23), as the reference's moviepy writer did.
    """
    _check_fps(fps)
    seq = _as_frames(frames)
    _check_even(*seq[0].shape[:2])
    _write_mp4(seq, Path(path), fps, metadata, {} if crf is None else {"crf": str(crf)})
    return Path(path)


def export_to_video(
    video_frames: Any,
    output_video_path: str | Path | None = None,
    fps: float = 10,
    quality: float | None = 5.0,
    bitrate: int | None = None,
    macro_block_size: int | None = 16,
    *,
    metadata: dict | None = None,
) -> str:
    """diffusers' export_to_video: write an MP4 (a new temporary .mp4 when no path is given) and return its path.

    An existing file at the path is replaced atomically (never left half-written). quality: 0 (worst) to 10 (best),
    x264 crf = int((1 - quality / 10) * 51); None keeps x264's default. bitrate (bits/s) replaces quality when given.
    A size that is not a multiple of `macro_block_size` is scaled up to the next multiple, with a warning.
    metadata: as in encode_video.
    """
    _check_fps(fps)
    if quality is not None and not (isinstance(quality, Real) and 0 <= quality <= 10):
        raise ValueError(f"quality must be a number from 0 (worst) to 10 (best), or None; got {quality!r}")
    if bitrate is not None and not (isinstance(bitrate, int) and bitrate > 0):
        raise ValueError(f"bitrate must be a positive number of bits per second, or None; got {bitrate!r}")
    if macro_block_size is not None and not (isinstance(macro_block_size, int) and macro_block_size > 0):
        raise ValueError(f"macro_block_size must be a positive integer, or None; got {macro_block_size!r}")
    seq = _as_frames(video_frames)
    height, width = seq[0].shape[:2]
    block = macro_block_size or 1
    size = (-(-height // block) * block, -(-width // block) * block)
    if size == (height, width):
        size = None
    else:
        news = f"scaled up to {size[1]}x{size[0]}"
        warnings.warn(f"{width}x{height} is not a multiple of macro_block_size={block}: {news}", stacklevel=2)
    _check_even(*(size or (height, width)))
    options = {"crf": str(int((1 - quality / 10) * 51))} if quality is not None and bitrate is None else {}
    write = partial(_write_mp4, seq, fps=fps, metadata=metadata, options=options, size=size, bit_rate=bitrate)
    return _export(output_video_path, ".mp4", write)


def export_to_gif(image: Any, output_gif_path: str | Path | None = None, fps: float = 10) -> str:
    """diffusers' export_to_gif: an endlessly looping GIF of the frames, 1000 // fps ms each; returns its path.

    image: PIL images, or anything encode_video takes. An existing file is replaced atomically.
    """
    from PIL import Image

    _check_fps(fps)
    if fps > 1000:
        raise ValueError(f"fps must be at most 1000 for a GIF (frame times are whole milliseconds); got {fps!r}")
    images = [Image.fromarray(_to_uint8(f)) for f in _as_frames(image)]

    def write(tmp: Path) -> None:
        rest, ms = images[1:], int(1000 // fps)
        images[0].save(tmp, format="GIF", save_all=True, append_images=rest, optimize=False, duration=ms, loop=0)

    return _export(output_gif_path, ".gif", write)


def _export(path: str | Path | None, suffix: str, write: Callable[[Path], object]) -> str:
    """Publish `write`'s file at `path`, replacing it atomically, or at a new temporary file when None."""
    if path is not None:
        return str(write_atomic(path, write, replace=True))
    fd, path = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    try:
        return str(write_atomic(path, write, replace=True))
    except BaseException:
        os.unlink(path)
        raise


def frames_digest(frames: Any) -> str:
    """SHA-256 of the frames as encode_video writes them: uint8 (T, H, W, 3), C order."""
    digest = hashlib.sha256()
    for frame in _as_frames(frames):
        digest.update(_to_uint8(frame).tobytes())
    return digest.hexdigest()


def stream_digest(path: str | Path) -> str:
    """SHA-256 over the encoded video stream of a file: its codec header, then each packet's bytes, in order.

    The container around it (times, tags) does not count: two files hold the same video exactly when these match.
    """
    digest = hashlib.sha256()
    with av.open(str(path)) as src:
        stream = src.streams.video[0]
        extradata = stream.codec_context.extradata or b""
        digest.update(len(extradata).to_bytes(8, "little") + extradata)
        for packet in src.demux(stream):
            if packet.size:  # the demuxer ends with an empty flush packet
                digest.update(packet.size.to_bytes(8, "little") + bytes(packet))
    return digest.hexdigest()


def _open_source(source: str | Path) -> str | io.BytesIO:
    """A local path as str, or an http(s) URL's bytes in memory; a clear error for anything else."""
    text = str(source)
    if text.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(text, timeout=60) as response:
                return io.BytesIO(response.read())
        except (urllib.error.URLError, OSError) as e:
            raise ValueError(f"could not download {text}: {getattr(e, 'reason', e)}") from None
    if not os.path.isfile(text):
        raise ValueError(f"{text} is not a file, nor a URL starting with http:// or https://")
    return text


def load_image(image: Any, convert_method: Callable | None = None):
    """diffusers' load_image: a path, an http(s) URL, a PIL image or an (H, W[, C]) array as a PIL image.

    EXIF rotation is applied; the result is RGB unless `convert_method(image)` converts it instead.
    Arrays are uint8 (0-255) or float (0-1).
    """
    from PIL import Image, ImageOps

    if isinstance(image, str | Path):
        image = Image.open(_open_source(image))
    elif isinstance(image, np.ndarray) or hasattr(image, "detach"):
        array = _as_array(image)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, -1)
        image = Image.fromarray(_to_uint8(_as_frames([array])[0]))
    elif not isinstance(image, Image.Image):
        raise ValueError(f"image must be a path, an http(s) URL, a PIL image or an array; got {type(image).__name__}")
    image = ImageOps.exif_transpose(image)
    return convert_method(image) if convert_method is not None else image.convert("RGB")


def load_video(video: str | Path, convert_method: Callable | None = None, return_fps: bool = False):
    """diffusers' load_video: a video file or http(s) URL (MP4 or anything FFmpeg reads; GIF) as PIL images.

    The images are RGB unless `convert_method(images)` converts them instead; return_fps=True also returns the
    frame rate (None when the file does not record one).
    """
    from PIL import Image, ImageSequence

    source = _open_source(video)
    if str(video).lower().endswith(".gif"):
        with Image.open(source) as gif:
            duration = gif.info.get("duration")
            images = [frame.copy() for frame in ImageSequence.Iterator(gif)]
        fps = 1000 / duration if duration else None
    else:
        with av.open(source) as src:
            stream = src.streams.video[0]
            images = [Image.fromarray(f.to_ndarray(format="rgb24", **TO_RGB)) for f in src.decode(stream)]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else None
    images = convert_method(images) if convert_method is not None else [im.convert("RGB") for im in images]
    return (images, fps) if return_fps else images


def read_video(path: str | Path) -> tuple[np.ndarray, dict]:
    """uint8 (T, H, W, 3) RGB frames and info: fps, codec, pix_fmt, width, height, frames, metadata, tags."""
    with av.open(str(path)) as src:
        stream = src.streams.video[0]
        frames = [f.to_ndarray(format="rgb24", **TO_RGB) for f in src.decode(stream)]
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


def _json_default(obj: Any) -> Any:
    """JSON for the values a run record holds: numpy/torch scalars and arrays, paths."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
