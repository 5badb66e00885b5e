"""bench/gpu_check.sh, the one command a session with a lent GPU runs, works: its dry run (the same Python on the
CPU at toy sizes, GPU-only checks replaced by stand-ins) passes every stage and prints the report."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path), "GPU_CHECK_SKIP_OFFLOAD": "1", "GPU_CHECK_SECONDS": "800"}
    run = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=850
    )
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    failed = [r for r in results if not r["ok"]]
    assert run.returncode == 0 and not failed, (failed, run.stderr[-3000:])
    assert [r["stage"] for r in results] == [
        "env",
        "models",
        "dit",
        "vae",
        "mode",
        "mode",
        "mode",
        "noise",
        "oom",
        "compile",
    ]
    report = run.stdout
    assert report == (tmp_path / "gpu_check.md").read_text()
    assert "| memory mode | load peak GiB | sampling peak GiB | s/step |" in report
    for mode in ("resident", "model", "sequential"):
        assert f"\n| {mode} | " in report
    oom = next(r for r in results if r["stage"] == "oom")
    assert oom["outcome"] == "latents written" and oom["decode_latents"] == {"rc": 0, "video": True}
    compiled = next(r for r in results if r["stage"] == "compile")
    assert compiled["graphs"] <= 4 and not compiled["recompile_warnings"] and compiled["max_abs_diff"] < 1e-5
    dit = next(r for r in results if r["stage"] == "dit")
    assert [(row["frames"], row["attention"]) for row in dit["rows"]] == [(7, "sdpa (CPU)"), (13, "sdpa (CPU)")]
    assert all(row["s_block"] > 0 and row["s_forward_48"] > row["s_block"] for row in dit["rows"])
    assert "| 13 | 18 | sdpa (CPU) | " in report and "VAE decode of 13 frames" in report
    vae = next(r for r in results if r["stage"] == "vae")
    assert [row["mode"] for row in vae["rows"]] == ["streaming", "tiled"] and all("seconds" in r for r in vae["rows"])
    noise = next(r for r in results if r["stage"] == "noise")
    assert noise["refused"].startswith("the generator is on cuda")


def test_gpu_check_refuses_unknown_options():
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--gpu"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "unknown option --gpu" in run.stderr
