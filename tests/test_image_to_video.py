"""Image to video, video to video and extension through the pipeline and the CLI, on the shipped demo model; Pusa
folders take the per-frame path."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mochi_preview import conditioning, infer
from mochi_preview import pipeline as pipeline_module
from mochi_preview.demo import world
from mochi_preview.pipeline import MochiPipeline
from mochi_preview.pusa import PUSA_DIT_FILE
from mochi_preview.tiny import DEMO_MODEL_DIR, save_random_model
from mochi_preview.video import encode_video, read_video

FAST = dict(num_inference_steps=4, num_frames=13, seed=3, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return MochiPipeline.from_pretrained(DEMO_MODEL_DIR, torch_dtype=torch.float32, device="cpu")


def clip(seed: int = 0, frames: int = 13, colour: str = "red", direction: str = "right") -> np.ndarray:
    """A demo-world clip (T, 64, 64, 3) uint8: what the demo model was trained on."""
    rng = np.random.default_rng(seed)
    attrs = [world.Attributes(colour, "square", direction)]
    config = world.WorldConfig(frames=frames)
    return world.render(attrs, world.sample_geometry(rng, attrs, config), config)[0].permute(1, 2, 3, 0).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def uint8(frames) -> np.ndarray:
    return (np.asarray(frames) * 255).astype(np.uint8)  # as encode_video writes them


# ---- image to video ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", conditioning.MODES)
def test_the_decoded_first_frame_is_the_image(pipe, mode):
    image = clip(seed=1)[0]
    out = pipe("a red square moves right", image=image, image_mode=mode, output_type="np", **FAST)
    first = uint8(out.frames[0, 0])
    # The ceiling is the VAE's own round trip of the image (the causal decoder makes frame 0 from latent 0 alone,
    # and "replace" ends latent 0 exactly on the image's latent): it must reach it, within 1 dB. "guide" pulls
    # halfway each step, so in 4 steps it gets part of the way only (this clip, demo model of 2026-12-04: 16.5 dB
    # at 4 steps, 21.6 at 8, 28.3 at 24, round trip 34.0): it is held to beating the same seed without the image.
    x = conditioning.encode(pipe.vae_encoder, image[None], pipe.latent_stats)
    round_trip = uint8(pipe.decode(x, "np")[0, 0])
    if mode == "replace":
        assert psnr(first, image) >= psnr(round_trip, image) - 1.0
        assert psnr(first, image) > 22.0  # the demo VAE's round trips of first frames measure 22-34 dB (bench)
    free = pipe("a red square moves right", output_type="np", **FAST)  # the same seed without the image
    assert psnr(uint8(free.frames[0, 0]), image) < psnr(first, image) - 3.0
    assert out.conditioning["mode"] == mode and out.conditioning["anchored_latent_frames"] == 1


def test_an_image_of_another_size_is_resized_and_cropped_with_a_warning(pipe):
    wide = np.asarray(Image.fromarray(clip(seed=2)[0]).resize((128, 64)))
    with pytest.warns(UserWarning, match=r"resized from 128x64 .* centre-cropped to 64x64"):
        out = pipe("a red square", image=Image.fromarray(wide), image_release=0.5, output_type="latent", **FAST)
    assert "centre-cropped" in out.conditioning["notes"][0]
    assert (out.conditioning["release"], out.conditioning["anchored_steps"]) == (0.5, 2)  # of 4: the last 2 free


def test_the_anchor_runs_before_the_users_callback_and_guide_composes_with_dit_hook(pipe):
    image = clip(seed=4)[0]
    x = conditioning.encode(pipe.vae_encoder, image[None], pipe.latent_stats)
    seen, calls = [], []

    def callback(p, i, t, kwargs):
        seen.append(kwargs["latents"][:, :, :1].clone())

    pipe("a red square moves right", image=image, callback_on_step_end=callback, output_type="latent", **FAST)
    torch.testing.assert_close(seen[-1], x, rtol=0, atol=1e-6)  # the last step's anchor already applied

    def count(call):
        calls.append(call.step)
        return call()

    out = pipe("a red square", image=image, image_mode="guide", dit_hook=count, output_type="latent", **FAST)
    assert sorted(set(calls)) == list(range(FAST["num_inference_steps"]))  # the user's hook saw every step
    assert out.conditioning["guide_strength"] == conditioning.GUIDE_STRENGTH
    free = pipe("a red square", output_type="latent", **FAST)
    distance = lambda z: (z[:, :, :1] - x).abs().mean()  # noqa: E731
    assert distance(out.frames) < 0.5 * distance(free.frames)  # softer than replace, still pulled onto the image


# ---- video to video ----------------------------------------------------------------------------------------


def test_strength_one_is_text_to_video_and_a_low_one_keeps_the_input(pipe):
    video = clip(seed=5, colour="blue", direction="up")
    t2v = pipe("a blue square moves up", output_type="latent", **FAST)
    v2v = pipe("a blue square moves up", video=video, strength=1.0, output_type="latent", **FAST)
    assert torch.equal(t2v.frames, v2v.frames)
    kept = pipe("a red circle moves left", video=video, strength=0.1, output_type="np", **FAST)
    assert psnr(uint8(kept.frames[0]), video) > 20.0
    assert kept.conditioning["sigma0"] == 0.1 and kept.conditioning["sigmas"][0] == 0.1


def test_the_video_gives_size_and_frames_and_a_count_not_6k_plus_1_is_trimmed(pipe):
    video = clip(seed=6, frames=16)
    args = {k: v for k, v in FAST.items() if k != "num_frames"}
    with pytest.warns(UserWarning, match="has 16 frames; using its first 13"):
        out = pipe("a red square moves right", video=video, strength=0.5, output_type="latent", **args)
    assert out.frames.shape == (1, 12, 3, 8, 8)
    assert "using its first 13" in out.conditioning["notes"][0]


# ---- extension ---------------------------------------------------------------------------------------------


def test_extension_is_the_input_followed_by_new_frames(pipe, tmp_path):
    video = clip(seed=7, frames=19)
    path = tmp_path / "in.mp4"
    encode_video(video, path, 10)
    decoded, _ = read_video(path)
    out = pipe("a red square moves right", extend=str(path), output_type="np", **FAST)
    frames = uint8(out.frames[0])
    assert len(frames) == len(decoded) + FAST["num_frames"] - 7
    assert np.array_equal(frames[: len(decoded)], decoded)  # the input's bytes, unchanged
    assert out.conditioning["anchored_latent_frames"] == 2 and out.conditioning["file"] == "in.mp4"
    assert out.conditioning["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


# ---- errors, before any work -------------------------------------------------------------------------------


@pytest.fixture
def no_work(pipe, monkeypatch):
    """The pipeline with no encoder loaded, and loading it (or encoding a prompt) an error."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the request was checked")

    monkeypatch.setattr(pipe, "vae_encoder", None)
    monkeypatch.setattr(pipeline_module, "load_vae_encoder", refuse)
    monkeypatch.setattr(pipe, "_encode", refuse)
    return pipe


def bad_requests(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    return [
        (dict(image=tmp_path / "missing.png"), FileNotFoundError, "does not exist"),
        (dict(image=str(broken)), ValueError, "cannot read it as an image"),
        (dict(image=np.zeros((8, 8, 3), np.uint8)), ValueError, "too small"),
        (dict(video=clip(frames=6)), ValueError, "at least 7"),
        (dict(video=clip(frames=13), width=128), ValueError, "64x64 but 128x64"),
        (dict(video=clip(frames=13), strength=0.0), ValueError, r"strength must be in \(0, 1\]"),
        (dict(video=clip(frames=13), strength=1.5), ValueError, r"strength must be in \(0, 1\]"),
        (dict(image=clip()[0], video=clip()), ValueError, "image= .* and video= .* were both given"),
        (dict(image=clip()[0], extend=clip()), ValueError, "were both given"),
        (dict(extend=clip(), num_frames=7), ValueError, "at least 13"),
        (dict(image=clip()[0], image_mode="soft"), ValueError, "image_mode must be one of replace, guide"),
        (dict(image=clip()[0], image_release=1.0), ValueError, r"image_release must be in \[0, 1\)"),
    ]


def test_every_bad_input_is_refused_before_any_work(no_work, tmp_path):
    for request, error, match in bad_requests(tmp_path):
        with pytest.raises(error, match=match):
            no_work("a red square", **{**FAST, **request})


def test_a_model_folder_without_the_encoder_is_refused_before_work(tmp_path, monkeypatch):
    folder = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL_DIR, folder, ignore=shutil.ignore_patterns("encoder.safetensors", "mochi_manifest.json"))
    pipe = MochiPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    monkeypatch.setattr(pipe, "_encode", lambda *a: pytest.fail("the prompt was encoded"))
    with pytest.raises(FileNotFoundError, match="need the VAE encoder"):
        pipe("a red square", image=clip()[0], **FAST)


# ---- memory modes, tiling and LoRAs -------------------------------------------------------------------------


def conditioned_latents(pipe, names=("image", "video", "extend"), **kw) -> dict:
    """Image to video, video to video and extension latents of the demo model (2 steps)."""
    inputs = {
        "image": dict(image=clip(seed=8)[0]),
        "video": dict(video=clip(seed=9), strength=0.5),
        "extend": dict(extend=clip(seed=10, frames=19)),
    }
    args = dict(FAST, num_inference_steps=2, output_type="latent", **kw)
    return {k: pipe("a red square moves right", **args, **inputs[k]) for k in names}


@pytest.fixture(scope="module")
def resident(pipe):
    """`conditioned_latents` on the CPU as loaded: untiled VAE, CFG branches unbatched (a small budget unbatches
    them), as the memory modes below run them."""
    try:
        return conditioned_latents(pipe.disable_vae_tiling(), batch_cfg=False)
    finally:
        pipe.vae_options = {"mode": "auto"}


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_modes_give_the_resident_latents(pipe, resident, mode):
    # Device stand-in (offload.LedgerMover: every weight the mode moves is copied); "sequential" with a budget that
    # makes the DiT's blocks stream. The same work as on the CPU: the same latents, bit for bit.
    from mochi_preview.offload import LedgerMover, Mover

    pipe.disable_vae_tiling()
    budget = 2**20 if mode == "sequential" else None
    pipe.set_memory_mode(mode, budget=budget, mover=LedgerMover(2**34))
    try:
        got = conditioned_latents(pipe, batch_cfg=False)
        record = pipe.memory_record()
    finally:
        pipe.set_memory_mode("auto", mover=Mover("cpu")).vae_options = {"mode": "auto"}
    assert record["mode"] == mode and record["moved_bytes"]["dit"] > 0
    if mode == "sequential":
        assert record["dit_blocks_resident"] < record["dit_blocks"]  # the blocks streamed
    for name, out in got.items():
        assert torch.equal(out.frames, resident[name].frames), name
        assert "encode_tiles" not in out.conditioning
    assert next(pipe.vae_encoder.parameters()).device.type == "cpu"  # the encoder left the device


def test_tiling_encodes_in_tiles_and_keeps_the_image(pipe):
    image = clip(seed=8)[0]
    plain = pipe("a red square moves right", image=image, output_type="latent", **FAST)
    pipe.enable_vae_tiling(tiles=(2, 2), overlap=2)
    try:
        tiled = pipe("a red square moves right", image=image, output_type="latent", **FAST)
    finally:
        pipe.vae_options = {"mode": "auto"}
    assert "encode_tiles" not in plain.conditioning and tiled.conditioning["encode_tiles"] == [2, 2]
    # The anchored latent frame came from the tiled encode; decoded whole (tiled decoding of an 8x8-latent clip is
    # not what this measures): 33.2 dB against the untiled 36.3 (tiles see their own pixels only).
    first = lambda out: psnr(uint8(pipe.decode(out.frames, "np")[0, 0]), image)
    assert first(plain) > 30.0 and first(tiled) > first(plain) - 6.0


def test_a_small_memory_budget_encodes_in_tiles(pipe):
    # The memory plan's budget (here 1 MiB on a device stand-in) is below the estimate for encoding a 64x64 video
    # whole: the encode runs in the fewest tiles that fit, the same plan on every rank (agree_min).
    from mochi_preview.offload import LedgerMover, Mover

    video = clip(seed=9)
    need = conditioning.encode_bytes(pipe.vae_encoder.config, *video.shape[:3])
    pipe.set_memory_mode("sequential", budget=2**20, mover=LedgerMover(2**34))
    try:
        out = pipe("a red square moves right", video=video, strength=0.3, output_type="np", **FAST)
    finally:
        pipe.set_memory_mode("auto", mover=Mover("cpu"))
    assert need > 2**20 and out.conditioning["encode_tiles"] == [3, 3]  # the finest grid 8x8 latents allow
    assert psnr(uint8(out.frames[0]), video) > 20.0  # strength 0.3 keeps the input


def test_conditioning_with_a_lora(pipe, tmp_path):
    # A LoRA changes the DiT, not the anchoring: the image still holds latent frame 0; merged and live agree.
    from mochi_preview.lora import GENMO_TARGETS, save_lora_native

    g = torch.Generator().manual_seed(2)
    layers = {}
    for i, block in enumerate(pipe.dit.blocks):
        for target in GENMO_TARGETS:
            if (layer := getattr(block.attn, target, None)) is not None:
                A, B = torch.randn(2, layer.in_features, generator=g), torch.randn(layer.out_features, 2, generator=g)
                layers[f"blocks.{i}.attn.{target}"] = (A * 0.2, B * 0.2)
    path = save_lora_native(tmp_path / "lora.safetensors", layers, rank=2, alpha=2.0)
    image = clip(seed=8)[0]
    x = conditioning.encode(pipe.vae_encoder, image[None], pipe.latent_stats)
    names = ("image", "video")
    plain = conditioned_latents(pipe, names)
    pipe.load_lora_weights(path, strength=0.7)
    try:
        live = conditioned_latents(pipe, names)
        pipe.fuse_lora()
        fused = conditioned_latents(pipe, names)
        pipe.unfuse_lora()
        pipe.set_adapters("default_0", 0.0)
        off = conditioned_latents(pipe, names)
    finally:
        pipe.unload_lora_weights()
    for name in plain:
        a, b = live[name].frames, fused[name].frames
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-5, name  # merged and live: fp32 rounding
        assert (a - plain[name].frames).abs().max() > 0.1, name  # the LoRA did change the generation
        assert torch.equal(off[name].frames, plain[name].frames), name  # strength 0 is no LoRA, bit for bit
    torch.testing.assert_close(live["image"].frames[:, :, :1], x, rtol=0, atol=1e-5)  # still the image's latent


# ---- the CLI -----------------------------------------------------------------------------------------------


def run_cli(tmp_path, *flags) -> tuple[int, dict | None]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    before = set(out.glob("*.json"))
    argv = ["--model_dir", str(DEMO_MODEL_DIR), "--num_steps", "3", "--num_frames", "13", "--seed", "1"]
    rc = infer.main([*argv, "--out_dir", str(out), "--quiet", "--device", "cpu", *map(str, flags)])
    new = sorted(set(out.glob("*.json")) - before)
    return rc, json.loads(new[0].read_text()) if new else None


def test_cli_image_init_video_and_extend(tmp_path):
    video = clip(seed=9, frames=19)
    Image.fromarray(video[0]).save(tmp_path / "first.png")
    encode_video(video, tmp_path / "in.mp4", 10)
    rc, record = run_cli(tmp_path, "--image", tmp_path / "first.png", "--image_mode", "guide")
    assert rc == 0 and record["image"].endswith("first.png") and record["image_mode"] == "guide"
    digest = hashlib.sha256((tmp_path / "first.png").read_bytes()).hexdigest()
    assert record["conditioning"]["sha256"] == digest and record["conditioning"]["file"] == "first.png"
    rc, record = run_cli(tmp_path, "--init_video", tmp_path / "in.mp4", "--strength", "0.4")
    assert rc == 0 and record["conditioning"]["sigma0"] == 0.4 and record["sigmas"][0] == 0.4
    rc, record = run_cli(tmp_path, "--extend", tmp_path / "in.mp4")
    assert rc == 0 and record["conditioning"]["anchored_latent_frames"] == 2


def test_cli_refuses_bad_inputs_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(infer, "load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    Image.fromarray(clip()[0]).save(tmp_path / "first.png")
    encode_video(clip(frames=6), tmp_path / "short.mp4", 10)
    cases = [
        (["--image", tmp_path / "missing.png"], "--image .*missing.png does not exist"),
        (["--init_video", tmp_path / "short.mp4"], "--init_video .*short.mp4: the video has 6 frames"),
        (["--image", tmp_path / "first.png", "--init_video", tmp_path / "short.mp4"], "--image and --init_video"),
        (["--init_video", tmp_path / "first.png", "--strength", "0"], r"--strength must be in \(0, 1\]"),
        (["--image", tmp_path / "first.png", "--width", "848", "--height", "480"], "too small"),
    ]
    for flags, match in cases:
        rc, record = run_cli(tmp_path, *flags)
        assert rc == 2 and record is None
        assert re.search(match, capsys.readouterr().err), flags


# ---- Pusa ---------------------------------------------------------------------------------------------------


def test_a_pusa_folder_conditions_by_per_frame_sigmas(tmp_path):
    folder = save_random_model(tmp_path / "pusa")
    (folder / "dit.safetensors").rename(folder / PUSA_DIT_FILE)  # Pusa's own file name, and no other DiT
    pipe = MochiPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    assert pipe.is_pusa
    image = np.asarray(Image.fromarray(clip()[0]).resize((pipe.defaults.width, pipe.defaults.height)))
    x = conditioning.encode(pipe.vae_encoder or pipeline_module.load_vae_encoder(folder), image[None])
    args = dict(num_inference_steps=3, seed=0, progress=False, output_type="latent")
    out = pipe("a red square", image=image, **args)
    assert out.conditioning["pusa"] == "image_to_video" and out.conditioning["noise_multiplier"] == 0.0
    torch.testing.assert_close(out.frames[:, :, :1], x, rtol=0, atol=1e-5)  # held clean: never moved
    noisy = pipe("a red square", image=image, noise_multiplier=0.3, **args)
    assert not torch.equal(noisy.frames, out.frames)
    with pytest.raises(ValueError, match="image_mode does not apply"):
        pipe("a red square", image=image, image_mode="guide", **args)


def test_the_encoder_loads_at_first_use_from_a_diffusers_folders_vae(tmp_path):
    from model_folders import save_diffusers_model

    pipe = MochiPipeline.from_pretrained(save_diffusers_model(tmp_path / "m"), torch_dtype=torch.float32, device="cpu")
    assert pipe.vae_encoder is None  # text to video never loads it
    size = dict(height=pipe.defaults.height, width=pipe.defaults.width)
    image = np.asarray(Image.fromarray(clip()[0]).resize((size["width"], size["height"])))
    out = pipe("a red square", image=image, num_inference_steps=2, seed=0, progress=False, output_type="latent")
    assert pipe.vae_encoder is not None and next(pipe.vae_encoder.parameters()).dtype == torch.float32
    x = conditioning.encode(pipe.vae_encoder, image[None], pipe.latent_stats)
    torch.testing.assert_close(out.frames[:, :, :1], x, rtol=0, atol=1e-5)


def test_cli_pusa_folder_with_noise_multiplier(tmp_path):
    folder = save_random_model(tmp_path / "pusa")
    (folder / "dit.safetensors").rename(folder / PUSA_DIT_FILE)
    Image.fromarray(clip()[0]).save(tmp_path / "first.png")
    out = tmp_path / "out"
    flags = ["--model_dir", folder, "--num_steps", "2", "--num_frames", "13", "--width", "64", "--height", "64"]
    flags += ["--image", tmp_path / "first.png"]
    flags += ["--noise_multiplier", "0.2", "--out_dir", out, "--quiet", "--device", "cpu"]
    rc = infer.main([str(f) for f in flags])
    [sidecar] = out.glob("*.json")
    record = json.loads(sidecar.read_text())
    assert rc == 0 and record["noise_multiplier"] == 0.2
    assert record["conditioning"]["pusa"] == "image_to_video" and record["conditioning"]["noise_multiplier"] == 0.2
