"""Memory modes: placement follows the mode from the first byte, offload streams and drops, OOM names the next mode.

There is no GPU here. `offload.LedgerMover` stands in for one: compute stays on the CPU, but every move to the
"device" makes a separate copy that its ledger counts (live bytes, the peak per stage, bytes moved), and a copy
beyond its capacity raises `torch.OutOfMemoryError`, as a full device would. Working memory (activations) is not on
this stand-in, so most tests plan with the weights alone (`weights_only`) and the ledger's figures are exact.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mochi_preview import MochiPipeline, offload
from mochi_preview.configs import CONFIGS
from mochi_preview.dit import AsymmDiT, save_dit_native
from mochi_preview.offload import GIB, Footprint, Ledger, LedgerMover, Plan, choose
from mochi_preview.pipeline import DeviceMemoryError
from mochi_preview.tiny import _random_, save_tiny_t5
from mochi_preview.vae import Decoder

SMALL = dict(height=32, width=48, num_frames=13, num_inference_steps=2, progress=False)
SHAPE = (1, 12, 3, 4, 6)  # the latents of SMALL


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random model with enough blocks to stream: a 6-block DiT and a 4-block T5 (native layout)."""
    folder = tmp_path_factory.mktemp("deep")
    tiny = CONFIGS["tiny"]
    save_dit_native(folder / "dit.safetensors", _random_(AsymmDiT(replace(tiny.dit, depth=6)), 0))
    save_file(_random_(Decoder(tiny.decoder), 1).state_dict(), str(folder / "decoder.safetensors"))
    save_tiny_t5(folder / "t5", d_model=tiny.dit.text_dim, num_layers=4, num_heads=4, d_ff=128, seed=3)
    return folder


def tensor_bytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.fixture(scope="module")
def size(model_dir) -> dict:
    """Bytes of what the modes move, counted from the modules themselves (not by offload.py)."""
    pipe = MochiPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, device="cpu")
    t5, dit = pipe.text_encoder, pipe.dit
    t5_blocks, dit_blocks = [tensor_bytes(b) for b in t5.encoder.block], [tensor_bytes(b) for b in dit.blocks]
    out = dict(t5=tensor_bytes(t5), dit=tensor_bytes(dit), vae=tensor_bytes(pipe.decoder))
    out |= dict(t5_block=max(t5_blocks), t5_rest=out["t5"] - sum(t5_blocks), t5_blocks=len(t5_blocks))
    out |= dict(dit_block=max(dit_blocks), dit_rest=out["dit"] - sum(dit_blocks), dit_blocks=len(dit_blocks))
    out["all"] = out["t5"] + out["dit"] + out["vae"]
    assert len(set(dit_blocks[:-1])) == 1  # every block but the last (no text update) is the same size
    return out


def load(model_dir, capacity: int = GIB, memory: str = "auto", work: dict | None = None):
    """A pipeline on a ledger device of `capacity` bytes -> (pipe, ledger). Planned with the weights alone, plus the
    working memory in `work` (Footprint fields), which the ledger does not hold."""
    ledger = Ledger(trace=[])
    pipe = MochiPipeline.from_pretrained(
        model_dir, torch_dtype=torch.float32, device="cpu", mover=LedgerMover(capacity, ledger)
    )
    weights_only(pipe, **(work or {}))
    return pipe.set_memory_mode(memory), ledger


def weights_only(pipe: MochiPipeline, **work) -> None:
    real = pipe._footprint
    zero = dict(t5_work=0, dit_work=0, dit_work_batched=0, vae_work=0)
    pipe._footprint = lambda shape=None, guided=True: replace(real(shape, guided), **{**zero, **work})


def live_after_each_stage(pipe: MochiPipeline, ledger: Ledger) -> list[tuple[str, int]]:
    """Record the ledger's live bytes at the end of each stage of the next generations."""
    seen, during = [], ledger.during

    def spy(stage):
        class Context:
            def __enter__(self):
                self.inner = during(stage)
                return self.inner.__enter__()

            def __exit__(self, *exc):
                seen.append((stage, ledger.live))
                return self.inner.__exit__(*exc)

        return Context()

    ledger.during = spy
    return seen


def check_generation(pipe: MochiPipeline, ledger: Ledger, mode: str, size: dict) -> None:
    """The device's peak at each stage of the generation that just ran, as the mode promises."""
    peaks = ledger.peaks  # the stages of the latest generation (`run` clears them before)
    assert set(peaks) in ({"text", "dit"}, {"text", "dit", "vae"})
    if mode == "resident":
        assert set(peaks.values()) == {size["all"]} and ledger.live == size["all"]
        return
    assert ledger.live == 0  # nothing stays on the device between generations
    if mode == "model":  # one component at a time: at most the largest
        expected = {"text": size["t5"], "dit": size["dit"], "vae": size["vae"]}
        assert peaks == {k: expected[k] for k in peaks}
        return
    k = pipe.memory.plan.dit_blocks_resident
    assert size["t5_rest"] + size["t5_block"] <= peaks["text"] <= size["t5_rest"] + 2 * size["t5_block"]  # streamed
    assert peaks["dit"] <= size["dit_rest"] + (k + 2) * size["dit_block"]  # the rest, k resident, two streamed
    assert peaks.get("vae", size["vae"]) == size["vae"]


def run(pipe: MochiPipeline, ledger: Ledger, **kwargs):
    """One generation of SMALL (latents unless asked), with the ledger's peaks of this generation only."""
    ledger.peaks.clear()
    return pipe("a cat", **{"seed": 1, "output_type": "latent", **SMALL, **kwargs})


def streaming_budget(size: dict, resident_blocks: int) -> int:
    """A sequential-offload budget that keeps `resident_blocks` DiT blocks on the device."""
    return size["dit_rest"] + (resident_blocks + 2) * size["dit_block"]


# ---- placement follows the mode --------------------------------------------------------------------------------


@pytest.mark.parametrize("memory", ["auto", "model", "sequential"])
def test_loading_puts_nothing_on_the_device(model_dir, memory):
    _, ledger = load(model_dir, memory=memory)
    assert ledger.live == 0 and not ledger.moved


def test_resident_places_everything_when_asked_and_only_then(model_dir, size):
    pipe, ledger = load(model_dir, memory="resident")
    assert ledger.live == size["all"] and ledger.moved == {"placement": size["all"]}
    pipe.enable_model_cpu_offload()  # another mode: what it does not want leaves at once
    assert ledger.live == 0
    pipe.set_memory_mode("resident")
    assert ledger.live == size["all"]


def test_the_model_cards_order_load_then_enable_offload(model_dir, size):
    """Load (nothing moves), enable model offload (nothing moves), generate: one component on the device at a time."""
    pipe, ledger = load(model_dir, capacity=max(size["t5"], size["dit"], size["vae"]))  # the whole set would not fit
    assert ledger.live == 0
    pipe.enable_model_cpu_offload()
    assert ledger.live == 0 and not ledger.moved
    out = run(pipe, ledger, output_type="np")
    check_generation(pipe, ledger, "model", size)
    assert out.memory["asked"] == out.memory["mode"] == "model"
    assert out.memory["moved_bytes"] == {"text": size["t5"], "dit": size["dit"], "vae": size["vae"]}


@pytest.mark.parametrize(
    "order",
    [
        ["resident", "model", "sequential", "model", "resident"],  # enable -> generate -> enable another ...
        ["sequential", "sequential"],  # generate twice
        ["model", "model"],
    ],
)
def test_peaks_per_stage_whatever_the_order_of_calls(model_dir, size, order):
    pipe, ledger = load(model_dir)
    for mode in order:
        budget = streaming_budget(size, 0) if mode == "sequential" else None
        pipe.set_memory_mode(mode, budget=budget)
        assert ledger.live == (size["all"] if mode == "resident" else 0)  # placed as soon as the mode is known
        run(pipe, ledger)
        check_generation(pipe, ledger, mode, size)


def test_offload_modes_give_the_resident_frames_bit_for_bit(model_dir, size):
    pipe, _ = load(model_dir, memory="resident")
    reference = pipe("a cat", seed=2, batch_cfg=False, output_type="latent", **SMALL).frames
    for mode, budget in (("model", None), ("sequential", streaming_budget(size, 0)), ("sequential", None)):
        pipe.set_memory_mode(mode, budget=budget)
        assert torch.equal(pipe("a cat", seed=2, batch_cfg=False, output_type="latent", **SMALL).frames, reference)


# ---- offload that streams, and only what does not fit ----------------------------------------------------------


@pytest.mark.parametrize("resident_blocks", [0, 2, 6])
def test_sequential_keeps_what_fits_and_streams_the_rest(model_dir, size, resident_blocks):
    """k blocks stay for the whole DiT stage; the others are copied once per forward (never copied back); with room
    for the whole DiT nothing moves per step, as in the resident mode."""
    n = size["dit_blocks"]
    budget = size["dit"] if resident_blocks == n else streaming_budget(size, resident_blocks)
    pipe, ledger = load(model_dir, memory="sequential")
    pipe.set_memory_mode("sequential", budget=budget)
    moved = {}
    for steps in (1, 3):
        run(pipe, ledger, batch_cfg=False, num_inference_steps=steps)
        assert pipe.memory.plan.dit_blocks_resident == resident_blocks
        moved[steps] = ledger.last_moved["dit"]
        check_generation(pipe, ledger, "sequential", size)
    streamed = size["dit"] - size["dit_rest"] - resident_blocks * size["dit_block"]
    if resident_blocks == n:
        streamed = 0
    assert (moved[3] - moved[1]) / 2 == 2 * streamed  # per step: two forwards (CFG one by one), each streams them
    dit_loads = [name for event, name, _ in ledger.trace if event == "load" and name.startswith("dit.block")]
    one_forward = [f"dit.block{i}" for i in range(resident_blocks, n)]
    if resident_blocks < n:  # in block order, forward after forward (the next forward's first block fetched early)
        assert dit_loads[resident_blocks : resident_blocks + 2 * len(one_forward)] == one_forward * 2


def test_device_copies_are_dropped_never_copied_back(model_dir, size):
    pipe, ledger = load(model_dir)
    tensors = [*pipe.dit.parameters(), *pipe.text_encoder.parameters(), *pipe.decoder.parameters()]
    before = [(t.data_ptr(), t._version) for t in tensors]
    for mode, budget in (("model", None), ("sequential", streaming_budget(size, 1))):
        pipe.set_memory_mode(mode, budget=budget)
        pipe("a cat", seed=1, output_type="latent", **SMALL)
        assert [(t.data_ptr(), t._version) for t in tensors] == before  # the same host tensors, never written
        drops = sum(b for event, _, b in ledger.trace if event == "drop")
        assert drops == sum(b for event, _, b in ledger.trace if event == "load")  # every copy released


def test_a_weight_changed_on_the_device_is_kept(model_dir):
    """Dropping skips the copy back only for unchanged weights: an in-place edit made on the device survives."""
    pipe, _ = load(model_dir, memory="model")
    bias = pipe.dit.t5_yproj.bias
    expected = bias.detach().clone() + 1.0
    edited = []

    def edit(module, args):
        if not edited:
            with torch.no_grad():
                bias.add_(1.0)  # on the device copy
            edited.append(True)

    pipe.dit.register_forward_pre_hook(edit)
    pipe("a cat", seed=1, output_type="latent", **SMALL)
    assert torch.equal(pipe.dit.t5_yproj.bias, expected)


@pytest.mark.parametrize("mode", ["model", "sequential", "auto"])
def test_a_lora_training_step_works_after_generating(model_dir, size, mode):
    """Moves run outside inference mode: after a generation the weights are ordinary tensors, so a LoRA-style step
    (a trainable low-rank delta on one Linear, then backward through the rest of the DiT) works. ("auto" places
    the weights resident during the generation, inside its inference mode, and leaves them there.)"""
    pipe, ledger = load(model_dir, memory=mode)
    if mode == "sequential":
        pipe.set_memory_mode("sequential", budget=streaming_budget(size, 1))
    pipe("a cat", seed=1, output_type="latent", **SMALL)
    assert ledger.live == (size["all"] if mode == "auto" else 0)
    assert not any(t.is_inference() for t in (*pipe.dit.parameters(), *pipe.dit.buffers()))
    layer = pipe.dit.blocks[0].attn.qkv_x
    g = torch.Generator().manual_seed(0)
    down = nn.Parameter(0.01 * torch.randn(4, layer.in_features, generator=g))
    up = nn.Parameter(0.01 * torch.randn(layer.out_features, 4, generator=g))
    hook = layer.register_forward_hook(lambda m, args, out: out + args[0] @ down.T @ up.T)
    z = torch.randn(1, 12, 3, 4, 6, generator=g)
    text = torch.randn(1, 8, pipe.dit.cfg.text_dim, generator=g)
    loss = pipe.dit(z, torch.tensor([0.5]), text, torch.ones(1, 8, dtype=torch.bool)).square().mean()
    loss.backward()
    hook.remove()
    assert down.grad is not None and up.grad is not None and torch.isfinite(up.grad).all() and up.grad.abs().sum() > 0


def test_weights_added_while_resident_are_placed_at_the_next_stage(model_dir, size):
    """A layer added to a resident DiT (a LoRA wrapping a Linear) holds new tensors: the next stage places them."""
    pipe, ledger = load(model_dir, memory="resident")
    run(pipe, ledger)
    extra = nn.Parameter(torch.zeros(4, 8), requires_grad=False)
    pipe.dit.blocks[0].attn.register_parameter("lora_down", extra)
    run(pipe, ledger)
    assert ledger.live == size["all"] + extra.numel() * extra.element_size()


# ---- free what is done -----------------------------------------------------------------------------------------


def test_t5_leaves_the_device_after_encoding_when_the_dit_needs_the_room(model_dir, size):
    """auto: T5 + DiT + VAE fit, but not beside the DiT's working memory: resident, with T5 leaving after encoding."""
    work = 3 * size["t5"]
    pipe, ledger = load(model_dir, capacity=size["dit"] + size["vae"] + work, work=dict(dit_work=work))
    stages = live_after_each_stage(pipe, ledger)
    out = pipe("a cat", seed=1, batch_cfg=False, **SMALL)
    assert (out.memory["mode"], out.memory["t5_leaves"]) == ("resident", True)
    assert stages == [("text", size["dit"] + size["vae"]), ("dit", size["dit"] + size["vae"]),
                      ("vae", size["dit"] + size["vae"])]  # fmt: skip
    assert ledger.peaks["dit"] == size["dit"] + size["vae"]  # sampling without T5 beside it
    loads = [name for event, name, _ in ledger.trace if event == "load"]
    assert loads.index("text_encoder.rest") > loads.index("dit.rest")  # DiT and VAE placed first, then T5 visits


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_t5_leaves_before_sampling_in_the_offload_modes(model_dir, size, mode):
    pipe, ledger = load(model_dir, memory=mode)
    stages = live_after_each_stage(pipe, ledger)
    pipe("a cat", seed=1, output_type="latent", **SMALL)
    assert stages == [("text", 0), ("dit", 0)]


def test_the_dits_tables_are_released_after_each_generation(model_dir, monkeypatch):
    pipe, _ = load(model_dir, memory="model")
    calls = []
    release = getattr(pipe.dit, "release_tables", None)
    if release is not None:
        monkeypatch.setattr(pipe.dit, "release_tables", lambda: calls.append(1) or release())
    pipe("a cat", seed=1, output_type="latent", **SMALL)
    pipe("a cat", seed=2, output_type="latent", **SMALL)
    if release is not None:
        assert calls == [1, 1] and getattr(pipe.dit, "_positions", None) is None
    else:
        assert pipe.dit._rope_cache is None


# ---- auto: choose from the free memory and the sizes -----------------------------------------------------------


def published(frames: int = 31) -> Footprint:
    """The published model at 848x480: parameter bytes as loaded (bf16 DiT with its fp32 norms, bf16 VAE decoder,
    fp32 T5-XXL; from offload.footprint on meta-device models, as bench/bench_offload.py builds them) and this many
    frames' working-memory estimates (the VAE's: 31 frames')."""
    from mochi_preview.geometry import MOCHI

    t, h, w = MOCHI.latent_shape(frames, 480, 848)[1:]
    tokens = t * (h // 2) * (w // 2)
    return Footprint(
        t5=19_049_242_624, t5_rest=526_401_536, t5_block=771_792_896, dit=20_055_413_856, dit_rest=197_280_864,
        dit_block=415_284_224, dit_blocks=48, vae=725_053_190,
        t5_work=offload.t5_working_bytes(4096, 10240, 64, 2),
        dit_work=offload.dit_working_bytes(3072, 8192, tokens, 1),
        dit_work_batched=offload.dit_working_bytes(3072, 8192, tokens, 2),
        vae_work=1_283_639_296,
    )  # fmt: skip


@pytest.mark.parametrize(
    "gib, mode, t5_leaves",
    [(80, "resident", False), (38, "resident", True), (28, "model", True), (16, "sequential", True)],
)
def test_auto_picks_the_first_mode_that_fits(gib, mode, t5_leaves):
    plan = choose("auto", published(), gib * GIB, torch.device("cuda"), copies=True)
    assert (plan.mode, plan.t5_leaves) == (mode, t5_leaves) and plan.need <= plan.budget
    if mode == "sequential":
        assert 0 < plan.dit_blocks_resident < 48  # loaded partially
    line = plan.describe()
    assert line.startswith("memory: auto chose") and offload.NAMES[mode] in line


def test_auto_on_a_cpu_device_keeps_everything_resident_and_batches_when_ram_allows():
    plan = choose("auto", published(), 64 * GIB, torch.device("cpu"), copies=False)
    assert (plan.mode, plan.batch_cfg) == ("resident", True) and "nothing moves" in plan.describe()
    assert not choose("auto", published(163), GIB, torch.device("cpu"), copies=False).batch_cfg


def test_auto_batches_cfg_where_it_fits():
    fp = published(163)
    assert choose("model", fp, 40 * GIB, torch.device("cuda"), copies=True).batch_cfg
    assert not choose("model", fp, 28 * GIB, torch.device("cuda"), copies=True).batch_cfg
    assert choose("model", fp, 40 * GIB, torch.device("cuda"), copies=True, batch_cfg=False).batch_cfg is False


def test_auto_on_the_ledger_device_picks_by_capacity_and_says_so(model_dir, size, capsys):
    for capacity, mode in (
        (size["all"], "resident"),
        (size["dit"], "model"),
        (streaming_budget(size, 1), "sequential"),
    ):
        pipe, ledger = load(model_dir, capacity=capacity)
        out = run(pipe, ledger, progress=True)
        assert (out.memory["asked"], out.memory["mode"]) == ("auto", mode)
        check_generation(pipe, ledger, mode, size)
        assert f"memory: auto chose {offload.NAMES[mode]}" in capsys.readouterr().err
    pipe("a cat", seed=1, output_type="latent", **{**SMALL, "progress": True})
    assert "memory:" not in capsys.readouterr().err  # said once, until it changes


def test_cpu_device_batches_cfg_by_default(model_dir):
    pipe = MochiPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, device="cpu")
    branches = []
    hook = lambda call: branches.append(call.branch) or call()  # noqa: E731
    out = pipe("a cat", seed=1, output_type="latent", dit_hook=hook, **SMALL)
    assert set(branches) == {"both"} and out.batch_cfg is True and out.memory["mode"] == "resident"
    one_by_one = pipe("a cat", seed=1, output_type="latent", batch_cfg=False, **SMALL)
    assert one_by_one.batch_cfg is False
    torch.testing.assert_close(out.frames, one_by_one.frames, rtol=1e-4, atol=1e-4)  # equal up to fp32 rounding
    assert pipe("a cat", seed=1, output_type="latent", guidance_scale=1.0, **SMALL).batch_cfg is None  # no CFG


# ---- out of memory: the next mode that fits, by name -----------------------------------------------------------


def advice(error: DeviceMemoryError) -> str:
    return str(error).split("Try ", 1)[1].split(";")[0]


def test_out_of_memory_names_the_next_mode_that_fits_loading_or_sampling(model_dir, size, monkeypatch):
    capacity = streaming_budget(size, 0)  # sequential offload fits; the whole DiT does not
    with pytest.raises(DeviceMemoryError, match=r"placing the weights \(memory mode: resident\)") as loading:
        load(model_dir, capacity=capacity, memory="resident")
    pipe, _ = load(model_dir, capacity=capacity, memory="model")
    with pytest.raises(DeviceMemoryError, match=r"during the dit stage \(memory mode: model offload\)") as sampling:
        pipe("a cat", seed=1, **SMALL)  # the DiT's copy does not fit the ledger device
    expected = "the next memory mode that fits: sequential offload, pipe.enable_sequential_cpu_offload(), or "
    assert advice(loading.value) == advice(sampling.value) == expected + "--memory sequential (--sequential_offload)"
    pipe.enable_sequential_cpu_offload()
    pipe("a cat", seed=1, output_type="latent", **SMALL)  # and it does fit


def test_out_of_memory_while_sampling_in_resident_mode_suggests_model_offload(model_dir, size, monkeypatch):
    pipe, _ = load(model_dir, capacity=size["all"], memory="resident")

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(pipe.dit, "forward", oom)
    with pytest.raises(DeviceMemoryError, match=r"during the dit stage \(memory mode: resident\)") as e:
        pipe("a cat", seed=1, **SMALL)
    assert advice(e.value).startswith("the next memory mode that fits: model offload, pipe.enable_model_cpu_offload()")
    assert "--memory model (--cpu_offload)" in str(e.value) and "enable_sequential_cpu_offload()" in str(e.value)


def test_plan_record_is_what_the_sidecar_keeps():
    plan = choose("auto", published(), 16 * GIB, torch.device("cuda:0"), copies=True)
    record = plan.record()
    assert isinstance(plan, Plan) and "batch_cfg" not in record
    fields = {"asked", "mode", "t5_leaves", "dit_blocks_resident", "dit_blocks", "budget", "need", "device"}
    assert set(record) == fields


# ---- the CLI's flags -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, memory, batch_cfg",
    [
        ([], "auto", "auto"),
        (["--cpu_offload"], "model", "auto"),
        (["--sequential_offload"], "sequential", "auto"),
        (["--memory", "resident", "--batch_cfg"], "resident", True),
        (["--memory", "model", "--cpu_offload", "--batch_cfg", "off"], "model", False),
        (["--batch_cfg", "on", "--quiet"], "auto", True),
    ],
)
def test_cli_memory_and_batch_cfg_flags(flags, memory, batch_cfg):
    from mochi_preview.infer import RunOptions, build_parser, memory_mode

    args = build_parser().parse_args(flags)
    assert memory_mode(args) == memory and RunOptions.from_args(args).batch_cfg == batch_cfg


def test_cli_contradicting_memory_flags_are_refused():
    from mochi_preview.infer import build_parser, memory_mode

    with pytest.raises(ValueError, match="--memory resident contradicts --cpu_offload"):
        memory_mode(build_parser().parse_args(["--memory", "resident", "--cpu_offload"]))


def test_cli_records_the_memory_mode_and_batch_cfg(model_dir, tmp_path):
    import json

    from mochi_preview.infer import main

    out = tmp_path / "v.mp4"
    small = ["--width", "48", "--height", "32", "--num_frames", "13", "--num_steps", "2", "--dtype", "fp32"]
    flags = ["--memory", "model", "--batch_cfg", "off", "--quiet", "--device", "cpu"]
    assert main(["--prompt", "x", "--model_dir", str(model_dir), "--output", str(out), *small, *flags]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["memory"]["asked"] == sidecar["memory"]["mode"] == "model" and sidecar["batch_cfg"] is False


def test_demo_model_frames_batched_by_default_stay_within_fp32_rounding_of_the_recording():
    """tests/test_outputs_unchanged.py pins the demo model's frames with the CFG branches one by one, bit for bit;
    the default on a CPU device batches them, which moves the numbers by fp32 rounding only (its tolerance)."""
    import json

    import numpy as np

    from mochi_preview.tiny import DEMO_MODEL_DIR

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pipe = MochiPipeline.from_pretrained(DEMO_MODEL_DIR, torch_dtype=torch.float32, device="cpu")
        d = json.loads((DEMO_MODEL_DIR / "mochi_defaults.json").read_text())
        size = dict(height=d["height"], width=d["width"], num_frames=d["num_frames"])
        out = pipe("a red square moving to the right", num_inference_steps=d["num_steps"],
                   guidance_scale=d["cfg_scale"], seed=0, progress=False, output_type="np", **size)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    expected = np.load(Path(__file__).parent / "data" / "demo_frames_seed0.npz")["frames"]
    assert out.batch_cfg is True
    assert np.abs(out.frames[0] - expected).max() <= 1e-4
