"""MochiPipeline end to end on tiny random models (diffusers' layout, numbers and scripts: test_diffusers_compat.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mochi_preview import MochiPipeline
from mochi_preview.pipeline import DeviceMemoryError, NonFiniteLatentsError
from mochi_preview.sampling import DiTCall, TextCondition, get_noise, linear_quadratic_schedule

SMALL = dict(height=32, width=48, num_frames=13, num_inference_steps=3, progress=False)
NP = dict(SMALL, output_type="np")


def test_native_folder_generates_frames(pipe):
    out = pipe("a red ball moving to the right", seed=3, **NP)
    video = out.frames[0]
    assert isinstance(video, np.ndarray) and video.shape == (13, 32, 48, 3) and video.dtype == np.float32
    assert 0.0 <= video.min() and video.max() <= 1.0 and video.std() > 0
    assert set(out.timings) == {"text", "dit", "vae"}


def test_same_seed_same_frames_other_seed_other_frames(pipe):
    a = pipe("a cat", seed=7, **NP).frames[0]
    b = pipe("a cat", seed=7, **NP).frames[0]
    c = pipe("a cat", seed=8, **NP).frames[0]
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
    reference = resident("a blue square", seed=5, **NP).frames[0]
    offloaded = MochiPipeline.from_pretrained(native_dir, torch_dtype=torch.float32, device="cpu")
    getattr(offloaded, f"enable_{mode}_cpu_offload")()
    np.testing.assert_allclose(offloaded("a blue square", seed=5, **NP).frames[0], reference, atol=1e-6)


def test_vae_tiling_close_to_full(pipe):
    full = pipe.disable_vae_tiling()("a dog", seed=2, **NP).frames[0]
    tiled = pipe.enable_vae_tiling(tiles=(1, 2), overlap=2)("a dog", seed=2, **NP).frames[0]
    pipe.vae_options = {"mode": "auto"}
    assert np.abs(tiled - full).mean() < 0.02


def test_callback_sees_every_step_with_diffusers_timesteps_and_the_tensors_asked_for(pipe):
    seen = []

    def record(p, i, t, kw):
        seen.append((i, float(t), sorted(kw), kw["prompt_embeds"].shape))

    inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    pipe("a cat", seed=1, callback_on_step_end=record, callback_on_step_end_tensor_inputs=inputs, **SMALL)
    sigmas = linear_quadratic_schedule(3)
    # diffusers passes its scheduler's timestep of the step: 1000 * (1 - sigma_i), 0 at pure noise
    assert [(i, t) for i, t, _, _ in seen] == [(i, pytest.approx((1 - sigmas[i]) * 1000)) for i in range(3)]
    assert pipe.scheduler.timesteps.tolist() == [t for _, t, _, _ in seen] and pipe.scheduler.sigmas.tolist() == sigmas
    assert seen[0][2] == sorted(inputs) and seen[0][3] == (1, 256, 64)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs may name"):
        pipe("a cat", callback_on_step_end_tensor_inputs=["noise_pred"], **SMALL)


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
    assert np.array_equal(frames, pipe("a cat", seed=6, **NP).frames)


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
        (dict(num_frames=0), r"num_frames=0 is not of the form 6k\+1 \(nearest valid: \[1\]\)"),
        (dict(num_frames=12.5), "num_frames must be a whole number; got 12.5"),
        (dict(num_inference_steps=2.5), "num_inference_steps must be a whole number; got 2.5"),
        (dict(num_videos_per_prompt=1.5), "num_videos_per_prompt must be a whole number of at least 1"),
        (dict(max_sequence_length=0), "max_sequence_length must be a whole number of at least 1"),
        (dict(noise="gpu"), "noise must be one of cpu, genmo"),
        (dict(seed=-5), r"seed must be between 0 and 2\*\*64 - 1"),
        (dict(seed=1, generator=torch.Generator()), "pass seed .* or generator, not both"),
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
    other = tmp_path / "other_cache" / "models--genmo--mochi-tiny"  # cache_dir= and revision= (a tag) say where
    (other / "snapshots").mkdir(parents=True)
    (other / "snapshots" / "4567ef01").symlink_to(native_dir.resolve(), target_is_directory=True)
    (other / "refs").mkdir()
    (other / "refs" / "v1").write_text("4567ef01")
    pipe = MochiPipeline.from_pretrained("genmo/mochi-tiny", cache_dir=other.parent, revision="v1", device="cpu")
    assert Path(pipe.sources["model_dir"]) == other / "snapshots" / "4567ef01"
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        MochiPipeline.from_pretrained("genmo/mochi-tiny", cache_dir=other.parent, revision="main")


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
    with pytest.raises(ValueError, match=r"12 (means|numbers)"):
        load_latent_stats(own)


# ---- diffusers' API: defaults, noise, outputs, components -----------------------------------------------------

EMBEDDINGS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")


def test_arguments_left_none_take_the_folders_defaults_else_diffusers(native_dir, tmp_path):
    import json
    import shutil

    from mochi_preview.settings import DEFAULTS_FILE
    from mochi_preview.tiny import DEMO_MODEL_DIR

    own = shutil.copytree(native_dir, tmp_path / "own")
    (own / DEFAULTS_FILE).write_text(json.dumps({"width": 64, "height": 64, "num_frames": 13, "num_steps": 8}))
    pipe = MochiPipeline.from_pretrained(own, torch_dtype=torch.float32, device="cpu")
    assert (pipe.defaults.width, pipe.defaults.num_frames, pipe.defaults.num_inference_steps) == (64, 13, 8)
    out = pipe("a cat", negative_prompt=None, height=None, num_inference_steps=2, output_type="latent", progress=False)
    assert out.frames.shape == (1, 12, 3, 8, 8) and isinstance(out.seed, int)  # 64x64 x 13 frames, a random seed

    d = MochiPipeline.from_pretrained(native_dir, torch_dtype=torch.float32, device="cpu").defaults  # no such file
    assert (d.height, d.width, d.num_frames, d.num_inference_steps, d.guidance_scale, d.seed) == (
        480, 848, 19, 64, 4.5, None,
    )  # fmt: skip

    demo = MochiPipeline.from_pretrained(DEMO_MODEL_DIR, torch_dtype=torch.float32, device="cpu")
    assert demo.is_demo and not pipe.is_demo
    video = demo("a red square moving right", num_inference_steps=2, output_type="np", progress=False).frames[0]
    assert video.shape == (25, 64, 64, 3)  # the demo's own 64x64 x 25 frames


def test_genmo_noise_is_the_global_generator_after_manual_seed(pipe):
    still = dict(output_type="latent", dit_hook=lambda call: torch.zeros_like(call.latents), **SMALL)
    out = pipe("a cat", seed=5, noise="genmo", **still)  # zero velocity: the result is the initial noise
    torch.manual_seed(5)
    assert torch.equal(out.frames, torch.randn(1, 12, 3, 4, 6)) and out.noise_device == "cpu"
    drawn = pipe("a cat", noise="genmo", **still)
    assert isinstance(drawn.seed, int) and torch.equal(pipe("a cat", seed=drawn.seed, noise="genmo", **still).frames,
                                                       drawn.frames)  # fmt: skip
    with pytest.raises(ValueError, match="not both"):
        pipe("a cat", noise="genmo", generator=torch.Generator(), **SMALL)


def test_autocast_around_the_call_changes_nothing(pipe):
    a = pipe("a cat", seed=3, output_type="latent", **SMALL).frames
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b = pipe("a cat", seed=3, output_type="latent", **SMALL).frames
    assert torch.equal(a, b)


def test_output_indexes_like_diffusers_and_return_dict_false_is_a_tuple(pipe):
    out = pipe("a cat", seed=1, output_type="latent", **SMALL)
    assert out[0] is out.frames and out["frames"] is out.frames and out.to_tuple() == (out.frames,)
    (frames,) = pipe("a cat", seed=1, output_type="latent", return_dict=False, **SMALL)
    assert torch.equal(frames, out.frames)
    default = pipe("a cat", seed=1, **SMALL).frames  # diffusers' default output: PIL images
    assert len(default) == 1 and len(default[0]) == 13 and default[0][0].size == (48, 32)


def test_batches_of_prompts_times_videos_per_prompt_and_a_generator_per_video(pipe):
    kw = dict(output_type="latent", **SMALL)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)]
    both = pipe(["a cat", "a dog"], num_videos_per_prompt=2, generator=gens, **kw).frames
    assert both.shape == (4, 12, 3, 4, 6)
    alone = pipe("a dog", generator=torch.Generator().manual_seed(4), **kw).frames[0]
    torch.testing.assert_close(both[3], alone, rtol=1e-4, atol=1e-4)  # video 2 of prompt 2: its noise and prompt
    with pytest.raises(ValueError, match="3 generators for 4 videos"):
        pipe(["a cat", "a dog"], num_videos_per_prompt=2, generator=gens[:3], **kw)


def test_vae_decodes_vae_latents_like_the_pipeline(pipe):
    z = pipe(["a cat", "a dog"], seed=1, output_type="latent", **SMALL).frames
    cfg = pipe.vae.config
    mean, std = (torch.tensor(v).view(1, 12, 1, 1, 1) for v in (cfg.latents_mean, cfg.latents_std))
    video = pipe.vae.decode(z * std / cfg.scaling_factor + mean, return_dict=False)[0]
    assert video.shape == (2, 3, 13, 32, 48) and -1.0 <= video.min() and video.max() <= 1.0
    expected = pipe.decode(z)
    np.testing.assert_allclose(pipe.video_processor.postprocess_video(video), expected, atol=1e-6)
    pipe.vae.enable_slicing()
    try:
        np.testing.assert_allclose(pipe.decode(z), expected, atol=1e-5)  # one video at a time: the same videos
    finally:
        pipe.vae.disable_slicing()
    pipe.vae.enable_tiling()
    assert pipe.vae_options == {"mode": "tiled"}
    with pytest.raises(TypeError, match=r"unknown VAE tiling options \['tile_sample_min_height'\]; valid: tiles"):
        pipe.vae.enable_tiling(tile_sample_min_height=256)
    pipe.vae.disable_tiling()
    pipe.vae_options = {"mode": "auto"}


def test_generates_from_embeddings_after_the_text_encoder_is_freed(native_dir):
    p = MochiPipeline.from_pretrained(native_dir, torch_dtype=torch.float32, device="cpu")
    embeds = dict(zip(EMBEDDINGS, p.encode_prompt("a cat")))
    assert embeds["prompt_attention_mask"].dtype == torch.bool and embeds["prompt_embeds"].shape == (1, 256, 64)
    a = p("a cat", seed=2, output_type="latent", **SMALL).frames
    p.free_text_encoder()
    assert p.text_encoder is None
    assert torch.equal(p(**embeds, seed=2, output_type="latent", **SMALL).frames, a)
    with pytest.raises(RuntimeError, match="free_text_encoder"):
        p("a cat", seed=2, **SMALL)


def test_pipeline_object_to_dtype_components_and_progress_bar(native_dir, capsys):
    p = MochiPipeline.from_pretrained(native_dir, torch_dtype=torch.float32, device="cpu")
    assert set(p.components) == {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert p.components["transformer"] is p.dit and callable(p.text_encoder) and p.dtype == torch.float32
    assert p.to("cpu", torch.bfloat16) is p and p.dtype == torch.bfloat16 and p.device == torch.device("cpu")
    assert p.dit.pos_frequencies.dtype == torch.float32 and p.text_encoder.dtype == torch.float32
    p.set_progress_bar_config(disable=True)
    p("a cat", seed=1, output_type="latent", **{**SMALL, "progress": True})
    assert "sampling" not in capsys.readouterr().err


def test_timesteps_max_sequence_length_and_attention_kwargs(pipe):
    kw = dict(output_type="latent", **{**SMALL, "num_inference_steps": None})
    by_sigmas = pipe("a cat", seed=1, sigmas=[1.0, 0.5, 0.0], **kw).frames
    assert torch.equal(pipe("a cat", seed=1, timesteps=[0, 500], **kw).frames, by_sigmas)  # t = 1000 (1 - sigma)
    embeds, mask, _, _ = pipe.encode_prompt("a cat", do_classifier_free_guidance=False, max_sequence_length=16)
    assert embeds.shape == (1, 16, 64) and mask.shape == (1, 16)
    short = pipe("a cat", seed=1, max_sequence_length=16, sigmas=[1.0, 0.5, 0.0], **kw).frames
    torch.testing.assert_close(short, by_sigmas, rtol=1e-4, atol=1e-4)  # a short prompt fits in 16 tokens
    with pytest.warns(UserWarning, match="attention_kwargs has no effect"):
        pipe("a cat", seed=1, attention_kwargs={"scale": 0.5}, sigmas=[1.0, 0.0], **kw)
