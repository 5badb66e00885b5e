"""MP4 writing: H.264/yuv420p round trip with metadata, no overwrite, no partial or temporary files left."""

import json
import math
import os

import numpy as np
import pytest
import torch

from mochi_preview import video
from mochi_preview.video import export_to_video, new_output_path, read_video, write_json_atomic

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
    path = export_to_video(frames, tmp_path / "out.mp4", metadata=meta, crf=17)
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
        got, info = read_video(export_to_video(f, tmp_path / f"{name}.mp4", fps=24))
        assert got.shape == (3, H, W, 3) and info["fps"] == 24 and info["metadata"] == {}, name


def test_fractional_fps(tmp_path):
    _, info = read_video(export_to_video(smooth_frames(3), tmp_path / "ntsc.mp4", fps=30000 / 1001))
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
        export_to_video(frames, tmp_path / "bad.mp4", fps=fps)
    assert os.listdir(tmp_path) == []


def test_existing_file_is_never_overwritten(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not overwriting"):
        export_to_video(smooth_frames(), path)
    assert path.read_bytes() == b"precious" and os.listdir(tmp_path) == ["out.mp4"]


def test_file_appearing_during_encoding_is_kept(tmp_path, monkeypatch):
    path = tmp_path / "out.mp4"
    convert = video._to_uint8

    def racing(frame):  # another process takes the name while we encode
        if not path.exists():
            path.write_bytes(b"theirs")
        return convert(frame)

    monkeypatch.setattr(video, "_to_uint8", racing)
    with pytest.raises(FileExistsError):
        export_to_video(smooth_frames(), path)
    assert path.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["out.mp4"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_mid_encoding_leaves_nothing(tmp_path, monkeypatch, exc):
    convert, calls = video._to_uint8, []

    def failing(frame):
        calls.append(1)
        if len(calls) == 4:
            raise exc("boom")
        return convert(frame)

    monkeypatch.setattr(video, "_to_uint8", failing)
    with pytest.raises(exc, match="boom"):
        export_to_video(smooth_frames(), tmp_path / "out.mp4")
    assert os.listdir(tmp_path) == []


def test_without_hard_links_falls_back_to_checked_rename(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise PermissionError("hard links not supported")

    monkeypatch.setattr(os, "link", no_link)
    path = export_to_video(smooth_frames(3), tmp_path / "out.mp4")
    assert read_video(path)[1]["frames"] == 3 and os.listdir(tmp_path) == ["out.mp4"]
    with pytest.raises(FileExistsError):
        write_json_atomic(path, {})
    assert read_video(path)[1]["frames"] == 3 and os.listdir(tmp_path) == ["out.mp4"]


def test_new_output_path_is_always_fresh(tmp_path):
    out_dir = tmp_path / "outputs" / "run"
    seen = set()
    for _ in range(4):
        path = new_output_path(out_dir)
        assert out_dir.is_dir() and not path.exists() and path not in seen
        assert path.parent == out_dir and path.name.startswith("output_") and path.suffix == ".mp4"
        path.touch()
        seen.add(path)
    assert new_output_path(out_dir, prefix="clip", suffix=".json").name.startswith("clip_")


def test_write_json_atomic(tmp_path):
    path = tmp_path / "run.json"
    obj = {"prompt": "ünï", "sigmas": np.linspace(1, 0, 3), "seed": np.int64(7), "out": tmp_path / "a.mp4"}
    write_json_atomic(path, obj)
    want = {**obj, "sigmas": [1.0, 0.5, 0.0], "seed": 7, "out": str(obj["out"])}
    assert json.loads(path.read_text()) == want
    with pytest.raises(FileExistsError):
        write_json_atomic(path, {"other": 1})
    assert json.loads(path.read_text())["seed"] == 7
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "bad.json", {"x": object()})
    assert sorted(os.listdir(tmp_path)) == ["run.json"]


def test_writes_go_through_the_one_atomic_writer(tmp_path, monkeypatch):
    """video.py has no writer of its own: MP4s and JSON are published by files.write_atomic."""
    from mochi_preview import files

    assert not hasattr(video, "_write_atomic") and not hasattr(video, "_publish")
    seen = []
    real = files.write_atomic
    monkeypatch.setattr(video, "write_atomic", lambda path, write, **kw: seen.append(path) or real(path, write, **kw))
    export_to_video(smooth_frames(3), tmp_path / "a.mp4")
    write_json_atomic(tmp_path / "a.json", {})
    assert seen == [tmp_path / "a.mp4", tmp_path / "a.json"]
