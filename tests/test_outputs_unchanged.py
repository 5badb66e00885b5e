"""Refactors change no numbers: the demo model's frames for a fixed seed, as recorded.

`data/demo_frames_seed0.npz` holds the frames the shipped demo model (issue 15, 13-19 px) made (fp32, CPU, seed 0;
its predecessor was pinned the same way from e00f062 on). On a machine like the one that recorded them (the same
torch build and CPU kernel set, 2 threads: the split of a matmul's sums depends on the thread count) they must be
equal bit for bit; elsewhere fp32 matmuls may sum in another order, so there they must agree to fp32 rounding carried
through 24 steps (1e-4 of the [0, 1] range).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mochi_preview import MochiPipeline
from mochi_preview.tiny import DEMO_MODEL_DIR

DATA = Path(__file__).parent / "data"
RECORDED_ON = {"torch": "2.13.0+cpu", "cpu_capability": "AVX2"}
RECORDED_SHA256 = "e5e569863f45fae41435a242f7c91cebe9b0678359a084504ee4318536c3561c"


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_demo_model_frames_are_unchanged(two_threads):
    pipe = MochiPipeline.from_pretrained(DEMO_MODEL_DIR, torch_dtype=torch.float32, device="cpu")
    defaults = json.loads((DEMO_MODEL_DIR / "mochi_defaults.json").read_text())
    frames = pipe(
        "a red square moving to the right",
        negative_prompt="",
        height=defaults["height"],
        width=defaults["width"],
        num_frames=defaults["num_frames"],
        num_inference_steps=defaults["num_steps"],
        guidance_scale=defaults["cfg_scale"],
        seed=0,
        output_type="np",
        batch_cfg=False,  # as recorded: the CFG branches one by one (batched is equal to fp32 rounding only)
        progress=False,
    ).frames[0]
    expected = np.load(DATA / "demo_frames_seed0.npz")["frames"]
    assert hashlib.sha256(expected.tobytes()).hexdigest() == RECORDED_SHA256  # the recording itself is intact
    assert frames.shape == expected.shape and frames.dtype == expected.dtype
    here = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if here == RECORDED_ON:
        assert hashlib.sha256(frames.tobytes()).hexdigest() == RECORDED_SHA256
    else:
        assert np.abs(frames - expected).max() <= 1e-4, f"frames moved on {here}"
