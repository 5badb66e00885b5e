"""LoRAs under the memory modes and with fp8 weights, through the pipeline (tiny model, device stand-in).

`offload.LedgerMover` stands in for a device: every weight a mode moves is copied, so a LoRA whose tensors did not
travel with their layer, or a fused weight that was lost when its device copy was dropped, would change the result.
The modes run the same arithmetic as the CPU pipeline, so every comparison is bitwise.
"""

from __future__ import annotations

import pytest
import torch
from distributed_worker import make_lora

from mochi_preview import MochiPipeline
from mochi_preview.lora import LoraError
from mochi_preview.offload import LedgerMover, Mover

CALL = dict(height=32, width=48, num_frames=7, num_inference_steps=2, seed=1, progress=False, output_type="latent")
MODES = {"resident": None, "model": None, "sequential": 2**20}  # mode -> planning budget (1 MiB: blocks stream)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora(native_dir, tmp_path_factory):
    return make_lora(native_dir, tmp_path_factory.mktemp("lora") / "lora.safetensors")


def generate(pipe) -> torch.Tensor:
    return pipe("a red ball", batch_cfg=False, **CALL).frames  # unbatched: a small budget would unbatch it


def under_modes(pipe, step) -> dict:
    """`step(pipe)` under each memory mode on the device stand-in -> mode -> (result, memory record)."""
    out = {}
    try:
        for mode, budget in MODES.items():
            pipe.set_memory_mode(mode, budget=budget, mover=LedgerMover(2**34))
            out[mode] = (step(pipe), pipe.memory_record())
    finally:
        pipe.set_memory_mode("auto", mover=Mover("cpu"))
    assert out["sequential"][1]["dit_blocks_resident"] < out["sequential"][1]["dit_blocks"]  # blocks streamed
    assert all(record["moved_bytes"]["dit"] > 0 for _, record in (out["model"], out["sequential"]))
    return out


def test_fp8_weights_take_a_live_lora_under_every_memory_mode(native_dir, lora):
    pipe = MochiPipeline.from_pretrained(native_dir, torch_dtype=torch.float32, device="cpu", fp8="tensor")
    plain = generate(pipe)
    pipe.load_lora_weights(lora, strength=0.8)
    want = generate(pipe)
    assert (want - plain).abs().max() > 0.1
    for mode, (got, _) in under_modes(pipe, generate).items():
        assert torch.equal(got, want), mode
    with pytest.raises(LoraError, match="fp8 weights.*apply it live"):
        pipe.fuse_lora()
    assert torch.equal(generate(pipe), want)  # the refusal changed nothing


def test_fused_and_live_loras_under_every_memory_mode(native_dir, lora):
    # Fused while the weights are where the mode keeps them (on the stand-in device for "resident": the in-place
    # merge is kept when the copy is dropped), unfused there (restored exactly: live again), unloaded.
    pipe = MochiPipeline.from_pretrained(native_dir, torch_dtype=torch.float32, device="cpu")
    plain = generate(pipe)
    pipe.load_lora_weights(lora, strength=0.8)
    live = generate(pipe)
    pipe.fuse_lora()
    fused = generate(pipe)
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe), plain)

    def cycle(pipe):
        pipe.load_lora_weights(lora, strength=0.8)
        out = [generate(pipe)]
        pipe.fuse_lora()
        out.append(generate(pipe))
        pipe.unfuse_lora()
        out.append(generate(pipe))
        pipe.unload_lora_weights()
        return [*out, generate(pipe)]

    for mode, (got, _) in under_modes(pipe, cycle).items():
        for name, a, b in zip(("live", "fused", "unfused", "unloaded"), got, (live, fused, live, plain)):
            assert torch.equal(a, b), f"{mode}: {name}"
    assert torch.equal(generate(pipe), plain)  # back on the CPU: the master weights are the originals


def test_fused_on_the_device_survives_a_change_of_mode(native_dir, lora):
    pipe = MochiPipeline.from_pretrained(native_dir, torch_dtype=torch.float32, device="cpu")
    pipe.load_lora_weights(lora, strength=0.8)
    pipe.fuse_lora()
    want = generate(pipe)
    pipe.unfuse_lora()
    pipe.set_memory_mode("resident", mover=LedgerMover(2**34))
    pipe.fuse_lora()  # merged into the device copies
    pipe.set_memory_mode("model", mover=LedgerMover(2**34))  # the copies leave: the merge must reach the masters
    try:
        assert torch.equal(generate(pipe), want)
    finally:
        pipe.set_memory_mode("auto", mover=Mover("cpu"))
    assert torch.equal(generate(pipe), want)
