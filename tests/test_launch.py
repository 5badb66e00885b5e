"""Several GPUs, one command: plain `python -m mochi_preview.infer` starts torch's elastic launcher itself, one process
per GPU (`--gpus N` chooses). The GPU count is injected; the real launch runs 2 CPU processes with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from model_folders import save_native_model

from mochi_preview import infer, launch

SMALL = ["--width", "48", "--height", "32", "--num_frames", "13", "--num_steps", "2", "--seed", "3", "--quiet"]


@pytest.fixture
def gpus(monkeypatch):
    """Pretend the machine has `n` GPUs: `gpus(n)`; outside any launched process."""
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)

    def set_count(n: int) -> None:
        monkeypatch.setattr(launch, "gpu_count", lambda: n)

    return set_count


@pytest.mark.parametrize(
    "count, flag, device, expected",
    [
        (4, None, None, 4),  # every GPU, by default
        (4, None, "cuda", 4),
        (4, None, "cuda:1", 1),  # one named device: one process
        (4, None, "cpu", 1),
        (4, 2, None, 2),  # --gpus chooses
        (4, 1, None, 1),  # --gpus 1: no launch
        (1, None, None, 1),
        (0, None, None, 1),
        (0, 2, "cpu", 2),  # CPU processes (gloo): how it is tested
    ],
)
def test_how_many_processes(gpus, count, flag, device, expected):
    gpus(count)
    assert launch.processes(flag, device) == expected


def test_bad_gpu_counts_name_the_flag(gpus, monkeypatch):
    gpus(2)
    with pytest.raises(ValueError, match=r"^--gpus 3: this machine has 2 GPU\(s\) \(valid: 1 to 2\)$"):
        launch.processes(3, None)
    with pytest.raises(ValueError, match="^--gpus must be at least 1; got 0$"):
        launch.processes(0, None)
    with pytest.raises(ValueError, match="give --device cuda or none, not --device cuda:1"):
        launch.processes(2, "cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch.processes(3, None) == 1  # inside a launched process: never launch again


def test_the_cli_launches_itself_after_checking_everything(gpus, monkeypatch, tmp_path, capsys):
    """With 2 GPUs, the command is run again by the launcher with the same arguments, once the request is checked;
    a bad request is refused first, in this one process."""
    gpus(2)
    monkeypatch.setattr(infer, "check_device", lambda name: None)  # "cuda" exists here only in the injected count
    launched = []
    monkeypatch.setattr(launch, "launch", lambda n, argv: launched.append((n, argv)) or 7)
    argv = ["--prompt", "a red ball", "--out_dir", str(tmp_path / "o"), *SMALL]
    assert infer.main(argv) == 7 and launched == [(2, argv)]  # the launcher's exit code is the command's
    assert not (tmp_path / "o").exists()  # nothing claimed here: rank 0 of the launch claims its name
    assert infer.main([*argv, "--num_frames", "30"]) == 2 and len(launched) == 1
    assert "--num_frames=30 is not of the form 6k+1" in capsys.readouterr().err


def test_two_cpu_processes_make_one_video(tmp_path):
    """`--gpus 2 --device cpu`: torch's elastic launcher starts 2 processes (gloo); rank 0 writes one video."""
    model = save_native_model(tmp_path / "model")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mochi_preview.infer", "--model_dir", str(model), "--out_dir", str(out), *SMALL]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    run = subprocess.run([*cmd, "--gpus", "2", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    [video] = out.glob("*.mp4")
    assert json.loads(video.with_suffix(".json").read_text())["processes"] == 2
    assert run.stderr.count("wrote ") == 1 and "Traceback" not in run.stderr
    assert sorted(p.name for p in out.iterdir()) == [video.with_suffix(".json").name, video.name]
