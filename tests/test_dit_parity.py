"""The AsymmDiT equals diffusers' MochiTransformer3DModel on identical random weights (spec section 12: exact)."""

from __future__ import annotations

import pytest
import torch
from dit_fixtures import diffusers_transformer, save_diffusers_transformer, text_inputs

from mochi_preview import load_dit
from mochi_preview.dit import save_dit_native


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    folder = save_diffusers_transformer(root)
    native = save_dit_native(root / "dit.safetensors", folder)
    torch.manual_seed(0)
    latents = torch.randn(2, 12, 3, 4, 6)
    feats, mask = text_inputs(2)
    return diffusers_transformer(), folder, native, latents, feats, mask


def reference(oracle, latents, sigma, feats, mask):
    with torch.no_grad():
        t = 1000.0 * (1.0 - sigma)
        return oracle(latents, feats, t, mask.long(), return_dict=False)[0]


@pytest.mark.parametrize("route", ["diffusers_folder", "native_file"])
@pytest.mark.parametrize("sigma", [1.0, 0.5, 0.025])
def test_fp32_parity(setup, route, sigma):
    oracle, folder, native, latents, feats, mask = setup
    model = load_dit(folder if route == "diffusers_folder" else native, dtype=torch.float32)
    sig = torch.full((2,), sigma)
    with torch.no_grad():
        ours = model(latents, sig, feats, mask)
    assert ours.dtype == torch.float32 and ours.shape == latents.shape
    assert rel_err(ours, reference(oracle, latents, sig, feats, mask)) <= 1e-5


def test_fp32_parity_empty_prompt(setup):
    oracle, folder, _, latents, feats, _ = setup
    mask = torch.zeros(2, 16, dtype=torch.bool)
    model = load_dit(folder, dtype=torch.float32)
    sig = torch.tensor([0.7, 0.2])
    with torch.no_grad():
        ours = model(latents, sig, feats, mask)
    assert torch.isfinite(ours).all()
    assert rel_err(ours, reference(oracle, latents, sig, feats, mask)) <= 1e-5


def test_bf16_close_to_fp32_reference(setup):
    oracle, folder, _, latents, feats, mask = setup
    model = load_dit(folder, dtype=torch.bfloat16)
    assert model.blocks[0].mlp_x.w1.weight.dtype == torch.bfloat16
    assert model.pos_frequencies.dtype == torch.float32  # kept fp32 by the precision policy
    assert model.blocks[0].attn.q_norm_x.weight.dtype == torch.float32
    sig = torch.full((2,), 0.5)
    with torch.no_grad():
        ours = model(latents, sig, feats, mask)
    assert rel_err(ours, reference(oracle, latents, sig, feats, mask)) <= 2e-2


def test_native_file_from_diffusers_has_native_keys(setup):
    from safetensors import safe_open

    _, _, native, *_ = setup
    with safe_open(str(native), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("blocks.0.attn.qkv_x.weight").get_shape() == [768, 256]
        assert f.get_slice("blocks.2.mod_y.weight").get_shape() == [
            128,
            256,
        ]  # the last block: scale_msa_y only
    assert "blocks.2.attn.proj_y.weight" not in keys and "blocks.2.mlp_y.w1.weight" not in keys
    assert "blocks.2.attn.qkv_y.weight" in keys  # the last block's text still supplies keys and values
