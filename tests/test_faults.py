"""Fault injection: kill -9 at every step of publishing and at seeded random times of CLI runs, a full disk at every
write, concurrent runs into one folder, corrupt files, and each signal. Nothing published is ever half there, nothing
finished is lost, and nothing is left behind once the next run has looked at the folder.

Runs are forked from this process (imports done once): the CLI's `main`, or `generate` on a pipeline loaded here.
The figures (runs tried, survived, outputs lost) are printed at the end; MOCHI_FAULTS_FIGURES=path also writes them
as JSON. MOCHI_FAULTS_LONG=1 runs the long version (more random kills, more concurrent runs).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from model_folders import save_native_model

from mochi_preview import infer, outputs
from mochi_preview.settings import Settings
from mochi_preview.video import read_video, stream_digest

LONG = os.environ.get("MOCHI_FAULTS_LONG") == "1"
TINY = dict(prompt="a red ball", width=32, height=32, num_frames=7, num_inference_steps=2, seed=1)
CLI = ["--prompt", "a red ball", "--width", "32", "--height", "32", "--num_frames", "7", "--num_steps", "2"]
CLI += ["--seed", "1", "--dtype", "fp32", "--quiet"]
FIGURES: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def figures(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forked children inherit no busy thread pool
    yield
    torch.set_num_threads(threads)
    line = (
        f"fault injection: {FIGURES['tried']} runs tried, {FIGURES['survived']} survived, "
        f"{FIGURES['lost']} outputs lost ({dict(sorted((k, v) for k, v in FIGURES.items() if ':' in k))})"
    )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else __import__("contextlib").nullcontext():
        print(f"\n{line}", file=sys.stderr)
    if path := os.environ.get("MOCHI_FAULTS_FIGURES"):
        Path(path).write_text(json.dumps(dict(FIGURES), indent=2) + "\n")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_native_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def pipe(model):
    args = infer.build_parser().parse_args(["--model_dir", str(model), "--dtype", "fp32"])
    return infer.load_pipeline(args)[0]


def tally(kind: str, survived: bool, lost: int = 0) -> None:
    FIGURES["tried"] += 1
    FIGURES[f"{kind}:tried"] += 1
    FIGURES["survived"] += survived
    FIGURES["lost"] += lost


# ---- running and checking ---------------------------------------------------------------------------------------


def fork(work, log: Path) -> int:
    """Run `work()` (-> exit code) in a forked child with its output in `log`; the child's pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        # Ctrl-C as in a terminal: a suite started in the background of a non-interactive shell inherits SIGINT
        # ignored (POSIX), and Python then leaves it ignored: every SIGINT test would see the run finish.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1), os.dup2(fd, 2)
            sys.stdout = sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
            code = work()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait(pid: int, timeout: float = 120) -> int:
    """The child's exit code, or -N when signal N ended it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish in {timeout} s")


def cli(argv: list[str], patch=None):
    def work() -> int:
        if patch is not None:
            patch()
        return infer.main(argv)

    return work


def whole_videos(folder: Path) -> tuple[list[Path], list[str]]:
    """The published videos of `folder` and what is wrong there: every MP4 must read, with a sidecar whose stream
    digest is the MP4's (a sidecar alone is a killed run's, until the next run cleans it: see `leftovers`)."""
    problems, videos = [], sorted(folder.glob("*.mp4")) if folder.is_dir() else []
    for video in videos:
        sidecar = video.with_suffix(".json")
        try:
            frames, _ = read_video(video)
            record = json.loads(sidecar.read_text())
            if record["stream_digest"] != stream_digest(video) or len(frames) != record["num_frames"]:
                problems.append(f"{video.name}: sidecar and video disagree")
        except Exception as e:  # noqa: BLE001 - any failure to read is the finding
            problems.append(f"{video.name}: {type(e).__name__}: {e}")
    return videos, problems


def leftovers(folder: Path) -> list[str]:
    """Hidden entries and sidecars without their video: what must not remain once a run has cleaned the folder."""
    if not folder.is_dir():
        return []
    hidden = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    orphans = [p.name for p in folder.glob("*.json") if not p.with_suffix(".mp4").exists()]
    return hidden + orphans


class Points:
    """Fault points around every step of publishing: encode, sidecar write, fsyncs, links (before and after each)."""

    def __init__(self, action):
        self.action, self.hits, self.names = action, 0, []

    def hit(self, name: str) -> None:
        self.hits += 1
        self.names.append(name)
        self.action(self.hits, name)

    def install(self, monkeypatch=None) -> None:
        def wrap(module, attr):
            real = getattr(module, attr)

            def wrapped(*args, **kwargs):
                self.hit(f"before {attr}")
                out = real(*args, **kwargs)
                self.hit(f"after {attr}")
                return out

            if monkeypatch is not None:
                monkeypatch.setattr(module, attr, wrapped)
            else:
                setattr(module, attr, wrapped)

        for module, attr in [(infer, "encode_video")] + [(outputs, a) for a in ("_write_text", "_fsync", "_link")]:
            wrap(module, attr)


def publish_points(pipe, tmp_path) -> list[str]:
    """The fault points one generation passes, in order."""
    points = Points(lambda n, name: None)
    with pytest.MonkeyPatch.context() as m:
        points.install(m)
        infer.generate(pipe, Settings(**TINY), tmp_path / "count" / "v.mp4", infer.RunOptions(progress=False))
    return points.names


# ---- kill -9 ----------------------------------------------------------------------------------------------------


def test_kill_at_every_step_of_publishing(pipe, tmp_path):
    """kill -9 before and after each write, fsync and link: the folder holds a whole pair or nothing visible (a
    sidecar alone only until the next run), and the next run into the folder cleans every leftover."""
    names = publish_points(pipe, tmp_path)
    assert names.count("before _link") == 2 and names.index("before encode_video") == 0
    folder = tmp_path / "out"
    commit = names.index("after _link", names.index("before _link") + 2)  # the video's link done: published
    for k, name in enumerate(names, start=1):

        def work(k=k) -> int:
            def action(n, name):
                if n == k:
                    os.kill(os.getpid(), signal.SIGKILL)

            Points(action).install()
            infer.generate(pipe, Settings(**TINY), folder / f"v{k:02d}.mp4", infer.RunOptions(progress=False))
            return 0

        code = wait(fork(work, tmp_path / f"kill{k}.log"))
        videos, problems = whole_videos(folder)
        committed = k > commit
        assert code == -signal.SIGKILL, (k, name, (tmp_path / f"kill{k}.log").read_text())
        assert not problems, (k, name, problems)
        assert (folder / f"v{k:02d}.mp4").exists() == committed, (k, name)
        outputs.clean(folder)  # what the next run does first
        survived = not leftovers(folder) and not problems
        tally("kill at a publishing step", survived)
        assert survived, (k, name, leftovers(folder))
    assert len(whole_videos(folder)[0]) == len(names) - commit  # killed after the commit: kept whole


def test_kill_at_random_times_of_cli_runs(model, tmp_path):
    """kill -9 at seeded random times of whole CLI runs into one folder; then a normal run: it finishes, every
    video there is whole, and nothing of the killed runs remains."""
    rng = random.Random(20261203)
    folder = tmp_path / "out"
    argv = [*CLI, "--model_dir", str(model), "--out_dir", str(folder)]
    start = time.monotonic()
    assert wait(fork(cli(argv), tmp_path / "clean.log")) == 0, (tmp_path / "clean.log").read_text()
    duration = time.monotonic() - start
    for i in range(40 if LONG else 6):
        pid = fork(cli(argv), tmp_path / f"run{i}.log")
        time.sleep(rng.uniform(0.2, duration * 1.1))
        os.kill(pid, signal.SIGKILL)
        wait(pid)
        videos, problems = whole_videos(folder)
        tally("kill -9 at a random time", not problems, len(problems))
        assert not problems, (i, problems)
    assert wait(fork(cli(argv), tmp_path / "last.log")) == 0, (tmp_path / "last.log").read_text()
    videos, problems = whole_videos(folder)
    assert not problems and not leftovers(folder), leftovers(folder)
    assert len(videos) >= 2


# ---- a full disk -----------------------------------------------------------------------------------------------


def test_full_disk_at_every_write(pipe, tmp_path):
    """ENOSPC at each write, fsync and link of publishing: an error that says nothing was written, and nothing
    there, hidden or not; the name is free again."""
    names = publish_points(pipe, tmp_path)
    commit = names.index("after _link", names.index("before _link") + 2)  # the video's link: later steps are cleanup
    names = [n for n in names[:commit] if n.startswith("before")]
    folder = tmp_path / "out"
    for k, name in enumerate(names, start=1):

        def action(n, _, k=k):
            if n == 2 * k - 1:  # the k-th "before"
                raise OSError(errno.ENOSPC, "No space left on device")

        path = folder / "v.mp4"
        with pytest.MonkeyPatch.context() as m:
            Points(action).install(m)
            with pytest.raises(OSError, match="No space left on device") as e:
                infer.generate(pipe, Settings(**TINY), path, infer.RunOptions(progress=False))
        message = str(e.value)
        survived = "nothing was written (neither v.mp4 nor v.json exists)" in message and not folder.exists()
        tally("ENOSPC at a write", survived)
        assert survived, (name, message, leftovers(folder))
    # and the check before writing: the disk filled up while the video was made
    with pytest.MonkeyPatch.context() as m:
        calls = []

        def usage(path):
            calls.append(path)
            free = 10**9 if len(calls) == 1 else 1000  # room before the work, none after it
            return __import__("shutil")._ntuple_diskusage(2 * 10**9, 10**9, free)

        m.setattr(outputs.shutil, "disk_usage", usage)
        with pytest.raises(OSError, match=r"the output folder .*: 0.0 MiB free on its disk") as e:
            infer.generate(pipe, Settings(**TINY), folder / "v.mp4", infer.RunOptions(progress=False))
    assert len(calls) == 2 and not folder.exists()
    tally("disk full before writing", True)


def test_a_real_write_failure_leaves_nothing(model, tmp_path):
    """A real failing write (the file size limit, RLIMIT_FSIZE: the kernel refuses the MP4's bytes with EFBIG, as a
    full disk refuses them with ENOSPC): exit 2, one error line, nothing left."""
    import resource

    folder = tmp_path / "out"

    def patch():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, resource.RLIM_INFINITY))

    log = tmp_path / "efbig.log"
    code = wait(fork(cli([*CLI, "--model_dir", str(model), "--out_dir", str(folder)], patch), log))
    err = log.read_text()
    survived = code == 2 and not folder.exists() and err.startswith("error: ") and len(err.splitlines()) == 1
    tally("a real write failure (EFBIG)", survived)
    assert survived, (code, err, leftovers(folder))


# ---- concurrent runs --------------------------------------------------------------------------------------------


def test_concurrent_runs_into_one_folder_all_finish(model, tmp_path):
    """Runs started together into one folder (the same second, so the same first name): every one finishes, each
    under its own name, whole."""
    folder, n = tmp_path / "out", 8 if LONG else 4
    argv = [*CLI, "--model_dir", str(model), "--out_dir", str(folder)]
    pids = [fork(cli(argv), tmp_path / f"c{i}.log") for i in range(n)]
    codes = [wait(pid, timeout=300) for pid in pids]
    videos, problems = whole_videos(folder)
    for i, code in enumerate(codes):
        tally("concurrent run", code == 0, int(code != 0))
        assert code == 0, (tmp_path / f"c{i}.log").read_text()
    assert len(videos) == n and not problems and not leftovers(folder)


def test_concurrent_sweeps_share_the_lines(model, tmp_path):
    """Two processes on one sweep file: each line is generated once (a line another run is writing is skipped), and
    a resume finds every line done (its MP4 and sidecar)."""
    sweep, folder = tmp_path / "s.jsonl", tmp_path / "out"
    sweep.write_text("".join(json.dumps({"seed": s}) + "\n" for s in range(3)))
    argv = [*CLI, "--model_dir", str(model), "--out_dir", str(folder), "--sweep-file", str(sweep)]
    pids = [fork(cli(argv), tmp_path / f"s{i}.log") for i in range(2)]
    codes = [wait(pid, timeout=300) for pid in pids]
    videos, problems = whole_videos(folder)
    assert codes == [0, 0] and len(videos) == 3 and not problems and not leftovers(folder)
    logs = "".join((tmp_path / f"s{i}.log").read_text() for i in range(2))
    assert logs.count("wrote ") == 3  # no line twice
    tally("concurrent sweep", True)
    assert wait(fork(cli(argv), tmp_path / "resume.log")) == 0
    assert (tmp_path / "resume.log").read_text().count("skip") == 3


# ---- signals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sig, code, line",
    [
        (signal.SIGINT, 130, "interrupted at step 1/2; nothing written"),
        (signal.SIGTERM, 143, "stopped by SIGTERM at step 1/2; nothing written"),
        (signal.SIGHUP, 129, "stopped by SIGHUP at step 1/2; nothing written"),
    ],
)
def test_each_signal_during_sampling(model, tmp_path, sig, code, line):
    """Ctrl-C, SIGTERM, SIGHUP after step 1: one line, the conventional exit code, nothing left (not the folder)."""
    folder = tmp_path / "out"

    def patch():
        real = infer.Progress.__call__

        def step(self, pipe, i, sigma, state):
            real(self, pipe, i, sigma, state)
            os.kill(os.getpid(), sig)

        infer.Progress.__call__ = step

    log = tmp_path / "log"
    got = wait(fork(cli([*CLI, "--model_dir", str(model), "--out_dir", str(folder)], patch), log))
    survived = got == code and log.read_text() == line + "\n" and not folder.exists()
    tally(f"{signal.Signals(sig).name} during sampling", survived)
    assert survived, (got, log.read_text())


def test_signal_while_writing_and_while_publishing(model, tmp_path):
    """SIGTERM while the MP4 is encoded: nothing written. Ctrl-C between the sidecar's and the video's links: held
    until the video is published; the line says what was written."""
    folder = tmp_path / "out"
    argv = [*CLI, "--model_dir", str(model), "--out_dir", str(folder)]

    def during_encode():
        real = infer.encode_video

        def encode(*args, **kwargs):
            real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)

        infer.encode_video = encode

    log = tmp_path / "encode.log"
    got = wait(fork(cli(argv, during_encode), log))
    ok = got == 143 and "nothing written" in log.read_text() and not folder.exists()
    tally("SIGTERM while encoding", ok)
    assert ok, (got, log.read_text())

    def during_links():
        real = outputs._link

        def link(src, dst):
            if dst.suffix == ".json":
                os.kill(os.getpid(), signal.SIGINT)
            return real(src, dst)

        outputs._link = link

    log = tmp_path / "links.log"
    got = wait(fork(cli(argv, during_links), log))
    videos, problems = whole_videos(folder)
    text = log.read_text().splitlines()
    ok = got == 130 and len(videos) == 1 and not problems and text[-1] == f"interrupted after writing {videos[0]}"
    ok = ok and not leftovers(folder)
    tally("SIGINT between the links", ok, int(not videos))
    assert ok, (got, text, leftovers(folder))


# ---- corrupt files ----------------------------------------------------------------------------------------------


def corrupt_copy(model: Path, folder: Path, name: str, content: bytes) -> Path:
    folder.mkdir()
    for p in model.iterdir():
        (folder / p.name).symlink_to(p)
    (folder / name).unlink(missing_ok=True)
    (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("mochi_defaults.json", b'{"width": "64"}', "mochi_defaults.json: width must be a whole number; got '64'"),
        ("mochi_defaults.json", b"{width: 64}", "mochi_defaults.json: not valid JSON"),
        ("latent_stats.json", b'{"mean": [0.0]}', "latent_stats.json: missing key 'std'"),
        ("latent_stats.json", b"[1, 2]", 'latent_stats.json: expected an object {"mean"'),
        ("dit.safetensors", b"\x00" * 64, "dit.safetensors is not a readable safetensors file"),
    ],
)
def test_corrupt_files_are_named(model, tmp_path, capsys, name, content, message):
    """A malformed file of the model folder: exit 2, the file (and key) named, no traceback, nothing created."""
    folder = corrupt_copy(model, tmp_path / "model", name, content)
    out = tmp_path / "out"
    code = infer.main([*CLI, "--model_dir", str(folder), "--out_dir", str(out)])
    err = capsys.readouterr().err
    ok = code == 2 and message in err and "Traceback" not in err and not out.exists()
    tally(f"corrupt {name}", ok)
    assert ok, (code, err)


# ---- claims -----------------------------------------------------------------------------------------------------


def test_claims_are_exclusive_and_dead_ones_are_cleaned(tmp_path):
    """A name another live process claimed is refused and its folder kept; once that process is killed, the next
    claim in the folder removes its run folder and the sidecar it published without the video."""
    folder = tmp_path / "out"
    path = folder / "v.mp4"
    ready_r, ready_w = os.pipe()

    def hold() -> int:
        outputs.claim(path)
        outputs.claim_for(path).tmp("v.json").write_text("{}")
        os.link(outputs.claim_for(path).tmp("v.json"), folder / "v.json")  # killed between the two links
        os.write(ready_w, b"x")
        time.sleep(60)
        return 0

    pid = fork(hold, tmp_path / "hold.log")
    assert os.read(ready_r, 1) == b"x"
    with pytest.raises(FileExistsError, match="v.json exists"):
        outputs.claim(path)  # the live run's sidecar is there (and its claim)
    (folder / "v.json").rename(tmp_path / "aside.json")
    with pytest.raises(FileExistsError, match="is being written by another run"):
        outputs.claim(path)
    assert outputs.clean(folder) == [] and outputs.run_dir_of(path).is_dir()  # alive: kept
    os.rename(tmp_path / "aside.json", folder / "v.json")
    os.kill(pid, signal.SIGKILL)
    wait(pid)
    claim = outputs.claim(path)  # cleans first: the dead run's folder and its uncommitted sidecar
    assert sorted(p.name for p in folder.iterdir()) == [".v.mp4.run"]
    claim.release()
    assert not list(folder.iterdir())


def test_names_are_distinct_and_old_temporary_files_are_removed(tmp_path):
    names = [outputs.new_output_path(tmp_path) for _ in range(3)]
    assert len(set(names)) == 3 and names[1].name.endswith("_1.mp4")
    for name in names:
        outputs.release(name)
    assert not list(tmp_path.iterdir())
    # files.write_atomic's temporary files: a dead process's old one goes, a live process's stays
    dead = subprocess_pid()
    stale, live = tmp_path / f".a.mp4.partial-{dead}-0a1b", tmp_path / f".b.mp4.partial-{os.getpid()}-0a1b"
    for p in (stale, live):
        p.write_bytes(b"x")
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    assert outputs.clean(tmp_path) == [stale] and live.exists()


def subprocess_pid() -> int:
    """The pid of a process that has ended."""
    pid = fork(lambda: 0, Path(os.devnull))
    wait(pid)
    return pid


def test_published_files_take_the_umask_even_when_the_writer_recreates_them(tmp_path):
    """safetensors' save_file re-creates its file 0600; a published weight file must be readable like any other."""
    import torch
    from safetensors.torch import save_file

    from mochi_preview.files import write_atomic

    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "w.safetensors", lambda t: save_file({"a": torch.zeros(2)}, str(t)))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
