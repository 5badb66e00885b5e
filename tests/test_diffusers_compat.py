"""diffusers' MochiPipeline, drop-in: its scripts run with only the import lines changed, and its numbers are ours.

The oracle is diffusers 0.42 (a test-only dependency). It equals Genmo's reference for the DiT, the schedule, the noise
of a CPU generator and guidance; where it does not, Genmo's numbers win and the tests below say so:
- "" as a prompt: Genmo encodes it as no text at all (diffusers' `force_zeros_for_empty_prompt=True`); diffusers'
  default keeps one EOS token. Ours follows Genmo unless `force_zeros_for_empty_prompt=False`.
- the VAE decoder: diffusers' drops frames at the end where Genmo's drops them after each upsampling stage, so decoded
  videos differ (spec section 12); only latents are compared here, the decoder is checked against Genmo's reference
  data in tests/vae.
- several prompts x `num_videos_per_prompt` > 1: diffusers repeats the embeddings per prompt but the masks per batch,
  so a video can get another prompt's mask; ours keeps each prompt's mask with its embeddings.
- `callback_on_step_end`'s prompt_embeds under guidance: diffusers passes [negative; positive] as one tensor; ours
  passes each half under its own name (prompt_embeds, negative_prompt_embeds) and takes back either form.
- saving: diffusers' DiT sizes its MLPs as 8 * width // 3 where Genmo rounds up to a multiple of 256 (equal at the
  published sizes); a model whose widths differ is saved in diffusers' layout with a warning that only ours loads it.
"""

from __future__ import annotations

import json
import runpy
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from dit_fixtures import diffusers_transformer
from model_folders import diffusers_vae, save_diffusers_model, save_native_model

from mochi_preview import MochiPipeline
from mochi_preview.dit import save_dit_native
from mochi_preview.lora import save_lora_native
from mochi_preview.tiny import DEMO_MODEL_DIR, save_tiny_t5_diffusers_layout
from mochi_preview.vae import load_vae_encoder
from mochi_preview.video import read_video

SCRIPTS = Path(__file__).parent / "diffusers_scripts"
EMBEDDINGS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
SIZE = dict(height=32, width=48, num_frames=13, num_inference_steps=4, guidance_scale=4.5, output_type="latent")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    return save_diffusers_model(tmp_path_factory.mktemp("diffusers"))


@pytest.fixture(scope="module")
def ours(diffusers_dir):
    pipe = MochiPipeline.from_pretrained(diffusers_dir, torch_dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def theirs(diffusers_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiTransformer3DModel
    from diffusers import MochiPipeline as TheirPipeline
    from transformers import T5EncoderModel, T5Tokenizer

    pipe = TheirPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        vae=diffusers_vae(),
        text_encoder=T5EncoderModel.from_pretrained(diffusers_dir / "text_encoder"),
        tokenizer=T5Tokenizer.from_pretrained(diffusers_dir / "tokenizer", legacy=False),
        transformer=MochiTransformer3DModel.from_pretrained(diffusers_dir / "transformer"),
        force_zeros_for_empty_prompt=True,  # Genmo's rule for ""; see test_empty_negative_prompt_is_genmos_no_text
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- same numbers --------------------------------------------------------------------------------------------


def test_same_latents_for_the_same_embeddings_and_one_generator_per_video(ours, theirs):
    embeds = dict(zip(EMBEDDINGS, ours.encode_prompt(["a red ball", "a blue cube"], negative_prompt="blurry")))
    a = ours(**embeds, generator=generators(3, 4), **SIZE).frames
    b = theirs(**embeds, generator=generators(3, 4), **SIZE).frames
    assert a.shape == (2, 12, 3, 4, 6) and rel_err(a, b) < 1e-5


def test_same_prompt_encoding_and_latents_from_text(ours, theirs):
    ours_embeds = ours.encode_prompt("a red ball", negative_prompt="blurry")
    their_embeds = theirs.encode_prompt("a red ball", negative_prompt="blurry")
    for x, y in zip(ours_embeds, their_embeds):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y) if x.dtype == torch.bool else rel_err(x, y) < 1e-5
    kw = dict(negative_prompt="blurry", num_videos_per_prompt=2, **SIZE)
    a = ours("a red ball", generator=generators(11)[0], **kw).frames
    b = theirs("a red ball", generator=generators(11)[0], **kw).frames
    assert a.shape == (2, 12, 3, 4, 6) and rel_err(a, b) < 1e-5


def test_empty_negative_prompt_is_genmos_no_text(ours, theirs):
    """Genmo wins: "" is no text at all. diffusers' default keeps an EOS token and gives other latents; ours gives
    those only with force_zeros_for_empty_prompt=False."""
    a = ours("a red ball", generator=generators(5), **SIZE).frames
    assert rel_err(a, theirs("a red ball", generator=generators(5), **SIZE).frames) < 1e-5
    theirs.register_to_config(force_zeros_for_empty_prompt=False)  # diffusers' default
    try:
        b = theirs("a red ball", generator=generators(5), **SIZE).frames
    finally:
        theirs.register_to_config(force_zeros_for_empty_prompt=True)
    assert rel_err(a, b) > 1e-3
    ours.force_zeros_for_empty_prompt = False
    try:
        assert rel_err(ours("a red ball", generator=generators(5), **SIZE).frames, b) < 1e-5
    finally:
        ours.force_zeros_for_empty_prompt = True


def test_guidance_is_off_at_one_and_below(ours, theirs):
    kw = {**SIZE, "guidance_scale": 0.5}
    a = ours("a red ball", generator=generators(2), **kw).frames
    assert rel_err(a, theirs("a red ball", generator=generators(2), **kw).frames) < 1e-5
    assert torch.equal(a, ours("a red ball", generator=generators(2), **{**SIZE, "guidance_scale": 1.0}).frames)


def test_callback_timesteps_and_interrupt_as_diffusers(ours, theirs):
    def stop_at_step_one(seen):
        def callback(pipe, i, t, kwargs):
            seen.append((i, float(t), kwargs["latents"].clone()))
            if i == 1:
                pipe._interrupt = True
            return kwargs

        return callback

    ours_seen, their_seen = [], []
    a = ours("a cat", generator=generators(1), callback_on_step_end=stop_at_step_one(ours_seen), **SIZE).frames
    b = theirs("a cat", generator=generators(1), callback_on_step_end=stop_at_step_one(their_seen), **SIZE).frames
    assert [(i, t) for i, t, _ in ours_seen] == [(i, t) for i, t, _ in their_seen]
    assert [i for i, _, _ in ours_seen] == [0, 1] and torch.equal(ours.scheduler.timesteps, theirs.scheduler.timesteps)
    assert rel_err(a, b) < 1e-5 and torch.equal(a, ours_seen[-1][2])  # stopped after step 1: those latents
    assert ours.interrupt  # the flag stays set until the next call resets it
    assert ours("a cat", generator=generators(1), **SIZE).frames.shape == a.shape and not ours.interrupt


def test_callback_replacing_the_embeddings_steers_the_next_steps_as_diffusers(ours, theirs):
    """diffusers' loop holds [negative; positive] as one prompt_embeds under guidance; ours passes and takes each
    half under its own name, and takes diffusers' batch too. The loop's masks stay (diffusers' too)."""
    pos2, _, neg2, _ = ours.encode_prompt("a blue cube", negative_prompt="dark")

    def at(step: int, **replacement):
        return lambda pipe, i, t, kwargs: replacement if i == step else {}

    def run(pipe, callback=None, **kw):
        return pipe("a red ball", negative_prompt="blurry", generator=generators(4), callback_on_step_end=callback,
                    **SIZE, **kw).frames  # fmt: skip

    plain = run(ours, batch_cfg=False)
    both = run(ours, at(1, prompt_embeds=pos2, negative_prompt_embeds=neg2), batch_cfg=False)
    theirs_both = run(theirs, at(1, prompt_embeds=torch.cat([neg2, pos2])))
    assert rel_err(both, theirs_both) < 1e-5 and rel_err(both, plain) > 1e-3
    batched = run(ours, at(1, prompt_embeds=torch.cat([neg2, pos2])), batch_cfg=True)  # diffusers' batch, taken
    assert rel_err(batched, theirs_both) < 1e-5


def test_callback_returning_embeddings_of_the_wrong_shape_is_refused_by_name(ours):
    def returning(**out):
        return lambda pipe, i, t, kwargs: out

    short = torch.zeros(1, 10, 64)
    expected = r"returned prompt_embeds shaped \(1, 10, 64\); the loop's prompt_embeds are \(1, 256, 64\) \(or "
    with pytest.raises(ValueError, match=expected + r"\(2, 256, 64\): diffusers' \[negative; positive\] batch\)"):
        ours("a cat", callback_on_step_end=returning(prompt_embeds=short), **SIZE)
    with pytest.raises(ValueError, match=r"returned negative_prompt_embeds shaped \(2, 256, 64\); the loop's "
                                         r"negative_prompt_embeds are \(1, 256, 64\) \(videos"):  # fmt: skip
        ours("a cat", callback_on_step_end=returning(negative_prompt_embeds=torch.zeros(2, 256, 64)), **SIZE)
    with pytest.raises(ValueError, match="returned negative_prompt_embeds, but this generation runs without guidance"):
        ours("a cat", callback_on_step_end=returning(negative_prompt_embeds=short), **{**SIZE, "guidance_scale": 1.0})


def test_frame_count_that_is_not_6k_plus_1_gives_diffusers_frames_with_a_warning(ours, theirs):
    kw = {**SIZE, "num_frames": 84, "num_inference_steps": 2}  # diffusers divides by zero at 1 step
    with pytest.warns(UserWarning, match=r"num_frames=84 is not of the form 6k\+1; generating 79 .*\[79, 85\]"):
        a = ours("a cat", generator=generators(0), **kw).frames
    b = theirs("a cat", generator=generators(0), **kw).frames
    assert a.shape == b.shape == (1, 12, 14, 4, 6) and rel_err(a, b) < 1e-5


# ---- loading and saving ---------------------------------------------------------------------------------------


def test_from_pretrained_takes_diffusers_loading_arguments(diffusers_dir):
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['use_flash'\]; it accepts .*'variant'"):
        MochiPipeline.from_pretrained(diffusers_dir, use_flash=True)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node=N"):
        MochiPipeline.from_pretrained(diffusers_dir, device_map="balanced")
    with pytest.raises(ValueError, match="not both"):
        MochiPipeline.from_pretrained(diffusers_dir, torch_dtype=torch.float32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"unknown components \['unet'\]"):
        MochiPipeline.from_pretrained(diffusers_dir, torch_dtype={"unet": torch.float16})
    bf16, fp32 = torch.bfloat16, torch.float32
    pipe = MochiPipeline.from_pretrained(diffusers_dir, dtype={"transformer": fp32, "default": bf16}, device="cpu")
    assert (pipe.dtype, pipe.vae.dtype, pipe.text_encoder.dtype) == (fp32, bf16, bf16)
    pipe = MochiPipeline.from_pretrained(
        diffusers_dir, torch_dtype=bf16, low_cpu_mem_usage=True, local_files_only=True, cache_dir=None, revision=None
    )
    assert (pipe.dtype, pipe.vae.dtype, pipe.text_encoder.dtype) == (bf16, fp32, fp32)  # Genmo: T5 and VAE in fp32
    with pytest.warns(UserWarning, match="has no 'fp16' variant; loading the plain files instead"):
        MochiPipeline.from_pretrained(diffusers_dir, variant="fp16", device="cpu")


def test_component_overrides_are_used_and_need_not_be_in_the_folder(ours, diffusers_dir, tmp_path):
    partial = shutil.copytree(diffusers_dir, tmp_path / "partial", ignore=shutil.ignore_patterns("transformer"))
    with pytest.raises(FileNotFoundError, match="missing the DiT"):
        MochiPipeline.from_pretrained(partial)
    pipe = MochiPipeline.from_pretrained(partial, device="cpu", **ours.components)
    assert pipe.transformer is ours.transformer and pipe.text_encoder is ours.text_encoder
    assert pipe.vae.decoder is ours.decoder and pipe.scheduler is ours.scheduler
    a = pipe("a cat", generator=generators(2), progress=False, **SIZE).frames
    assert torch.equal(a, ours("a cat", generator=generators(2), **SIZE).frames)


def test_save_pretrained_writes_diffusers_layout_that_both_load(ours, theirs, tmp_path):
    from diffusers import MochiTransformer3DModel

    out = ours.save_pretrained(tmp_path / "saved", variant="bf16")
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"transformer/diffusion_pytorch_model.bf16.safetensors", "vae/diffusion_pytorch_model.bf16.safetensors",
            "text_encoder/model.bf16.safetensors", "model_index.json"} <= files  # fmt: skip
    back = MochiTransformer3DModel.from_pretrained(out / "transformer", variant="bf16").state_dict()
    original = theirs.transformer.state_dict()
    assert back.keys() == original.keys() and all(torch.equal(back[k], v) for k, v in original.items())
    again = MochiPipeline.from_pretrained(out, variant="bf16", torch_dtype=torch.float32, device="cpu")
    again.set_progress_bar_config(disable=True)
    assert torch.equal(again("a cat", generator=generators(1), **SIZE).frames,
                       ours("a cat", generator=generators(1), **SIZE).frames)  # fmt: skip


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory, diffusers_dir):
    """A native folder (dit/decoder/encoder.safetensors, t5/) whose DiT diffusers can describe: the diffusers
    fixture's DiT in the native layout (the native tiny DiT's MLP widths are not diffusers' 8 * width // 3)."""
    folder = save_native_model(tmp_path_factory.mktemp("native"))
    (folder / "dit.safetensors").unlink()
    save_dit_native(folder / "dit.safetensors", diffusers_dir / "transformer")
    return folder


def native_pipe(folder: Path) -> MochiPipeline:
    pipe = MochiPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def genmo_order_decode(vae, z: torch.Tensor) -> torch.Tensor:
    """diffusers' decoder modules run as Genmo's decoder runs: each upsampling block's first st - 1 frames dropped
    at once (diffusers' own decode drops 5 frames at the end instead: not the same function, spec section 12)."""
    d = vae.decoder
    x, _ = d.block_in(d.conv_in(z))
    for up in d.up_blocks:
        x, _ = up(x)
        x = x[:, :, up.temporal_expansion - 1 :]
    x, _ = d.block_out(x)
    return d.proj_out(d.nonlinearity(x).permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


def test_save_pretrained_of_a_native_folder_is_diffusers_layout_that_both_load(native_dir, theirs, tmp_path):
    """Here in the bf16 variant's names (the demo model's test below: the plain names)."""
    from diffusers import AutoencoderKLMochi, MochiTransformer3DModel

    pipe = native_pipe(native_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing diffusers cannot load
        out = pipe.save_pretrained(tmp_path / "saved", variant=(variant := "bf16"))
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "tokenizer" not in p.parts}
    weights = "diffusion_pytorch_model.bf16.safetensors"
    assert files == {f"transformer/{weights}", "transformer/config.json", f"vae/{weights}", "vae/config.json",
                     "text_encoder/model.bf16.safetensors", "text_encoder/config.json",
                     "scheduler/scheduler_config.json", "model_index.json", "mochi_defaults.json"}  # fmt: skip
    # ours reads it back: the same latents and frames, bit for bit
    again = MochiPipeline.from_pretrained(out, variant=variant, torch_dtype=torch.float32, device="cpu")
    again.set_progress_bar_config(disable=True)
    latents = [p("a cat", generator=generators(1), **SIZE).frames for p in (pipe, again)]
    assert torch.equal(*latents)
    assert np.array_equal(*(p.decode(z, "np") for p, z in zip((pipe, again), latents)))
    # diffusers reads it: every tensor in place, the DiT exactly diffusers' fixture, the VAE the same functions
    transformer, info = MochiTransformer3DModel.from_pretrained(
        out / "transformer", variant=variant, output_loading_info=True
    )
    assert not any(info.values())
    original = theirs.transformer.state_dict()
    assert all(torch.equal(transformer.state_dict()[k], v) for k, v in original.items())
    vae, info = AutoencoderKLMochi.from_pretrained(out / "vae", variant=variant, output_loading_info=True)
    assert not any(info.values()) and list(vae.config.latents_mean) == list(pipe.vae.config.latents_mean)
    video = torch.rand(1, 3, 13, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        moments, _ = vae.encoder(video)
        mean, logvar = load_vae_encoder(native_dir)(video)
        assert rel_err(torch.cat([mean, logvar], dim=1), moments) < 1e-5
        z = torch.randn(1, 12, 3, 4, 6, generator=torch.Generator().manual_seed(1))
        ours = pipe.vae.decode(z).sample
        assert rel_err(ours, genmo_order_decode(vae, z).clamp(-1, 1)) < 1e-5
        assert vae.decode(z).sample.shape == ours.shape == (1, 3, 13, 32, 48)


def test_save_pretrained_of_the_demo_model_keeps_its_files_and_numbers(tmp_path):
    """The demo's own latent statistics and defaults travel; its text MLP is wider than diffusers' formula, so
    diffusers' DiT cannot load it (said once, when saving)."""
    from diffusers import AutoencoderKLMochi

    pipe = MochiPipeline.from_pretrained(DEMO_MODEL_DIR, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    with pytest.warns(UserWarning, match=r"cannot load this model \(the text MLP is 512 wide where diffusers makes it "
                                         r"8 \* 128 // 3 = 341\); MochiPipeline.from_pretrained here can"):  # fmt: skip
        out = pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((out / "latent_stats.json").read_text()) == json.loads(
        (DEMO_MODEL_DIR / "latent_stats.json").read_text()
    )
    vae, info = AutoencoderKLMochi.from_pretrained(out / "vae", output_loading_info=True)  # encoder included
    assert not any(info.values()) and list(vae.config.latents_mean) == pipe.latent_stats[0]
    again = MochiPipeline.from_pretrained(out, device="cpu")
    again.set_progress_bar_config(disable=True)
    assert again.defaults == pipe.defaults and again.latent_stats == pipe.latent_stats
    kw = dict(generator=None, seed=3, num_inference_steps=2, output_type="np")  # the demo's size and length
    a, b = (p("a red ball moving to the right", **kw).frames for p in (pipe, again))
    assert a.shape == (1, 25, 64, 64, 3) and np.array_equal(a, b)


def test_save_pretrained_writes_a_fused_lora_merged(native_dir, tmp_path):
    pipe = native_pipe(native_dir)
    base = pipe("a cat", generator=generators(2), **SIZE).frames
    g, layers = torch.Generator().manual_seed(0), {}
    for name in ("blocks.0.attn.qkv_x", "blocks.1.attn.proj_x"):
        m = pipe.dit.get_submodule(name)
        layers[name] = torch.randn(4, m.in_features, generator=g), torch.randn(m.out_features, 4, generator=g)
    pipe.load_lora_weights(save_lora_native(tmp_path / "lora.safetensors", layers, rank=4, alpha=4.0))
    with pytest.warns(UserWarning, match=r"LoRA adapters \['default_0'\] are applied live and are not saved"):
        pipe.save_pretrained(tmp_path / "live")
    pipe.fuse_lora()
    fused = pipe("a cat", generator=generators(2), **SIZE).frames
    again = native_pipe(pipe.save_pretrained(tmp_path / "fused"))
    assert rel_err(fused, base) > 1e-3 and torch.equal(again("a cat", generator=generators(2), **SIZE).frames, fused)


# ---- scripts written for diffusers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_only_dir(tmp_path_factory):
    """A tiny model in diffusers' layout holding only the bf16 variant files (sharded DiT with its index)."""
    from transformers import T5EncoderModel

    folder = tmp_path_factory.mktemp("bf16_only")
    diffusers_transformer().to(torch.bfloat16).save_pretrained(
        folder / "transformer", variant="bf16", max_shard_size="2MB"
    )
    diffusers_vae().to(torch.bfloat16).save_pretrained(folder / "vae", variant="bf16")
    save_tiny_t5_diffusers_layout(folder)
    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder")
    shutil.rmtree(folder / "text_encoder")
    t5.to(torch.bfloat16).save_pretrained(folder / "text_encoder", variant="bf16")
    weights = [p.name for p in folder.rglob("*") if "safetensors" in p.name]
    assert weights and all("bf16" in name for name in weights)
    return folder


def hub_cache(root: Path, model_dir: Path, repo: str = "genmo/mochi-1-preview") -> Path:
    """A Hugging Face cache in which `repo` is a snapshot of `model_dir` (nothing is downloaded)."""
    entry = root / f"models--{repo.replace('/', '--')}"
    (entry / "snapshots").mkdir(parents=True)
    (entry / "snapshots" / "0123abcd").symlink_to(model_dir.resolve(), target_is_directory=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123abcd")
    return root


OUTPUTS = {
    "quick_start_bf16.py": ["mochi.mp4"],
    "device_generator.py": ["mochi_on_device.mp4"],
    "embeddings_then_vae.py": ["mochi_from_latents.mp4"],
    "every_argument_pil.py": ["mochi_pil.mp4", "first_frame.png"],
    "callbacks_interrupt.py": ["mochi_0.mp4", "mochi_1.mp4"],
}


@pytest.mark.parametrize("script", sorted(OUTPUTS))
@pytest.mark.parametrize("model", ["demo", "bf16_only"])
def test_diffusers_script_runs_twice_in_the_same_folder(script, model, request, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    model_dir = DEMO_MODEL_DIR if model == "demo" else request.getfixturevalue("bf16_only_dir")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", model_dir)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    source = (SCRIPTS / script).read_text()
    assert "diffusers" not in source and source.count("from mochi_preview import") == 1
    for _ in range(2):  # the second run replaces the first run's files
        runpy.run_path(str(SCRIPTS / script), run_name="__main__")
    assert sorted(p.name for p in work.iterdir()) == sorted(OUTPUTS[script])
    for name in OUTPUTS[script]:
        if name.endswith(".mp4"):
            frames, _ = read_video(work / name)
            assert frames.shape[:3] == (13, 64, 64)
