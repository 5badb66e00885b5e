"""MochiPipeline end to end on tiny random models in both real layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_folders import diffusers_vae, save_diffusers_model, save_native_model

from mochi_preview import MochiPipeline
from mochi_preview.pipeline import DeviceMemoryError, NonFiniteLatentsError
from mochi_preview.sampling import DiTCall, TextCondition, get_noise, linear_quadratic_schedule

SMALL = dict(height=32, width=48, num_frames=13, num_inference_steps=3, progress=False)


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    return save_native_model(tmp_path_factory.mktemp("native"))


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    return save_diffusers_model(tmp_path_factory.mktemp("diffusers"))


@pytest.fixture(scope="module")
def pipe(native_dir):
    return MochiPipeline.from_pretrained(native_dir, torch_dtype=torch.float32, device="cpu")


def test_native_folder_generates_frames(pipe):
    out = pipe("a red ball moving to the right", seed=3, **SMALL)
    video = out.frames[0]
    assert isinstance(video, np.ndarray) and video.shape == (13, 32, 48, 3) and video.dtype == np.float32
    assert 0.0 <= video.min() and video.max() <= 1.0 and video.std() > 0
    assert set(out.timings) == {"text", "dit", "vae"}


def test_same_seed_same_frames_other_seed_other_frames(pipe):
    a = pipe("a cat", seed=7, **SMALL).frames[0]
    b = pipe("a cat", seed=7, **SMALL).frames[0]
    c = pipe("a cat", seed=8, **SMALL).frames[0]
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_output_types(pipe):
    latent = pipe("a cat", seed=1, output_type="latent", **SMALL).frames
    assert latent.shape == (1, 12, 3, 4, 6) and latent.dtype == torch.float32
    pt = pipe("a cat", seed=1, output_type="pt", **SMALL).frames
    assert pt.shape == (1, 13, 3, 32, 48)
    pil = pipe("a cat", seed=1, output_type="pil", **SMALL).frames
    assert len(pil[0]) == 13 and pil[0][0].size == (48, 32)


def test_given_latents_are_used(pipe):
    z = torch.randn(1, 12, 3, 4, 6, generator=torch.Generator().manual_seed(9))
    a = pipe("a cat", latents=z, output_type="latent", **SMALL).frames
    b = pipe("a cat", seed=9, output_type="latent", **SMALL).frames
    torch.testing.assert_close(a, b)  # seed 9's noise is exactly that tensor
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 12, 3, 4, 6\)"):
        pipe("a cat", latents=torch.zeros(1, 12, 2, 4, 6), **SMALL)


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_modes_give_the_same_frames(native_dir, mode):
    resident = MochiPipeline.from_pretrained(native_dir, torch_dtype=torch.float32, device="cpu")
    reference = resident("a blue square", seed=5, **SMALL).frames[0]
    offloaded = MochiPipeline.from_pretrained(native_dir, torch_dtype=torch.float32, device="cpu")
    getattr(offloaded, f"enable_{mode}_cpu_offload")()
    np.testing.assert_allclose(offloaded("a blue square", seed=5, **SMALL).frames[0], reference, atol=1e-6)


def test_vae_tiling_close_to_full(pipe):
    full = pipe.disable_vae_tiling()("a dog", seed=2, **SMALL).frames[0]
    tiled = pipe.enable_vae_tiling(tiles=(1, 2), overlap=2)("a dog", seed=2, **SMALL).frames[0]
    pipe.vae_options = {"mode": "auto"}
    assert np.abs(tiled - full).mean() < 0.02


def test_callback_sees_every_step(pipe):
    seen = []
    pipe("a cat", seed=1, callback_on_step_end=lambda p, i, s, kw: seen.append((i, s)), **SMALL)
    assert [i for i, _ in seen] == [0, 1, 2] and seen[-1][1] == 0.0


def test_callback_can_replace_the_latents(pipe):
    ones = torch.ones(1, 12, 3, 4, 6)
    last = lambda p, i, sigma, kw: {"latents": ones} if i == 2 else None
    assert torch.equal(pipe("a cat", seed=1, output_type="latent", callback_on_step_end=last, **SMALL).frames, ones)


@pytest.mark.parametrize("guidance_scale, batch_cfg, branches", [
    (6.0, False, ["cond", "uncond"]), (6.0, True, ["both"]), (1.0, False, ["cond"]),
])  # fmt: skip
def test_dit_hook_sees_every_dit_call(pipe, guidance_scale, batch_cfg, branches):
    calls = []

    def count(call: DiTCall) -> torch.Tensor:
        calls.append((call.step, call.sigma, call.branch, len(call.latents), len(call.text.features)))
        return call()

    kw = dict(guidance_scale=guidance_scale, batch_cfg=batch_cfg, output_type="latent", **SMALL)
    hooked = pipe("a cat", seed=4, dit_hook=count, **kw).frames
    assert torch.equal(hooked, pipe("a cat", seed=4, **kw).frames)  # a hook that only counts changes nothing
    rows = 2 if batch_cfg else 1
    sigmas = linear_quadratic_schedule(3)
    assert calls == [(i, sigmas[i], b, rows, rows) for i in range(3) for b in branches]


def test_dit_hook_replacing_the_velocity_changes_the_result(pipe):
    # Zero velocity: the sampler never moves, so the "video" is the seed's noise itself.
    still = pipe("a cat", seed=4, output_type="latent", dit_hook=lambda call: torch.zeros_like(call.latents), **SMALL)
    assert torch.equal(still.frames, get_noise(1, 13, 32, 48, seed=4))
    # A step cache: run the DiT at steps 0 and 2 only, reusing step 0's velocities (per branch) at step 1.
    cache, ran = {}, []

    def reuse(call: DiTCall) -> torch.Tensor:
        if call.step != 1:
            ran.append(call.step)
            cache[call.branch] = call()
        return cache[call.branch]

    one_by_one = dict(output_type="latent", batch_cfg=False)  # a cache per CFG branch
    cached = pipe("a cat", seed=4, dit_hook=reuse, **one_by_one, **SMALL).frames
    assert ran == [0, 0, 2, 2]
    assert not torch.equal(cached, pipe("a cat", seed=4, **one_by_one, **SMALL).frames)


def test_prepare_sample_decode_compose_to_a_call(pipe):
    request = pipe.prepare("a cat", height=32, width=48, num_frames=13, num_inference_steps=3, seed=6)
    assert isinstance(request.cond, TextCondition) and request.seed == 6 and len(request.guidance) == 3
    frames = pipe.decode(pipe.sample(request, progress=False))
    assert np.array_equal(frames, pipe("a cat", seed=6, **SMALL).frames)


def test_seed_is_reported_and_drawn_when_not_given(pipe):
    drawn = pipe("a cat", output_type="latent", **SMALL)
    assert isinstance(drawn.seed, int) and drawn.seed >= 0
    again = pipe("a cat", seed=drawn.seed, output_type="latent", **SMALL)
    assert again.seed == drawn.seed and torch.equal(again.frames, drawn.frames)
    g = torch.Generator().manual_seed(drawn.seed)
    assert pipe("a cat", generator=g, output_type="latent", **SMALL).seed is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_frames=30), r"num_frames=30 is not of the form 6k\+1 \(nearest valid: \[25, 31\]\)"),
        (dict(height=40), r"height=40 is not a multiple of 16 .*nearest valid: \[32, 48\]"),
        (dict(width=8), r"width=8 .*nearest valid: \[16\]"),
        (dict(num_inference_steps=0), "num_inference_steps must be between 1 and 1000"),
        (dict(guidance_scale=-1.0), r"guidance_scale must be between 0 and 50"),
        (dict(output_type="gif"), "output_type must be one of"),
    ],
)
def test_bad_requests_are_explained(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe("a cat", **{**SMALL, **kwargs})


def test_nan_latents_stop_before_decoding(pipe, monkeypatch):
    decoded = []
    monkeypatch.setattr(pipe.decoder, "forward", lambda *a, **k: decoded.append(1))
    z = torch.full((1, 12, 3, 4, 6), float("nan"))
    with pytest.raises(NonFiniteLatentsError, match="NaN or inf at step 1 of 3"):
        pipe("a cat", latents=z, **SMALL)
    assert not decoded


def test_out_of_memory_suggests_memory_modes(native_dir, monkeypatch):
    pipe = MochiPipeline.from_pretrained(native_dir, torch_dtype=torch.float32, device="cpu")

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(pipe.dit, "forward", oom)
    with pytest.raises(DeviceMemoryError, match=r"dit stage.*enable_model_cpu_offload.*enable_sequential_cpu"):
        pipe("a cat", **SMALL)


def test_diffusers_folder_loads_and_matches_diffusers_pipeline_latents(diffusers_dir):
    """Same folder, same seed: our latents equal diffusers' MochiPipeline's (a non-empty negative prompt, because
    diffusers keeps one EOS token for "" while we follow native and mask it entirely)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiTransformer3DModel
    from diffusers import MochiPipeline as TheirPipeline
    from transformers import T5EncoderModel, T5Tokenizer

    ours = MochiPipeline.from_pretrained(diffusers_dir, torch_dtype=torch.float32, device="cpu")
    theirs = TheirPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        vae=diffusers_vae(),
        text_encoder=T5EncoderModel.from_pretrained(diffusers_dir / "text_encoder"),
        tokenizer=T5Tokenizer.from_pretrained(diffusers_dir / "tokenizer", legacy=False),
        transformer=MochiTransformer3DModel.from_pretrained(diffusers_dir / "transformer"),
    )
    theirs.set_progress_bar_config(disable=True)
    kw = dict(height=32, width=48, num_frames=13, num_inference_steps=4, guidance_scale=4.5)
    a = ours("a red ball", negative_prompt="blurry", seed=11, output_type="latent", progress=False, **kw).frames
    b = theirs(
        "a red ball",
        negative_prompt="blurry",
        generator=torch.Generator("cpu").manual_seed(11),
        output_type="latent",
        **kw,
    ).frames
    err = float((a - b).abs().max() / b.abs().max())
    print("pipeline parity rel err", err)
    assert err < 1e-4


def test_sequential_offload_streams_one_block_at_a_time(native_dir):
    """On a CPU there is no second device, so a ledger device stands in (offload.LedgerMover: every move is a separate
    copy it counts). With a budget too small for the whole DiT, each DiT and T5 block goes to the device as it runs
    (the next one fetched meanwhile) and its copy is dropped after it: never more than two blocks there, nothing
    copied back."""
    from mochi_preview.offload import Ledger, LedgerMover

    ledger = Ledger(trace=[])
    pipe = MochiPipeline.from_pretrained(native_dir, torch_dtype=torch.float32, device="cpu", memory="sequential")
    rest = sum(t.numel() * t.element_size() for t in pipe.dit.parameters()) - sum(
        t.numel() * t.element_size() for t in pipe.dit.blocks.parameters()
    )
    block = max(sum(t.numel() * t.element_size() for t in b.parameters()) for b in pipe.dit.blocks)
    masters = [t.data_ptr() for t in pipe.dit.parameters()]
    pipe.set_memory_mode("sequential", budget=rest + block, mover=LedgerMover(2**30, ledger))
    pipe("a cat", seed=1, **{**SMALL, "num_inference_steps": 1}, guidance_scale=1.0)
    loads = [name for event, name, _ in ledger.trace if event == "load" and ".block" in name]
    assert loads == ["text_encoder.block0", "text_encoder.block1", "dit.block0", "dit.block1", "dit.block0"]
    blocks = 0
    for event, name, _ in ledger.trace:
        if ".block" in name:
            blocks += 1 if event == "load" else -1
            assert blocks <= 2
    assert ledger.live == 0 and [t.data_ptr() for t in pipe.dit.parameters()] == masters


def test_memory_mode_is_checked_before_loading_and_nothing_moves_at_load(native_dir, monkeypatch):
    from mochi_preview import pipeline

    monkeypatch.setattr(pipeline, "load_dit", lambda *a, **k: pytest.fail("loaded before the mode was checked"))
    with pytest.raises(ValueError, match="memory mode must be one of"):
        MochiPipeline.from_pretrained(native_dir, memory="fast")
    monkeypatch.undo()
    pipe = MochiPipeline.from_pretrained(native_dir, torch_dtype=torch.float32, device="cpu")
    assert (pipe.memory_mode, pipe.offload, pipe.memory.ledger.moved) == ("auto", "auto", {})
    pipe.enable_sequential_cpu_offload()
    assert (pipe.memory_mode, pipe.offload) == ("sequential", "sequential")
    pipe.disable_cpu_offload()
    assert (pipe.memory_mode, pipe.offload) == ("resident", "none")
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu")


def test_hub_id_resolves_through_the_local_cache(native_dir, tmp_path, monkeypatch):
    """`org/name` is looked up in the Hugging Face cache (no download): a cached snapshot loads like a folder."""
    import shutil

    from mochi_preview.pipeline import resolve_model_dir

    cache = tmp_path / "hub"
    snapshot = cache / "models--genmo--mochi-tiny" / "snapshots" / "0123abcd"
    shutil.copytree(native_dir, snapshot)
    (cache / "models--genmo--mochi-tiny" / "refs").mkdir()
    (cache / "models--genmo--mochi-tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model_dir("genmo/mochi-tiny") == snapshot
    pipe = MochiPipeline.from_pretrained("genmo/mochi-tiny", torch_dtype=torch.float32, device="cpu")
    assert pipe("a cat", seed=1, output_type="latent", **SMALL).frames.shape == (1, 12, 3, 4, 6)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        resolve_model_dir("genmo/not-downloaded")


def test_mochi_console_script_is_installed():
    from importlib.metadata import entry_points

    [script] = [e for e in entry_points(group="console_scripts") if e.name == "mochi"]
    assert script.value == "mochi_preview.infer:main"


def test_model_folder_latent_stats_replace_the_published_ones(native_dir, tmp_path):
    import json
    import shutil

    from mochi_preview.vae import LATENTS_MEAN, denormalize_latents, load_latent_stats, normalize_latents

    z = torch.randn(1, 12, 3, 4, 6, generator=torch.Generator().manual_seed(2))
    mean, std = [0.5] * 12, [2.0] * 12
    torch.testing.assert_close(denormalize_latents(z, mean, std), z * 2.0 + 0.5)
    torch.testing.assert_close(normalize_latents(denormalize_latents(z, mean, std), mean, std), z)
    assert MochiPipeline.from_pretrained(native_dir, torch_dtype=torch.float32).latent_stats is None  # published

    own = shutil.copytree(native_dir, tmp_path / "own")
    (own / "latent_stats.json").write_text(json.dumps({"mean": mean, "std": std}))
    pipe = MochiPipeline.from_pretrained(own, torch_dtype=torch.float32, device="cpu")
    assert pipe.latent_stats == (mean, std)
    seen = []
    pipe.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    latent = pipe("a cat", seed=1, output_type="latent", **SMALL).frames
    pipe("a cat", seed=1, **SMALL)
    torch.testing.assert_close(seen[-1], latent * 2.0 + 0.5)  # the decoder got the folder's denormalization

    (own / "latent_stats.json").write_text(json.dumps({"mean": list(LATENTS_MEAN[:3]), "std": [1.0] * 3}))
    with pytest.raises(ValueError, match="12 means"):
        load_latent_stats(own)
