"""The command line: MP4 + sidecar output, sweeps with resume, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from model_folders import save_diffusers_model, save_native_model

from mochi_preview.infer import main
from mochi_preview.video import read_video

SMALL = ["--width", "48", "--height", "32", "--num_frames", "13", "--num_steps", "3", "--dtype", "fp32", "--quiet"]


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    return save_native_model(tmp_path_factory.mktemp("native"))


def run(*args):
    return main([str(a) for a in args])


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any weights load: settings must be refused before."""
    from mochi_preview import infer

    def load(*args, **kwargs):
        pytest.fail("weights were loaded before the settings were checked")

    monkeypatch.setattr(infer.MochiPipeline, "from_pretrained", load)
    monkeypatch.setattr(infer, "load_pipeline", load)


def test_writes_mp4_and_sidecar(native_dir, tmp_path):
    out = tmp_path / "out"
    assert run("--prompt", "a red ball", "--seed", "4", "--model_dir", native_dir, "--out_dir", out, *SMALL) == 0
    [video] = list(out.glob("output_*.mp4"))
    frames, info = read_video(video)
    assert frames.shape == (13, 32, 48, 3)
    assert (info["fps"], info["codec"], info["pix_fmt"]) == (30, "h264", "yuv420p")
    sidecar = json.loads(video.with_suffix(".json").read_text())
    assert sidecar["prompt"] == "a red ball" and sidecar["seed"] == 4 and sidecar["cfg_scale"] == 6.0
    assert list(sidecar) == [  # the settings under the CLI's names, then the run's record: as always
        "prompt", "negative_prompt", "width", "height", "num_frames", "seed", "cfg_scale", "num_steps",
        "threshold_noise", "linear_steps", "sigmas", "cfg_schedule", "fps", "dtype", "t5_dtype", "model_dir",
        "text_encoder", "model_files", "mochi_preview", "torch", "device", "noise_device", "memory", "batch_cfg",
        "attention", "processes", "vae", "seconds", "peak_memory_bytes", "created",
    ]  # fmt: skip
    assert sidecar["attention"] == "sdpa"  # the kernel that ran: flash-attn is never chosen on a CPU
    assert (sidecar["t5_dtype"], sidecar["dtype"], sidecar["fps"], sidecar["cfg_schedule"]) == (
        "fp32",
        "float32",
        30,
        [6.0] * 3,
    )
    assert len(sidecar["sigmas"]) == 4 and sidecar["sigmas"][0] == 1.0 and sidecar["sigmas"][-1] == 0.0
    assert sidecar["model_files"]["dit.safetensors"]["bytes"] == (native_dir / "dit.safetensors").stat().st_size
    embedded = json.loads(info["metadata"]["mochi"])
    assert embedded["prompt"] == "a red ball" and embedded["sigmas"] == sidecar["sigmas"]
    assert not [p for p in out.iterdir() if "partial" in p.name]


def test_same_seed_same_video(native_dir, tmp_path):
    a, b, c = (tmp_path / f"{n}.mp4" for n in "abc")
    for path, seed in ((a, 1), (b, 1), (c, 2)):
        assert run("--prompt", "x", "--seed", seed, "--model_dir", native_dir, "--output", path, *SMALL) == 0
    fa, fb, fc = (read_video(p)[0].astype(int) for p in (a, b, c))
    assert np.array_equal(fa, fb) and np.abs(fa - fc).mean() > 1


def test_sweep_runs_and_resumes(native_dir, tmp_path, capsys):
    sweep = tmp_path / "sweep.jsonl"
    # an old sweep file: the CLI's names (cfg_scale, num_steps), as sidecars record them
    sweep.write_text('{"prompt": "a", "seed": 1}\n\n{"prompt": "b", "seed": 2, "cfg_scale": 3.0, "num_steps": 2}\n')
    out = tmp_path / "out"
    assert run("--sweep-file", sweep, "--model_dir", native_dir, "--out_dir", out, *SMALL) == 0
    first = sorted(p.name for p in out.glob("*.mp4"))
    assert len(first) == 2 and len(list(out.glob("*.json"))) == 2
    second = json.loads((out / first[1]).with_suffix(".json").read_text())
    assert second["cfg_scale"] == 3.0 and second["num_steps"] == 2 and len(second["sigmas"]) == 3
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert run("--sweep-file", sweep, "--model_dir", native_dir, "--out_dir", out, *SMALL) == 0
    assert capsys.readouterr().err.count("skip") == 2
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes  # nothing rewritten
    sweep.write_text('{"prompt": "a", "seed": 1}\n{"prompt": "b", "seed": 3}\n')  # line 2 edited
    assert run("--sweep-file", sweep, "--model_dir", native_dir, "--out_dir", out, *SMALL) == 0
    assert len(list(out.glob("*.mp4"))) == 3


@pytest.mark.parametrize(
    "lines, message",
    [
        ('{"prompt": "a"}\n{"prompt": "b", "frames": 9}\n', r"sweep.jsonl:2: unknown keys \['frames'\]"),
        ('{"prompt": "a"}\n\n{"num_frames": 30}\n', r"sweep.jsonl:3: num_frames=30 is not of the form 6k\+1"),
        ('{"num_steps": 2.5}\n', r"sweep.jsonl:1: num_steps must be a whole number; got 2.5"),
        ('{"seed": -1}\n', r"sweep.jsonl:1: seed must be between 0 and 2\*\*64 - 1; got -1"),
        ('{"prompt": "a"\n', r"sweep.jsonl:1: not valid JSON"),
    ],
)
def test_bad_sweep_line_is_reported_before_loading(native_dir, tmp_path, no_loading, lines, message):
    sweep = tmp_path / "sweep.jsonl"
    sweep.write_text(lines)
    with pytest.raises(SystemExit, match=message):
        run("--sweep-file", sweep, "--model_dir", native_dir, "--out_dir", tmp_path, *SMALL)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num_frames", "84"], r"--num_frames=84 is not of the form 6k\+1 \(nearest valid: \[79, 85\]\)"),
        (["--num_frames", "30"], r"--num_frames=30 is not of the form 6k\+1 \(nearest valid: \[25, 31\]\)"),
        (["--width", "50"], r"--width=50 is not a multiple of 16.*\[48, 64\]"),
        (["--num_steps", "0"], "--num_steps must be between 1 and 1000; got 0"),
        (["--cfg_scale", "100"], r"--cfg_scale must be between 0 and 50 .*; got 100"),
        (["--seed", str(2**64)], r"--seed must be between 0 and 2\*\*64 - 1"),
        (["--linear-steps", "3"], r"--linear-steps must be in \[1, 2\] for 3 steps \(--num_steps\); got 3"),
        (["--threshold_noise", "2"], r"--threshold-noise must be between 0 and 1; got 2"),
    ],
)
def test_bad_settings_are_refused_before_loading(native_dir, tmp_path, capsys, no_loading, args, message):
    assert run("--model_dir", native_dir, "--out_dir", tmp_path / "o", *SMALL, *args) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
    assert "num_inference_steps" not in err and "guidance_scale" not in err  # the CLI's names only
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_fractions_and_bad_fps_are_refused_by_the_parser(native_dir, tmp_path, capsys, no_loading):
    for args, flag in ((["--num_frames", "13.5"], "--num_frames"), (["--fps", "0"], "--fps")):
        with pytest.raises(SystemExit) as stop:
            run("--model_dir", native_dir, *SMALL, *args)
        assert stop.value.code == 2 and flag in capsys.readouterr().err


def test_model_folder_defaults_are_checked_before_loading(native_dir, tmp_path, capsys, no_loading):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("dit.safetensors", "decoder.safetensors"):
        (folder / name).symlink_to(native_dir / name)
    (folder / "mochi_defaults.json").write_text('{"width": 64, "steps": 8}')
    assert run("--model_dir", folder, "--out_dir", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "mochi_defaults.json: unknown keys ['steps']" in err


def test_existing_output_is_never_overwritten(native_dir, tmp_path):
    target = tmp_path / "mine.mp4"
    target.write_bytes(b"my precious video")
    with pytest.raises(SystemExit, match="exists; not overwriting"):
        run("--model_dir", native_dir, "--output", target, *SMALL)
    assert target.read_bytes() == b"my precious video"


def test_missing_files_are_named(native_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dit.safetensors").write_bytes((native_dir / "dit.safetensors").read_bytes())
    assert run("--model_dir", broken, "--out_dir", tmp_path, *SMALL) == 2
    err = capsys.readouterr().err
    assert "missing the VAE decoder (decoder.safetensors, or vae/)" in err and "the T5 text encoder" in err
    assert "the DiT" not in err
    (broken / "decoder.safetensors").write_bytes(b"\x00" * 100)  # present but corrupt
    assert run("--model_dir", broken, "--t5_dir", native_dir / "t5", "--out_dir", tmp_path, *SMALL) == 2
    assert "decoder.safetensors is not a readable safetensors file" in capsys.readouterr().err
    assert run("--model_dir", tmp_path / "nowhere", "--out_dir", tmp_path, *SMALL) == 2
    assert "not found" in capsys.readouterr().err


def test_diffusers_folder_through_the_cli(tmp_path):
    folder = save_diffusers_model(tmp_path / "model")
    assert run("--prompt", "x", "--model_dir", folder, "--output", tmp_path / "v.mp4", *SMALL) == 0
    assert read_video(tmp_path / "v.mp4")[0].shape == (13, 32, 48, 3)


def test_module_entry_point_runs(native_dir, tmp_path):
    cmd = [sys.executable, "-m", "mochi_preview.infer", "--model_dir", str(native_dir), "--output", "v.mp4", *SMALL]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "v.mp4").is_file() and (tmp_path / "v.json").is_file()


def test_speed_and_memory_flags_reach_the_model(native_dir, monkeypatch, tmp_path):
    """--fp8, --attention, --attention_chunk, --compile: each changes the loaded pipeline, and the video is made."""
    from mochi_preview import infer
    from mochi_preview.dit.fp8 import FP8Linear

    seen = {}
    real = infer.generate

    def spy(pipe, *args, **kwargs):
        seen["pipe"] = pipe
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(infer, "generate", spy)
    monkeypatch.setattr(infer.MochiPipeline, "compile", lambda self, **kw: seen.setdefault("compiled", self))
    flags = ["--fp8", "channel", "--attention", "sdpa", "--attention_chunk", "7", "--compile"]
    out = tmp_path / "v.mp4"
    assert run("--prompt", "x", "--model_dir", native_dir, "--output", out, *SMALL, *flags) == 0
    pipe = seen["pipe"]
    assert out.is_file() and seen["compiled"] is pipe
    assert isinstance(pipe.dit.blocks[0].attn.qkv_x, FP8Linear) and pipe.dit.blocks[0].attn.qkv_x.scale.ndim == 2
    assert (pipe.dit.attention.backend, pipe.dit.attention.chunk) == ("sdpa", 7)


def test_generate_takes_settings_not_flags(native_dir, tmp_path):
    """The API: generate(pipeline, Settings, path, RunOptions); seed=None records the seed the pipeline drew."""
    from mochi_preview.infer import RunOptions, build_parser, generate, load_pipeline
    from mochi_preview.settings import Settings

    args = build_parser().parse_args(["--model_dir", str(native_dir), "--dtype", "fp32"])
    pipe, _ = load_pipeline(args)
    small = Settings(prompt="x", width=48, height=32, num_frames=13, num_inference_steps=2, seed=None)
    options = RunOptions(fps=12, progress=False)
    video = generate(pipe, small, tmp_path / "v.mp4", options)
    sidecar = json.loads(video.with_suffix(".json").read_text())
    assert read_video(video)[1]["fps"] == 12 and sidecar["fps"] == 12 and sidecar["num_steps"] == 2
    assert isinstance(sidecar["seed"], int) and 0 <= sidecar["seed"] < 2**64  # drawn by the pipeline, recorded
    again = generate(pipe, small.updated({"seed": sidecar["seed"]}), tmp_path / "w.mp4", options)
    assert np.array_equal(read_video(video)[0], read_video(again)[0])  # the recorded seed makes the same video
