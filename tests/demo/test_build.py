"""The demo build (`python -m mochi_preview.demo.build`): every stage at toy sizes, and the VAE's two-stage training."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import toy_build
from safetensors.torch import load_file

from mochi_preview import MochiPipeline
from mochi_preview.demo.build import (
    DemoSpec,
    arguments,
    main,
    polish_decoder,
    spec_of,
    train_vae,
    vae_configs,
    vae_models,
)
from mochi_preview.demo.world import Attributes, sample_geometry
from mochi_preview.text import SentencePieceT5
from mochi_preview.train import VAETrainConfig, inflate_time
from mochi_preview.vae import load_vae_decoder, load_vae_encoder
from mochi_preview.verify import check_hashes, manifest_of, read_manifest

TOY = toy_build.TOY


def test_build_writes_a_model_the_pipeline_loads_and_resumes_to_the_same_files(tmp_path):
    out = tmp_path / "demo"
    args = ["--out", str(out), *TOY, "--text_steps", "2", "--vae_steps", "2", "--vae_finetune_steps", "2"]
    args += ["--dit_steps", "2"]
    args += ["--latent_clips", "16", "--skip_eval"]
    main(args)
    work = tmp_path / "demo.work"
    step = lambda stage: json.loads((work / stage / "state.json").read_text())["step"]
    steps = {stage: step(stage) for stage in ["t5_train", "vae", "vae_full", "dit"]}
    assert steps == {"t5_train": 2, "vae": 2, "vae_full": 2, "dit": 2}
    # The shipped T5 is the pretrained one (tokenizer files kept), not the random one it started from.
    t5 = load_file(out / "t5" / "model.safetensors")
    assert all(torch.equal(v, t5[k]) for k, v in load_file(work / "t5" / "model.safetensors").items())
    assert any(not torch.equal(v, t5[k]) for k, v in load_file(work / "t5_init" / "model.safetensors").items())
    # The tokenizer it trained with, made case-blind: the same ids for lower case, capitals read as lower case.
    shipped, trained = (SentencePieceT5(f / "spiece.model") for f in (out / "t5", work / "t5_init"))
    assert shipped.ids("A RED Ball moving") == shipped.ids("a red ball moving") == trained.ids("a red ball moving")
    defaults = json.loads((out / "mochi_defaults.json").read_text())
    assert (defaults["width"], defaults["height"], defaults["num_frames"]) == (16, 16, 13)
    # The folder comes with its manifest (what is shipped is exactly what the build writes) and verifies.
    assert read_manifest(out) == manifest_of(out) and "t5/spiece.model" in read_manifest(out)
    check_hashes(out)
    files = ["dit.safetensors", "decoder.safetensors", "t5/model.safetensors"]
    first = {name: (out / name).read_bytes() for name in files}

    main(args)  # every stage is finished: the rerun only reloads checkpoints and exports the same weights
    assert {name: (out / name).read_bytes() for name in first} == first

    pipe = MochiPipeline.from_pretrained(out, torch_dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    frames = pipe("a red ball moving to the right", width=16, height=16, num_frames=13, num_inference_steps=2,
                  generator=g, progress=False, output_type="np").frames  # fmt: skip
    assert frames.shape == (1, 13, 16, 16, 3)


def test_vae_fine_tuning_starts_from_the_small_clips_ema_weights(tmp_path):
    spec = DemoSpec(frames=13, size=16, vae_pretrain_frames=7, vae_pretrain_size=8)
    cfg = VAETrainConfig(steps=3, batch_size=2, warmup=1, threads=2, checkpoint_every=100)
    # With a zero learning rate the second stage changes nothing: what it returns is what the first stage handed over.
    encoder, decoder = train_vae(tmp_path, spec, cfg, replace(cfg, lr=0.0, weight_decay=0.0))
    first = load_file(tmp_path / "vae" / "state.safetensors")
    for name, module in [("encoder", encoder), ("decoder", decoder)]:
        for k, v in module.state_dict().items():
            torch.testing.assert_close(v, first[f"ema.{name}.{k}"], rtol=0, atol=0)
    assert json.loads((tmp_path / "vae_full" / "state.json").read_text())["step"] == 3


def test_a_single_frame_first_stage_hands_over_its_decoder_inflated_to_smaller_second_stage_clips(tmp_path):
    spec = DemoSpec(frames=13, size=32, vae_pretrain_frames=1, vae_pretrain_size=16, vae_finetune_frames=7,
                    vae_finetune_size=24, object_size=(0.1, 0.15), pretrain_keeps_pixels=True)  # fmt: skip
    world = spec.finetune_world()  # the second stage's clips: smaller, objects as many pixels across as the model's
    assert (world.frames, world.height, world.width) == (7, 24, 24)
    assert world.size_range == pytest.approx((0.1 * 32 / 24, 0.15 * 32 / 24))
    assert DemoSpec(frames=13, size=32).finetune_world() == DemoSpec(frames=13, size=32).world()  # 0: the model's
    cfg = VAETrainConfig(steps=2, batch_size=2, warmup=1, threads=2, checkpoint_every=100)
    encoder, decoder = train_vae(tmp_path, spec, cfg, replace(cfg, lr=0.0, weight_decay=0.0))
    first = load_file(tmp_path / "vae" / "state.safetensors")
    _, expected = vae_models(spec)
    expected.load_state_dict({k[len("ema.decoder.") :]: v for k, v in first.items() if k.startswith("ema.decoder.")})
    assert any(not torch.equal(v, expected.state_dict()[k]) for k, v in decoder.state_dict().items())
    inflate_time(expected)
    for k, v in decoder.state_dict().items():
        torch.testing.assert_close(v, expected.state_dict()[k], rtol=0, atol=0)


@pytest.mark.parametrize("keep_pixels", [True, False])
def test_second_stage_clips_move_their_objects_as_many_pixels_a_frame_as_the_models(keep_pixels):
    spec = DemoSpec(size=64, frames=25, object_size=(0.14, 0.22), vae_finetune_size=48, vae_finetune_frames=7,
                    pretrain_keeps_pixels=keep_pixels)  # fmt: skip
    rng = np.random.default_rng(0)

    def pixels_per_frame(world):
        geometry = sample_geometry(rng, [Attributes("red", "square", "right")] * 4000, world)
        return np.abs(geometry.end - geometry.start).sum(axis=1).mean() / (world.frames - 1)

    small, model = spec.finetune_world(), spec.world()
    assert small.travel_range[1] < model.travel_range[1] / 2  # the same share of the room would be 2-3x faster
    assert pixels_per_frame(small) == pytest.approx(pixels_per_frame(model), rel=0.03)


def test_vae_trains_in_one_stage_when_the_clips_are_no_larger_than_the_first_stages(tmp_path):
    spec = DemoSpec(frames=7, size=8)  # the first stage's 32x32x13 is capped at the clip's own size
    assert spec.pretrain_world() == spec.world()
    cfg = VAETrainConfig(steps=2, batch_size=2, warmup=1, threads=2)
    train_vae(tmp_path, spec, cfg, cfg)
    assert (tmp_path / "vae" / "state.json").is_file() and not (tmp_path / "vae_full").exists()


def test_the_decoder_stage_trains_the_decoder_alone_and_gives_a_shipped_folder_the_builds_decoder(tmp_path):
    """--decoder_steps: the encoder, the DiT and the T5 are the build's without it; the decoder is what
    `polish_decoder` makes of the exported folder without it (the stage starts from the exported weights)."""
    steps = ["--text_steps", "2", "--vae_steps", "2", "--vae_finetune_steps", "2", "--dit_steps", "2"]
    common = [*TOY, *steps, "--latent_clips", "16", "--vae_batch", "2", "--threads", "1", "--skip_eval"]
    plain, noisy = tmp_path / "plain", tmp_path / "noisy"
    main(["--out", str(plain), *common])
    main(["--out", str(noisy), *common, "--decoder_steps", "2", "--decoder_noise", "0.5"])
    for name in ["dit.safetensors", "encoder.safetensors", "t5/model.safetensors"]:
        assert (plain / name).read_bytes() == (noisy / name).read_bytes(), name
    assert (plain / "decoder.safetensors").read_bytes() != (noisy / "decoder.safetensors").read_bytes()

    args = arguments().parse_args(["--out", str(plain), *common, "--decoder_steps", "2", "--decoder_noise", "0.5"])
    encoder, decoder = load_vae_encoder(plain / "encoder.safetensors"), load_vae_decoder(plain / "decoder.safetensors")
    polished = polish_decoder(tmp_path / "again", spec_of(args), encoder, decoder, vae_configs(args)[2], torch.float16)
    shipped = load_file(noisy / "decoder.safetensors")
    assert shipped.keys() == polished.state_dict().keys()
    for k, v in polished.state_dict().items():
        assert torch.equal(v.half(), shipped[k]), k


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--size", "40"], "multiple of 16"),
        (["--decoder_steps", "-1"], "at least 0"),
        (["--decoder_noise", "5"], "between 0 and 4"),
        (["--frames", "12"], "6k + 1"),
        (["--vae_pretrain_size", "12"], "multiple of 8"),
        (["--vae_finetune_size", "20"], "multiple of 8"),
        (["--vae_finetune_frames", "8"], "6k + 1"),
        (["--latent_clips", "0"], "positive"),
        (["--dit_steps", "-1"], "at least 0"),
        (["--text_steps", "-2"], "at least 0"),
        (["--caption_noise", "1.5"], "between 0 and 1"),
    ],
)
def test_bad_build_options_are_refused_before_anything_is_written(tmp_path, capsys, bad, message):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit):
        main(["--out", str(out), *bad])
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_caption_noise_reaches_the_text_encoders_and_the_dits_captions_and_zero_changes_nothing():
    """--caption_noise: the T5's training captions and the DiT cache's (and fresh) captions get filler words or
    capitals; at 0 they are exactly those of a build without the option (the same random stream)."""
    import numpy as np

    from mochi_preview.demo.build import caption_labels, clip_batches
    from mochi_preview.demo.world import TRAIN_ENDINGS, TRAIN_OPENINGS

    def noisy_share(captions):
        opening, ending = tuple(f"{o} " for o in TRAIN_OPENINGS), tuple(f" {e}" for e in TRAIN_ENDINGS)
        return np.mean([c.isupper() or c.lower().startswith(opening) or c.endswith(ending) for c in captions])

    plain, labels = caption_labels(np.random.default_rng(0), 200)
    again, same = caption_labels(np.random.default_rng(0), 200, noise=0.0)
    assert again == plain and torch.equal(same, labels) and noisy_share(plain) == 0
    noisy, noisy_labels = caption_labels(np.random.default_rng(0), 200, noise=0.5)
    assert torch.equal(noisy_labels, labels) and 0.35 < noisy_share(noisy) < 0.65  # the same clips' attributes
    spec = DemoSpec(frames=7, size=16, latent_clips=64)
    batches = lambda s: [c for _, captions in clip_batches(s, 64, seed=2) for c in captions]
    assert batches(spec) == batches(replace(spec, caption_noise=0.0)) and noisy_share(batches(spec)) == 0
    assert 0.8 < noisy_share(batches(replace(spec, caption_noise=1.0)))


def test_a_work_folder_keeps_the_text_options_it_began_with(tmp_path, capsys):
    # Its latent cache holds that text encoder's features; another encoder would train the DiT on the wrong ones.
    work = tmp_path / "demo.work"
    work.mkdir()
    (work / "text_options.json").write_text(json.dumps({"text_encoder": "frozen", "tokenizer": "generic"}))
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "demo"), *TOY])  # the default is the pretrained text encoder
    assert "--work" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["demo.work", "text_options.json"]
    (work / "text_options.json").write_text(json.dumps({"text_encoder": "pretrained", "tokenizer": "generic"}))
    with pytest.raises(SystemExit):  # a folder begun without caption noise
        main(["--out", str(tmp_path / "demo"), *TOY, "--caption_noise", "0.3"])
    assert "'caption_noise': 0.0" in capsys.readouterr().err
