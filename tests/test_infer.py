"""The command line: MP4 + sidecar output, sweeps with resume, and clear errors for bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from model_folders import save_diffusers_model
from PIL import Image

from mochi_preview import outputs
from mochi_preview.demo.vocabulary import DEMO_PROMPT, prompt_warning
from mochi_preview.infer import main
from mochi_preview.settings import DEFAULT_PROMPT
from mochi_preview.video import read_video, stream_digest

SMALL = ["--width", "48", "--height", "32", "--num_frames", "13", "--num_steps", "3", "--dtype", "fp32", "--quiet"]


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
    assert list(sidecar) == [  # the settings under the CLI's names, then the run's record
        "prompt", "negative_prompt", "width", "height", "num_frames", "seed", "cfg_scale", "num_steps",
        "threshold_noise", "linear_steps", "noise", "schedule", "cache", "image", "init_video", "strength", "extend",
        "image_mode", "image_release", "noise_multiplier", "sigmas", "cfg_schedule", "fps", "dtype", "t5_dtype",
        "vae_dtype", "model_dir", "text_encoder", "model_files", "mochi_preview", "torch", "device", "noise_device",
        "memory", "batch_cfg", "loras", "attention", "processes", "vae", "seconds", "peak_memory_bytes", "created",
        "frames_digest",
        "stream_digest",
    ]  # fmt: skip
    assert (sidecar["noise"], sidecar["vae_dtype"]) == ("cpu", "fp32")  # the defaults: a CPU generator, fp32 decode
    assert len(sidecar["frames_digest"]) == 64  # of the frames before encoding (test_same_seed_same_video)
    assert sidecar["stream_digest"] == stream_digest(video)
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
    assert embedded["frames_digest"] == sidecar["frames_digest"]
    assert sorted(p.name for p in out.iterdir()) == [video.with_suffix(".json").name, video.name]  # nothing hidden


def test_same_seed_same_video(native_dir, tmp_path):
    a, b, c = (tmp_path / f"{n}.mp4" for n in "abc")
    for path, seed in ((a, 1), (b, 1), (c, 2)):
        assert run("--prompt", "x", "--seed", seed, "--model_dir", native_dir, "--output", path, *SMALL) == 0
    fa, fb, fc = (read_video(p)[0].astype(int) for p in (a, b, c))
    assert np.array_equal(fa, fb) and np.abs(fa - fc).mean() > 1
    sa, sb, sc = (json.loads(p.with_suffix(".json").read_text()) for p in (a, b, c))
    # the same seed: the same frames and the same encoded stream, byte for byte (the container's times may differ)
    assert sa["frames_digest"] == sb["frames_digest"] != sc["frames_digest"]
    assert sa["stream_digest"] == sb["stream_digest"] == stream_digest(b) != sc["stream_digest"]


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
    # resume checks the video and its sidecar: a video alone (an older version's half-published line) is named
    sidecar = (out / first[0]).with_suffix(".json")
    sidecar.rename(tmp_path / "aside.json")
    assert run("--sweep-file", sweep, "--model_dir", native_dir, "--out_dir", out, *SMALL) == 0
    assert f"warning: skip 0: {out / first[0]} has no sidecar" in capsys.readouterr().err
    (tmp_path / "aside.json").rename(sidecar)
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
def test_bad_sweep_line_is_reported_before_loading(native_dir, tmp_path, capsys, no_loading, lines, message):
    sweep = tmp_path / "sweep.jsonl"
    sweep.write_text(lines)
    assert run("--sweep-file", sweep, "--model_dir", native_dir, "--out_dir", tmp_path / "o", *SMALL) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num_frames", "84"], r"--num_frames=84 is not of the form 6k\+1 \(nearest valid: \[79, 85\]\)"),
        (["--num_frames", "30"], r"--num_frames=30 is not of the form 6k\+1 \(nearest valid: \[25, 31\]\)"),
        (["--width", "50"], r"--width=50 is not a multiple of 16.*\[48, 64\]"),
        (["--num_steps", "0"], "--num_steps must be between 1 and 1000; got 0"),
        (["--cfg_scale", "100"], r"--cfg_scale must be between 0 and 50 .*; got 100"),
        (["--seed", "18446744073709551616"], r"--seed must be between 0 and 2\*\*64 - 1; got 18446744073709551616"),
        (["--seed", "-5"], r"--seed must be between 0 and 2\*\*64 - 1; got -5"),
        (["--linear-steps", "3"], r"--linear-steps must be in \[1, 2\] for 3 steps \(--num_steps\); got 3"),
        (["--threshold_noise", "2"], r"--threshold-noise must be between 0 and 1; got 2"),
    ],
)
def test_bad_settings_are_refused_before_loading(native_dir, tmp_path, capsys, no_loading, args, message):
    assert run("--model_dir", native_dir, "--out_dir", tmp_path / "o", *SMALL, *args) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
    assert "num_inference_steps" not in err and "guidance_scale" not in err  # the CLI's names only
    assert not (tmp_path / "o").exists()  # a refused run creates no folder


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num_frames", "13.5"], "argument --num_frames: must be a whole number; got '13.5'"),
        (["--seed", "1.5"], "argument --seed: must be a whole number; got '1.5'"),
        (["--cfg_scale", "nan"], "argument --cfg_scale: must be a finite number; got 'nan'"),
        (["--fps", "0"], "argument --fps: must be a positive number; got '0'"),
        (["--fps", "-30"], "argument --fps: must be a positive number; got '-30'"),
        (["--noise", "gpu"], "argument --noise: invalid choice: 'gpu'"),
    ],
)
def test_fractions_and_bad_values_are_refused_by_the_parser(native_dir, tmp_path, capsys, no_loading, args, message):
    with pytest.raises(SystemExit) as stop:
        run("--model_dir", native_dir, "--out_dir", tmp_path / "o", *SMALL, *args)
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "tpu:7"], "--device 'tpu:7' is not a device name; available here: cpu"),
        (["--device", "cuda"], "--device cuda: not available on this machine; available here: cpu"),
        (["--device", "cuda:3"], "--device cuda:3: not available on this machine; available here: cpu"),
        (["--gpus", "2"], r"--gpus 2: this machine has 0 GPU(s) (valid: 1 to 1)"),
        (["--gpus", "0"], "--gpus must be at least 1; got 0"),
        (["--output", "{tmp}/o/v.mp4", "--sweep-file", "{tmp}/s.jsonl"], "--output names one file; with --sweep-file"),
    ],
)
def test_bad_devices_and_flags_are_refused_before_loading(native_dir, tmp_path, capsys, no_loading, args, message):
    (tmp_path / "s.jsonl").write_text("{}\n")
    args = [a.format(tmp=tmp_path) for a in args]
    assert run("--model_dir", native_dir, "--out_dir", tmp_path / "o", *SMALL, *args) == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unwritable_or_full_output_folder_is_refused_before_loading(
    native_dir, tmp_path, capsys, monkeypatch, no_loading
):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert run("--model_dir", native_dir, "--out_dir", not_a_folder / "videos", *SMALL) == 2
    assert f"--out_dir {not_a_folder / 'videos'}: {not_a_folder} is not a folder" in capsys.readouterr().err
    # read-only (as root, mode bits do not stop writes: the answer of access(2) is what is checked)
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
    assert run("--model_dir", native_dir, "--out_dir", tmp_path / "ro" / "v", *SMALL) == 2
    assert (
        f"--out_dir {tmp_path / 'ro' / 'v'} is not writable (it would be created in {tmp_path})"
        in capsys.readouterr().err
    )
    monkeypatch.undo()
    usage = __import__("shutil").disk_usage(tmp_path)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: usage._replace(free=300_000))
    assert run("--model_dir", native_dir, "--output", tmp_path / "full" / "v.mp4", *SMALL) == 2
    err = capsys.readouterr().err
    assert (
        f"error: --output {tmp_path / 'full'}: 0.3 MiB free on its disk, a video of this size needs about 1.0 MiB"
        in err
    )
    assert not (tmp_path / "ro").exists() and not (tmp_path / "full").exists()


def test_model_folder_defaults_are_checked_before_loading(native_dir, tmp_path, capsys, no_loading):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("dit.safetensors", "decoder.safetensors"):
        (folder / name).symlink_to(native_dir / name)
    (folder / "mochi_defaults.json").write_text('{"width": 64, "steps": 8}')
    assert run("--model_dir", folder, "--out_dir", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "mochi_defaults.json: unknown keys ['steps']" in err


def test_existing_output_is_never_overwritten(native_dir, tmp_path, capsys):
    target = tmp_path / "mine.mp4"
    target.write_bytes(b"my precious video")
    assert run("--model_dir", native_dir, "--output", target, *SMALL) == 2
    assert f"error: --output {target} exists; not overwriting it" in capsys.readouterr().err
    assert target.read_bytes() == b"my precious video"
    target.unlink()
    target.with_suffix(".json").write_text("{}")  # a sidecar alone also holds the name
    assert run("--model_dir", native_dir, "--output", target, *SMALL) == 2
    assert "its sidecar" in capsys.readouterr().err and not target.exists()


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
    flags = ["--noise", "genmo", "--vae_dtype", "bf16"]  # Genmo's noise; the decoder in bf16
    assert run("--prompt", "x", "--model_dir", folder, "--output", tmp_path / "v.mp4", *SMALL, *flags) == 0
    assert read_video(tmp_path / "v.mp4")[0].shape == (13, 32, 48, 3)
    sidecar = json.loads((tmp_path / "v.json").read_text())
    assert (sidecar["noise"], sidecar["vae_dtype"], sidecar["dtype"]) == ("genmo", "bf16", "float32")


def test_module_entry_point_runs_quietly(native_dir, tmp_path):
    """--quiet: no progress bars (transformers' loading bar neither); warnings as one line each; the result line."""
    long_prompt = "a red ball " * 100  # more tokens than T5 reads: the cut is a warning
    cmd = [sys.executable, "-m", "mochi_preview.infer", "--model_dir", str(native_dir), "--output", "v.mp4", *SMALL]
    proc = subprocess.run([*cmd, "--prompt", long_prompt], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "v.mp4").is_file() and (tmp_path / "v.json").is_file()
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and lines[1].startswith("wrote "), proc.stderr
    assert __import__("re").fullmatch(r"warning: prompt 0 is \d+ tokens; the last \d+ were cut .*", lines[0]), lines[0]
    assert proc.stdout == ""


def test_help_shows_the_defaults_of_the_model_it_will_use(native_dir, capsys):
    with pytest.raises(SystemExit) as stop:
        run("--help")  # no --model_dir: the demo model
    out = " ".join(capsys.readouterr().out.split())
    assert stop.value.code == 0
    assert "(default: 64)" in out and "(default: 25)" in out and "(default: 24)" in out and "(default: 4.5)" in out
    assert f"(default: {DEMO_PROMPT!r})" in out and "(default: 848)" not in out and "lemon" not in out
    with pytest.raises(SystemExit):
        run("--model_dir", native_dir, "--help")  # a folder without mochi_defaults.json: the table's (the model card's)
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 848)" in out and "(default: 163)" in out and "lemon" in out


def test_demo_prompts(tmp_path, capsys, monkeypatch):
    """The demo model: its default prompt is one it draws; a prompt outside its world is warned about, before
    loading; a refused or failed run leaves no folder."""
    from mochi_preview import infer

    assert prompt_warning(DEMO_PROMPT) is None and prompt_warning("two green boxes drift up") is None
    warning = prompt_warning(DEFAULT_PROMPT)  # the lemon prompt names "yellow" and "up", but no shape
    assert "red, green, blue, yellow, white, orange, purple" in warning and "circle, ball, disc, square, box" in warning
    assert "left, right, up, down, still" in warning
    seen = []

    def load(args, model_dir=None):
        seen.append(infer.table.from_arguments(args, infer.cli_defaults(model_dir)))
        raise ValueError("stop before loading")

    monkeypatch.setattr(infer, "load_pipeline", load)
    assert run("--out_dir", tmp_path / "o") == 2
    assert seen[-1].prompt == DEMO_PROMPT and "warning" not in capsys.readouterr().err
    assert run("--out_dir", tmp_path / "o", "--prompt", DEFAULT_PROMPT) == 2
    assert f"warning: {warning}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # the claimed name and the folder made for it are given back


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
    from mochi_preview import infer
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
    # the web UI's way: a claimed name; a callback that raises (or Ctrl-C) leaves nothing and frees the name
    folder = tmp_path / "ui"
    path = infer.new_output_path(folder)
    assert outputs.run_dir_of(path).is_dir()  # claimed: concurrent runs get other names

    def stop(pipe, i, sigma, state):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(pipe, small, path, options, callback=stop)
    assert not folder.exists()  # the claim made the folder; nothing of it is left
    assert generate(pipe, small, infer.new_output_path(folder), options).parent == folder.absolute()


def test_loras_presets_and_step_caches_through_the_cli(native_dir, tmp_path, capsys):
    """--lora_path PATH[:S] (merged, recorded with its sha256), --preset fast (FastMochi's recipe under the flags),
    --cache (what was reused is recorded); each bad value refused before loading."""
    import hashlib

    import torch

    from mochi_preview.dit import load_dit
    from mochi_preview.lora import save_lora_native

    dit = load_dit(native_dir)
    layer = dit.blocks[0].attn.qkv_x
    g = torch.Generator().manual_seed(0)
    pairs = {"blocks.0.attn.qkv_x": (torch.randn(2, layer.in_features, generator=g),
                                     torch.randn(layer.out_features, 2, generator=g))}  # fmt: skip
    lora = save_lora_native(tmp_path / "style.safetensors", pairs, 2, 2.0)
    base = ["--prompt", "a red ball", "--seed", "4", "--model_dir", native_dir, *SMALL]

    def sidecar(*extra):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert run(*base, "--out_dir", out, *extra) == 0, capsys.readouterr().err
        (video,) = out.glob("*.mp4")
        return json.loads(video.with_suffix(".json").read_text()), read_video(video)[0]

    plain, plain_frames = sidecar()
    assert plain["loras"] == [] and plain["cache"] is None and plain["schedule"] == "linear_quadratic"
    with_lora, lora_frames = sidecar("--lora_path", f"{lora}:0.5")
    sha = hashlib.sha256(lora.read_bytes()).hexdigest()
    (record,) = with_lora["loras"]
    assert (record["sha256"], record["strength"], record["bytes"], record["fused"]) == (
        sha,
        0.5,
        lora.stat().st_size,
        True,
    )
    assert not np.array_equal(lora_frames, plain_frames)  # the merged LoRA changed the video

    fast, _ = sidecar("--preset", "fast", "--num_steps", "4")  # flags win over the preset
    assert (fast["schedule"], fast["cfg_scale"], fast["num_steps"]) == ("pcm_linear_quadratic", 1.5, 4)
    cached, _ = sidecar("--num_steps", "6", "--cache", "teacache:1")
    assert cached["cache"] == "teacache:1" and cached["cache_steps"]["reused"] > 0

    for args, message in [
        (["--lora_path", tmp_path / "missing.safetensors"], "--lora_path"),
        (["--cache", "teacache:x"], "--cache: cache threshold must be a number"),
    ]:
        assert run(*base, "--out_dir", tmp_path / "refused", *args) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "refused").exists()
    with pytest.raises(SystemExit) as e:  # a word outside the choices: the parser's usage error
        run(*base, "--out_dir", tmp_path / "refused", "--schedule", "cosine")
    assert e.value.code == 2 and "invalid choice: 'cosine'" in capsys.readouterr().err


def test_preview_png_is_rewritten_during_sampling_and_stages_are_reported(native_dir, tmp_path, capsys, monkeypatch):
    """--preview writes a PNG every --preview_every steps and after the last; without --quiet, stderr names each
    stage in order: the prompt, the sampling steps (i/N with the time per step), the decode."""
    from mochi_preview import infer, preview

    written = []

    def write_png(path, image):
        written.append(image.shape)
        return preview.write_png(path, image)

    monkeypatch.setattr(infer, "write_png", write_png)
    png, out = tmp_path / "previews" / "now.png", tmp_path / "out"
    (tmp_path / "previews").mkdir()
    args = ["--prompt", "x", "--model_dir", native_dir, "--out_dir", out, "--preview", png, "--preview_every", 2]
    assert run(*args, *[a for a in SMALL if a != "--quiet"], "--num_steps", 5) == 0
    assert len(written) == 3  # after steps 2, 4 and 5
    image = np.asarray(Image.open(png))
    assert image.dtype == np.uint8 and image.shape == written[-1] and image.shape[2] == 3
    assert [p.name for p in png.parent.iterdir()] == ["now.png"]  # written whole: no temporary file left
    err = capsys.readouterr().err
    # the stages in order (the bar's final 5/5 may be drawn again after the decoding line: tqdm redraws it)
    text, steps, decode = (err.index(s) for s in ("text: encoding the prompt", "sampling:", "decoding: the VAE"))
    assert text < steps < decode and re.search(r"5/5 \[[0-9:<]+, +[0-9.]+(s/step|step/s)\]", err)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preview", "p.jpg"], "--preview p.jpg: must end in .png"),
        (["--preview_every", "0"], "--preview_every must be a whole number of steps >= 1; got 0"),
        (["--preview", "in.png", "--image", "in.png"], "--preview in.png is the input --image: it would be overwrit"),
        (["--preview", "folder.png"], "--preview folder.png is a folder; give a .png file path"),
    ],
)
def test_bad_preview_flags_are_refused_before_loading(native_dir, tmp_path, capsys, no_loading, args, message,
                                                      monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (48, 32)).save("in.png")
    (tmp_path / "folder.png").mkdir()
    assert run("--model_dir", native_dir, "--out_dir", tmp_path / "out", *SMALL, *args) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png", "in.png"]
