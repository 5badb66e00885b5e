"""Context parallelism on CPU with gloo: 2, 3 and 4 processes give what one process gives; failures stop every rank;
every choice that shapes a collective is the same on every rank.

Each launch forks real processes with the environment torchrun sets, and runs several scenarios; rank 0 saves its
results and the test compares them with this process. The CLI test starts torchrun itself. GPU behaviour (the
backend, the device) is shown with stand-ins: torch.cuda functions patched, gloo groups.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from distributed_worker import (
    AUTO_OVERLAP,
    AUTO_SHAPE,
    DECODERS,
    FREE_MIB,
    PIPELINE_CALL,
    TILED,
    conditioned,
    fp8_live,
    free_port,
    load_pipeline,
    make_decoder,
    make_dit,
    make_latents,
    make_lora,
    pusa_conditioned,
    reference,
    run,
    with_loras,
)
from model_folders import save_native_model
from PIL import Image

from mochi_preview import distributed
from mochi_preview.distributed import check_backend, check_compatible, default_device, init_distributed, resolve_device
from mochi_preview.infer import main
from mochi_preview.pipeline import MochiPipeline
from mochi_preview.pusa import PUSA_DIT_FILE
from mochi_preview.vae import decode, plan_decode
from mochi_preview.vae.decode import DEFAULT_BUDGET_FRACTION
from mochi_preview.video import read_video

RTOL = 1e-5


def _rank(rank: int, n: int, port: int, out: Path, log: Path, scenarios: tuple[str, ...]) -> None:
    """A forked rank: the env vars torchrun would set, output to `log`, and never back into pytest."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1), os.dup2(fd, 2)
    sys.stdout = sys.stderr = os.fdopen(os.dup(1), "w", buffering=1)
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(env)
    code = 0
    try:
        run(str(out), list(scenarios))
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    os._exit(code)


def launch(folder: Path, n: int, *scenarios: str, wait_for=None, timeout: float = 90.0) -> dict:
    """Run n ranks of the worker until the `wait_for` ranks (default all) exit; the others are then killed.

    The ranks are forked from this process: importing torch and mochi_preview anew in each would take far longer
    than the tests themselves. -> exit codes and times (time.time()) of the waited ranks, every rank's log, and
    rank 0's results.
    """
    port, out = free_port(), folder / "results.pt"
    logs = [folder / f"rank{r}.log" for r in range(n)]
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_rank, args=(r, n, port, out, logs[r], scenarios)) for r in range(n)]
    waited = list(wait_for if wait_for is not None else range(n))
    codes, ended = {}, {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(codes) < len(waited) and time.monotonic() < deadline:
            for r in waited:
                if r not in codes and procs[r].exitcode is not None:
                    codes[r], ended[r] = procs[r].exitcode, time.time()
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    assert len(codes) == len(waited), f"ranks {sorted(set(waited) - set(codes))} did not exit in {timeout:.0f} s"
    return {
        "wait_for": waited,
        "codes": [codes[r] for r in waited],
        "ended": [ended[r] for r in waited],
        "logs": [log.read_text() for log in logs],
        "results": torch.load(out) if out.exists() else {},
    }


@pytest.fixture(scope="module")
def expected():
    torch.manual_seed(0)
    with torch.no_grad():
        dit = reference(make_dit())
        vae = {
            f"{name}/{t}": decode(make_decoder(name), make_latents((1, 12, t, 3, 4)), mode="full")
            for name in DECODERS
            for t in (1, 2, 5)
        }
        vae["plain/5/tiled"] = decode(make_decoder("plain"), make_latents((1, 12, 5, 3, 4)), mode="tiled", **TILED)
    return {"dit": dit, "vae": vae}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch per world size: sequence parallel, CFG parallel (even sizes), the split VAE decode (also "auto" with
    a different free memory per rank), the device and memory-mode checks, (2 ranks) pixel inputs and LoRAs through
    the pipeline, then a failure.

    With 2 ranks, rank 1 raises in the first block and exits; with 3, the same but its process lives on (only ranks
    0 and 2 are waited for); with 4, rank 1 raises in the second block of the sampler's second step and exits.
    """
    plan = {
        2: (
            ("dit", "dit_cfg", "vae", "vae_auto", "device", "offload", "disagree", "conditioning", "lora", "fail"),
            None,
        ),
        3: (("dit", "vae", "vae_auto", "fail_hang"), [0, 2]),
        4: (("dit_cfg", "fail_denoise"), None),
    }
    model = save_native_model(tmp_path_factory.mktemp("model"))  # for the pipeline scenarios (memory modes, ...)
    lora = make_lora(model, tmp_path_factory.mktemp("lora") / "lora.safetensors")
    pusa = save_native_model(tmp_path_factory.mktemp("pusa"))
    (pusa / "dit.safetensors").rename(pusa / PUSA_DIT_FILE)  # a Pusa V0.5 folder: per-frame sigmas
    env = {"MOCHI_TEST_MODEL": str(model), "MOCHI_TEST_LORA": lora, "MOCHI_TEST_PUSA": str(pusa)}
    os.environ.update(env)
    try:
        done = {
            n: launch(tmp_path_factory.mktemp(f"world{n}"), n, *s, wait_for=w, timeout=300)
            for n, (s, w) in plan.items()
        }
        return {**done, "model": model, "lora": lora, "pusa": pusa}
    finally:
        for name in env:
            del os.environ[name]


def results(run: dict, scenario: str) -> dict:
    assert scenario in run["results"], "\n".join(run["logs"])
    return run["results"][scenario]


def assert_close(got, want, rtol: float = RTOL):
    err = float((got - want).abs().max() / want.abs().max())
    assert got.shape == want.shape and err <= rtol, f"relative error {err:.2e}"


def check_dit(got: dict, want: dict):
    names = [k for k in got if k != "bytes_sent"]
    assert names and got["bytes_sent"] > 0  # the ranks did talk
    for name in names:
        assert_close(got[name], want[name.removeprefix("sharded/")])  # the sharded DiT gives the same result


@pytest.mark.parametrize("n", [2, 3])
def test_sequence_parallel_equals_one_process(runs, expected, n):
    # Token counts 20 and 15: one of them does not divide n; also a batch of 2 with different text lengths,
    # and the same with the DiT's blocks sharded across the ranks.
    got = results(runs[n], "dit")
    assert {k for k in got if "batch2" in k} and {k for k in got if k.startswith("sharded/")}
    check_dit(got, expected["dit"])


@pytest.mark.parametrize("n", [2, 4])
def test_cfg_parallel_equals_one_process(runs, expected, n):
    # n = 2: each rank runs one CFG branch whole; n = 4: two sequence-parallel halves, one per branch.
    check_dit(results(runs[n], "dit_cfg"), expected["dit"])


@pytest.mark.parametrize("n", [2, 3])
def test_time_split_vae_decode_equals_one_process(runs, expected, n):
    # 1, 2 and 5 latent frames (fewer than the ranks, uneven slices), with and without causal attention; and in
    # two spatial tiles cross-faded as the single-process tiled decode does.
    got = results(runs[n], "vae")
    assert got.keys() == expected["vae"].keys()
    for name, frames in got.items():
        assert_close(frames, expected["vae"][name])


@pytest.mark.parametrize("n", [2, 3])
def test_auto_vae_decode_plans_once_for_every_rank(runs, n):
    # Each rank sees its own free memory; alone, they would choose different tiles (and fail in the boundary
    # exchange). They plan for the smallest budget: every rank returns the video one process decodes in those tiles.
    budgets = [int(DEFAULT_BUDGET_FRACTION * mib * 2**20) for mib in FREE_MIB[:n]]
    alone = [plan_decode(DECODERS["plain"], AUTO_SHAPE, torch.float32, b, AUTO_OVERLAP, ranks=n) for b in budgets]
    assert len({plan.tiles for plan in alone}) > 1, "the free-memory figures no longer lead to different plans"
    tiles = plan_decode(DECODERS["plain"], AUTO_SHAPE, torch.float32, min(budgets), AUTO_OVERLAP, ranks=n).tiles
    z = make_latents(AUTO_SHAPE)
    with torch.no_grad():
        want = decode(make_decoder("plain"), z, mode="tiled", tiles=tiles, overlap=AUTO_OVERLAP)
    videos = results(runs[n], "vae_auto")["videos"]
    assert len(videos) == n
    for video in videos:
        assert_close(video, want)


def test_backend_follows_the_device(runs, monkeypatch):
    # A machine with GPUs (stand-in): --device cpu joins with gloo, a GPU with NCCL on cuda:LOCAL_RANK.
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        distributed.dist,
        "init_process_group",
        lambda backend, **kw: calls.append((backend, str(kw.get("device_id")))),
    )
    monkeypatch.setattr(distributed.atexit, "register", lambda f: None)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert init_distributed(device="cpu") == torch.device("cpu") and calls == [("gloo", "None")]
    calls.clear()
    for device in (None, "cuda"):
        assert init_distributed(device=device) == torch.device("cuda", 1)
        assert calls == [("set_device", "cuda:1"), ("nccl", "cuda:1")]
        calls.clear()
    # With a real group (gloo ranks that believe CUDA is there): --device cpu gave gloo.
    assert results(runs[2], "setup") == {"backend": "gloo", "device": "cpu"}


def test_device_follows_local_rank(runs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # what every rank of a user's group would see
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_device() == resolve_device() == resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert default_device() == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    # ContextParallel() in a group made without init_distributed (gloo; torch.cuda patched in the ranks): each rank
    # computes on cuda:LOCAL_RANK and makes it the current device.
    got = results(runs[2], "device")["per_rank"]
    assert got == [("0", "cuda:0", ["cuda:0"]), ("1", "cuda:1", ["cuda:1"])]


def test_ranks_that_disagree_all_refuse(runs):
    # Different cfg_parallel per rank (the CFG halves are subgroups: a mismatch would hang), or a different model
    # per rank under block sharding (the broadcasts are sized from each rank's copy): every rank raises.
    for got in results(runs[2], "disagree")["per_rank"]:
        assert "cfg_parallel (from 0 to 1)" in got["cfg_parallel"], got
        assert "blocks (from 2 to 3)" in got["depth"], got


def test_nccl_group_refuses_cpu_ranks():
    with pytest.raises(ValueError, match="NCCL.*gloo"):
        check_backend("nccl", torch.device("cpu"))
    for backend, device in (("gloo", "cpu"), ("nccl", "cuda:1"), ("cpu:gloo,cuda:nccl", "cpu"), ("gloo", "cuda")):
        check_backend(backend, torch.device(device))


def test_check_compatible():
    for offload in ("none", "resident", "auto", "model"):
        for parallel, sharded in ((False, False), (True, False), (True, True)):
            check_compatible(offload, parallel, sharded)  # model offload moves whole components: any layout
    check_compatible("sequential", False)
    with pytest.raises(ValueError, match="sequential CPU offload.*shard_dit.*do not combine.*--cpu_offload"):
        check_compatible("sequential", True, sharded=True)
    with pytest.raises(ValueError, match="sequential CPU offload.*context parallelism do not combine.*--shard_dit"):
        check_compatible("sequential", True)
    with pytest.raises(ValueError, match="offload must be"):
        check_compatible("blocks", True)


def test_model_offload_with_sharded_dit_equals_one_process(runs):
    # Each rank's memory mode moves its own blocks (a stand-in device that copies every weight); the broadcasts of
    # the others' blocks run where the collectives run: two generations in a row give the one-process video.
    got = results(runs[2], "offload")
    assert got["model offload, moved bytes"] > 0  # the stand-in device did receive the DiT's weights
    want = MochiPipeline.from_pretrained(runs["model"], torch_dtype=torch.float32, device="cpu")
    want = torch.from_numpy(want("a red ball", **PIPELINE_CALL).frames[0])
    for frames in got["model offload, sharded"]:
        assert (frames - want).abs().max() < 1e-4


def test_sequential_offload_and_sharding_refused_in_either_order(runs):
    # MochiPipeline on 2 gloo ranks: either order of calls stops with advice, and changes nothing before that.
    got = results(runs[2], "offload")
    for order in ("sharded, then sequential offload", "sequential offload, then sharded"):
        assert got[order] is not None, f"{order}: accepted"
        message, unchanged = got[order]
        assert "do not combine" in message and "--cpu_offload" in message, message
        assert unchanged, f"{order}: changed the pipeline before refusing"


# ---- pixel inputs and LoRAs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process(runs):
    """The worker's pipeline scenarios in this process, CFG branches unbatched as the CFG-parallel ranks run them."""
    model, lora = runs["model"], runs["lora"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: another thread count sums the matmuls in another order
    try:
        pusa = pusa_conditioned(load_pipeline(runs["pusa"]), batch_cfg=False)
        return {
            "conditioning": conditioned(load_pipeline(model), batch_cfg=False) | pusa,
            "lora": with_loras(load_pipeline(model), lora, batch_cfg=False),
            "fp8": fp8_live(load_pipeline(model, fp8="tensor"), lora, batch_cfg=False),
        }
    finally:
        torch.set_num_threads(threads)


def check_layout(layout: str, got: dict, want: dict, bitwise: bool) -> None:
    """CFG halves of one rank each run the one-process code path: bitwise; split tokens: within fp32 rounding."""
    assert got.keys() <= want.keys() and got, layout
    for name, frames in got.items():
        if bitwise:
            assert torch.equal(frames, want[name]), f"{layout}: {name}"
        else:  # decoded frames: the decoder amplifies the latents' rounding about tenfold
            assert_close(frames, want[name], rtol=10 * RTOL if name.endswith("/frames") else RTOL)


def test_image_video_and_extension_under_context_parallelism_equal_one_process(runs, one_process):
    # 2 ranks: CFG halves (bitwise), and the tokens split with the DiT's blocks sharded. Image to video in both
    # modes ("guide" is a dit_hook around the CFG-parallel DiT), video to video, extension (latents, and the
    # decoded video that starts with the input's frames, decoded in time slices across the ranks); a Pusa model's
    # image to video and extension (one sigma per latent frame).
    got = results(runs[2], "conditioning")
    assert set(got) == {"cfg", "tokens, sharded"}
    want = one_process["conditioning"]
    assert set(want) == {"image", "image_guide", "video", "extend", "extend/frames", "pusa image", "pusa extend"}
    for layout, frames in got.items():
        assert frames.keys() == want.keys()
        check_layout(layout, frames, want, bitwise=layout == "cfg")
    assert want["extend/frames"].shape[1] == 19 + 13 - 7


def test_loras_under_context_parallelism_and_sharding_equal_one_process(runs, one_process):
    # Live (also under an image), fused, unfused (live again), unloaded: each rank applies a block's LoRA where the
    # block lives (its owner merges it; the broadcast carries the merged weights) and skips the blocks it does not
    # hold. Also: fused on one process then sharded (each owner restores its blocks when unfusing), and under
    # model CPU offload with sharded blocks.
    got = results(runs[2], "lora")
    want = one_process["lora"]
    assert (want["live"] - want["none"]).abs().max() > 0.1  # the LoRA changes the video
    assert torch.equal(want["unfused"], want["live"]) and torch.equal(want["unloaded"], want["none"])
    assert_close(want["fused"], want["live"])  # merged and live agree (fp32)
    cfg_halves = {"cfg, sharded": True, "tokens, sharded": False, "fused, then sharded": False}
    for layout, bitwise in {**cfg_halves, "model offload, sharded": True}.items():  # 2 ranks: CFG halves by default
        check_layout(layout, got[layout], want, bitwise)
    assert set(got["cfg, sharded"]) == set(want)
    given = got["a given transformer, sharded"]  # from_pretrained(transformer=..., shard_dit=True)
    assert given["sharded"] and torch.equal(given["video"], want["none"])


def test_fp8_weights_take_a_live_lora_under_context_parallelism_with_sharded_blocks(runs, one_process):
    # Each rank reads and quantizes only its blocks; a block's fp8 weights (as bytes) and scales travel to the others.
    got, want = results(runs[2], "lora")["fp8, tokens, sharded"], one_process["fp8"]
    assert_close(got["fp8 live"], want["fp8 live"])
    assert "fp8" in got["fp8 fuse refused"] and "live" in got["fp8 fuse refused"]  # refused on the ranks too...
    assert torch.equal(got["fp8 live after refusal"], got["fp8 live"])  # ... having changed nothing


class Loaded(Exception):
    """Weights started loading."""


def test_cli_checks_offload_and_sharding_before_loading(tmp_path, monkeypatch, capsys):
    model = save_native_model(tmp_path / "model")

    def load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(MochiPipeline, "from_pretrained", load)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun --nproc_per_node=2
    args = ["--prompt", "a red ball", "--model_dir", str(model), "--out_dir", str(tmp_path / "out"), "--shard_dit"]
    assert main([*args, "--sequential_offload"]) == 2
    assert "do not combine" in capsys.readouterr().err
    with pytest.raises(Loaded):  # model offload with a sharded DiT is allowed
        main([*args, "--cpu_offload"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(args) == 2
    assert "torchrun" in capsys.readouterr().err


@pytest.mark.parametrize("n", [2, 3, 4], ids=["failed-rank-exits", "failed-rank-lives-on", "fails-mid-sampling"])
def test_one_rank_failing_stops_every_rank(runs, n):
    """Rank 1 raises while the others wait for it in a collective: every other rank stops with a message naming
    rank 1 within seconds (the collective timeout is 60 s), even if rank 1's process lives on and never closes its
    connections (n = 3; then a watcher thread sees rank 1's post in the store). n = 2, 3: in the first block of a
    DiT forward; n = 4: inside the sampler (CFG halves of two ranks), in the second block of step 2."""
    run = runs[n]
    logs = run["logs"]
    raised = float(re.search(r"raising at ([0-9.]+)", logs[1]).group(1))
    assert "boom from the test" in logs[1]
    assert n != 4 or "in step 2" in logs[1]
    for rank, code, ended in zip(run["wait_for"], run["codes"], run["ended"]):
        if rank == 1:
            continue
        assert code != 0
        assert "rank 1 failed: ValueError: boom from the test (rank " in logs[rank], logs[rank]
        assert ended - raised < 15, f"rank {rank} took {ended - raised:.1f} s to stop"


def test_cli_under_torchrun_writes_one_video(tmp_path):
    # With an image and a LoRA (fused on each rank into the blocks it holds), as one process makes it.
    model = save_native_model(tmp_path / "model")
    lora = make_lora(model, tmp_path / "lora.safetensors")
    image = torch.randint(0, 256, (32, 48, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    Image.fromarray(image.numpy()).save(tmp_path / "first.png")
    small = ["--width", "48", "--height", "32", "--num_frames", "13", "--num_steps", "2", "--seed", "3", "--quiet"]
    plain = ["--prompt", "a red ball", "--model_dir", str(model), *small, "--image", str(tmp_path / "first.png")]
    args = [*plain, "--lora_path", f"{lora}:0.8"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --shard_dit: each rank reads only its blocks from the file; CFG parallel (the default with 2 ranks).
    run = subprocess.run(
        [*cmd, "-m", "mochi_preview.infer", *args, "--shard_dit", "--out_dir", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    videos = list((tmp_path / "out").glob("*.mp4"))
    assert len(videos) == 1 and len(list((tmp_path / "out").glob("*.json"))) == 1, run.stderr
    assert run.stderr.count("wrote ") == 1  # rank 0 alone reports
    sidecar = json.loads(videos[0].with_suffix(".json").read_text())
    assert sidecar["processes"] == 2 and sidecar["conditioning"]["file"] == "first.png"
    assert [(x["file"], x["strength"], x["fused"]) for x in sidecar["loras"]] == [("lora.safetensors", 0.8, True)]
    # The same command in one process makes the same video: unbatched CFG and one thread, as the CFG-parallel ranks
    # run it (another order of fp32 sums differs by rounding, which H.264 amplifies).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--batch_cfg", "off", "--out_dir", str(tmp_path / "single")]) == 0
        assert main([*plain, "--batch_cfg", "off", "--out_dir", str(tmp_path / "plain")]) == 0  # without the LoRA
    finally:
        torch.set_num_threads(threads)
    (parallel, _), (one, _) = read_video(videos[0]), read_video(next((tmp_path / "single").glob("*.mp4")))
    assert parallel.shape == one.shape == (13, 32, 48, 3)
    assert abs(parallel.astype(int) - one.astype(int)).max() <= 1
    no_lora, _ = read_video(next((tmp_path / "plain").glob("*.mp4")))
    assert abs(no_lora.astype(int) - one.astype(int)).max() > 10
