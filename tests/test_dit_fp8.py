"""FP8 weight storage for the DiT: quantization error, memory, outputs, and the fp8 checkpoint formats we read.

Error bounds come from float8_e4m3fn's format: 3 mantissa bits, so rounding a normal value (|v| >= 2^-6) moves it
by at most half a step, 2^-4 of its magnitude; below 2^-6 values are subnormal, spaced 2^-9 apart (error <= 2^-10
in units of the scale). Weights are scaled so the largest |w| maps to 448, the largest e4m3 value.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from dit_fixtures import randomize_, save_diffusers_transformer
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from mochi_preview.checkpoint import CheckpointError, CheckpointReader, Fp8Reader, open_checkpoint
from mochi_preview.dit import (
    AsymmDiT,
    DiTConfig,
    FP8Linear,
    load_dit,
    parameter_bytes,
    quantize_dit_fp8,
    save_dit_native,
)
from mochi_preview.dit.fp8 import E4M3_MAX, block_linears, quantize_fp8
from mochi_preview.dit.layers import Linear

torch.set_num_threads(1)

CFG = DiTConfig(depth=2, num_heads=2, head_dim=32, dim_y=64, mlp_hidden_x=128, mlp_hidden_y=128, text_dim=32)
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
REL, SUB = 2.0**-4, 2.0**-10  # e4m3 rounding: relative error of normal values; absolute, in scale units, below 2^-6


@pytest.fixture(scope="module")
def model():
    return randomize_(AsymmDiT(CFG), seed=4).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(2)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, :6] = True
    return torch.randn(1, 12, 2, 4, 4, generator=g), torch.tensor([0.6]), torch.randn(1, 8, 32, generator=g), mask


def run(m, inputs):
    with torch.no_grad():
        return m(*inputs)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def cast(model, dtype):
    """A copy in `dtype`, RoPE frequencies and QK-norm weights kept fp32 (as load_dit does)."""
    out = copy.deepcopy(model).to(dtype)
    for name, p in out.named_parameters():
        if name in model.fp32_parameter_names():
            p.data = p.data.float()
    return out


def fp8_copy(model, granularity="tensor", dtype=torch.float32):
    return quantize_dit_fp8(cast(model, dtype), granularity)


def assert_within_e4m3_rounding(w, q, scale):
    """Every element of q * scale is within half an e4m3 step of w (relative for normals, absolute for subnormals)."""
    err, bound = (q.float() * scale - w).abs(), torch.maximum(REL * w.abs(), SUB * scale)
    assert bool((err <= bound * (1 + 1e-5)).all()), float((err / bound).max())


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_quantization_error_is_e4m3_rounding(granularity):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * torch.exp(2 * torch.randn(64, 1, generator=g))  # rows of varied sizes
    w[5] = 0.0  # an all-zero row: scale 1, no 0/0
    q, scale = quantize_fp8(w, granularity)
    assert q.dtype == E4M3 and scale.dtype == torch.float32
    assert scale.shape == (() if granularity == "tensor" else (64, 1))
    assert_within_e4m3_rounding(w, q, scale)
    assert torch.isfinite(q.float()).all() and (q.float()[5] == 0).all()
    # The scale maps the largest |w| (of the tensor, or of each nonzero row) to 448 exactly.
    peak = q.float().abs().amax(dim=None if granularity == "tensor" else 1)
    assert bool((peak[peak > 0] == E4M3_MAX).all())


def test_per_channel_beats_per_tensor_on_rows_of_different_magnitude():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=g) * torch.logspace(-6, 0, 32)[:, None]  # row sizes over 6 decades
    errors = {}
    for granularity in ("tensor", "channel"):
        q, scale = quantize_fp8(w, granularity)
        errors[granularity] = ((q.float() * scale - w).norm(dim=1) / w.norm(dim=1)).tolist()  # per row, relative
    # Per channel every row uses the normal range: <= 2^-4 per element. e4m3 spans 2^-9 (smallest subnormal) to 448,
    # under 6 decades: per tensor, rows below ~1e-4 of the largest go subnormal (few bits) or round to zero.
    assert max(errors["channel"]) < REL
    assert max(errors["tensor"]) > 0.5 and sum(e > REL for e in errors["tensor"]) >= 5


def test_block_weights_take_half_the_bytes_of_bf16(model):
    bf16 = cast(model, torch.bfloat16)
    fp8 = fp8_copy(model, "channel", torch.bfloat16)
    linears = block_linears(bf16)
    assert len(linears) == sum(isinstance(m, FP8Linear) for m in fp8.modules())
    assert not any(isinstance(m, FP8Linear) for m in (fp8.t5_yproj, fp8.final_layer.linear, fp8.t_embedder.mlp[0]))
    b16, b8 = parameter_bytes(bf16.blocks), parameter_bytes(fp8.blocks)
    w8 = sum(fp8.get_submodule(n).weight.nbytes for n in linears)
    assert 2 * w8 == sum(bf16.get_submodule(n).weight.nbytes for n in linears)  # 1 byte per weight instead of 2
    rows = sum(fp8.get_submodule(n).out_features for n in linears)
    assert b8 == b16 - w8 + 4 * rows  # plus one fp32 scale per row; biases and norms unchanged
    # Rows here have 64-128 inputs, so scales add 3-6%; at the published width (1536-8192 inputs), under 0.3%.
    assert b8 <= (0.5 + 4 / 64) * b16
    assert parameter_bytes(fp8) - b8 == parameter_bytes(bf16) - b16  # nothing outside the blocks changed


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fp8_linear_output_within_the_rounding_bound(model, granularity):
    layer = model.blocks[0].mlp_x.w1
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(3))
    fp8 = FP8Linear.from_linear(layer, granularity)
    y, y8 = layer(x), fp8(x)
    # |sum_i (q_i s - w_i) x_i| <= sum_i (2^-4 |w_i| + 2^-10 s) |x_i|, elementwise, up to fp32 summation error.
    bound = (REL * layer.weight.abs() + SUB * fp8.scale) @ x.abs().T
    assert bool(((y8 - y).abs() <= bound.T * 1.001 + 1e-6).all())
    assert not torch.equal(y8, y)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantized_is_the_exact_product_rounded_once(model, granularity, dtype):
    fp8 = FP8Linear.from_linear(model.blocks[0].mlp_x.w1, granularity)
    got = fp8.dequantized(dtype)
    assert got.dtype == dtype and torch.equal(got, (fp8.weight.float() * fp8.scale).to(dtype))
    if dtype == torch.bfloat16:  # not the scale rounded to bf16 first (a gain error of up to 2^-9)
        assert not torch.equal(got, fp8.weight.to(dtype) * fp8.scale.to(dtype))


class FullSizeOutputs(TorchDispatchMode):
    """Records the dtype of every op output with `numel` elements (a weight-sized tensor)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.dtypes = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() == self.numel:
            self.dtypes.append(out.dtype)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantizing_makes_no_fp32_copy_of_the_weight(model, dtype):
    """Straight to the compute dtype: one weight-sized tensor, the result (on a GPU the bf16 multiply by the fp32
    scale computes in fp32 in registers). Before: fp32 copy, fp32 product, then the result."""
    fp8 = FP8Linear.from_linear(model.blocks[0].mlp_x.w1, "channel")
    with FullSizeOutputs(fp8.weight.numel()) as seen:
        fp8.dequantized(dtype)
    assert seen.dtypes == [dtype, dtype]  # fp8 -> dtype, then the in-place multiply by the scale


def test_fp8_model_output_close_to_full_precision(model, inputs):
    ref = run(model, inputs)
    bf16_weights = copy.deepcopy(model)
    for name in block_linears(bf16_weights):
        w = bf16_weights.get_submodule(name).weight
        w.copy_(w.to(torch.bfloat16).float())
    err_bf16_weights = rel(run(bf16_weights, inputs), ref)
    for granularity in ("tensor", "channel"):
        err = rel(run(fp8_copy(model, granularity), inputs), ref)
        # e4m3 keeps 4 significant bits, bf16 8: the same weights rounded to e4m3 err ~2^4 times more (errors
        # are random, so they add alike). Below 2^-4: the worst case of one layer; above 0: it did quantize.
        assert 4 * err_bf16_weights < err < 64 * err_bf16_weights, (err, err_bf16_weights)
        assert err < REL
    # Computing in bf16 too (activations rounded to 8 bits each layer) stays close to the fp32 reference.
    err_bf16 = rel(run(fp8_copy(model, "tensor", torch.bfloat16), inputs), ref)
    assert err_bf16 < REL


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_save_and_load_round_trip(tmp_path, model, inputs, granularity):
    fp8 = fp8_copy(model, granularity, torch.bfloat16)
    state = fp8.state_dict()
    for name in block_linears(model):
        assert state[f"{name}.weight"].dtype == E4M3 and state[f"{name}.scale"].dtype == torch.float32
    assert set(state) == set(model.state_dict()) | {f"{n}.scale" for n in block_linears(model)}
    path = save_dit_native(tmp_path / "dit.safetensors", fp8)
    kept = load_dit(path, dtype=torch.bfloat16, fp8="checkpoint")
    assert kept.state_dict().keys() == state.keys()
    bits = lambda t: t.reshape(-1).view(torch.uint8)
    assert all(v.dtype == state[k].dtype and torch.equal(bits(v), bits(state[k])) for k, v in kept.state_dict().items())
    assert torch.equal(run(kept, inputs), run(fp8, inputs))
    # fp8=None dequantizes: in fp32, the same weights the FP8 model computes with, so the same output.
    fp8_32 = fp8_copy(model, granularity)
    dequantized = load_dit(save_dit_native(tmp_path / "f32.safetensors", fp8_32), dtype=torch.float32)
    assert not any(isinstance(m, FP8Linear) for m in dequantized.modules())
    assert torch.equal(run(dequantized, inputs), run(fp8_32, inputs))


def test_quantize_while_loading_matches_quantizing_after(tmp_path, model):
    path = save_dit_native(tmp_path / "dit.safetensors", model, dtype=torch.bfloat16)
    after = quantize_dit_fp8(load_dit(path, dtype=torch.bfloat16), "channel").state_dict()
    during = load_dit(path, dtype=torch.bfloat16, fp8="channel").state_dict()
    assert during.keys() == after.keys()
    assert all(during[k].dtype == v.dtype and torch.equal(during[k].float(), v.float()) for k, v in after.items())


def test_quantize_while_loading_a_diffusers_folder(tmp_path):
    folder = save_diffusers_transformer(tmp_path, seed=5)  # fused q/k/v and swapped halves: quantized after fusing
    after = quantize_dit_fp8(load_dit(folder, dtype=torch.float32), "tensor").state_dict()
    during = load_dit(folder, dtype=torch.float32, fp8="tensor").state_dict()
    assert all(torch.equal(during[k].float(), v.float()) for k, v in after.items())
    with pytest.raises(CheckpointError, match="fp8='checkpoint' reads native or ComfyUI files"):
        load_dit(folder, fp8="checkpoint")


# ---------------------------------------------------------------------------------------------------------------
# Community fp8 files, written here in their published layouts (see mochi_preview/checkpoint.py for the format facts)


def e4m3_rounded(model, fp8_dtype=E4M3):
    """The model with the blocks' Linear weights and t5_yproj rounded to fp8 (scale 1): what a plain fp8 file holds."""
    out = copy.deepcopy(model)
    for name in [*block_linears(out), "t5_yproj"]:
        w = out.get_submodule(name).weight
        w.copy_(w.to(fp8_dtype).float())
    return out


def plain_state(rounded, fp8_dtype=E4M3):
    """Kijai / ComfyUI "fp8_e4m3fn": the native keys, fp8 weights stored without a scale (exact for `rounded`)."""
    fp8_names = {f"{n}.weight" for n in [*block_linears(rounded), "t5_yproj"]}
    return {k: v.to(fp8_dtype) if k in fp8_names else v for k, v in rounded.state_dict().items()}


def comfy_scaled_state(fp8_model, new_format=False):
    """ComfyUI fp8_scaled: `scale_weight` per layer, a `scaled_fp8` marker, unit `scale_input`s; or the newer
    per-layer format: `weight_scale`, `input_scale` and a `comfy_quant` JSON tag."""
    state = {}
    for k, v in fp8_model.state_dict().items():
        layer, _, part = k.rpartition(".")
        if part != "scale":
            state[k] = v
        elif new_format:
            tag = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
            state |= {f"{layer}.weight_scale": v, f"{layer}.input_scale": torch.ones(()), f"{layer}.comfy_quant": tag}
        else:
            state |= {f"{layer}.scale_weight": v, f"{layer}.scale_input": torch.ones(())}
    if not new_format:
        state["scaled_fp8"] = torch.empty(0, dtype=E4M3)
    return state


def write(path, state, prefix=False):
    save_file({("model.diffusion_model." if prefix else "") + k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("fmt", ["plain", "plain_e5m2", "scaled", "comfy_quant"])
def test_community_fp8_files_load_exactly(tmp_path, model, inputs, fmt, prefix):
    if fmt.startswith("plain"):
        fp8_dtype = E5M2 if fmt == "plain_e5m2" else E4M3
        source = e4m3_rounded(model, fp8_dtype)  # the model the file was made from: its values are exact in fp8
        state = plain_state(source, fp8_dtype)
    else:
        fp8_dtype, source = E4M3, fp8_copy(model, "tensor")
        state = comfy_scaled_state(source, new_format=fmt == "comfy_quant")
    path = write(tmp_path / "dit.safetensors", state, prefix)
    ref = run(source, inputs)
    # Dequantized to fp32: the same weights as the source, hence the same output.
    assert torch.equal(run(load_dit(path, dtype=torch.float32), inputs), ref)
    # Kept in fp8: the file's bytes and scales unchanged; outside the blocks (t5_yproj) dequantized.
    kept = load_dit(path, dtype=torch.float32, fp8="checkpoint")
    layer = kept.blocks[1].attn.qkv_x
    assert isinstance(layer, FP8Linear) and layer.weight.dtype == fp8_dtype and layer.scale.shape == ()
    assert kept.t5_yproj.weight.dtype == torch.float32
    assert torch.equal(run(kept, inputs), ref)


def test_scaled_fp8_requantized_per_channel(tmp_path, model, inputs):
    path = write(tmp_path / "dit.safetensors", comfy_scaled_state(fp8_copy(model, "tensor")))
    requantized = load_dit(path, dtype=torch.float32, fp8="channel")
    assert requantized.blocks[0].mod_x.scale.shape == (4 * CFG.dim_x, 1)
    assert rel(run(requantized, inputs), run(model, inputs)) < REL


def test_save_native_from_a_scaled_file_dequantizes(tmp_path, model, inputs):
    fp8 = fp8_copy(model, "tensor")
    path = write(tmp_path / "comfy.safetensors", comfy_scaled_state(fp8), prefix=True)
    native = save_dit_native(tmp_path / "dit.safetensors", path, dtype=torch.bfloat16)
    with safe_open(str(native), "pt") as f:
        assert not any("scale" in k for k in f.keys())
        assert f.get_tensor("blocks.0.mlp_x.w1.weight").dtype == torch.bfloat16
    assert rel(run(load_dit(native, dtype=torch.float32), inputs), run(fp8, inputs)) < 2e-2  # bf16 rounding


@pytest.fixture(scope="module")
def scaled_state(model):
    return comfy_scaled_state(fp8_copy(model, "tensor"))


def test_missing_scale_is_an_error(tmp_path, scaled_state):
    state = {k: v for k, v in scaled_state.items() if k != "blocks.0.attn.proj_x.scale_weight"}
    with pytest.raises(CheckpointError, match=r"1 fp8 tensors have none \(blocks\.0\.attn\.proj_x\.weight\)"):
        load_dit(write(tmp_path / "dit.safetensors", state))


def test_misshapen_scale_is_an_error(tmp_path, scaled_state):
    state = {**scaled_state, "blocks.1.mlp_x.w2.scale_weight": torch.ones(3)}
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.mlp_x\.w2\.scale_weight' has shape \(3,\)"):
        load_dit(write(tmp_path / "dit.safetensors", state))


def test_unsupported_fp8_format_is_named(tmp_path, scaled_state):
    fnuz = scaled_state["blocks.0.mod_y.weight"].float().to(torch.float8_e4m3fnuz)  # AMD's variant: other bits
    state = {**scaled_state, "blocks.0.mod_y.weight": fnuz}
    with pytest.raises(CheckpointError, match=r"F8_E4M3FNUZ; the supported fp8 formats are float8_e4m3fn"):
        load_dit(write(tmp_path / "dit.safetensors", state))
    tag = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match=r"names format 'nvfp4'"):
        load_dit(write(tmp_path / "q.safetensors", {**scaled_state, "blocks.0.mod_y.comfy_quant": tag}))


def test_unknown_keys_are_errors(tmp_path, scaled_state):
    state = {**scaled_state, "blocks.0.attn.extra": torch.zeros(2), "blocks.9.mod_x.scale_weight": torch.ones(())}
    with pytest.raises(CheckpointError, match=r"2 unexpected tensors \(blocks\.0\.attn\.extra, blocks\.9\.mod_x"):
        load_dit(write(tmp_path / "dit.safetensors", state))


def test_fp8_checkpoint_mode_needs_fp8_weights(tmp_path, model):
    path = save_dit_native(tmp_path / "dit.safetensors", model, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match="stores no fp8 block weights"):
        load_dit(path, fp8="checkpoint")
    with pytest.raises(ValueError, match="fp8 must be one of"):
        load_dit(path, fp8="e4m3")
    assert all(type(m) is not FP8Linear for m in load_dit(path).modules())
    assert type(load_dit(path).blocks[0].attn.qkv_x) is Linear


def test_fp8_reader_is_a_reader_like_the_file_reader(tmp_path, model, scaled_state):
    plain = open_checkpoint(write(tmp_path / "plain.safetensors", model.state_dict()))
    view = Fp8Reader(plain)
    assert isinstance(plain, CheckpointReader) and isinstance(view, CheckpointReader)
    assert view.keys() == plain.keys() and "t5_yproj.weight" in view
    for k in plain.keys():  # a file without fp8 tensors passes through unchanged
        assert view.shape(k) == plain.shape(k) and view.dtype(k) == plain.dtype(k) == torch.float32
        assert torch.equal(view.read(k, torch.bfloat16), plain.read(k, torch.bfloat16))
    comfy = write(tmp_path / "scaled.safetensors", scaled_state, prefix=True)
    stored = open_checkpoint(comfy, prefixes=["model.diffusion_model."])
    view, w = Fp8Reader(stored), "blocks.0.attn.qkv_x.weight"
    assert set(view.keys()) == set(model.state_dict())  # scales, activation scales and the marker hidden
    assert "blocks.0.attn.qkv_x.scale_weight" in stored and "blocks.0.attn.qkv_x.scale_weight" not in view
    assert stored.dtype(w) == E4M3 and view.dtype(w) == view.read(w).dtype == torch.float32
    assert view.shape(w) == stored.shape(w) and view.raw(w).dtype == E4M3
    assert torch.equal(view.read(w), view.raw(w).float() * stored.read("blocks.0.attn.qkv_x.scale_weight"))


@pytest.mark.parametrize("fp8", ["channel", "checkpoint"])
def test_keep_block_leaves_fp8_placeholders_of_the_right_kind(tmp_path, model, scaled_state, fp8):
    path = write(tmp_path / "dit.safetensors", scaled_state)
    full = load_dit(path, dtype=torch.bfloat16, fp8=fp8).state_dict()
    part = load_dit(path, dtype=torch.bfloat16, fp8=fp8, keep_block=lambda i: i == 1).state_dict()
    assert part["blocks.0.mlp_x.w1.weight"].dtype == E4M3 and part["blocks.0.mlp_x.w1.scale"].dtype == torch.float32
    for key, tensor in part.items():
        assert tensor.shape == full[key].shape and tensor.dtype == full[key].dtype, key
        assert tensor.is_meta if key.startswith("blocks.0.") else torch.equal(tensor, full[key])
