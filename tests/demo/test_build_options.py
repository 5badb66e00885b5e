"""The demo build's options for the rebuild (issue 15): object size, VAE widths, the VAE's edge loss."""

from __future__ import annotations

import pytest
import torch
import toy_build
from safetensors import safe_open

from mochi_preview import MochiPipeline
from mochi_preview.demo.build import DemoSpec, main
from mochi_preview.vae.layout import infer_decoder_config, infer_encoder_config

TOY = [*toy_build.TOY, "--threads", "1"]
STEPS = ["--text_steps", "1", "--vae_steps", "1", "--vae_finetune_steps", "1", "--dit_steps", "1", "--vae_batch", "1"]


def shapes(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


def test_the_clips_objects_have_the_chosen_size_in_both_vae_stages():
    spec = DemoSpec(object_size=(0.15, 0.2))
    assert spec.world().size_range == spec.pretrain_world().size_range == (0.15, 0.2)
    assert DemoSpec().world().size_range == (0.20, 0.30)  # the shipped model's world


def test_the_first_vae_stage_can_keep_the_objects_pixel_size():
    spec = DemoSpec(size=64, vae_pretrain_size=32, object_size=(0.1, 0.15), pretrain_keeps_pixels=True)
    world = spec.pretrain_world()
    assert (world.height, world.size_range) == (32, (0.2, 0.3))  # 6.4 to 9.6 pixels, as in the 64-pixel clips


def test_a_wider_vae_is_built_exported_and_loaded(tmp_path):
    out = tmp_path / "demo"
    widths = ["--vae_channels", "32", "32", "64", "96", "--vae_blocks", "1", "0", "1", "1", "2"]
    main(["--out", str(out), *TOY, *STEPS, *widths, "--vae_edge_weight", "1", "--latent_clips", "4", "--skip_eval"])
    decoder = infer_decoder_config(shapes(out / "decoder.safetensors"))
    encoder = infer_encoder_config(shapes(out / "encoder.safetensors"))
    for config in (decoder, encoder):
        assert (config.channels, config.num_res_blocks) == ((32, 32, 64, 96), (1, 0, 1, 1, 2))
    pipe = MochiPipeline.from_pretrained(out, torch_dtype=torch.float32, device="cpu")
    frames = pipe("a red ball moving to the right", width=16, height=16, num_frames=13, num_inference_steps=1,
                  generator=torch.Generator().manual_seed(0), progress=False, output_type="np").frames  # fmt: skip
    assert frames.shape == (1, 13, 16, 16, 3)


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--vae_channels", "32", "48", "64", "64"], "multiples of 32"),
        (["--vae_blocks", "0", "0", "1", "1", "-1"], "at least 0"),
        (["--object_size", "0.2", "0.1"], "0 < MIN <= MAX"),
        (["--object_size", "0.1", "0.3"], "--vae_pretrain_size"),  # 0.3 of an 8-pixel frame leaves no room to move
        (["--object_size", "0.1", "0.45"], "--size"),
        (["--object_size", "0.1", "0.14", "--vae_pretrain_pixels"], "--vae_pretrain_size"),  # 2.2 pixels in 8
        (["--seed", "-1"], "at least 0"),
        (["--checkpoint_every", "-5"], "at least 0"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "demo"), *TOY, *bad])
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
