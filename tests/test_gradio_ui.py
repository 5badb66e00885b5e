"""The web UI: its server side called directly (results, refusals, cancelling, the queue), then a real server through
gradio_client and the real page in headless Chromium."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from browser import chromium_page, free_port, server, wait_until_up

from mochi_preview import MochiPipeline, gradio_ui, infer
from mochi_preview.demo.vocabulary import DEMO_PROMPT
from mochi_preview.estimate import Cost, Rates
from mochi_preview.settings import SETTINGS, Settings
from mochi_preview.tiny import save_random_model
from mochi_preview.video import read_video

SMALL = dict(width=48, height=32, num_frames=13, num_steps=3)  # the test model's mochi_defaults.json
FORM = {**Settings().to_file(), "prompt": "a red ball", "seed": 7, "random_seed": False, "lora_path": "", **SMALL}
LONG = dict(num_steps=1000)  # a job that runs long enough to be cancelled (the tiny model: ms per step)
HUGE = dict(width=4096, height=4096, num_frames=997)  # issue 20: it once took the server's whole memory


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
    cmd += ["--port", str(port), "--out_dir", str(folder / "outputs"), "--quiet", "--max_pixels", str(2**40)]
    env = {**os.environ, "GRADIO_TEMP_DIR": str(folder / "gradio"), "NO_PROXY": "127.0.0.1"}
    with server(cmd, folder / "server.log", cwd=folder, env=env) as proc:
        yield proc, f"http://127.0.0.1:{port}/", folder


@pytest.fixture(scope="module")
def loaded(model_dir):
    args = gradio_ui.build_parser().parse_args(["--model_dir", str(model_dir), "--dtype", "fp32", "--quiet"])
    return infer.load_pipeline(args)[0], args


@pytest.fixture(scope="module")
def rates(loaded, tmp_path_factory):
    """Measured once, on a studio's device thread (where jobs run); the studios below share it."""
    pipe, args = loaded
    return gradio_ui.Studio(pipe, tmp_path_factory.mktemp("x"), infer.RunOptions.from_args(args)).rates


def studio(loaded, rates, out_dir, limits=None, **kw):
    pipe, args = loaded
    limits = limits or gradio_ui.Limits()
    return gradio_ui.Studio(pipe, out_dir, infer.RunOptions.from_args(args), limits, rates=rates, **kw)


def values(**changes):
    form = {**FORM, **changes}
    return [form[k] for k in gradio_ui.FORM]


def run(handler, *args):
    """Everything a generator handler yields, and its last update."""
    updates = list(handler(*args))
    return updates, updates[-1]


def started(job, steps: int = 1, timeout: float = 60) -> None:
    """Wait until `job` has run `steps` sampling steps."""
    deadline = time.monotonic() + timeout
    while job.steps_done < steps:
        assert time.monotonic() < deadline and not job.done.is_set(), (job.stage, job.error)
        job.seen = time.monotonic()  # its request is still listening
        time.sleep(0.02)


def test_handler_writes_the_clis_files_and_reports_each_stage(loaded, rates, tmp_path):
    updates, (shown, record, seed, status, _) = run(gradio_ui.make_handler(studio(loaded, rates, tmp_path)), *values())
    [video] = tmp_path.glob("output_*.mp4")
    frames, info = read_video(video)
    assert frames.shape == (13, 32, 48, 3) and info["fps"] == 30  # the saved file: native size
    assert record == json.loads(Path(video).with_suffix(".json").read_text())
    assert record["prompt"] == "a red ball" and record["seed"] == seed == 7 and len(record["sigmas"]) == 4
    assert status == "Done" and all(u[:3] == (gr.skip(),) * 3 for u in updates[:-1])
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".mp4"]  # nothing else, no partial file
    assert Path(shown).name == video.name and Path(shown).parent != tmp_path  # the page shows a display copy


def test_small_videos_are_shown_upscaled_by_a_whole_factor_with_nearest_neighbour(loaded, rates, tmp_path):
    """The page's copy of a 48x32 clip is 8x larger (384x256), each source pixel a flat 8x8 block; a demo-like
    clip (a square on a dark background) comes back as its own pixels."""
    s = studio(loaded, rates, tmp_path)
    _, (shown, *_) = run(gradio_ui.make_handler(s), *values())
    big = read_video(shown)[0].astype(float)
    assert big.shape == (13, 256, 384, 3)
    blocks = big.reshape(13, 32, 8, 48, 8, 3)
    inside = blocks[:, :, 2:6, :, 2:6].std(axis=(2, 4)).mean()  # within each block (its edges take the decoder's
    # bilinear chroma upsampling of yuv420p): codec noise only
    between = blocks.mean(axis=(2, 4)).std(axis=(1, 2)).mean()  # between blocks: the picture
    print(f"display copy: within-block std {inside:.2f}, between blocks {between:.2f}")
    assert inside < 0.1 * between
    clip = np.full((7, 64, 64, 3), 16, np.uint8)
    for t in range(7):
        clip[t, 20:36, 8 + 4 * t : 24 + 4 * t] = (230, 40, 40)
    copy = read_video(s._display_copy(list(clip), tmp_path / "clip.mp4"))[0].astype(float)
    assert copy.shape == (7, 512, 512, 3)  # 8x: 512 px
    assert np.abs(copy[:, 4::8, 4::8] - clip).mean() < 3  # block centres: the clip's pixels
    large = np.zeros((1, gradio_ui.DISPLAY_SIZE // 2 + 16, 16, 3), np.uint8)
    assert s._display_copy(large, tmp_path / "large.mp4") is None  # shown as it is


def test_status_names_the_stage_step_and_seconds_per_step(loaded, rates, tmp_path):
    s = studio(loaded, rates, tmp_path)
    job = s.request({**FORM, **LONG})
    started(job, 2)
    text = job.status().split("\n\n")[-1]  # after the notices
    assert text.startswith("Sampling: step ") and " of 1000 · " in text and " per step · about " in text
    assert job.step_seconds() == sum(job.step_times) / len(job.step_times)  # measured, no longer the estimate
    s.cancel(None)
    job.done.wait(60)


@pytest.mark.parametrize("cache", [None, "first_block:0.1"])
def test_the_first_step_is_labelled_sampling_not_encoding(loaded, rates, tmp_path, cache):
    """During the first DiT call the page says "Sampling: step 1", also when a step cache runs the DiT's blocks
    without its forward (the label once stayed "Encoding the prompt" through the whole sampling)."""
    pipe, _ = loaded
    s, seen = studio(loaded, rates, tmp_path), []
    hook = pipe.dit.blocks[-1].register_forward_pre_hook(lambda m, a: seen.append(s.worker.current.status()))
    try:
        _, (*_, status, _) = run(gradio_ui.make_handler(s), *values(cache=cache))
    finally:
        hook.remove()
    assert status == "Done" and seen[0].startswith("Sampling: step 1 of 3 · ")
    assert all(line.startswith("Sampling: step ") for line in seen)


def test_random_seed_is_drawn_and_recorded(loaded, rates, tmp_path):
    _, (_, record, seed, _, _) = run(gradio_ui.make_handler(studio(loaded, rates, tmp_path)), *values(random_seed=True))
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
        (dict(width=16.5), "Width must be a whole number; got 16.5"),  # refused, as in the CLI, not rounded
        (dict(seed=-1), "Seed must be between 0 and 2\\*\\*64 - 1; got -1"),
        (
            dict(num_frames=169),
            r"Refused: Frames=169 is above this server's --max_frames=163\. Estimate on this "
            r"machine: .* per step",
        ),  # fmt: skip
        (dict(width=864, height=480), r"864x480 = 414,720 pixels is above this server's --max_pixels=407,040"),
        (HUGE, r"Refused: .*it needs about [0-9.]+ (TiB|GiB) of memory on cpu; [0-9.]+ GiB is free"),
    ],
)
def test_bad_input_is_a_message_before_anything_is_queued(loaded, rates, tmp_path, changes, message):
    s = studio(loaded, rates, tmp_path)
    with pytest.raises(gr.Error, match=message):
        run(gradio_ui.make_handler(s), *values(**changes))
    assert s.worker.waiting() == 0 and s.worker.current is None and not list(tmp_path.iterdir())


def test_a_job_estimated_past_the_time_limit_is_refused_with_the_estimate(loaded, tmp_path):
    def slow():  # 30 s per DiT call, 5 s per decode, whatever the FLOPs (a finished job would correct them)
        return Rates(1.0, Cost(fixed=30.0, rate=1e30), Cost(fixed=5.0, rate=1e30), free=2**40, host_free=2**40)

    s = studio(loaded, slow(), tmp_path, gradio_ui.Limits(max_job_seconds=600))
    refusal = r"about 3 h \d\d min, above this server's --max_job_seconds=600\. Estimate on this machine: 3 h .* = 30 s"
    with pytest.raises(ValueError, match=refusal):
        s.request({**FORM, "num_steps": 400, "cfg_scale": 1.0})
    job = s.request({**FORM, "num_steps": 3, "cfg_scale": 1.0})  # 1 min 36 s: no warning
    assert job.estimate.seconds == pytest.approx(1 + 3 * 30 + 5) and job.notices == []
    job.done.wait(60)
    s = studio(loaded, slow(), tmp_path, gradio_ui.Limits(max_job_seconds=600))
    job = s.request({**FORM, "num_steps": 8, "cfg_scale": 1.0})  # 4 min 06 s: a warning
    assert job.notices == [f"This job will take about 4 min 06 s on this device ({gradio_ui.summary(job.estimate)})"]
    job.done.wait(60)


def test_cancel_stops_the_job_between_steps_and_frees_the_queue(loaded, rates, tmp_path):
    s = studio(loaded, rates, tmp_path)
    handler = gradio_ui.make_handler(s)
    request = type("Request", (), {"session_hash": "tab-1"})()
    updates = []
    thread = threading.Thread(target=lambda: updates.extend(handler(*values(**LONG), request)))
    thread.start()
    while s.worker.current is None or s.worker.current.steps_done < 2:
        assert thread.is_alive()
        time.sleep(0.02)
    job = s.worker.current
    assert s.cancel("another-tab") == "Nothing to cancel" and not job.cancel.is_set()
    assert s.cancel("tab-1") == "Cancelling 1 job"
    thread.join(60)
    assert updates[-1][:3] == (gr.skip(),) * 3 and updates[-1][3].startswith("Cancelled at step ")
    assert any(isinstance(u[4], np.ndarray) for u in updates)  # previews came (the last, at least, with the cancel)
    assert 2 <= job.steps_done < 1000 and not list(tmp_path.iterdir())  # between steps; nothing written
    _, (video, *_) = run(handler, *values())  # the next job runs
    assert Path(video).is_file()


def test_a_job_whose_page_went_away_stops(loaded, rates, tmp_path, monkeypatch):
    """Its request stops asking (gradio closed the event, or the client vanished): the job stops between steps."""
    monkeypatch.setattr(gradio_ui, "CLIENT_TIMEOUT", 0.5)
    s = studio(loaded, rates, tmp_path)
    job = s.request({**FORM, **LONG})
    started(job, 2)
    assert job.done.wait(60)  # nobody follows it any more
    assert isinstance(job.error, gradio_ui.JobStopped) and "the page that asked for it went away" in str(job.error)
    assert job.steps_done < 1000 and not list(tmp_path.iterdir())


def test_closing_the_status_stream_cancels_the_job(loaded, rates, tmp_path):
    """What gradio does to a generator on /cancel and on a disconnect: close it."""
    s = studio(loaded, rates, tmp_path)
    job = s.request({**FORM, **LONG})
    with closing(s.follow(job)) as statuses:
        next(statuses)
        started(job, 1)
    assert job.cancel.is_set() and job.done.wait(60) and "Cancelled at step" in str(job.error)


def test_a_job_past_its_time_limit_is_stopped(loaded, tmp_path):
    fast = Rates(text=0.0, dit=Cost(fixed=0.0, rate=1e30), vae=Cost(fixed=0.0, rate=1e30), free=2**40, host_free=2**40)
    s = studio(loaded, fast, tmp_path, gradio_ui.Limits(max_job_seconds=0.5))
    with pytest.raises(
        gr.Error, match=r"Stopped at step \d+ of 1000: it ran past this server's --max_job_seconds=0\.5"
    ):
        run(gradio_ui.make_handler(s), *values(**LONG))
    assert not list(tmp_path.iterdir())


def test_queue_position_and_an_honest_wait(loaded, rates, tmp_path):
    """The second job sees one job ahead, and a wait from what the first one has measured and has left."""
    s = studio(loaded, rates, tmp_path, max_queue=1)
    first = s.request({**FORM, **LONG})
    started(first, 3)
    second = s.request(FORM)
    with pytest.raises(gradio_ui.QueueFull, match=r"the queue is full \(1 jobs wait\)"):
        s.request(FORM)
    ahead, wait = s.worker.place(second)
    assert ahead == 1 and wait == pytest.approx(first.remaining(), rel=0.2)
    assert wait > (1000 - first.steps_done - 5) * min(first.step_times)  # its remaining steps at their measured pace
    assert second.status(ahead, wait).startswith("Waiting for the device: 1 job ahead, about ")
    s.cancel(None)
    assert first.done.wait(60) and second.done.wait(60) and second.video is None


def test_out_of_memory_fails_that_job_only(loaded, rates, tmp_path, monkeypatch):
    pipe, _ = loaded
    handler = gradio_ui.make_handler(studio(loaded, rates, tmp_path))
    forward = pipe.dit.forward
    monkeypatch.setattr(pipe.dit, "forward", lambda *a, **k: forward(*a, **k) * float("nan"))
    with pytest.raises(gr.Error, match="NaN or inf at step 1 of 3.*no video was written"):
        run(handler, *values())

    def out_of_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(pipe.dit, "forward", out_of_memory)
    with pytest.raises(gr.Error, match=r"out of device memory during the dit stage.*--cpu_offload"):
        run(handler, *values())

    def host_out_of_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried")

    monkeypatch.setattr(pipe.dit, "forward", host_out_of_memory)
    with pytest.raises(gr.Error, match=r"out of memory \(.*can't allocate memory.*\); this job failed"):
        run(handler, *values())
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(pipe.dit, "forward", forward)
    _, (video, *_) = run(handler, *values())  # the server goes on
    assert Path(video).is_file()


def test_notices_for_a_cut_prompt_and_a_prompt_outside_the_demo_world(loaded, rates, tmp_path):
    s = studio(loaded, rates, tmp_path, demo=True)
    cut, demo = [s.request({**FORM, "prompt": p}) for p in ("a lemon on a table " * 60, DEMO_PROMPT)]
    s.cancel(None)
    assert cut.done.wait(60) and demo.done.wait(60)
    assert re.match(r"The prompt is \d{3} tokens; only the first 256 are used", cut.notices[0])
    assert "colours: " in cut.notices[1] and "shapes: " in cut.notices[1]  # the demo's vocabulary
    assert demo.notices == []
    lemon = gradio_ui.read_form({**FORM, "prompt": "a lemon"})
    assert studio(loaded, rates, tmp_path)._read_prompts(lemon)[1] == []  # not the demo model: no such notice


def test_form_and_genmos_endpoint_are_built_from_the_settings_table(loaded, rates, tmp_path):
    """Every setting has one input, labelled and filled as the table and the model's defaults say, in FORM's order;
    Genmo's endpoint takes Genmo's eight inputs in Genmo's order."""
    pipe, args = loaded
    assert gradio_ui.FORM == (*[s.file for s in SETTINGS[:6]], "random_seed", *[s.file for s in SETTINGS[6:]],
                              "lora_path")  # fmt: skip
    s = studio(loaded, rates, tmp_path)
    assert list(inspect.signature(gradio_ui.make_handler(s)).parameters) == [*gradio_ui.FORM, "request"]
    demo = gradio_ui.build_ui(s, args, args.model_dir)
    inputs = [demo.blocks[b._id] for b in endpoint(demo, "generate").inputs]
    settings = [b for b, k in zip(inputs, gradio_ui.FORM, strict=True) if k not in ("random_seed", "lora_path")]
    assert [b.label for b in settings] == [s.label for s in SETTINGS]
    assert [b.value for b in settings][2:5] == [48, 32, 13]  # the model folder's mochi_defaults.json
    assert all(getattr(b, "precision", None) is None for b in settings)  # gradio would round 16.5 to 16
    uploads = {s.file: type(b).__name__ for s, b in zip(SETTINGS, settings, strict=True) if not isinstance(b,
               gr.Textbox | gr.Number)}  # fmt: skip
    assert uploads == {"image": "Image", "init_video": "Video", "extend": "Video"}  # file inputs are uploads
    labels = lambda name: [demo.blocks[b._id].label for b in endpoint(demo, name).inputs]  # noqa: E731
    assert labels("generate") == [*[s.label for s in SETTINGS[:6]], "Random seed", *[s.label for s in SETTINGS[6:]],
                                  "LoRAs"]  # fmt: skip
    assert labels("generate_video") == ["Prompt", "Negative prompt", "Width", "Height", "Frames", "Seed", "CFG scale",
                                        "Steps"]  # fmt: skip
    assert list(demo.fns.values())[0].api_name == "generate_video"  # also fn_index=0, as in Genmo's UI


def endpoint(demo, name):
    [fn] = [fn for fn in demo.fns.values() if fn.api_name == name]
    return fn


def test_demo_model_starts_with_a_demo_prompt(loaded, rates, tmp_path):
    _, args = loaded
    demo = gradio_ui.build_ui(studio(loaded, rates, tmp_path, demo=True), args, args.model_dir)
    [prompt] = [b for b in demo.blocks.values() if isinstance(b, gr.Textbox) and b.label == "Prompt"]
    assert prompt.value == DEMO_PROMPT


def test_startup_errors_are_messages(model_dir, tmp_path, capsys, monkeypatch):
    assert gradio_ui.main(["--model_dir", str(tmp_path / "nowhere")]) == 2
    assert "model folder not found" in capsys.readouterr().err

    def load(*args, **kwargs):
        pytest.fail("weights were loaded before the flags were checked")

    monkeypatch.setattr(infer, "load_pipeline", load)
    assert gradio_ui.main(["--model_dir", str(model_dir), "--num_frames", "30", "--out_dir", str(tmp_path)]) == 2
    assert "--num_frames=30 is not of the form 6k+1 (nearest valid: [25, 31])" in capsys.readouterr().err
    assert gradio_ui.main(["--model_dir", str(model_dir), "--lora_path", str(tmp_path / "x.safetensors")]) == 2
    assert f"--lora_path {tmp_path / 'x.safetensors'}: " in capsys.readouterr().err
    assert gradio_ui.main(["--model_dir", str(model_dir), "--max_frames", "0"]) == 2
    assert "--max_frames must be positive; got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gradio_ui.main(["--sweep-file", "x.jsonl"])
    assert "--sweep-file and --output belong to the CLI" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gradio_ui.main(["--preview", "p.png"])
    assert "--preview belongs to the CLI (python -m mochi_preview.infer)" in capsys.readouterr().err


def test_genmos_flags_are_taken(model_dir, tmp_path, monkeypatch):
    """Genmo's --cpu_offload is the model offload memory mode; --lora_path (PATH[:STRENGTH]) fills the LoRA field,
    whose LoRAs each job applies live (nothing is merged at startup)."""
    from mochi_preview.lora import save_lora_native

    args = gradio_ui.build_parser().parse_args(["--model_dir", str(model_dir), "--cpu_offload", "--dtype", "fp32"])
    assert infer.memory_mode(args) == "model"
    merged, served = [], []
    monkeypatch.setattr(
        MochiPipeline, "load_lora_weights", lambda pipe, path, strength=1.0: merged.append((path, strength))
    )
    monkeypatch.setattr(MochiPipeline, "fuse_lora", lambda pipe: merged.append("fused"))
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: served.append((self, kw)))
    lora = save_lora_native(
        tmp_path / "style.safetensors", {"blocks.0.attn.qkv_x": (torch.ones(2, 8), torch.ones(8, 2))}, 2, 2.0
    )
    argv = ["--model_dir", str(model_dir), "--dtype", "fp32", "--quiet", "--out_dir", str(tmp_path / "out")]
    assert gradio_ui.main([*argv, "--lora_path", f"{lora}:0.5", "--port", "7999"]) == 0
    assert merged == []
    demo, kw = served[0]
    assert kw["server_port"] == 7999
    [field] = [b for b in demo.blocks.values() if getattr(b, "label", None) == "LoRAs"]
    assert field.value == f"{lora}:0.5"


def test_gradio_client_huge_request_is_refused_while_a_job_runs_and_genmos_script_runs(ui_server):
    """The 4096x4096x997 request is refused at once, while a long job holds the device (so it never waited for it);
    cancelling frees the device; then a call written for Genmo's UI (its eight inputs, positionally) runs."""
    from gradio_client import Client

    proc, url, folder = ui_server
    wait_until_up(proc, url, folder / "server.log")
    client = Client(url, verbose=False)
    long = client.submit(*values(**LONG), api_name="/generate")
    deadline = time.monotonic() + 60
    while not any("Sampling: step" in str(o) for o in long.outputs()):
        assert time.monotonic() < deadline, (long.status(), (folder / "server.log").read_text()[-2000:])
        time.sleep(0.1)
    start = time.monotonic()
    with pytest.raises(Exception, match=r"Refused: .*it needs about .* of memory on cpu"):
        client.predict(*values(**HUGE), api_name="/generate")
    print(f"refused in {time.monotonic() - start:.2f} s")  # issue 20 asks for under a second (reported, not asserted)
    assert not long.done()  # it did not wait for the running job
    assert client.predict(api_name="/cancel") == "Cancelling 1 job"
    video = client.predict("a red ball", "", 48, 32, 13, 7, 6.0, 3, api_name="/generate_video")
    path = Path(video["video"] if isinstance(video, dict) else video)
    assert read_video(path)[0].shape == (13, 32, 48, 3)
    [sidecar] = [json.loads(p.read_text()) for p in (folder / "outputs").glob("*.json")]
    assert (sidecar["seed"], sidecar["num_steps"], sidecar["cfg_scale"]) == (7, 3, 6.0)
    from gradio_client import handle_file
    from PIL import Image

    Image.new("RGB", (48, 32), (200, 30, 30)).save(folder / "first.png")  # an upload into the Image input
    video, record, *_ = client.predict(*values(image=handle_file(str(folder / "first.png"))), api_name="/generate")
    assert record["conditioning"]["input"] == "image" and record["image"].endswith(".png")


def test_page_generates_cancels_and_generates_again_in_chromium(ui_server):
    """Type a prompt, click Generate, see the video; a long job is cancelled between steps and the next one runs;
    30 frames shows the message and writes nothing."""
    proc, url, folder = ui_server
    out = folder / "outputs"
    with chromium_page() as page:
        wait_until_up(proc, url, folder / "server.log")
        page.goto(url)
        assert page.get_by_label("Width").input_value() == "48"  # the model folder's defaults fill the form
        page.locator("#estimate").get_by_text("Estimate on this device: ").wait_for()  # before any run
        page.get_by_label("Prompt", exact=True).fill("a lemon on a table")
        page.get_by_role("button", name="Generate").click()
        video = page.locator("video[src]")
        video.wait_for(timeout=60_000)
        src = video.get_attribute("src")
        assert src.startswith(url) and src.endswith(".mp4")
        assert page.request.get(src).body()[4:8] == b"ftyp"  # the page's video is served, and it is an MP4
        rendering = page.locator("#video video").evaluate("v => getComputedStyle(v).imageRendering")
        assert rendering == "pixelated"  # any stretch beyond the served copy's whole factor stays sharp
        [mp4] = [p for p in out.glob("output_*.mp4") if "a lemon on a table" in p.with_suffix(".json").read_text()]
        assert read_video(mp4)[0].shape == (13, 32, 48, 3)
        page.get_by_text('"a lemon on a table"').wait_for()  # the settings panel shows the sidecar
        before = set(out.iterdir())

        page.get_by_label("Steps").fill("1000")
        page.get_by_role("button", name="Generate").click()
        page.locator("#status").get_by_text("Sampling: step").wait_for(timeout=60_000)
        page.locator("#preview img").wait_for(timeout=30_000)  # the preview shows while it samples
        page.get_by_role("button", name="Cancel").click()
        page.locator("#status").get_by_text("Cancelled at step").wait_for(timeout=30_000)
        assert set(out.iterdir()) == before  # nothing written

        page.get_by_label("Steps").fill("3")
        page.get_by_label("Prompt", exact=True).fill("a blue square")
        page.get_by_role("button", name="Generate").click()
        page.get_by_text('"a blue square"').wait_for(timeout=60_000)  # the next job ran
        assert len(set(out.iterdir()) - before) == 2

        page.get_by_label("Frames").fill("30")
        page.get_by_role("button", name="Generate").click()
        page.get_by_text("Frames=30 is not of the form 6k+1 (nearest valid: [25, 31])").first.wait_for(timeout=20_000)
        assert len(set(out.iterdir()) - before) == 2
        assert page.external == []  # nothing left 127.0.0.1

        page.get_by_label("Frames").fill("13")
        page.get_by_label("Steps").fill("1000")
        page.get_by_role("button", name="Generate").click()
        page.locator("#status").get_by_text("Sampling: step").wait_for(timeout=60_000)
        log = folder / "server.log"
        stopped = log.read_text().count("job stopped: ")
        page.close()  # closing the tab stops its job
        deadline = time.monotonic() + 60
        while log.read_text().count("job stopped: ") == stopped:
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        last = log.read_text().split("job stopped: ")[-1].splitlines()[0]
        print(f"closing the tab: {last}")  # the unload event cancels it, or the watchdog sees its page gone
        assert last.startswith(("Cancelled at step", "Stopped at step")) and last.endswith("nothing was written")
        assert len(set(out.iterdir()) - before) == 2


def test_without_gradio_the_ui_says_which_setup_option_installs_it():
    import subprocess

    blocked = "import sys, runpy; sys.modules['gradio'] = None; "  # as if gradio were not installed
    code = blocked + "runpy.run_module('mochi_preview.gradio_ui', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "the web UI needs gradio: install it with `bash scripts/setup.sh --ui`" in proc.stderr


def test_lora_field_applies_loras_live_between_jobs_and_records_them(loaded, rates, tmp_path, monkeypatch):
    """One LoRA at 1.5, then at 0 (the same adapter, bitwise the base video), then none: the model is never
    reloaded, and each sidecar records the LoRAs the job used."""
    from mochi_preview.lora import save_lora_native

    pipe, _ = loaded
    out, g = pipe.dit.blocks[0].attn.qkv_x.weight.shape, torch.Generator().manual_seed(0)
    lora = save_lora_native(tmp_path / "style.safetensors", {"blocks.0.attn.qkv_x": (
        torch.randn(2, out[1], generator=g), torch.randn(out[0], 2, generator=g))}, 2, 2.0)  # fmt: skip
    monkeypatch.setattr(MochiPipeline, "from_pretrained", lambda *a, **k: pytest.fail("the model was reloaded"))
    handler = gradio_ui.make_handler(studio(loaded, rates, tmp_path / "out"))
    record = lambda **kw: run(handler, *values(**kw))[1][1]  # noqa: E731
    base, strong = record(), record(lora_path=f"  {lora}:1.5\n\n")
    adapters = dict(pipe.loras.adapters)
    zero = record(lora_path=f"{lora}:0")
    kept = dict(pipe.loras.adapters)
    none = record(lora_path="")
    assert [(r["file"], r["strength"], r["fused"]) for r in strong["loras"]] == [("style.safetensors", 1.5, False)]
    assert strong["loras"][0]["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
    assert strong["frames_digest"] != base["frames_digest"]
    assert zero["loras"][0]["strength"] == 0 and zero["frames_digest"] == base["frames_digest"]
    assert kept.keys() == adapters.keys() and all(kept[k] is a for k, a in adapters.items())  # only the strength
    assert none["loras"] == [] and none["frames_digest"] == base["frames_digest"] and not pipe.loras.adapters


@pytest.mark.parametrize(
    "field, message",
    [
        ("{tmp}/nowhere.safetensors", r"LoRAs: .*nowhere\.safetensors: "),
        ("{tmp}/style.safetensors:nan", r"LoRAs: .*style\.safetensors:nan: LoRA strength must be a finite number"),
        ("{tmp}/other.safetensors", r"LoRAs: .*other\.safetensors: .*does not fit the DiT.*\(8, 8\)"),
    ],
)
def test_bad_loras_are_refused_before_anything_is_queued(loaded, rates, tmp_path, field, message):
    from mochi_preview.lora import save_lora_native

    pipe, _ = loaded
    out = pipe.dit.blocks[0].attn.qkv_x.weight.shape
    save_lora_native(tmp_path / "style.safetensors", {"blocks.0.attn.qkv_x": (torch.ones(2, out[1]),
                     torch.ones(out[0], 2))}, 2, 2.0)  # fmt: skip
    save_lora_native(tmp_path / "other.safetensors", {"blocks.0.attn.qkv_x": (torch.ones(2, 8), torch.ones(8, 2))}, 2,
                     2.0)  # fmt: skip  # a LoRA for another model: its shapes do not fit
    s = studio(loaded, rates, tmp_path / "out")
    with pytest.raises(gr.Error, match=message):
        run(gradio_ui.make_handler(s), *values(lora_path=field.format(tmp=tmp_path)))
    assert s.worker.waiting() == 0 and s.worker.current is None and not (tmp_path / "out").exists()
