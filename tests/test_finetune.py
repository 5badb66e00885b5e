"""`python -m mochi_preview.finetune`: clip preprocessing and its cache, config checks, LoRA and full fine-tuning runs
on the shipped demo model, exact resume, exports that load, and gradient checkpointing."""

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mochi_preview import finetune
from mochi_preview.dit import load_dit
from mochi_preview.lora import load_lora
from mochi_preview.tiny import default_model_dir
from mochi_preview.train.data import ClipError, ClipSpec, centre_crop_resize, find_clips, prepare, read_clip
from mochi_preview.train.flow import shift_sigmas
from mochi_preview.video import encode_video, read_video

SPEC = ClipSpec(width=64, height=64, num_frames=13, fps=None)


def moving_square(seed: int, frames: int = 14, height: int = 72, width: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    video = np.zeros((frames, height, width, 3), np.uint8)
    video[:] = rng.integers(0, 60, 3)
    for t in range(frames):
        video[t, 20:40, 10 + 3 * t : 30 + 3 * t] = (200, 30, 30)
    return video


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two captioned clips (one in a subfolder), one without caption, one that is not a video."""
    root = tmp_path_factory.mktemp("clips")
    (root / "sub").mkdir()
    encode_video(moving_square(0), root / "a.mp4", 10)
    (root / "a.txt").write_text("a red square moves right")
    encode_video(moving_square(1), root / "sub" / "b.mp4", 10)
    (root / "sub" / "b.txt").write_text("a red square slides to the right")
    encode_video(moving_square(2), root / "nocap.mp4", 10)
    (root / "broken.mp4").write_bytes(b"not a video" * 20)
    (root / "broken.txt").write_text("never read")
    return root


def config(tmp_path, data_dir, **sections) -> dict:
    cfg = {
        "output_dir": str(tmp_path / "out"),
        "data": {"folder": str(data_dir), "width": 64, "height": 64, "num_frames": 13, "fps": None},
        "train": {"steps": 4, "warmup": 1, "lr": 1e-3, "checkpoint_every": 2, "batch_size": 2},
        "lora": {"rank": 4},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def write_config(tmp_path, cfg: dict, name: str = "cfg.yaml"):
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory, data_dir):
    """The clips encoded once; tests copy this folder to `<output_dir>/cache` and reuse it."""
    out = tmp_path_factory.mktemp("prepared")
    cfg = finetune.load_and_check(write_config(out, config(out, data_dir)))
    finetune.prepare_data(cfg, log=lambda _: None)
    return out / "out" / "cache"


def seeded_output(tmp_path, cache, name: str = "out"):
    shutil.copytree(cache, tmp_path / name / "cache")
    return tmp_path / name


# ---- data -------------------------------------------------------------------------------------------------------


def test_preprocessing_skips_bad_clips_by_name_and_resumes(tmp_path, data_dir):
    from mochi_preview.pipeline import find_text_encoder_dir
    from mochi_preview.text import TextEncoder
    from mochi_preview.vae import load_latent_stats, load_vae_encoder

    model_dir = default_model_dir()
    calls = []

    def load_models():
        calls.append(1)
        mean, std = load_latent_stats(model_dir)
        text = TextEncoder.from_folder(find_text_encoder_dir(model_dir))
        return load_vae_encoder(model_dir), text, torch.tensor(mean), torch.tensor(std), "cpu"

    logs = []
    report = prepare(data_dir, tmp_path / "cache", SPEC, load_models, "demo", logs.append)
    assert [p.relative_to(tmp_path / "cache").as_posix() for p in report.files] == [
        "a.mp4.safetensors",
        "sub/b.mp4.safetensors",
    ]
    assert dict(report.skipped).keys() == {"broken.mp4", "nocap.mp4"}
    assert "cannot be read" in dict(report.skipped)["broken.mp4"] and "no caption" in dict(report.skipped)["nocap.mp4"]
    assert any("broken.mp4" in line for line in logs) and any("nocap.mp4" in line for line in logs)
    with safe_open(str(report.files[0]), "pt") as f:
        assert f.get_slice("mean").get_shape() == [12, 3, 8, 8] == f.get_slice("logvar").get_shape()
        assert f.metadata()["caption"] == "a red square moves right"
    assert not [p for p in (tmp_path / "cache").rglob("*") if "partial" in p.name]  # atomic writes only

    again = prepare(data_dir, tmp_path / "cache", SPEC, lambda: pytest.fail("nothing to encode"), "demo", logs.append)
    assert again.reused == report.files and not again.encoded  # a rerun loads no model

    (data_dir / "sub" / "b.txt").write_text("a red square glides right")  # a changed caption: that clip again
    try:
        third = prepare(data_dir, tmp_path / "cache", SPEC, load_models, "demo", logs.append)
    finally:
        (data_dir / "sub" / "b.txt").write_text("a red square slides to the right")
    assert [p.name for p in third.encoded] == ["b.mp4.safetensors"] and len(calls) == 2


def test_clip_reading_crops_the_centre_resamples_and_refuses_short_clips(tmp_path):
    frames = np.zeros((3, 32, 64, 3), np.uint8)
    frames[:, :, 16:48] = 200  # the centre square of a 2:1 frame; the side bands are black
    out = centre_crop_resize(frames, 16, 16)
    assert out.shape == (3, 16, 16, 3) and out.min() == 200

    video = np.zeros((20, 32, 32, 3), np.uint8)
    video[:] = (np.arange(20) * 12)[:, None, None, None]  # frame i has brightness 12 i
    encode_video(video, tmp_path / "ramp.mp4", 10, crf=0)
    half = read_clip(tmp_path / "ramp.mp4", ClipSpec(32, 32, 7, fps=5.0))  # every second frame
    assert np.abs(half.mean(axis=(1, 2, 3)) - np.arange(0, 14, 2) * 12).max() < 3
    with pytest.raises(ClipError, match="too short: 10 frames at 5 fps, 13 needed"):
        read_clip(tmp_path / "ramp.mp4", ClipSpec(32, 32, 13, fps=5.0))
    (tmp_path / ".trash").mkdir()
    (tmp_path / ".trash" / "old.mp4").write_bytes(b"")
    (tmp_path / ".ramp.mp4.partial.mp4").write_bytes(b"")
    assert find_clips(tmp_path) == [tmp_path / "ramp.mp4"]  # hidden files and folders left out


# ---- config -----------------------------------------------------------------------------------------------------


def test_config_problems_are_named_before_any_work(tmp_path, data_dir, capsys):
    cfg = config(tmp_path, data_dir, train={"stesp": 3})
    with pytest.raises(finetune.ConfigError, match=r"unknown setting 'train.stesp'; known in train: \['mode', 'steps'"):
        finetune.load_and_check(write_config(tmp_path, cfg))
    bad = config(tmp_path, data_dir, data={"num_frames": 14}, lora={"targets": ["mlp_x"]})
    with pytest.raises(finetune.ConfigError) as e:
        finetune.load_and_check(write_config(tmp_path, bad), ["train.lr=fast", "train.mode=half"])
    message = str(e.value)
    assert "train.lr must be a number; got 'fast'" in message  # type errors first, all at once
    with pytest.raises(finetune.ConfigError) as e:
        finetune.load_and_check(write_config(tmp_path, bad), ["train.mode=half"])
    message = str(e.value)
    assert "data.num_frames=14 is not of the form 6k+1 (nearest valid: [13, 19])" in message
    assert "train.mode must be 'lora' or 'full'; got 'half'" in message and "lora.targets must be" in message
    with pytest.raises(finetune.ConfigError, match="unknown setting 'colour'; known settings: \\['output_dir'"):
        finetune.load_and_check(write_config(tmp_path, config(tmp_path, data_dir)), ["colour=red"])
    with pytest.raises(finetune.ConfigError, match="must be key=value"):
        finetune.load_and_check(write_config(tmp_path, config(tmp_path, data_dir)), ["train.steps"])

    with pytest.raises(SystemExit) as exit_:
        finetune.main([str(write_config(tmp_path, bad)), "train.mode=half"])
    assert exit_.value.code == 2 and "data.num_frames=14" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written, nothing loaded


def test_the_readmes_example_config_is_accepted_as_written(tmp_path, data_dir):
    """Only its paths are pointed at this test's folders (its model_dir `weights` is a user's download)."""
    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```yaml\n(output_dir: finetunes/my_lora.*?)```", readme, re.S)
    cfg = yaml.safe_load(block.group(1))
    assert cfg["lora"]["targets"] == ["qkv_x", "qkv_y", "proj_x", "proj_y"] and cfg["train"]["mode"] == "lora"
    cfg |= {"output_dir": str(tmp_path / "out"), "model_dir": str(default_model_dir())}
    cfg["data"]["folder"] = str(data_dir)
    got = finetune.load_and_check(write_config(tmp_path, cfg))
    assert (got.data.width, got.data.height, got.data.num_frames, got.train.steps) == (848, 480, 37, 2000)
    assert got.export.diffusers and got.validation.prompts == ("a red panda eating bamboo",)


def test_config_json_overrides_and_model_defaults(tmp_path, data_dir):
    cfg = config(tmp_path, data_dir)
    del cfg["data"]["width"], cfg["data"]["height"], cfg["data"]["num_frames"]
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    got = finetune.load_and_check(path, ["train.lr=1e-4", "lora.targets=qkv_x,proj_x", "validation.prompts=[a, b]"])
    assert (got.data.width, got.data.height, got.data.num_frames) == (64, 64, 25)  # the demo model's own size
    assert got.train.lr == 1e-4 and got.lora.targets == ("qkv_x", "proj_x") and got.validation.prompts == ("a", "b")
    assert got.validation.num_inference_steps == 24 and got.model_dir == str(default_model_dir())


# ---- training ---------------------------------------------------------------------------------------------------


def test_lora_run_through_main_writes_loadable_loras(tmp_path, data_dir, cache):
    out = seeded_output(tmp_path, cache)
    cfg = config(tmp_path, data_dir, validation={"prompts": ["a red square"], "every": 4, "num_inference_steps": 2})
    targets = "lora.targets=[qkv_x,qkv_y,proj_x,proj_y,mod_x,mod_y]"  # the modulation too (the last block's mod_y)
    result = finetune.main([str(write_config(tmp_path, cfg)), "export.diffusers=true", "train.threads=1", targets])
    assert result["finished"] and result["step"] == 4 and result["clips"] == 2 and len(result["skipped"]) == 2
    assert (out / "checkpoints" / "model_2.lora.safetensors").is_file()

    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        kwargs = json.loads(f.metadata()["kwargs"])
        assert kwargs["qkv_proj_lora_rank"] == 4 and kwargs["out_proj_lora_alpha"] == 16.0
        assert f.get_slice("blocks.0.attn.qkv_x.lora_A").get_shape()[0] == 4
    with safe_open(str(out / "trainer" / "state.safetensors"), "pt") as f:  # the frozen DiT is not checkpointed
        assert all("lora_" in k for k in f.keys() if k.startswith("model."))

    base = load_dit(default_model_dir(), dtype=torch.float32)
    merged = load_lora(load_dit(default_model_dir(), dtype=torch.float32), out / "lora.safetensors")
    via_peft = load_lora(load_dit(default_model_dir(), dtype=torch.float32), out / "pytorch_lora_weights.safetensors")
    zero = load_lora(load_dit(default_model_dir(), dtype=torch.float32), out / "lora.safetensors", strength=0.0)
    last = f"blocks.{len(base.blocks) - 1}.mod_y.weight"
    for w in ("blocks.0.attn.qkv_x.weight", "blocks.0.mod_x.weight", last):
        assert not torch.equal(merged.state_dict()[w], base.state_dict()[w]), w  # trained: B moved off zero
    assert all(torch.allclose(v, merged.state_dict()[k], atol=1e-6) for k, v in via_peft.state_dict().items())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in zero.state_dict().items())

    frames, info = read_video(out / "validation" / "step_000004" / "00.mp4")
    assert frames.shape == (13, 64, 64, 3) and info["metadata"]["prompt"] == "a red square"


def test_resume_after_a_stop_gives_the_same_lora_bit_for_bit(tmp_path, data_dir, cache):
    def lora(out):
        with safe_open(str(out / "lora.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    straight = finetune.load_and_check(write_config(tmp_path, config(tmp_path, data_dir)), ["output_dir=" + str(
        seeded_output(tmp_path, cache, "straight"))])  # fmt: skip
    split = replace(straight, output_dir=str(seeded_output(tmp_path, cache, "split")))
    quiet = dict(progress=False, log=lambda _: None)
    finetune.run(straight, **quiet)
    stopped = finetune.run(split, until=2, **quiet)  # stopped at step 2, state saved, nothing exported
    assert stopped["step"] == 2 and not stopped["finished"] and not (tmp_path / "split" / "lora.safetensors").exists()
    resumed = finetune.run(split, **quiet)  # a fresh DiT, LoRA init and data: everything comes from the checkpoint
    assert resumed["step"] == 4
    a, b = lora(tmp_path / "straight"), lora(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_between_the_two_checkpoint_files_still_resumes_exactly(tmp_path, cache, monkeypatch):
    from mochi_preview.train import common
    from mochi_preview.train.data import load_cache
    from mochi_preview.train.lora import LoraTrainConfig, LoraTrainer

    data = load_cache(sorted(cache.rglob("*.safetensors")))
    cfg = LoraTrainConfig(rank=4, steps=3, warmup=1, batch_size=2, sample_posterior=True, threads=0)
    make = lambda: LoraTrainer(load_dit(default_model_dir(), dtype=torch.float32), data, cfg)
    straight = make()
    straight.fit(progress=False)
    killed = make()
    killed.fit(until=2, checkpoint=tmp_path / "ck", progress=False)
    killed.train_step()
    real = common.write_atomic

    def dies_before_the_json(path, write, **kwargs):
        if path.name == "state.json":
            raise KeyboardInterrupt  # the process dies after the tensors were published
        return real(path, write, **kwargs)

    monkeypatch.setattr(common, "write_atomic", dies_before_the_json)
    with pytest.raises(KeyboardInterrupt):
        killed.save(tmp_path / "ck")
    monkeypatch.undo()
    assert json.loads((tmp_path / "ck" / "state.json").read_text())["step"] == 2  # stale
    resumed = make()
    resumed.load(tmp_path / "ck")
    assert resumed.step == 3  # the tensors file carries its own metadata
    for name, (A, B) in straight.lora().items():
        assert torch.equal(resumed.lora()[name][0], A) and torch.equal(resumed.lora()[name][1], B)


def test_lora_on_a_fp8_base(tmp_path, data_dir, cache):
    out = seeded_output(tmp_path, cache)
    cfg = finetune.load_and_check(write_config(tmp_path, config(tmp_path, data_dir)), ["train.fp8_base=true"])
    result = finetune.run(replace(cfg, train=replace(cfg.train, steps=2)), progress=False, log=lambda _: None)
    assert result["finished"] and np.isfinite(result["last_loss"])
    base = load_dit(default_model_dir(), dtype=torch.float32)
    merged = load_lora(load_dit(default_model_dir(), dtype=torch.float32), out / "lora.safetensors")
    w = "blocks.0.attn.proj_x.weight"
    assert not torch.equal(merged.state_dict()[w], base.state_dict()[w])
    with pytest.raises(finetune.ConfigError, match="train.fp8_base is for LoRA training"):
        finetune.load_and_check(
            write_config(tmp_path, config(tmp_path, data_dir)), ["train.fp8_base=true", "train.mode=full"]
        )


def test_full_fine_tuning_exports_a_dit_that_loads(tmp_path, data_dir, cache):
    out = seeded_output(tmp_path, cache)
    cfg = config(tmp_path, data_dir, train={"mode": "full", "steps": 2, "lr": 1e-4}, export={"diffusers": True})
    cfg = finetune.load_and_check(write_config(tmp_path, cfg))
    finetune.run(cfg, progress=False, log=lambda _: None)
    base = load_dit(default_model_dir(), dtype=torch.float32).state_dict()
    native = load_dit(out / "dit.safetensors", dtype=torch.float32).state_dict()
    diffusers = load_dit(out / "transformer", dtype=torch.float32).state_dict()
    assert native.keys() == base.keys() and all(torch.equal(native[k], diffusers[k]) for k in native)
    changed = [k for k in base if not torch.equal(base[k], native[k])]
    assert "blocks.0.mlp_x.w1.weight" in changed and "t5_yproj.weight" in changed  # every part trained


# ---- pieces -----------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_identical_gradients():
    from mochi_preview.train.lora import LoraTrainConfig, add_lora

    def grads(checkpointing: bool) -> dict:
        dit = load_dit(default_model_dir(), dtype=torch.float32)
        add_lora(dit, LoraTrainConfig(rank=4), torch.Generator().manual_seed(0))
        for name, p in dit.named_parameters():  # B is zero at init: give it values so every path carries gradient
            if "lora_B" in name:
                p.data.normal_(0, 0.01, generator=torch.Generator().manual_seed(len(name)))
        dit.blocks[1].mlp_x.requires_grad_(True)  # and a plain layer too
        dit.gradient_checkpointing = checkpointing
        g = torch.Generator().manual_seed(1)
        x, text = torch.randn(2, 12, 3, 8, 8, generator=g), torch.randn(2, 5, dit.cfg.text_dim, generator=g)
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
        saved = []  # bytes kept for the backward pass
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            loss = dit(x, torch.tensor([0.3, 0.8]), text, mask).square().mean()
        loss.backward()
        return {n: p.grad for n, p in dit.named_parameters() if p.requires_grad}, sum(saved)

    (plain, kept_plain), (recomputed, kept_recomputed) = grads(False), grads(True)
    assert len(plain) > 20 and all(plain[n].abs().sum() > 0 for n in plain if "blocks.1.mlp_x" in n)
    assert all(torch.equal(plain[n], recomputed[n]) for n in plain)
    assert kept_recomputed < kept_plain / 2  # it did recompute


def test_sigma_shift_moves_levels_towards_noise():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(shift_sigmas(s, 1.0), s)
    assert torch.allclose(shift_sigmas(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
