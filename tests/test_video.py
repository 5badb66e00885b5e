"""Video I/O: byte-reproducible H.264 MP4s with metadata, diffusers' export/load utilities, digests, atomic writes."""

import functools
import hashlib
import http.server
import math
import os
import tempfile
import threading

import av
import numpy as np
import pytest
import torch

from mochi_preview import video
from mochi_preview.video import (
    encode_video,
    export_to_gif,
    export_to_video,
    frames_digest,
    load_image,
    load_video,
    read_video,
    stream_digest,
)

T, H, W = 7, 48, 64


def smooth_frames(t: int = T) -> np.ndarray:
    """Float (t, H, W, 3) frames in [0, 1]: slow gradients that survive 4:2:0 chroma and a lossy codec."""
    y, x = np.mgrid[0:H, 0:W]
    y, x, k = y / H, x / W, np.arange(t)[:, None, None] / t
    rgb = [0.5 + 0.3 * np.sin(3 * x + k), 0.5 + 0.3 * np.cos(2 * y) + 0 * k, 0.3 + 0.2 * x + 0.1 * k]
    return np.stack(rgb, -1).astype(np.float32)


def test_round_trip(tmp_path):
    frames = smooth_frames()
    meta = {"prompt": "a lemon, ünïcode", "seed": 1710977262, "sigmas": np.linspace(1, 0, 5), "cfg": [6.0]}
    path = encode_video(frames, tmp_path / "out.mp4", 30, metadata=meta, crf=17)
    assert path == tmp_path / "out.mp4" and os.listdir(tmp_path) == ["out.mp4"]  # no temporary file left
    got, info = read_video(path)
    assert got.shape == (T, H, W, 3) and got.dtype == np.uint8
    assert info["frames"] == T and (info["width"], info["height"]) == (W, H) and info["fps"] == 30
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["metadata"] == {**meta, "sigmas": [1.0, 0.75, 0.5, 0.25, 0.0]}
    want = (frames * 255).astype(np.uint8)
    assert np.abs(got.astype(float) - want).mean() < 3  # i.e. < 3/255 on the [0, 1] scale


def test_float_conversion_clips_and_truncates_like_reference():
    got = video._to_uint8(np.array([[[-0.5, 0.0, 0.999]], [[1.0, 2.0, 0.5]]], dtype=np.float32))
    assert got.dtype == np.uint8 and got.tolist() == [[[0, 0, 254]], [[255, 255, 127]]]


def test_input_kinds(tmp_path):
    frames = smooth_frames(3)
    u8 = (frames * 255).astype(np.uint8)
    kinds = {
        "uint8": u8,
        "list": list(frames),
        "torch": torch.from_numpy(frames).bfloat16(),
        "torch_u8": torch.from_numpy(u8),
    }
    try:
        from PIL import Image

        kinds["pil"] = [Image.fromarray(f) for f in u8]
    except ImportError:
        pass
    for name, f in kinds.items():
        got, info = read_video(encode_video(f, tmp_path / f"{name}.mp4", fps=24))
        assert got.shape == (3, H, W, 3) and info["fps"] == 24 and info["metadata"] == {}, name


def test_fractional_fps(tmp_path):
    _, info = read_video(encode_video(smooth_frames(3), tmp_path / "ntsc.mp4", fps=30000 / 1001))
    assert math.isclose(info["fps"], 29.97, abs_tol=0.01)


@pytest.mark.parametrize(
    ("frames", "fps", "match"),
    [
        ([], 30, "empty"),
        (np.zeros((2, H, W, 4), np.uint8), 30, r"\(H, W, 3\)"),
        (np.zeros((2, H, W - 1, 3), np.uint8), 30, "even width and height; got 63x48"),
        (np.zeros((1, 2, H, W, 3), np.float32), 30, r"frames\[0\]"),
        (np.full((2, H, W, 3), np.nan, np.float32), 30, "NaN"),
        (np.zeros((2, H, W, 3), np.int64), 30, "uint8"),
        ([np.zeros((H, W, 3)), np.zeros((H + 2, W, 3))], 30, "sizes must match"),
        (np.zeros((2, H, W, 3), np.uint8), 0, "fps"),
        (np.zeros((2, H, W, 3), np.uint8), -30, "fps"),
        (np.zeros((2, H, W, 3), np.uint8), float("nan"), "fps"),
    ],
)
def test_bad_input_is_refused_before_any_file(tmp_path, frames, fps, match):
    with pytest.raises((ValueError, TypeError), match=match):
        encode_video(frames, tmp_path / "bad.mp4", fps=fps)
    with pytest.raises((ValueError, TypeError), match=match):
        export_to_video(frames, tmp_path / "bad.mp4", fps=fps, macro_block_size=None)
    assert os.listdir(tmp_path) == []


def test_same_frames_give_the_same_stream(tmp_path):
    """Ten encodes of the same frames give one stream, packet for packet; other frames give another."""
    frames = smooth_frames(25)
    streams = {stream_digest(encode_video(frames, tmp_path / f"{i}.mp4", 30)) for i in range(10)}
    assert len(streams) == 1
    assert stream_digest(encode_video(frames[::-1], tmp_path / "reversed.mp4", 30)) not in streams
    tagged = encode_video(frames, tmp_path / "tagged.mp4", 30, metadata={"created": "12:00"})
    assert stream_digest(tagged) in streams  # the container differs (its tag), the stream does not
    assert (tmp_path / "tagged.mp4").read_bytes() != (tmp_path / "0.mp4").read_bytes()


def test_encoder_runs_one_thread(tmp_path, monkeypatch):
    """x264 gets threads=1 whatever the caller asks, so the stream cannot depend on the machine's cores."""
    seen = []
    add_stream = av.container.OutputContainer.add_stream

    def spy(self, codec, rate=None, options=None, **kw):
        seen.append(dict(options or {}))
        return add_stream(self, codec, rate=rate, options=options, **kw)

    monkeypatch.setattr(av.container.OutputContainer, "add_stream", spy)
    encode_video(smooth_frames(3), tmp_path / "a.mp4", 30, crf=20)
    export_to_video(smooth_frames(3), tmp_path / "b.mp4", quality=7)
    assert seen == [{"crf": "20", "threads": "1"}, {"crf": "15", "threads": "1"}]  # 15 = int((1 - 7 / 10) * 51)


def test_frames_digest_is_the_sha256_of_the_uint8_frames():
    frames = smooth_frames(3)
    u8 = (frames * 255).astype(np.uint8)
    want = hashlib.sha256(u8.tobytes()).hexdigest()
    assert frames_digest(frames) == frames_digest(u8) == frames_digest(list(u8)) == want
    assert frames_digest(torch.from_numpy(u8)) == want
    u8[1, 2, 3, 0] ^= 1
    assert frames_digest(u8) != want


def test_encode_video_writes_exactly_the_path_given(tmp_path):
    """encode_video is the plain writer (the caller publishes): it writes `path` itself, replacing what is there."""
    path = tmp_path / "claimed.mp4"
    path.write_bytes(b"")  # a name claimed by the caller
    assert encode_video(smooth_frames(3), path, 30) == path
    assert os.listdir(tmp_path) == ["claimed.mp4"] and read_video(path)[1]["frames"] == 3


def test_export_to_video_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"old")
    got = export_to_video(smooth_frames(3), str(path), fps=8)
    assert got == str(path) and os.listdir(tmp_path) == ["out.mp4"]
    frames, info = read_video(path)
    assert frames.shape == (3, H, W, 3) and info["fps"] == 8
    export_to_video(smooth_frames(5), path)  # twice into the same file, as diffusers scripts do
    assert read_video(path)[1]["frames"] == 5 and read_video(path)[1]["fps"] == 10  # diffusers' default fps

    seen = []
    real = video.write_atomic
    monkeypatch.setattr(video, "write_atomic", lambda p, write, **kw: seen.append(kw) or real(p, write, **kw))
    export_to_video(smooth_frames(3), path)
    assert seen == [{"replace": True}]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_mid_export_keeps_the_old_file(tmp_path, monkeypatch, exc):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"precious")
    convert, calls = video._to_uint8, []

    def failing(frame):
        calls.append(1)
        if len(calls) == 4:
            raise exc("boom")
        return convert(frame)

    monkeypatch.setattr(video, "_to_uint8", failing)
    with pytest.raises(exc, match="boom"):
        export_to_video(smooth_frames(), path)
    assert path.read_bytes() == b"precious" and os.listdir(tmp_path) == ["out.mp4"]


def test_export_to_video_without_a_path_makes_a_new_temporary_mp4(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a, b = export_to_video(smooth_frames(3)), export_to_video(smooth_frames(3))
    assert isinstance(a, str) and a != b and a.endswith(".mp4") and b.endswith(".mp4")
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(a), os.path.basename(b)])
    assert read_video(a)[0].shape == (3, H, W, 3)
    with pytest.raises(ValueError, match="fps"):
        export_to_video(smooth_frames(3), fps=0)
    with pytest.raises(ValueError, match="NaN"):
        export_to_gif(np.full((2, H, W, 3), np.nan, np.float32))
    monkeypatch.setattr(video, "_to_uint8", lambda frame: 1 / 0)  # fails while writing
    with pytest.raises(ZeroDivisionError):
        export_to_video(smooth_frames(3))
    assert len(os.listdir(tmp_path)) == 2  # nothing left by the failures


def test_export_to_video_takes_what_diffusers_takes(tmp_path):
    from PIL import Image

    frames = smooth_frames(3)
    u8 = (frames * 255).astype(np.uint8)
    inputs = {"np": frames, "list_float": list(frames), "list_u8": list(u8), "pil": [Image.fromarray(f) for f in u8]}
    decoded = {k: read_video(export_to_video(v, tmp_path / f"{k}.mp4"))[0].astype(int) for k, v in inputs.items()}
    for name, got in decoded.items():
        assert np.abs(got - u8).mean() < 4, name  # quality 5 = crf 25
    assert np.array_equal(decoded["np"], decoded["pil"])  # floats convert to the same uint8 as the images hold


def test_export_to_video_quality_and_bitrate(tmp_path):
    rng = np.random.default_rng(0)
    noisy = np.clip(smooth_frames(5) + rng.normal(0, 0.05, (5, H, W, 3)), 0, 1).astype(np.float32)
    size = {q: os.path.getsize(export_to_video(noisy, tmp_path / f"q{q}.mp4", quality=q)) for q in (2, None, 9)}
    assert size[9] > 2 * size[None] > 4 * size[2]  # higher quality keeps more of the noise; None: x264's crf 23
    for rate, quality in [(20_000, 9), (2_000_000, 2)]:  # a bitrate wins over quality
        path = export_to_video(noisy, tmp_path / f"{rate}.mp4", bitrate=rate, quality=quality)
        assert (os.path.getsize(path) > size[9]) if rate > 20_000 else (os.path.getsize(path) < size[None])
    for bad, match in [({"quality": 11}, "quality"), ({"bitrate": -5}, "bitrate"), ({"macro_block_size": 0}, "macro")]:
        with pytest.raises(ValueError, match=match):
            export_to_video(noisy, tmp_path / "bad.mp4", **bad)
    assert not (tmp_path / "bad.mp4").exists()


def test_export_to_video_scales_up_to_the_macro_block(tmp_path):
    frames = smooth_frames(3)[:, :40, :50]
    with pytest.warns(UserWarning, match="50x40 is not a multiple of macro_block_size=16: scaled up to 64x48"):
        path = export_to_video(frames, tmp_path / "a.mp4")
    got = read_video(path)[0]
    assert got.shape == (3, 48, 64, 3)
    assert abs(got.astype(float).mean() - frames.mean() * 255) < 3  # the same picture, larger
    assert read_video(export_to_video(frames, tmp_path / "b.mp4", macro_block_size=2))[0].shape == (3, 40, 50, 3)


def test_gif_round_trip(tmp_path):
    frames = (smooth_frames(4) * 255).astype(np.uint8)
    path = tmp_path / "a.gif"
    path.write_bytes(b"old")
    assert export_to_gif(list(frames), path, fps=5) == str(path) and os.listdir(tmp_path) == ["a.gif"]
    images, fps = load_video(str(path), return_fps=True)
    assert fps == 5 and len(images) == 4 and all(im.mode == "RGB" and im.size == (W, H) for im in images)
    assert np.abs(np.stack([np.asarray(im) for im in images]).astype(int) - frames).mean() < 6  # 256-colour palette
    with pytest.raises(ValueError, match="fps"):
        export_to_gif(list(frames), tmp_path / "b.gif", fps=0)
    assert export_to_gif(frames).endswith(".gif")


def test_load_video_gives_rgb_images(tmp_path):
    frames = smooth_frames(5)
    path = encode_video(frames, tmp_path / "a.mp4", 12)
    images, fps = load_video(path, return_fps=True)
    assert fps == 12 and [im.size for im in images] == [(W, H)] * 5 and {im.mode for im in images} == {"RGB"}
    assert np.array_equal(np.stack([np.asarray(im) for im in images]), read_video(path)[0])
    gray = load_video(str(path), convert_method=lambda ims: [im.convert("L") for im in ims])
    assert {im.mode for im in gray} == {"L"}
    with pytest.raises(ValueError, match="not a file, nor a URL"):
        load_video(tmp_path / "missing.mp4")


def test_load_image_kinds(tmp_path):
    from PIL import Image

    u8 = (smooth_frames(1)[0] * 255).astype(np.uint8)
    rgba = Image.fromarray(u8).convert("RGBA")
    rgba.save(tmp_path / "a.png")
    for kind in (tmp_path / "a.png", str(tmp_path / "a.png"), rgba, u8, u8 / 255.0, torch.from_numpy(u8)):
        image = load_image(kind)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), u8), type(kind)
    assert load_image(u8[..., 0]).mode == "RGB"  # grayscale arrays too
    assert load_image(rgba, convert_method=lambda im: im.convert("L")).mode == "L"
    bad_inputs = [(tmp_path / "missing.png", "not a file"), (42, "must be a path"), ("ftp://x/y.png", "nor a URL")]
    for bad, match in bad_inputs:
        with pytest.raises(ValueError, match=match):
            load_image(bad)


def test_load_image_applies_exif_rotation(tmp_path):
    from PIL import Image

    image = Image.fromarray(np.zeros((H, W, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (H, W)


def test_load_from_a_url(tmp_path):
    from PIL import Image

    u8 = (smooth_frames(1)[0] * 255).astype(np.uint8)
    Image.fromarray(u8).save(tmp_path / "a.png")
    encode_video(smooth_frames(3), tmp_path / "v.mp4", 30)
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            assert np.array_equal(np.asarray(load_image(f"{url}/a.png")), u8)
            assert len(load_video(f"{url}/v.mp4")) == 3
            with pytest.raises(ValueError, match=r"could not download .*/missing.png"):
                load_image(f"{url}/missing.png")
        finally:
            server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_writes_go_through_the_one_atomic_writer(tmp_path, monkeypatch):
    """video.py has no publisher of its own: exported MP4s and GIFs are published by files.write_atomic."""
    from mochi_preview import files

    assert not hasattr(video, "_write_atomic") and not hasattr(video, "_publish")
    seen = []
    real = files.write_atomic
    monkeypatch.setattr(video, "write_atomic", lambda path, write, **kw: seen.append(path) or real(path, write, **kw))
    export_to_video(smooth_frames(3), tmp_path / "a.mp4")
    export_to_gif(smooth_frames(3), tmp_path / "a.gif")
    assert seen == [tmp_path / "a.mp4", tmp_path / "a.gif"]
