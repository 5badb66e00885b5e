"""Conditioning a generation on pixels: an image as the first frame, a video to re-draw, a video to continue.

Mochi's VAE is causal: latent frame 0 encodes video frame 0 alone and latent frame k >= 1 encodes frames 6k-5 ... 6k
given the ones before. So an image encoded as a one-frame video *is* latent frame 0 of any video that starts with
it, and the last 6(K-1)+1 frames of a video encode to K latent frames that can start a new one. The DiT was trained
on text alone; these inputs steer its sampler without new weights:

- **anchoring** (image to video, extension): after every Euler step the anchored latent frames are put back on their
  own noising path `sigma * eps0 + (1 - sigma) * x` (eps0: their initial noise), so the DiT always sees them at the
  noise level of the rest; or, softer ("guide"), their velocity is pulled toward the one that reaches `x`.
- **video to video**: sampling starts from `sigma0 * eps + (1 - sigma0) * x` at sigma0 = `strength`, on the
  linear-quadratic schedule cut at sigma0. "Skip a fraction of the steps" would not do: Mochi's schedule stays
  above sigma = 0.975 for its first half, so skipping half the steps still starts from almost pure noise.

Large inputs encode in overlapping spatial tiles, cross-faded (`encode(..., tiles)`), when the pipeline's VAE
tiling or its memory budget asks for it (`encode_plan`).

What the causal VAE does not allow: a last-frame keyframe. The last latent frame encodes 6 frames together with
everything before them, so a lone final image has no latent of its own to anchor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .geometry import MOCHI
from .sampling import DiTCall, linear_quadratic_schedule
from .vae.decode import blend_ramps, next_tiles, tile_spans
from .vae.latents import normalize_latents

MODES = ("replace", "guide")
INPUTS = ("image", "video", "extend")  # the pipeline's keywords (the CLI: --image, --init_video, --extend)
FLAGS = {"image": "--image", "video": "--init_video", "extend": "--extend"}
# "guide" corrects the anchored frames' velocity halfway toward the image: at 1 it would be "replace" exactly (from a
# point on the anchor's path, the velocity that reaches x is the path's own); measured in bench/bench_conditioning.py
GUIDE_STRENGTH = 0.5
MAX_UPSCALE = 4.0  # an image enlarged more than this is refused: the video would show its pixels, not the picture
MIN_VIDEO_FRAMES = MOCHI.num_frames(2)  # 7: two latent frames
ENCODE_OVERLAP = 2  # latent pixels (16 video pixels) that neighbouring encode tiles share and cross-fade over


@dataclass
class Conditioning:
    """What a pixel input changes in a generation: its start, its schedule and what happens around each step."""

    latents: torch.Tensor  # the initial latents (B, 12, T, h, w), fp32
    sigmas: list[float] | None = None  # a cut schedule (video to video); None keeps the request's
    after_step: Callable[[int, float, torch.Tensor], torch.Tensor | None] | None = None  # denoise's callback
    dit_hook: Callable[..., torch.Tensor] | None = None  # the "guide" mode's correction: (call, inner=None)
    notes: list[str] = field(default_factory=list)  # what was done to the input (resized, trimmed...)
    record: dict = field(default_factory=dict)  # for the sidecar


# ---- pixels in -------------------------------------------------------------------------------------------------


def fit_image(image, height: int, width: int) -> tuple[np.ndarray, str | None]:
    """A PIL image, an (H, W, 3) array or a path -> (height, width, 3) uint8, scaled to cover and centre-cropped.

    Returns the note to show when the image was resized or cropped (None when it already had the size).
    """
    from PIL import Image

    if isinstance(image, str | Path):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        try:
            image = Image.open(path)
            image.load()
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {e} (PNG, JPEG, WebP... are read)") from None
    elif isinstance(image, np.ndarray | torch.Tensor):
        array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"an image array must be (H, W, 3) RGB; got shape {array.shape}")
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
        image = Image.fromarray(array)
    elif not hasattr(image, "convert"):
        raise TypeError(f"image must be a PIL image, an (H, W, 3) array or a path; got {type(image).__name__}")
    image = image.convert("RGB")
    w0, h0 = image.size
    scale = check_image_size(w0, h0, height, width)
    if (w0, h0) == (width, height):
        return np.asarray(image), None
    w1, h1 = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    left, top = (w1 - width) // 2, (h1 - height) // 2
    image = image.resize((w1, h1), Image.Resampling.LANCZOS).crop((left, top, left + width, top + height))
    cropped = " and centre-cropped" if (w1, h1) != (width, height) else ""
    return np.asarray(image), f"image resized from {w0}x{h0} to {w1}x{h1}{cropped} to {width}x{height}"


def check_image_size(w0: int, h0: int, height: int, width: int) -> float:
    """The scale that makes a w0 x h0 image cover the video; an image too small for it is refused."""
    scale = max(width / w0, height / h0)
    if scale > MAX_UPSCALE:
        need = (int(np.ceil(width / MAX_UPSCALE)), int(np.ceil(height / MAX_UPSCALE)))
        raise ValueError(
            f"the image is {w0}x{h0}, too small for a {width}x{height} video (it would be enlarged {scale:.1f}x); "
            f"give one of at least {need[0]}x{need[1]}"
        )
    return scale


def check_video_shape(t: int, h: int, w: int, height: int | None = None, width: int | None = None) -> int:
    """The frames of a (t, h, w) video that are used (its longest 6k+1 prefix); refuses one too short, of another
    size than the requested one (when given), or of a size Mochi cannot make."""
    if t < MIN_VIDEO_FRAMES:
        raise ValueError(f"the video has {t} frames; at least {MIN_VIDEO_FRAMES} are needed")
    if (height is not None and height != h) or (width is not None and width != w):
        raise ValueError(
            f"the video is {w}x{h} but {width}x{height} was asked for; leave width and height unset to use the "
            f"video's size, or resize the video"
        )
    used = MOCHI.num_frames(MOCHI.latent_frames(t))
    if problems := MOCHI.problems(used, h, w):
        raise ValueError(f"the video cannot be used as it is: {'; '.join(problems)}")
    return used


def fit_video(frames: np.ndarray, height: int | None = None, width: int | None = None) -> tuple[np.ndarray, str | None]:
    """(T, H, W, 3) uint8 frames -> the longest 6k+1 prefix; the size must be the requested one (when given)."""
    t, h, w = frames.shape[:3]
    used = check_video_shape(t, h, w, height, width)
    note = None if used == t else f"the video has {t} frames; using its first {used} (frames must be 6k+1)"
    return frames[:used], note


@torch.inference_mode()
def encode(
    encoder: torch.nn.Module,
    frames: np.ndarray,
    stats=None,
    tiles: tuple[int, int] = (1, 1),
    overlap: int = ENCODE_OVERLAP,
) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames, T = 6k+1 -> the normalised latent mean (1, 12, k+1, H/8, W/8), fp32 on the CPU.

    `tiles` (rows, cols): encode overlapping spatial tiles one at a time (the working memory of one tile) and
    cross-fade their latents over the `overlap` latent pixels neighbours share, as the tiled decode does. Not exact:
    a tile's GroupNorms see its own pixels only, and its edge latents miss the context beyond the tile.
    """
    param = next(encoder.parameters())
    video = torch.from_numpy(np.array(frames, copy=True)).permute(3, 0, 1, 2)[None]  # (1, 3, T, H, W) uint8
    s = encoder.config.spatial_factor
    rows = tile_spans(video.shape[3] // s, tiles[0], overlap, "height")
    cols = tile_spans(video.shape[4] // s, tiles[1], overlap, "width")
    mean = None
    for (h0, h1), ramp_h in zip(rows, blend_ramps(rows, 1, overlap, "cpu")):
        for (w0, w1), ramp_w in zip(cols, blend_ramps(cols, 1, overlap, "cpu")):
            tile = video[:, :, :, h0 * s : h1 * s, w0 * s : w1 * s].to(param.device, torch.float32) / 127.5 - 1.0
            part = encoder(tile)[0].float().cpu()  # (1, 12, K, h1 - h0, w1 - w0)
            if mean is None:
                mean = torch.zeros(*part.shape[:3], rows[-1][1], cols[-1][1])
            mean[:, :, :, h0:h1, w0:w1] += part * (ramp_h[:, None] * ramp_w[None, :])
    return normalize_latents(mean, *(stats or (None, None)))


def encode_bytes(config, frames: int, height: int, width: int) -> int:
    """Working bytes of encoding (frames, height, width) pixels in fp32, estimated from the encoder's first level,
    where it peaks: a ResBlock's input, normalised copy, convolution output and sum at the first width, beside the
    Fourier features and the RGB input."""
    return 4 * frames * height * width * (4 * config.channels[0] + config.in_channels + 3)


def encode_plan(config, shape: tuple[int, int, int], vae_options: dict, budget: int) -> tuple[tuple[int, int], int]:
    """(tiles, overlap) for encoding a (T, H, W) input under a pipeline's VAE options (`enable_vae_tiling`): "full"
    in one piece, "tiled" in its `tiles` when given, else the fewest tiles whose encode fits `budget` bytes."""
    overlap = vae_options.get("overlap", ENCODE_OVERLAP)
    mode = vae_options.get("mode", "auto")
    if mode == "full":
        return (1, 1), overlap
    if mode != "tiled" or vae_options.get("tiles") is None:
        return encode_tiles(config, shape, budget, overlap), overlap
    tiles, s = tuple(vae_options["tiles"]), config.spatial_factor
    try:
        tile_spans(shape[1] // s, tiles[0], overlap, "height")
        tile_spans(shape[2] // s, tiles[1], overlap, "width")
    except ValueError as e:
        raise ValueError(
            f"enable_vae_tiling(tiles={tiles}, overlap={overlap}) does not fit the {shape[2]}x{shape[1]} input "
            f"({shape[2] // s}x{shape[1] // s} latent pixels): {e}"
        ) from None
    return tiles, overlap


def encode_tiles(config, shape: tuple[int, int, int], budget: int, overlap: int = ENCODE_OVERLAP) -> tuple[int, int]:
    """The fewest spatial tiles (rows, cols) in which a (T, H, W) video's encode fits `budget` bytes (the finest
    grid the overlap allows when none fits: the estimate errs high)."""
    t, h, w = shape
    s = config.spatial_factor
    tiles = (1, 1)
    while True:
        tile_h = max(b - a for a, b in tile_spans(h // s, tiles[0], overlap)) * s
        tile_w = max(b - a for a, b in tile_spans(w // s, tiles[1], overlap)) * s
        finer = next_tiles(tiles, h // s, w // s, overlap)
        if encode_bytes(config, t, tile_h, tile_w) <= budget or finer == tiles:
            return tiles
        tiles = finer


@dataclass
class PixelInput:
    """A request's pixel input, read and fitted: which kind, its uint8 frames (T, H, W, 3), notes, its source."""

    kind: str  # "image", "video" or "extend"
    frames: np.ndarray  # the image (T = 1), the video's frames used, or the whole video to extend
    notes: list[str] = field(default_factory=list)
    source: dict = field(default_factory=dict)  # a file's name, bytes and sha256; else the type given


def given_input(image=None, video=None, extend=None) -> tuple[str, object] | None:
    """(kind, value) of the one pixel input given, None for none; two or more are refused."""
    given = [(k, v) for k, v in zip(INPUTS, (image, video, extend)) if v is not None]
    if len(given) > 1:
        names = " and ".join(f"{k}= ({FLAGS[k]})" for k, _ in given)
        raise ValueError(f"{names} were both given; pass one input: an image, a video to redraw or one to extend")
    return given[0] if given else None


def source_record(value) -> dict:
    """What the sidecar keeps of an input: a file's name, size and sha256, else the kind of object given."""
    if not isinstance(value, str | Path):
        return {"given": type(value).__name__}
    path = Path(value)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def probe(kind: str, path: str | Path) -> tuple[int, int, int]:
    """(width, height, frames) of an image or video file from its header (a video without a frame count in its
    header is decoded); a missing or unreadable file raises naming the flag."""
    path = Path(path)
    flag = FLAGS[kind]
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path} does not exist")
    if kind == "image":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                return image.size[0], image.size[1], 1
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"{flag} {path}: cannot read it as an image ({e}); PNG, JPEG, WebP... are read") from None
    import av

    try:
        with av.open(str(path)) as src:
            stream = src.streams.video[0]
            count = stream.frames or sum(1 for _ in src.decode(stream))
            return stream.codec_context.width, stream.codec_context.height, count
    except (av.error.FFmpegError, IndexError, OSError) as e:
        raise ValueError(f"{flag} {path}: cannot read it as a video ({e}); MP4, WebM, GIF... are read") from None


def read_frames(kind: str, video) -> np.ndarray:
    """A video as uint8 (T, H, W, 3): a file (any PyAV reads), a (T, H, W, 3) array or tensor (uint8, or floats in
    [0, 1]) or a list of PIL images."""
    if isinstance(video, str | Path):
        from .video import read_video

        probe(kind, video)
        return read_video(video)[0]
    if isinstance(video, list | tuple):
        video = np.stack([np.asarray(f.convert("RGB") if hasattr(f, "convert") else f) for f in video])
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    if not isinstance(video, np.ndarray) or video.ndim != 4 or video.shape[-1] != 3:
        got = getattr(video, "shape", type(video).__name__)
        raise ValueError(f"{kind}= must be a video file, a (T, H, W, 3) array or a list of images; got {got}")
    if video.dtype != np.uint8:
        video = (np.clip(video.astype(np.float32), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return video


def read_input(image=None, video=None, extend=None) -> PixelInput | None:
    """The one pixel input given, read (an image stays as given until `fit_input` knows the size); None for none."""
    given = given_input(image, video, extend)
    if given is None:
        return None
    kind, value = given
    if kind == "image" and isinstance(value, str | Path):
        probe(kind, value)
    frames = value if kind == "image" else read_frames(kind, value)
    if kind != "image" and len(frames) < MIN_VIDEO_FRAMES:
        raise ValueError(f"{FLAGS[kind]}: the video has {len(frames)} frames; at least {MIN_VIDEO_FRAMES} are needed")
    return PixelInput(kind, frames, source={"input": kind, **source_record(value)})


def fit_input(pixels: PixelInput, num_frames: int, height: int, width: int) -> PixelInput:
    """The input fitted to the request: the image resized/cropped; the video's first `num_frames`; the last 7
    frames of a video to extend (at the request's size)."""
    if pixels.kind == "image":
        image, note = fit_image(pixels.frames, height, width)
        return PixelInput("image", image[None], [note] if note else [], pixels.source)
    frames, note = fit_video(pixels.frames, height, width)
    notes = [note] if note else []
    if pixels.kind == "extend":
        if num_frames <= MIN_VIDEO_FRAMES:
            raise ValueError(
                f"num_frames={num_frames}: an extension generates num_frames frames of which the first "
                f"{MIN_VIDEO_FRAMES} are the video's last ones; give at least {MOCHI.num_frames(3)}"
            )
        return PixelInput("extend", pixels.frames, [], pixels.source)
    if num_frames > len(frames):
        raise ValueError(f"num_frames={num_frames} but the video has {len(frames)} usable frames; leave num_frames "
                         "unset to use them all")  # fmt: skip
    if num_frames < len(frames):
        notes = [f"the video has {len(pixels.frames)} frames; using its first {num_frames} (num_frames)"]
    return PixelInput("video", frames[:num_frames], notes, pixels.source)


# ---- schedules -------------------------------------------------------------------------------------------------


def cut_schedule(
    strength: float, num_steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> list[float]:
    """`num_steps` + 1 sigmas from `strength` down to 0: the tail of a longer linear-quadratic schedule whose last
    `num_steps` steps lie below `strength`. strength = 1 gives the full schedule."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1] (1 = ignore the input video); got {strength}")

    def tail(n: int) -> list[float]:
        lin = None if linear_steps is None else max(1, min(n - 1, round(linear_steps * n / num_steps)))
        return [s for s in linear_quadratic_schedule(n, threshold_noise, lin) if s < strength]

    if strength == 1.0:
        return linear_quadratic_schedule(num_steps, threshold_noise, linear_steps)
    lo, hi = num_steps, num_steps
    while len(tail(hi)) < num_steps:  # the schedule's share below `strength` is fixed: grow until it holds enough
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if len(tail(mid)) < num_steps else (lo, mid)
    return [float(strength), *tail(hi)[-num_steps:]]


# ---- conditionings ---------------------------------------------------------------------------------------------


def anchor(
    noise: torch.Tensor,
    x: torch.Tensor,
    sigmas: Sequence[float],
    mode: str = "replace",
    release: float = 0.0,
    strength: float = 1.0,
) -> Conditioning:
    """Hold the first K latent frames of a generation on the path to `x` (1 or B, 12, K, h, w), normalised.

    `noise` (B, 12, T, h, w) is the generation's initial noise; its first K frames are the anchor's eps0. "replace"
    puts them back at `sigma * eps0 + (1 - sigma) * x` after every step; "guide" corrects their velocity toward `x`
    by `strength` (0..1, 1 = the velocity that lands on `x`). Either stops for the last `release` fraction of steps.
    """
    if mode not in MODES:
        raise ValueError(f"the conditioning mode must be one of {MODES}; got {mode!r}")
    if not 0.0 <= release < 1.0:
        raise ValueError(f"release must be in [0, 1) (the fraction of the last steps left free); got {release}")
    k = x.shape[2]
    if (
        x.shape[0] not in (1, noise.shape[0])
        or x.shape[1] != noise.shape[1]
        or x.shape[3:] != noise.shape[3:]
        or k > noise.shape[2]
    ):
        raise ValueError(f"anchor latents {tuple(x.shape)} do not fit the generation's {tuple(noise.shape)}")
    x = x.to(noise.device, torch.float32)
    eps0 = noise[:, :, :k].clone()
    steps = len(sigmas) - 1
    held = steps - int(release * steps)  # steps 0 .. held-1 are anchored
    latents = noise.clone()
    latents[:, :, :k] = sigmas[0] * eps0 + (1.0 - sigmas[0]) * x
    record = {"anchored_latent_frames": k, "mode": mode, "release": release, "anchored_steps": held}
    if mode == "replace":

        def after_step(i: int, sigma: float, z: torch.Tensor) -> torch.Tensor | None:
            if i >= held:
                return None
            z = z.clone()
            z[:, :, :k] = sigma * eps0.to(z.device) + (1.0 - sigma) * x.to(z.device)
            return z

        return Conditioning(latents, after_step=after_step, record=record)

    def dit_hook(call: DiTCall, inner: Callable[[DiTCall], torch.Tensor] | None = None) -> torch.Tensor:
        v = call() if inner is None else inner(call)  # `inner`: another dit_hook the correction applies on top of
        if call.step >= held or call.sigma <= 0.0:
            return v
        v = v.float().clone()
        z = call.latents[:, :, :k].float()
        rows = x.to(v.device).repeat(z.shape[0] // x.shape[0], 1, 1, 1, 1)  # batched CFG: cond rows, then uncond
        target = (rows - z) / call.sigma  # the velocity that reaches x
        v[:, :, :k] += strength * (target - v[:, :, :k])
        return v

    return Conditioning(latents, dit_hook=dit_hook, record=record | {"guide_strength": strength})


def start_from(noise: torch.Tensor, x: torch.Tensor, strength: float, sigmas: Sequence[float]) -> Conditioning:
    """Video to video: start at sigma0 = `strength` from `x` (1, 12, T, h, w) noised with `noise`, on `sigmas`."""
    if tuple(x.shape[1:]) != tuple(noise.shape[1:]):
        raise ValueError(f"video latents {tuple(x.shape)} do not fit the generation's {tuple(noise.shape)}")
    sigma0 = float(sigmas[0])
    latents = sigma0 * noise + (1.0 - sigma0) * x.to(noise.device, torch.float32)
    record = {"strength": strength, "sigma0": sigma0, "sigmas": list(sigmas)}
    return Conditioning(latents, sigmas=list(sigmas), record=record)


def extension_frames(frames: np.ndarray, latent_frames: int = 2) -> np.ndarray:
    """The last 6(K-1)+1 frames of a video: what a continuation anchors on (K latent frames)."""
    n = MOCHI.num_frames(latent_frames)
    if len(frames) < n:
        raise ValueError(f"the video has {len(frames)} frames; extending it with {latent_frames} anchored latent "
                         f"frames needs at least {n}")  # fmt: skip
    return frames[-n:]
