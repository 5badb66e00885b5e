"""The web UI: its handler called directly (results and error messages), then the real page in headless Chromium."""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

import gradio as gr
import pytest
import torch
from browser import chromium_page, free_port, server, wait_until_up

from mochi_preview import gradio_ui, infer
from mochi_preview.settings import SETTINGS
from mochi_preview.tiny import save_random_model
from mochi_preview.video import read_video

SMALL = dict(width=48, height=32, num_frames=13, num_steps=3)  # the test model's mochi_defaults.json
FORM = dict(prompt="a red ball", negative_prompt="", seed=7, random_seed=False, cfg_scale=6.0, threshold_noise=0.025,
            linear_steps=None, **SMALL)  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = save_random_model(tmp_path_factory.mktemp("model"))
    (folder / "mochi_defaults.json").write_text(json.dumps(SMALL))
    return folder


@pytest.fixture(scope="module", autouse=True)
def ui_server(model_dir, tmp_path_factory):
    """The UI in its own process, started first so that its slow startup (imports) overlaps the direct tests."""
    folder, port = tmp_path_factory.mktemp("ui"), free_port()
    cmd = [sys.executable, "-m", "mochi_preview.gradio_ui", "--model_dir", str(model_dir), "--dtype", "fp32"]
    cmd += ["--port", str(port), "--out_dir", str(folder / "outputs"), "--quiet"]
    env = {**os.environ, "GRADIO_TEMP_DIR": str(folder / "gradio"), "NO_PROXY": "127.0.0.1"}
    with server(cmd, folder / "server.log", cwd=folder, env=env) as proc:
        yield proc, f"http://127.0.0.1:{port}/", folder


@pytest.fixture(scope="module")
def loaded(model_dir):
    args = gradio_ui.build_parser().parse_args(["--model_dir", str(model_dir), "--dtype", "fp32", "--quiet"])
    return infer.load_pipeline(args)[0], args


def handler(loaded, out_dir):
    pipe, args = loaded
    return gradio_ui.make_handler(pipe, out_dir, infer.RunOptions.from_args(args))


def call(run, progress=None, **changes):
    values = {**FORM, **changes}
    return run(*(values[k] for k in gradio_ui.FORM), progress=progress or (lambda *a, **k: None))


def test_handler_writes_the_clis_files_and_reports_progress(loaded, tmp_path):
    steps = []
    video, record, seed = call(handler(loaded, tmp_path), progress=lambda p, **k: steps.append(p))
    assert video.startswith(str(tmp_path / "output_")) and video.endswith(".mp4")
    frames, info = read_video(video)
    assert frames.shape == (13, 32, 48, 3) and info["fps"] == 30
    assert record == json.loads(Path(video).with_suffix(".json").read_text())
    assert record["prompt"] == "a red ball" and record["seed"] == seed == 7 and len(record["sigmas"]) == 4
    assert steps == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".mp4"]  # nothing else, no partial file


def test_random_seed_is_drawn_and_recorded(loaded, tmp_path):
    _, record, seed = call(handler(loaded, tmp_path), random_seed=True, seed=None)
    assert record["seed"] == seed != FORM["seed"]  # the seed field shows the drawn seed; the sidecar keeps it


@pytest.mark.parametrize(
    "changes, message",
    [  # every message names the form's labels (str(gr.Error) quotes the message)
        (dict(num_frames=30), r"Frames=30 is not of the form 6k\+1 \(nearest valid: \[25, 31\]\)"),
        (dict(width=50, height=20), r"Height=20 is not a multiple of 16.*\[16, 32\].*Width=50.*\[48, 64\]"),
        (dict(num_steps=0), "Steps must be between 1 and 1000; got 0"),
        (dict(cfg_scale=100), r"CFG scale must be between 0 and 50 .*; got 100"),
        (dict(linear_steps=5), r"Linear steps must be in \[1, 2\] for 3 steps \(Steps\); got 5"),
        (dict(threshold_noise=2), r"Threshold noise must be between 0 and 1; got 2"),
        (dict(width=None), "Width is empty; enter a number"),
        (dict(num_frames=13.5), "Frames must be a whole number; got 13.5"),
        (dict(seed=-1), "Seed must be between 0 and 2\\*\\*64 - 1; got -1"),
    ],
)
def test_bad_input_is_a_message_and_writes_nothing(loaded, tmp_path, changes, message):
    with pytest.raises(gr.Error, match=message):
        call(handler(loaded, tmp_path), **changes)
    assert not list(tmp_path.iterdir())


def test_nan_latents_and_out_of_memory_are_messages(loaded, tmp_path, monkeypatch):
    pipe, _ = loaded
    forward = pipe.dit.forward
    monkeypatch.setattr(pipe.dit, "forward", lambda *a, **k: forward(*a, **k) * float("nan"))
    with pytest.raises(gr.Error, match="NaN or inf at step 1 of 3.*no video was written"):
        call(handler(loaded, tmp_path))

    def out_of_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(pipe.dit, "forward", out_of_memory)
    with pytest.raises(gr.Error, match=r"out of device memory during the dit stage.*--cpu_offload"):
        call(handler(loaded, tmp_path))
    assert not list(tmp_path.iterdir())


def test_form_is_built_from_the_settings_table(loaded, tmp_path):
    """Every setting has one input, labelled and filled as the table and the model's defaults say, in FORM's order."""
    pipe, args = loaded
    assert gradio_ui.FORM == (*[s.file for s in SETTINGS[:6]], "random_seed", *[s.file for s in SETTINGS[6:]])
    run = handler(loaded, tmp_path)
    assert list(inspect.signature(run).parameters) == [*gradio_ui.FORM, "progress"]  # what gradio passes
    demo = gradio_ui.build_ui(pipe, args, args.model_dir)
    inputs = [b for b in demo.blocks.values() if isinstance(b, gr.Textbox | gr.Number)]
    assert [b.label for b in inputs] == [s.label for s in SETTINGS]
    assert [b.value for b in inputs][2:5] == [48, 32, 13]  # the model folder's mochi_defaults.json
    [click] = [fn for fn in demo.fns.values() if fn.api_name == "generate"]
    assert [demo.blocks[i].label for i in (b._id for b in click.inputs)] == [
        *[s.label for s in SETTINGS[:6]],
        "Random seed",
        *[s.label for s in SETTINGS[6:]],
    ]


def test_startup_errors_are_messages(model_dir, tmp_path, capsys, monkeypatch):
    assert gradio_ui.main(["--model_dir", str(tmp_path / "nowhere")]) == 2
    assert "model folder not found" in capsys.readouterr().err

    def load(*args, **kwargs):
        pytest.fail("weights were loaded before the flags were checked")

    monkeypatch.setattr(infer, "load_pipeline", load)
    assert gradio_ui.main(["--model_dir", str(model_dir), "--num_frames", "30", "--out_dir", str(tmp_path)]) == 2
    assert "--num_frames=30 is not of the form 6k+1 (nearest valid: [25, 31])" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gradio_ui.main(["--sweep-file", "x.jsonl"])
    assert "--sweep-file and --output belong to the CLI" in capsys.readouterr().err


def test_page_generates_a_video_in_chromium(ui_server):
    """Type a prompt, click Generate, see the video; then 30 frames shows the message and writes nothing."""
    proc, url, folder = ui_server
    out = folder / "outputs"
    with chromium_page() as page:
        wait_until_up(proc, url, folder / "server.log")
        page.goto(url)
        assert page.get_by_label("Width").input_value() == "48"  # the model folder's defaults fill the form
        page.get_by_label("Prompt", exact=True).fill("a lemon on a table")
        page.get_by_role("button", name="Generate").click()
        video = page.locator("video[src]")
        video.wait_for(timeout=60_000)
        src = video.get_attribute("src")
        assert src.startswith(url) and src.endswith(".mp4")
        assert page.request.get(src).body()[4:8] == b"ftyp"  # the page's video is served, and it is an MP4
        [mp4] = list(out.glob("output_*.mp4"))
        sidecar = json.loads(mp4.with_suffix(".json").read_text())
        assert sidecar["prompt"] == "a lemon on a table" and sidecar["num_frames"] == 13
        assert read_video(mp4)[0].shape == (13, 32, 48, 3)
        page.get_by_text('"a lemon on a table"').wait_for()  # the settings panel shows the sidecar

        page.get_by_label("Frames").fill("30")
        page.get_by_role("button", name="Generate").click()
        page.get_by_text("Frames=30 is not of the form 6k+1 (nearest valid: [25, 31])").wait_for(timeout=20_000)
        assert {p.name for p in out.iterdir()} == {mp4.name, mp4.with_suffix(".json").name}
        assert page.external == []  # nothing left 127.0.0.1
