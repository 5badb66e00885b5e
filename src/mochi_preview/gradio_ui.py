"""Web UI: `python -m mochi_preview.gradio_ui [--model_dir DIR]`, then open http://127.0.0.1:7860.

The form holds the CLI's settings and generates through the CLI's own code (`infer.generate`), so every video lands in
`--out_dir` as `output_<timestamp>.mp4` with its JSON sidecar, exactly as `python -m mochi_preview.infer` writes it.
The pipeline is loaded once at startup. Every request is checked and estimated (seconds on this device, memory) before
it is queued: one beyond the machine or the server's limits is refused at once, with the estimate. One thread runs the
jobs on the device, one at a time; at most `--max_queue` more wait. A job stops between steps when it is cancelled, its
client goes away, or it runs past `--max_job_seconds`. While it samples, the page shows the stage (prompt, step i of N
with seconds per step, decode) and a preview image (preview.py). The LoRA field's LoRAs are applied live for each job
(the model is never reloaded); image and video inputs are uploads. A small video is shown upscaled by a whole factor
with nearest neighbour (the saved file stays native). Genmo's endpoint `/generate_video` takes Genmo's inputs and
returns the saved file.
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import json
import os
import secrets
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before importing gradio: no calls home
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import gradio as gr
except ModuleNotFoundError as e:  # an optional dependency: say which set-up option installs it
    if e.name != "gradio":
        raise
    print("error: the web UI needs gradio: install it with `bash scripts/setup.sh --ui`", file=sys.stderr)
    raise SystemExit(2) from None
import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import infer  # noqa: E402
from . import settings as table  # noqa: E402
from .demo.vocabulary import DEMO_PROMPT, prompt_warning  # noqa: E402
from .estimate import Estimate, Rates, describe, estimate, gib  # noqa: E402
from .lora import check_lora_file, parse_lora_arg, read_lora  # noqa: E402
from .pipeline import DeviceMemoryError, MochiPipeline, NonFiniteLatentsError, release_memory  # noqa: E402
from .preview import Previewer, projection_for  # noqa: E402
from .settings import SETTINGS, Settings  # noqa: E402
from .video import encode_video  # noqa: E402

# What the user can get wrong (settings, memory, NaNs, files): shown as a message in the page, never as a traceback.
USER_ERRORS = (ValueError, OSError, NonFiniteLatentsError, DeviceMemoryError)
RANDOM_SEED = "random_seed"  # a form field that is not a setting: draw a new seed each time
LORAS = "lora_path"  # another: LoRAs applied live, one PATH[:STRENGTH] a line (the CLI's --lora_path)
# The form's fields (the settings' file names, as in sweep files and sidecars), in the order the handler takes them.
FORM = (*(k for s in SETTINGS for k in ((s.file, RANDOM_SEED) if s.api == "seed" else (s.file,))), LORAS)
UPLOADS = {"image": "image", "init_video": "video", "extend": "video"}  # file settings with an upload input
DISPLAY_SIZE = 512  # a smaller video is shown upscaled by a whole factor, nearest neighbour (the file stays native)
DISPLAY_KEPT = 8  # display copies kept (gradio serves its own copy once a result is shown)
CSS = "#video video { image-rendering: pixelated; }"  # and any further stretch by the browser stays sharp
# Genmo's demos/gradio_ui.py endpoint inputs, in its order (spec §8.2): a gradio_client script for it runs here.
GENMO = ("prompt", "negative_prompt", "width", "height", "num_frames", "seed", "cfg_scale", "num_steps")
SECTIONS = {
    "size": "row",
    "seed": "row",
    "sampling": "row",
    "input": "Image / video input",
    "advanced": "Advanced",
}  # ui_group -> how it is laid out
POLL_SECONDS = 0.5  # how often a request's page hears about its job
CLIENT_TIMEOUT = 10.0  # a job whose request stopped listening this long is stopped (its client went away)
WARN_SECONDS = 180  # estimates above this come with a warning


@dataclass(frozen=True)
class Limits:
    """What the server accepts: the longest job by estimate (and by the clock), the most frames, the most pixels."""

    max_job_seconds: float = 1800
    max_frames: int = 163
    max_pixels: int = 848 * 480

    def problems(self, s: Settings, est: Estimate) -> list[str]:
        out = []
        if s.num_frames > self.max_frames:
            out.append(f"Frames={s.num_frames} is above this server's --max_frames={self.max_frames}")
        if s.width * s.height > self.max_pixels:
            out.append(
                f"Width x Height = {s.width}x{s.height} = {s.width * s.height:,} pixels is above this server's "
                f"--max_pixels={self.max_pixels:,}"
            )
        if est.seconds > self.max_job_seconds:
            out.append(f"it would take about {describe(est.seconds)}, above this server's --max_job_seconds="
                       f"{self.max_job_seconds:g}")  # fmt: skip
        return out + est.problems


class JobStopped(Exception):
    """A job stopped between steps: cancelled, its client gone, or past its time limit. Nothing is written."""


class QueueFull(Exception):
    """More jobs wait than --max_queue allows."""


@dataclass(eq=False)
class Job:
    """One request on its way through the queue and the device; its fields are what the page shows."""

    settings: Settings
    estimate: Estimate
    session: str | None = None
    time_limit: float | None = None
    notices: list[str] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    stage: str = "queued"  # queued, text, dit, vae, done
    steps_done: int = 0
    started: float | None = None  # when the device took it up
    stage_started: float | None = None
    step_times: list[float] = field(default_factory=list)  # seconds of each finished step
    last_step: float = 0.0  # when the latest step ended
    seen: float = field(default_factory=time.monotonic)  # when its request last asked about it
    loras: tuple[tuple[Path, float], ...] = ()  # applied live for this job
    preview: np.ndarray | None = None  # the latest preview image (preview.py)
    previews: int = 0  # how many were shown
    video: Path | None = None
    display: Path | None = None  # the page's copy of a small video, upscaled (None: the video itself)
    error: BaseException | None = None

    @property
    def steps(self) -> int:
        return self.settings.num_inference_steps

    def enter(self, stage: str) -> None:
        self.stage, self.stage_started = stage, time.monotonic()

    def show(self, image: np.ndarray) -> None:
        self.preview, self.previews = image, self.previews + 1

    def check(self) -> None:
        """Raise JobStopped if the job must stop now (called between steps)."""
        now = time.monotonic()
        doing = {"queued": "waiting", "text": "encoding the prompt", "vae": "decoding"}.get(self.stage, self.stage)
        where = f"at step {self.steps_done} of {self.steps}" if self.stage == "dit" else f"while {doing}"
        if self.cancel.is_set():
            raise JobStopped(f"Cancelled {where}; nothing was written")
        if now - self.seen > CLIENT_TIMEOUT:
            raise JobStopped(f"Stopped {where}: the page that asked for it went away; nothing was written")
        if self.time_limit is not None and self.started is not None and now - self.started > self.time_limit:
            raise JobStopped(f"Stopped {where}: it ran past this server's --max_job_seconds={self.time_limit:g} "
                             f"(estimate: {describe(self.estimate.seconds)}); nothing was written")  # fmt: skip

    def step_seconds(self) -> float:
        """Seconds per step: measured once a step has run, else estimated."""
        return sum(self.step_times) / len(self.step_times) if self.step_times else self.estimate.step_seconds

    def remaining(self) -> float:
        """Seconds until it is done, from where it is and what it has measured."""
        stages, elapsed = self.estimate.stages, time.monotonic() - (self.stage_started or time.monotonic())
        if self.stage == "queued":
            return self.estimate.seconds
        if self.stage == "text":
            return self.estimate.seconds - min(elapsed, stages["text"])
        after = stages["vae"] + stages["write"] + stages["other"]
        if self.stage == "dit":
            return (self.steps - self.steps_done) * self.step_seconds() + after
        return max(after - elapsed, 0) if self.stage == "vae" else 0.0

    def status(self, ahead: int = 0, wait: float = 0.0) -> str:
        """What the page shows now."""
        if self.stage == "queued":
            line = f"Waiting for the device: {ahead} job{'s' * (ahead != 1)} ahead, about {describe(wait)}"
        elif self.stage == "text":
            line = f"Encoding the prompt; then {self.steps} steps of about {describe(self.step_seconds())} each"
        elif self.stage == "dit":
            line = (f"Sampling: step {min(self.steps_done + 1, self.steps)} of {self.steps} · "
                    f"{describe(self.step_seconds())} per step · about {describe(self.remaining())} left")  # fmt: skip
        else:
            line = f"Decoding and writing the video: about {describe(self.remaining())} left"
        if self.stage == "queued":
            line += f"; then about {describe(self.estimate.seconds)} to generate"
        return "\n\n".join([*(f"⚠️ {n}" for n in self.notices), line])


class Worker:
    """The one thread that runs jobs on the device, in order; the others wait in a bounded queue."""

    def __init__(self, run, max_queue: int, setup=None):
        """`run(job)` generates a job; `setup()` runs first on the same thread (timings taken there are the jobs':
        a thread's CPU threading, and so its speed, is its own)."""
        self._run, self.max_queue, self._setup = run, max_queue, setup
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self.current: Job | None = None
        self.ready, self.setup_error = threading.Event(), None
        threading.Thread(target=self._loop, name="mochi-device", daemon=True).start()
        self.ready.wait()
        if self.setup_error is not None:
            raise self.setup_error

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs wait); try again later")
            self._waiting.append(job)
            self._cond.notify()

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def place(self, job: Job) -> tuple[int, float]:
        """(jobs ahead of `job`, seconds until the device is free for it): what the running job has left, by its
        measured steps, plus the estimates of the jobs waiting ahead."""
        with self._cond:
            if job not in self._waiting:
                return 0, 0.0
            ahead = list(self._waiting)[: self._waiting.index(job)]
            current = [self.current] if self.current is not None else []
        return len(ahead) + len(current), sum(j.remaining() for j in current + ahead)

    def cancel(self, session: str | None) -> int:
        """Cancel every job of a page session (waiting ones leave the queue at once); -> how many."""
        with self._cond:
            jobs = [j for j in [self.current, *self._waiting] if j is not None and j.session == session]
            for job in jobs:
                job.cancel.set()
                if job in self._waiting:
                    self._waiting.remove(job)
                    job.error = JobStopped("Cancelled while waiting; nothing was written")
                    job.done.set()
        return len(jobs)

    def _loop(self) -> None:
        try:
            if self._setup is not None:
                self._setup()
        except Exception as e:
            self.setup_error = e
            return
        finally:
            self.ready.set()
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                job = self.current = self._waiting.popleft()
            try:
                job.started = time.monotonic()
                job.check()  # cancelled or abandoned while it waited
                job.video = self._run(job)
            except BaseException as e:  # reported to the job's request; the worker goes on with the next job
                job.error = e
            finally:
                with self._cond:
                    self.current = None
                job.enter("done")
                job.done.set()


class Studio:
    """The server side of the page: checks and estimates requests, queues them for the device, reports on them."""

    def __init__(
        self,
        pipe: MochiPipeline,
        out_dir: Path,
        options: infer.RunOptions,
        limits: Limits = Limits(),  # frozen: a shared default is safe
        max_queue: int = 8,
        rates: Rates | None = None,
        demo: bool = False,
    ):
        self.pipe, self.out_dir, self.options, self.limits, self.demo = pipe, Path(out_dir), options, limits, demo
        self.rates = rates

        self._display = tempfile.TemporaryDirectory(prefix="mochi-ui-display-")  # removed with the Studio
        self.display_dir = Path(self._display.name)

        def measure():
            projection_for(pipe)  # the preview's latent -> RGB fit: a few small decodes, once, before any job
            if self.rates is None:
                self.rates = Rates.measure(pipe)
                start = time.monotonic()
                _clean_up(pipe)
                self.rates.other = time.monotonic() - start

        self.worker = Worker(self._run, max_queue, measure)

    def request(self, values: dict, session: str | None = None) -> Job:
        """A form's values (keyed as FORM) as a queued Job; ValueError naming the problem (settings, limits, the
        estimate) before anything is queued, QueueFull when the queue is."""
        s, loras = read_form(values), self._read_loras(values.get(LORAS))
        tokens, notices = self._read_prompts(s)
        est = estimate(self.pipe, s, self.rates, tokens, self.options.batch_cfg)
        if problems := self.limits.problems(s, est):
            raise ValueError(f"Refused: {'; '.join(problems)}. Estimate on this machine: {summary(est)}")
        if est.seconds > WARN_SECONDS:
            notices.append(f"This job will take about {describe(est.seconds)} on this device ({summary(est)})")
        job = Job(s, est, session, self.limits.max_job_seconds, notices, loras=loras)
        self.worker.submit(job)
        return job

    def follow(self, job: Job) -> Iterator[str]:
        """The job's status, every POLL_SECONDS until it is done; closing this iterator early cancels the job."""
        try:
            while not job.done.is_set():
                job.seen = time.monotonic()
                yield job.status(*self.worker.place(job))
                job.done.wait(POLL_SECONDS)
        finally:
            if not job.done.is_set():
                job.cancel.set()

    def cancel(self, session: str | None) -> str:
        n = self.worker.cancel(session)
        return f"Cancelling {n} job{'s' * (n != 1)}" if n else "Nothing to cancel"

    def _read_loras(self, text: str | None) -> tuple[tuple[Path, float], ...]:
        """The LoRA field, each file read and checked against this DiT (format, shapes, finite values) before the
        job is queued; ValueError naming the line."""
        loras = read_loras(text)
        for path, _ in loras:
            try:
                read_lora(path, self.pipe.dit)
            except (ValueError, OSError) as e:
                raise ValueError(f"LoRAs: {path}: {e}") from None
        return loras

    def _read_prompts(self, s: Settings) -> tuple[tuple[int, int], list[str]]:
        """(T5 tokens of the prompt and of the negative prompt, notices): a prompt cut to T5's length, and on the
        demo model a prompt outside its world."""
        tokenizer, most = self.pipe.tokenizer, self.pipe.t5.max_length
        counts = [0 if p == "" else len(tokenizer([p], verbose=False).input_ids[0]) for p in (s.prompt,
                  s.negative_prompt)]  # fmt: skip
        notices = [
            f"The {what} is {n} tokens; only the first {most} are used (T5 sees at most {most})"
            for what, n in zip(("prompt", "negative prompt"), counts, strict=True)
            if n > most
        ]
        if self.demo and (warning := prompt_warning(s.prompt)):
            notices.append(warning)
        return (min(counts[0], most), min(counts[1], most)), notices

    def _run(self, job: Job) -> Path:
        """Generate one job on the device (the worker thread), checking between steps whether it must stop."""

        def before_dit(module, args):
            if job.stage == "text":
                job.enter("dit")
            job.check()

        previewer = Previewer(job.show).prepare(self.pipe)

        def on_step(pipe, i, sigma, state):
            now = time.monotonic()
            job.step_times.append(now - (job.stage_started if not job.step_times else job.last_step))
            job.last_step, job.steps_done = now, i + 1
            previewer(pipe, i, sigma, state)
            if i + 1 == job.steps:
                job.enter("vae")
            else:
                job.check()

        def display(frames):
            job.display = self._display_copy(frames, path)

        job.enter("text")
        apply_loras(self.pipe, job.loras)
        # on the first block, which every DiT path runs (a step cache runs the blocks without the DiT's forward)
        hook = self.pipe.dit.blocks[0].register_forward_pre_hook(before_dit)
        path = infer.new_output_path(self.out_dir)
        try:
            video = infer.generate(self.pipe, job.settings, path, self.options, on_step, display)
        except BaseException as e:
            if isinstance(e, JobStopped):
                print(f"job stopped: {e}", file=sys.stderr)
            _drop_tracebacks(e)  # its frames hold the job's tensors: free them before the next job starts
            raise
        finally:
            hook.remove()
            _clean_up(self.pipe)
            if not self.worker.waiting():
                self.rates.refresh(self.pipe)  # idle: the free memory the next estimates compare with
        seconds = json.loads(video.with_suffix(".json").read_text()).get("seconds", {})
        seconds["rest"] = time.monotonic() - job.started - sum(seconds.values())  # encoding, writing, cleaning up
        self.rates.observe(job.estimate, seconds)
        return video

    def _display_copy(self, frames, like: Path) -> Path | None:
        """The page's copy of a video smaller than DISPLAY_SIZE: upscaled by a whole factor with nearest neighbour,
        so the browser does not stretch it blurred (the saved file stays native); None for a larger video."""
        frames = np.stack([np.asarray(f) for f in frames])  # (T, H, W, 3)
        k = DISPLAY_SIZE // max(frames.shape[1:3])
        if k < 2:
            return None
        k -= k % 8 if k >= 8 else 0  # blocks on the codec's 8x8 grid: flat inside
        for old in sorted(self.display_dir.iterdir(), key=lambda p: p.stat().st_mtime)[: -DISPLAY_KEPT + 1]:
            old.unlink(missing_ok=True)
        big = frames.repeat(k, axis=1).repeat(k, axis=2)
        return Path(encode_video(big, self.display_dir / like.name, self.options.fps))

    def result(self, job: Job) -> tuple[str, dict, int]:
        """(the video to show, sidecar, seed) of a finished job, or the gr.Error that says why there is none."""
        error = job.error
        if error is None:
            record = json.loads(job.video.with_suffix(".json").read_text())
            return str(job.display or job.video), record, record["seed"]
        job.error = None  # the job (and its error's frames, holding tensors) must not outlive the request
        message = _message(error)
        print(f"error: {message}", file=sys.stderr)
        _drop_tracebacks(error)
        raise gr.Error(message, print_exception=False) from None


def _message(error: BaseException) -> str:
    """What the page says about a failed job."""
    if isinstance(error, (JobStopped, *USER_ERRORS)):
        return str(error)
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, torch.OutOfMemoryError | MemoryError) or "can't allocate memory" in first:
        return f"out of memory ({first}); this job failed, nothing was written"
    return f"{type(error).__name__}: {first}"


def summary(est: Estimate) -> str:
    """An estimate in one line: time by stage, memory."""
    text, dit, vae, write, other = (est.stages[k] for k in ("text", "dit", "vae", "write", "other"))
    return (
        f"{describe(est.seconds)} (prompt {describe(text)}, sampling {describe(dit)} = {describe(est.step_seconds)} "
        f"per step, decoding {describe(vae)}, writing {describe(write + other)}); memory {gib(est.memory)} of "
        f"{gib(est.available)} free on {est.where}"
    )


def read_loras(text: str | None) -> tuple[tuple[Path, float], ...]:
    """The LoRA field: one PATH[:STRENGTH] a line (the CLI's --lora_path syntax), each file's header checked
    (exists, safetensors, a known layout); ValueError naming the line."""
    loras = []
    for line in filter(None, (line.strip() for line in (text or "").splitlines())):
        try:
            path, strength = parse_lora_arg(line)
            check_lora_file(path)
        except (ValueError, OSError) as e:
            raise ValueError(f"LoRAs: {line}: {e}") from None
        loras.append((path, strength))
    return tuple(loras)


def apply_loras(pipe: MochiPipeline, loras: tuple[tuple[Path, float], ...]) -> None:
    """Make exactly `loras` live on the DiT (never reloading the model): the same files as the last job keep their
    adapters and take the new strengths; another set replaces them."""
    loaded = [a.lora.path.resolve() for a in pipe.loras.adapters.values()]
    if loaded != [Path(p).resolve() for p, _ in loras]:
        pipe.unload_lora_weights()
        for path, _ in loras:
            pipe.load_lora_weights(path)
    pipe.set_adapters(list(pipe.loras.adapters), [strength for _, strength in loras])


def read_form(values: dict) -> Settings:
    """The form's values (keyed as FORM) as checked `Settings`; errors name the form's labels.

    "Random seed" (or an empty Seed) draws the seed here, below 2**32: a browser shows numbers above 2**53 rounded,
    so a seed the page shows must be one the page can give back.
    """
    given = {k: v for k, v in values.items() if k not in (RANDOM_SEED, LORAS)}
    s = Settings().updated(given, "ui")
    # an empty box of an optional text setting (an input image's path...) means "not given", not ""
    empty = [table.BY_FILE[k] for k, v in given.items() if not v and table.BY_FILE[k].kind is str]
    s = replace(s, **{e.api: None for e in empty if e.optional})
    if values.get(RANDOM_SEED) or s.seed is None:
        s = replace(s, seed=secrets.randbelow(2**32))
    return s.check("ui")


def make_handler(studio: Studio):
    """The Generate button's function, a generator: form values in (FORM's order); (video, sidecar, seed, status,
    preview) out, the status (and a new preview image, if any) every POLL_SECONDS while the job waits and runs; a
    gr.Error with the message on failure."""

    def generate(*values):
        values, request = _split_request(values, FORM)
        try:
            job = studio.request(dict(zip(FORM, values, strict=True)), _session(request))
        except (ValueError, QueueFull) as e:
            print(f"refused: {e}", file=sys.stderr)
            raise gr.Error(str(e), print_exception=False) from None
        for notice in job.notices:
            gr.Warning(notice)
        shown = None  # the previous job's preview is cleared by the first update
        with closing(studio.follow(job)) as statuses:  # closed early (the page went away, /cancel): job cancelled
            for status in statuses:
                preview = gr.skip() if job.previews == shown else job.preview
                shown = job.previews
                yield gr.skip(), gr.skip(), gr.skip(), status, preview
        last = job.preview if job.previews != shown else gr.skip()  # a preview made after the last poll
        if isinstance(job.error, JobStopped) and job.cancel.is_set():  # the user asked for it: no error
            yield gr.skip(), gr.skip(), gr.skip(), str(job.error), last
            return
        try:
            yield *studio.result(job), "\n\n".join([*(f"⚠️ {n}" for n in job.notices), "Done"]), last
        except gr.Error as e:
            yield gr.skip(), gr.skip(), gr.skip(), f"**Failed:** {e.message}", gr.skip()
            raise

    return _with_parameters(generate, FORM)


def make_genmo_handler(studio: Studio, defaults: Settings, loras: str = ""):
    """Genmo's endpoint: its eight inputs in its order, the saved video out (the other settings: the model's defaults;
    the LoRAs: `loras`, the server's --lora_path, as Genmo's UI applies its LoRA to every call)."""
    base = {**defaults.to_file(), RANDOM_SEED: False, LORAS: loras}

    def generate_video(*values):
        values, request = _split_request(values, GENMO)
        form = {**base, **dict(zip(GENMO, values, strict=True))}
        with closing(make_handler(studio)(*(form[k] for k in FORM), request)) as updates:
            for video, *_ in updates:  # the saved file itself, not the page's upscaled copy
                yield studio.out_dir / Path(video).name if isinstance(video, str) else video

    return _with_parameters(generate_video, GENMO)


def _with_parameters(fn, names: tuple[str, ...]):
    """`fn(*values)` with a signature naming one parameter per input, then `request`: gradio passes the inputs by
    position, shows these names in the API docs, and appends the gr.Request (found by its annotation)."""
    P = inspect.Parameter
    params = [P(k, P.POSITIONAL_OR_KEYWORD) for k in names]
    fn.__signature__ = inspect.Signature([*params, P("request", P.POSITIONAL_OR_KEYWORD, default=None)])
    fn.__annotations__ = {"request": gr.Request}
    return fn


def _split_request(values: tuple, names: tuple[str, ...]) -> tuple[tuple, gr.Request | None]:
    """(the inputs, the gr.Request gradio appended or None)."""
    return (values[:-1], values[-1]) if len(values) == len(names) + 1 else (values, None)


def _session(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None)


def _drop_tracebacks(error: BaseException) -> None:
    """Let go of the frames (and so the tensors) an exception and the ones it chained to still reference."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if error.__traceback__ is not None:
            traceback.clear_frames(error.__traceback__)
            error.__traceback__ = None
        error = error.__cause__ or error.__context__


def _clean_up(pipe: MochiPipeline) -> None:
    """After a job: collect its garbage, and hand freed heap memory back to the system (glibc keeps it otherwise,
    and the server's resident memory creeps up)."""
    release_memory(pipe.device)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _input(s: table.Setting, value) -> gr.components.Component:
    """The form's input for one setting: its label, initial value and hints all come from the settings table; an
    input file is an upload (its value: the uploaded file's path). Numbers arrive unrounded (no `precision`): 16.5
    is refused by the settings check, as in the CLI."""
    if UPLOADS.get(s.file) == "image":
        return gr.Image(value, label=s.label, type="filepath", sources=["upload"])
    if UPLOADS.get(s.file) == "video":
        return gr.Video(value, label=s.label, sources=["upload"], format=None)
    if s.kind is str:
        return gr.Textbox(value, label=s.label, **s.ui)
    return gr.Number(value, label=s.label, **{k: v for k, v in s.ui.items() if k != "precision"})


def build_ui(studio: Studio, args: argparse.Namespace, model_dir: Path) -> gr.Blocks:
    """The page: settings on the left (one input per row of the settings table), the video and its sidecar right."""
    d = table.from_arguments(args, infer.cli_defaults(model_dir, args.preset))  # flags > preset > the folder's
    if studio.demo and args.prompt is None:
        d = replace(d, prompt=DEMO_PROMPT)  # the lemon prompt is outside the demo's world
    # gradio serves copies of the videos from its cache; drop copies older than a day (the originals stay in out_dir)
    with gr.Blocks(title="Mochi 1 preview", delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## Mochi 1 preview\nModel: `{model_dir}` · videos are saved in `{args.out_dir.resolve()}`")
        if studio.demo:
            gr.Markdown("The small demo model: one coloured shape moving; describe its colour, shape and direction.")
        elif args.model_dir is None:
            gr.Markdown("**No --model_dir given: this model has RANDOM weights; it makes noise, not video.**")
        with gr.Row():
            with gr.Column():
                form = {}
                for group in dict.fromkeys(s.ui_group for s in SETTINGS):  # the table's groups, in its order
                    layout = SECTIONS.get(group)
                    box = gr.Row() if layout == "row" else gr.Accordion(layout, open=False) if layout else None
                    with box or nullcontext():
                        for s in (s for s in SETTINGS if s.ui_group == group):
                            form[s.file] = _input(s, getattr(d, s.api))
                            if s.api == "seed":
                                form[RANDOM_SEED] = gr.Checkbox(
                                    False, label="Random seed", info="draw a new seed each time"
                                )
                with gr.Accordion("LoRA", open=bool(args.lora_path)):
                    form[LORAS] = gr.Textbox(
                        "\n".join(args.lora_path), label="LoRAs", lines=2, placeholder="(none)",
                        info="one PATH[:STRENGTH] a line (Genmo, diffusers/peft or ComfyUI files), applied live",
                    )  # fmt: skip
                preview = gr.Markdown(elem_id="estimate")
                with gr.Row():
                    button = gr.Button("Generate", variant="primary")
                    cancel = gr.Button("Cancel", variant="stop")
                hidden = gr.Button(visible=False)  # Genmo's API endpoint's trigger
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                shown = gr.Image(label="Preview (while sampling)", interactive=False, elem_id="preview", height=160)
                video = gr.Video(
                    label="Video", format="mp4", interactive=False, autoplay=True, loop=True, elem_id="video"
                )
                record = gr.JSON(label="Settings (the sidecar JSON)")
        inputs = [form[k] for k in FORM]
        hidden.click(
            make_genmo_handler(studio, d, "\n".join(args.lora_path)), [form[k] for k in GENMO], [video],
            api_name="generate_video", concurrency_limit=None, show_progress="hidden",
        )  # fmt: skip
        button.click(
            make_handler(studio), inputs, [video, record, form["seed"], status, shown], api_name="generate",
            concurrency_limit=None, show_progress="hidden",
        )  # fmt: skip

        def stop(request: gr.Request) -> str:
            return studio.cancel(_session(request))

        cancel.click(stop, None, [status], api_name="cancel", concurrency_limit=None)
        demo.unload(stop)  # the tab closed (its heartbeat ended): its jobs stop

        def show_estimate(*values):
            try:
                s = read_form(dict(zip(FORM, values, strict=True)))
                est = estimate(studio.pipe, s, studio.rates, studio._read_prompts(s)[0], studio.options.batch_cfg)
            except ValueError as e:
                return f"*{e}*"
            problems = studio.limits.problems(s, est)
            verdict = f"**Refused here:** {'; '.join(problems)}" if problems else ""
            return f"Estimate on this device: {summary(est)}. {verdict}"

        triggers = [form[k].change for k in FORM] + [demo.load]
        gr.on(triggers, show_estimate, inputs, preview, queue=False, show_progress="hidden", api_visibility="private")
    return demo


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags (generation flags set the form's initial values; Genmo's --cpu_offload and --lora_path among
    them) plus the server's."""
    p = infer.build_parser()
    p.prog, p.description = "python -m mochi_preview.gradio_ui", "Web UI for Mochi 1 preview."
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: the whole network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--max_queue", type=int, default=8, help="requests that may wait for the device (default 8)")
    p.add_argument(
        "--max_job_seconds",
        type=float,
        default=Limits.max_job_seconds,
        help=f"refuse jobs estimated longer, stop jobs running longer (default {Limits.max_job_seconds:g})",
    )
    p.add_argument(
        "--max_frames", type=int, default=Limits.max_frames, help=f"refuse more frames (default {Limits.max_frames})"
    )
    p.add_argument("--max_pixels", type=int, default=Limits.max_pixels,
                   help=f"refuse a larger width x height (default {Limits.max_pixels:,} = 848x480)")  # fmt: skip
    return p


def check_server_args(args: argparse.Namespace) -> None:
    """The server's own flags (ValueError naming the flag), before anything loads."""
    for name in ("max_queue", "max_job_seconds", "max_frames", "max_pixels"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive; got {getattr(args, name)}")
    infer.lora_arguments(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sweep_file is not None or args.output is not None:
        parser.error("--sweep-file and --output belong to the CLI (python -m mochi_preview.infer)")
    if args.save_latents is not None or args.decode_latents is not None:  # a decode that fails writes them anyway
        parser.error("--save_latents and --decode_latents belong to the CLI (python -m mochi_preview.infer)")
    if args.preview is not None:
        parser.error("--preview belongs to the CLI (python -m mochi_preview.infer); the page shows previews itself")
    if args.fps <= 0:
        parser.error(f"--fps must be a positive number; got {args.fps}")
    try:
        # the flags are checked before the weights load (slow): a typo is reported at once
        check_server_args(args)
        model_dir = infer.find_model_dir(args.model_dir)
        table.from_arguments(args, infer.cli_defaults(model_dir, args.preset)).check("cli")
        # once, before serving: requests never wait for it; --lora_path fills the LoRA field (applied live per job)
        pipe, model_dir = infer.load_pipeline(argparse.Namespace(**{**vars(args), "lora_path": []}), model_dir)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    limits = Limits(args.max_job_seconds, args.max_frames, args.max_pixels)
    studio = Studio(pipe, args.out_dir, infer.RunOptions.from_args(args), limits, args.max_queue, demo=pipe.is_demo)
    print(f"measured on {pipe.device}: {studio.rates}", file=sys.stderr)
    demo = build_ui(studio, args, model_dir)
    # The events do not wait in gradio's queue: requests are checked at once, and the Studio's worker runs them.
    demo.queue(default_concurrency_limit=None)
    # show_error: an unexpected failure still shows its message in the page (the traceback stays in the console)
    out = str(args.out_dir.resolve())
    allowed = [out, str(studio.display_dir)]
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=allowed, show_error=True, css=CSS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
