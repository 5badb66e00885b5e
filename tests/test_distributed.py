"""Context parallelism on CPU with gloo: 2, 3 and 4 processes give what one process gives; failures stop every rank.

Each launch starts real processes with the environment torchrun sets (one launch runs several scenarios: starting
Python with torch is the slow part); rank 0 saves its results and the test compares them with this process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_worker import DECODERS, make_decoder, make_dit, make_latents, reference
from model_folders import save_native_model

from mochi_preview.infer import main
from mochi_preview.video import read_video

WORKER = Path(__file__).with_name("distributed_worker.py")
RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(folder: Path, n: int, *scenarios: str, wait_for=None, timeout: float = 120.0):
    """Run n ranks of the worker; -> (exit codes of `wait_for` ranks (default all), logs, rank 0's results)."""
    port, out = free_port(), folder / "results.pt"
    procs, logs = [], [folder / f"rank{r}.log" for r in range(n)]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(n)}
    try:
        for r in range(n):
            with open(logs[r], "w") as log:
                rank_env = {**env, "RANK": str(r), "LOCAL_RANK": str(r), "OMP_NUM_THREADS": "1"}
                cmd = [sys.executable, str(WORKER), str(out), *scenarios]
                procs.append(subprocess.Popen(cmd, env=rank_env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        codes = [procs[r].wait(timeout=max(deadline - time.monotonic(), 1)) for r in (wait_for or range(n))]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = torch.load(out) if out.exists() else None
    return codes, [log.read_text() for log in logs], results


@pytest.fixture(scope="module")
def expected():
    torch.manual_seed(0)
    with torch.no_grad():
        dit = reference(make_dit())
        vae = {
            f"{name}/{t}": make_decoder(name)(make_latents((1, 12, t, 3, 4)), mode="full")
            for name in DECODERS
            for t in (1, 2, 5)
        }
    return {"dit": dit, "vae": vae}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Rank 0's results per world size: sequence parallel, CFG parallel (even sizes), and the split VAE decode."""
    plan = {2: ("dit", "dit_cfg", "vae"), 3: ("dit", "vae"), 4: ("dit_cfg",)}
    out = {}
    for n, scenarios in plan.items():
        codes, logs, results = launch(tmp_path_factory.mktemp(f"world{n}"), n, *scenarios)
        assert codes == [0] * n, "\n".join(logs)
        out[n] = results
    return out


def assert_close(got, want):
    err = float((got - want).abs().max() / want.abs().max())
    assert got.shape == want.shape and err <= RTOL, f"relative error {err:.2e}"


def check_dit(got: dict, want: dict):
    names = [k for k in got if k != "bytes_sent"]
    assert names and got["bytes_sent"] > 0  # the ranks did talk
    for name in names:
        assert_close(got[name], want[name.removeprefix("sharded/")])  # the sharded DiT gives the same result


@pytest.mark.parametrize("n", [2, 3])
def test_sequence_parallel_equals_one_process(runs, expected, n):
    # Token counts 20 and 15: one of them does not divide n; also a batch of 2 with different text lengths,
    # and the same with the DiT's blocks sharded across the ranks.
    got = runs[n]["dit"]
    assert {k for k in got if "batch2" in k} and {k for k in got if k.startswith("sharded/")}
    check_dit(got, expected["dit"])


@pytest.mark.parametrize("n", [2, 4])
def test_cfg_parallel_equals_one_process(runs, expected, n):
    # n = 2: each rank runs one CFG branch whole; n = 4: two sequence-parallel halves, one per branch.
    check_dit(runs[n]["dit_cfg"], expected["dit"])


@pytest.mark.parametrize("n", [2, 3])
def test_time_split_vae_decode_equals_one_process(runs, expected, n):
    # 1, 2 and 5 latent frames (fewer than the ranks, uneven slices), with and without causal attention.
    got = runs[n]["vae"]
    assert got.keys() == expected["vae"].keys()
    for name, frames in got.items():
        assert_close(frames, expected["vae"][name])


@pytest.mark.parametrize("hang", [False, True], ids=["failed-rank-exits", "failed-rank-lives-on"])
def test_one_rank_failing_stops_every_rank(tmp_path, hang):
    """Rank 1 raises in the first block while rank 0 waits for it in the all-to-all; rank 0 must stop with a
    message naming rank 1, well before the 60 s collective timeout, even when rank 1's process stays alive."""
    start = time.monotonic()
    codes, logs, _ = launch(tmp_path, 2, "fail_hang" if hang else "fail", wait_for=[0] if hang else None)
    elapsed = time.monotonic() - start
    assert all(code != 0 for code in codes), logs
    assert "rank 1 failed: ValueError: boom from the test (rank 0 stopped)" in logs[0], logs[0]
    assert "ValueError: boom from the test" in logs[1], logs[1]
    assert elapsed < 50, f"took {elapsed:.0f} s"


def test_cli_under_torchrun_writes_one_video(tmp_path):
    model = save_native_model(tmp_path / "model")
    small = ["--width", "48", "--height", "32", "--num_frames", "13", "--num_steps", "2", "--seed", "3", "--quiet"]
    args = ["--prompt", "a red ball", "--model_dir", str(model), *small]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [*cmd, "-m", "mochi_preview.infer", *args, "--out_dir", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    videos = list((tmp_path / "out").glob("*.mp4"))
    assert len(videos) == 1 and len(list((tmp_path / "out").glob("*.json"))) == 1, run.stderr
    assert run.stderr.count("wrote ") == 1  # rank 0 alone reports
    # The same command in one process makes the same video.
    assert main([*args, "--out_dir", str(tmp_path / "single")]) == 0
    [single] = list((tmp_path / "single").glob("*.mp4"))
    (parallel, _), (one, _) = read_video(videos[0]), read_video(single)
    assert parallel.shape == one.shape == (13, 32, 48, 3)
    assert abs(parallel.astype(int) - one.astype(int)).max() <= 1
