"""Loading: native files, model folders, diffusers folders, bf16 files, shapes inferred from tensors, clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from vae_fixtures import diffusers_vae, randomize_, save_diffusers_vae, save_native, single_thread  # noqa: F401

from mochi_preview.checkpoint import CheckpointError
from mochi_preview.vae import Decoder, DecoderConfig, Encoder, EncoderConfig, decode, load_vae_decoder, load_vae_encoder
from mochi_preview.vae.layout import diffusers_vae_config, diffusers_vae_problems, to_diffusers_state

SMALL_DECODER = DecoderConfig(channels=(32, 32, 32, 32), num_res_blocks=(1, 1, 1, 1, 1))
ODD_ENCODER = EncoderConfig(
    channels=(32, 64, 32, 96),
    num_res_blocks=(2, 1, 0, 1, 1),
    temporal_reductions=(1, 2, 3),
    spatial_reductions=(2, 2, 2),
    has_attention=(True, False, False, True, False),
)


def test_published_sizes():
    with torch.device("meta"):
        decoder, encoder = Decoder(), Encoder()
    assert sum(p.numel() for p in decoder.parameters()) == 362_526_595
    assert sum(p.numel() for p in encoder.parameters()) == 97_222_016
    assert len(decoder.state_dict()) == 162 and len(encoder.state_dict()) == 243
    assert "blocks.1.proj.weight" in decoder.state_dict() and decoder.state_dict()["blocks.1.proj.weight"].shape == (
        6144,
        768,
    )
    assert encoder.state_dict()["layers.6.layers.0.weight"].shape == (384, 256, 3, 2, 2)
    assert encoder.state_dict()["layers.9.attn_block.attn.qkv.weight"].shape == (1152, 384)


@pytest.mark.parametrize(
    "config",
    [
        DecoderConfig(channels=(64, 32, 32, 32), num_res_blocks=(1, 1, 2, 1, 2)),
        DecoderConfig(channels=(32, 64, 96), num_res_blocks=(0, 2, 1, 1), temporal_expansions=(2, 3),
                      spatial_expansions=(2, 2), has_attention=(False, True, False, True)),
    ],
    ids=["reference-like", "two-stages-attention"],
)  # fmt: skip
def test_native_decoder_round_trip(tmp_path, config):
    decoder = randomize_(Decoder(config), seed=4)
    loaded = load_vae_decoder(save_native(tmp_path / "decoder.safetensors", decoder))
    assert loaded.config == config
    for name, tensor in decoder.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0)


def test_native_encoder_round_trip_with_odd_widths_and_attention(tmp_path):
    encoder = randomize_(Encoder(ODD_ENCODER), seed=5)
    loaded = load_vae_encoder(save_native(tmp_path / "encoder.safetensors", encoder))
    assert loaded.config == ODD_ENCODER
    video = torch.rand(1, 3, 7, 16, 16) * 2 - 1
    for a, b in zip(loaded(video), encoder(video)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_expansion_factors_can_be_given_where_the_tensors_are_ambiguous(tmp_path):
    """A projection only fixes st * s^2: 4 could be (1, 2) or (4, 1). s = 2 is assumed unless told otherwise."""
    config = DecoderConfig(
        channels=(32, 32), num_res_blocks=(1, 0, 1), temporal_expansions=(4,), spatial_expansions=(1,)
    )
    path = save_native(tmp_path / "decoder.safetensors", randomize_(Decoder(config)))
    assert load_vae_decoder(path).config.spatial_expansions == (2,)
    given = load_vae_decoder(path, temporal_expansions=(4,), spatial_expansions=(1,))
    assert given.config == config and decode(given, torch.zeros(1, 12, 2, 3, 3), mode="full").shape == (1, 3, 5, 3, 3)
    with pytest.raises(CheckpointError, match=r"do not match the upsampling projections, whose st\*s\^2 are \[4\]"):
        load_vae_decoder(path, temporal_expansions=(2,), spatial_expansions=(2,))


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    vae = diffusers_vae(seed=6)
    return vae, save_diffusers_vae(tmp_path_factory.mktemp("model"), vae)


@pytest.mark.parametrize("where", ["model folder", "vae folder", "vae file"])
def test_diffusers_layouts_load(diffusers_folder, where):
    vae, folder = diffusers_folder
    path = {
        "model folder": folder,
        "vae folder": folder / "vae",
        "vae file": folder / "vae" / "diffusion_pytorch_model.safetensors",
    }[where]
    decoder, encoder = load_vae_decoder(path), load_vae_encoder(path)
    # The qkv weight is diffusers' to_q, to_k, to_v stacked in that order.
    attn = vae.encoder.down_blocks[0].attentions[0]
    qkv = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
    torch.testing.assert_close(encoder.layers[2].layers[1].attn_block.attn.qkv.weight, qkv, atol=0, rtol=0)
    torch.testing.assert_close(decoder.output_proj.weight, vae.decoder.proj_out.weight, atol=0, rtol=0)
    assert decoder.config.channels == (64, 32, 32, 32) and encoder.config.channels == (32, 32, 64, 64)


def test_diffusers_writer_is_the_exact_inverse_of_the_reader(diffusers_folder):
    vae, folder = diffusers_folder
    decoder, encoder = load_vae_decoder(folder), load_vae_encoder(folder)
    state = to_diffusers_state(decoder.state_dict(), "decoder") | to_diffusers_state(encoder.state_dict(), "encoder")
    expected = vae.state_dict()  # attention included: our qkv split back into to_q, to_k, to_v
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())
    config = diffusers_vae_config(decoder.config, encoder.config, vae.config.latents_mean, vae.config.latents_std)
    theirs = {k: list(v) if isinstance(v, tuple) else v for k, v in vae.config.items() if not k.startswith("_")}
    assert {k: v for k, v in config.items() if k != "_class_name"} == theirs
    assert config["_class_name"] == "AutoencoderKLMochi"


def test_a_decoder_written_for_diffusers_decodes_as_diffusers_where_the_functions_agree():
    """Without temporal expansion neither decoder drops frames, so Genmo's and diffusers' are the same function end
    to end (with it they are not: spec section 12, test_vae_parity)."""
    from diffusers import AutoencoderKLMochi

    config = DecoderConfig(channels=(32, 32, 32, 32), num_res_blocks=(1, 0, 1, 1, 1), temporal_expansions=(1, 1, 1))
    decoder = randomize_(Decoder(config), seed=11)
    written = diffusers_vae_config(config, None, [0.0] * 12, [1.0] * 12)
    vae = AutoencoderKLMochi(**{k: v for k, v in written.items() if k != "_class_name"}).eval()
    missing, unexpected = vae.load_state_dict(to_diffusers_state(decoder.state_dict(), "decoder"), strict=False)
    assert not unexpected and missing and all(k.startswith("encoder.") for k in missing)
    z = torch.randn(1, 12, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(decode(decoder, z, mode="full"), vae.decode(z).sample, atol=1e-5, rtol=1e-5)


def test_what_diffusers_cannot_describe_is_named():
    decoder = DecoderConfig(channels=(32, 32), num_res_blocks=(1, 0, 1), temporal_expansions=(3,),
                            spatial_expansions=(2,), has_attention=(False, True, False))  # fmt: skip
    encoder = EncoderConfig(channels=(32, 32), num_res_blocks=(1, 1, 1), temporal_reductions=(3,),
                            spatial_reductions=(2,), has_attention=(False, True, True))  # fmt: skip
    assert diffusers_vae_problems(decoder, encoder) == [
        "the decoder has attention (False, True, False)",
        "the encoder's ResBlocks per level are (1, 1, 1), the decoder's (1, 0, 1)",
    ]
    assert diffusers_vae_problems(SMALL_DECODER, None) == []
    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.0\.1\.extra\.weight' has no name in diffusers'"):
        to_diffusers_state({"blocks.0.1.extra.weight": torch.zeros(1)}, "decoder")


def test_native_model_folder_and_prefixed_single_file(tmp_path):
    decoder = randomize_(Decoder(SMALL_DECODER), seed=7)
    encoder = randomize_(Encoder(ODD_ENCODER), seed=8)
    save_native(tmp_path / "decoder.safetensors", decoder)
    save_native(tmp_path / "encoder.safetensors", encoder)
    assert load_vae_decoder(tmp_path).config == SMALL_DECODER
    assert load_vae_encoder(tmp_path).config == ODD_ENCODER
    both = {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    both.update({f"encoder.{k}": v for k, v in encoder.state_dict().items()})
    save_file(both, str(tmp_path / "vae.safetensors"))
    assert load_vae_decoder(tmp_path / "vae.safetensors").config == SMALL_DECODER
    assert load_vae_encoder(tmp_path / "vae.safetensors").config == ODD_ENCODER


def test_bf16_file_loads_exactly_and_runs_in_either_dtype(tmp_path):
    decoder = randomize_(Decoder(SMALL_DECODER), seed=9)
    path = save_native(tmp_path / "decoder.safetensors", decoder, torch.bfloat16)
    as_fp32 = load_vae_decoder(path)
    for name, tensor in decoder.state_dict().items():
        stored = tensor.to(torch.bfloat16).float()
        torch.testing.assert_close(as_fp32.state_dict()[name], stored, atol=0, rtol=0)
    as_bf16 = load_vae_decoder(path, dtype=torch.bfloat16)
    assert as_bf16.blocks[0][0].weight.dtype == torch.bfloat16
    assert as_bf16.blocks[0][1].stack[0].weight.dtype == torch.float32  # group norms compute in fp32
    z = torch.randn(1, 12, 1, 2, 2)
    out16, out32 = decode(as_bf16, z, mode="full"), decode(as_fp32, z, mode="full")
    assert out16.dtype == torch.float32
    assert ((out16 - out32).norm() / out32.norm()) < 0.05


@pytest.fixture
def native_state():
    return {k: v.clone() for k, v in randomize_(Decoder(SMALL_DECODER), seed=10).state_dict().items()}


def _save(tmp_path, state):
    path = tmp_path / "decoder.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def test_missing_tensor_is_named(tmp_path, native_state):
    del native_state["blocks.0.1.stack.5.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing tensors \(blocks\.0\.1\.stack\.5\.bias"):
        load_vae_decoder(_save(tmp_path, native_state))


def test_unexpected_tensor_is_named(tmp_path, native_state):
    native_state["blocks.0.1.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"1 unexpected tensors \(blocks\.0\.1\.extra\.weight\)"):
        load_vae_decoder(_save(tmp_path, native_state))


def test_shape_mismatch_names_the_tensor(tmp_path, native_state):
    native_state["blocks.0.1.stack.2.weight"] = torch.zeros(32, 32, 3, 3, 1)
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.1\.stack\.2\.weight' has shape \(32, 32, 3, 3, 1\)"):
        load_vae_decoder(_save(tmp_path, native_state))


def test_missing_shape_defining_tensor_is_named(tmp_path, native_state):
    del native_state["blocks.2.proj.weight"]
    with pytest.raises(CheckpointError, match=r"no tensor 'blocks\.2\.proj\.weight'"):
        load_vae_decoder(_save(tmp_path, native_state))


def test_nan_or_inf_in_a_tensor_is_named_before_anything_runs(tmp_path, native_state):
    native_state["blocks.0.1.stack.2.weight"][0, 0, 0, 0, 0] = float("inf")
    native_state["blocks.0.1.stack.2.weight"][1, 0, 0, 0, 0] = float("nan")
    path = _save(tmp_path, native_state)
    with pytest.raises(
        CheckpointError, match=r"decoder\.safetensors: tensor 'blocks\.0\.1\.stack\.2\.weight' holds 1 NaN and 1 Inf"
    ):
        load_vae_decoder(path)


def test_truncated_file_is_reported(tmp_path, native_state):
    path = _save(tmp_path, native_state)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_vae_decoder(path)


def test_safetensors_header_length_ending_in_0x80_is_not_a_pickle(tmp_path, native_state):
    """A safetensors file starts with its header length (u64, little endian): its first byte can be 0x80."""
    path = tmp_path / "decoder.safetensors"
    for pad in range(256):
        save_file(native_state, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    load_vae_decoder(path)


def test_pickles_are_refused(tmp_path, native_state):
    torch.save(native_state, tmp_path / "decoder.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        load_vae_decoder(tmp_path / "decoder.pt")
    with pytest.raises(CheckpointError, match="found pickles"):
        load_vae_decoder(tmp_path)


def test_wrong_part_and_wrong_paths(tmp_path, native_state):
    path = _save(tmp_path, native_state)
    with pytest.raises(CheckpointError, match="does not hold a Mochi VAE encoder.*looks like a VAE decoder"):
        load_vae_encoder(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_vae_decoder(tmp_path / "nothing.safetensors")
    (tmp_path / "model").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model" / "dit.safetensors"))
    with pytest.raises(CheckpointError, match="no encoder.safetensors in the model folder"):
        load_vae_encoder(tmp_path / "model")
    with pytest.raises(ValueError, match="floating-point"):
        load_vae_decoder(path, dtype=torch.int8)


def test_loaded_modules_are_frozen_for_inference(tmp_path, native_state):
    decoder = load_vae_decoder(_save(tmp_path, native_state))
    assert not decoder.training and not any(p.requires_grad for p in decoder.parameters())
    assert load_file(str(tmp_path / "decoder.safetensors")).keys() == decoder.state_dict().keys()
