"""Loading DiT checkpoints in every layout, and the errors for files that cannot be loaded."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dit_fixtures import save_diffusers_transformer, text_inputs
from safetensors import safe_open
from safetensors.torch import save_file

import mochi_preview.dit.layout as dit_layout
from mochi_preview import configs, load_dit
from mochi_preview.checkpoint import CheckpointError, CheckpointReader
from mochi_preview.dit import save_dit_native


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    folder = save_diffusers_transformer(root, seed=11)
    return save_dit_native(root / "dit.safetensors", folder)


@pytest.fixture(scope="module")
def state(native):
    with safe_open(str(native), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def outputs(model):
    feats, mask = text_inputs(1)
    with torch.no_grad():
        return model(torch.ones(1, 12, 2, 4, 4), 0.5, feats, mask)


def test_comfyui_prefix_and_model_folder(tmp_path, native, state):
    reference = outputs(load_dit(native, dtype=torch.float32))
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, str(tmp_path / "comfy.safetensors"))
    torch.testing.assert_close(outputs(load_dit(tmp_path / "comfy.safetensors", dtype=torch.float32)), reference)
    # A model folder holding dit.safetensors resolves to it.
    assert torch.equal(outputs(load_dit(native.parent, dtype=torch.float32)), reference)


def test_sharded_diffusers_folder(tmp_path, native):
    folder = save_diffusers_transformer(tmp_path, seed=11, max_shard_size="1MB")
    assert len(list(folder.glob("*.safetensors"))) > 1 and list(folder.glob("*.index.json"))
    sharded = load_dit(tmp_path, dtype=torch.float32).state_dict()
    single = load_dit(native, dtype=torch.float32).state_dict()
    assert sharded.keys() == single.keys() and all(torch.equal(sharded[k], single[k]) for k in single)


def test_bf16_file_and_dtype_policy(tmp_path, native):
    bf16 = save_dit_native(tmp_path / "dit_bf16.safetensors", native, dtype=torch.bfloat16)
    with safe_open(str(bf16), "pt") as f:
        assert f.get_tensor("blocks.0.mlp_x.w1.weight").dtype == torch.bfloat16
        assert f.get_tensor("pos_frequencies").dtype == torch.float32
        assert f.get_tensor("blocks.1.attn.k_norm_y.weight").dtype == torch.float32
    model = load_dit(bf16, dtype=torch.float32)
    assert model.blocks[0].mlp_x.w1.weight.dtype == torch.float32
    ref = outputs(load_dit(native, dtype=torch.float32))
    assert float((outputs(model) - ref).abs().max() / ref.abs().max()) < 2e-2


def test_missing_tensors_are_named(tmp_path, state):
    broken = {k: v for k, v in state.items() if not k.startswith("blocks.1.mlp_x")}
    save_file(broken, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match=r"2 missing tensors \(blocks\.1\.mlp_x\.w1\.weight"):
        load_dit(tmp_path / "dit.safetensors")


def test_unexpected_tensors_are_named(tmp_path, state):
    save_file({**state, "extra.thing": torch.zeros(2)}, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 unexpected tensors \(extra\.thing\)"):
        load_dit(tmp_path / "dit.safetensors")


def test_shape_mismatch_names_tensor_and_shapes(tmp_path, state):
    bad = dict(state)
    bad["blocks.1.attn.proj_x.bias"] = torch.zeros(100)
    save_file(bad, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.attn\.proj_x\.bias' has shape \(100,\).*\(256,\)"):
        load_dit(tmp_path / "dit.safetensors")


def test_truncated_file(tmp_path, native):
    data = native.read_bytes()
    (tmp_path / "dit.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_dit(tmp_path / "dit.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_or_inf_is_named_with_file_and_tensor_while_loading(tmp_path, state, dtype):
    """A corrupt tensor stops the load (before any sampling), in a fp32 or bf16 file, far from a chunk's start."""
    bad = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    weight = bad["final_layer.linear.weight"].clone()
    weight.view(-1)[-1] = float("nan")
    bad["final_layer.linear.weight"] = weight
    bad["blocks.0.mlp_x.w1.weight"] = (
        bad["blocks.0.mlp_x.w1.weight"].clone().index_fill_(0, torch.tensor([2]), float("-inf"))
    )
    save_file(bad, str(tmp_path / "dit.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"dit\.safetensors: tensor '(final_layer\.linear\.weight|blocks\.0\.mlp_x\.w1\.weight)' holds",
    ):
        load_dit(tmp_path, dtype=torch.bfloat16)
    del bad["blocks.0.mlp_x.w1.weight"]
    reader = dit_layout.open_checkpoint(_save_partial(tmp_path, bad))
    with pytest.raises(CheckpointError, match=r"'final_layer\.linear\.weight' holds 1 NaN and 0 Inf values"):
        reader.read("final_layer.linear.weight")
    assert reader.read("blocks.0.mlp_x.w2.weight").isfinite().all()


def test_nan_check_spans_chunks(tmp_path, monkeypatch):
    """The check runs chunk by chunk as the data is copied: a NaN in the last of several chunks is found."""
    from mochi_preview import checkpoint

    monkeypatch.setattr(checkpoint, "CHUNK", 7)
    t = torch.arange(50, dtype=torch.float32)
    save_file(
        {"ok": t, "bad": t.clone().index_fill_(0, torch.tensor([48]), float("inf"))}, str(tmp_path / "x.safetensors")
    )
    reader = checkpoint.open_checkpoint(tmp_path / "x.safetensors")
    assert torch.equal(reader.read("ok", torch.bfloat16), t.bfloat16())
    with pytest.raises(CheckpointError, match=r"'bad' holds 0 NaN and 1 Inf"):
        reader.read("bad")


def _save_partial(tmp_path, state):
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    return path


def test_pickle_is_refused(tmp_path, state):
    torch.save(state, tmp_path / "dit.pt")
    with pytest.raises(CheckpointError, match="pickle.*refused"):
        load_dit(tmp_path / "dit.pt")
    # Even when it is named like a safetensors file.
    (tmp_path / "dit.safetensors").write_bytes((tmp_path / "dit.pt").read_bytes())
    with pytest.raises(CheckpointError, match="pickle.*refused"):
        load_dit(tmp_path / "dit.safetensors")


def test_folder_without_dit(tmp_path):
    with pytest.raises(CheckpointError, match="expected dit.safetensors"):
        load_dit(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_dit(tmp_path / "nope.safetensors")


def test_not_a_dit(tmp_path):
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="does not look like a Mochi DiT"):
        load_dit(tmp_path / "x.safetensors")


class CountingReader(CheckpointReader):
    """Another reader's tensors, recording which keys are read."""

    def __init__(self, inner: CheckpointReader):
        self.inner, self.reads = inner, []

    def keys(self):
        return self.inner.keys()

    def __contains__(self, key):
        return key in self.inner

    def shape(self, key):
        return self.inner.shape(key)

    def dtype(self, key):
        return self.inner.dtype(key)

    def read(self, key, dtype=None):
        self.reads.append(key)
        return self.inner.read(key, dtype)


@pytest.fixture
def counting(monkeypatch):
    """The readers load_dit opens from now on, each wrapped in a CountingReader."""
    opened, real_open = [], dit_layout.open_dit_checkpoint

    def open_counting(path):
        reader, layout, name = real_open(path)
        opened.append(CountingReader(reader))
        return opened[-1], layout, name

    monkeypatch.setattr(dit_layout, "open_dit_checkpoint", open_counting)
    return opened


def test_keep_block_never_reads_the_other_blocks(native, counting):
    full = load_dit(native).state_dict()
    counting.clear()
    part = load_dit(native, keep_block=lambda i: i == 1).state_dict()
    (reader,) = counting
    assert any(k.startswith("blocks.1.") for k in reader.reads) and "t5_yproj.weight" in reader.reads
    assert not any(k.startswith(("blocks.0.", "blocks.2.")) for k in reader.reads)
    assert part.keys() == full.keys()
    for key, tensor in part.items():
        assert tensor.shape == full[key].shape and tensor.dtype == full[key].dtype, key  # fp32 QK norms included
        assert tensor.is_meta if key.startswith(("blocks.0.", "blocks.2.")) else torch.equal(tensor, full[key])


def test_keep_block_still_checks_the_whole_file(tmp_path, state):
    save_file({**state, "blocks.0.extra": torch.zeros(2)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 unexpected tensors \(blocks\.0\.extra\)"):
        load_dit(tmp_path / "extra.safetensors", keep_block=lambda i: i == 1)
    save_file({k: v for k, v in state.items() if k != "blocks.2.mlp_x.w2.weight"}, str(tmp_path / "less.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing tensors \(blocks\.2\.mlp_x\.w2\.weight\)"):
        load_dit(tmp_path / "less.safetensors", keep_block=lambda i: i == 1)


def test_published_depth_and_widths_with_other_sizes_are_refused(monkeypatch, native):
    """A checkpoint with the published model's depth and widths must be that model: pretend this one's are."""
    cfg = load_dit(native, dtype=torch.float32).cfg
    published = dataclasses.replace(cfg, timestep_freq_dim=2 * cfg.timestep_freq_dim)
    entry = dataclasses.replace(configs.CONFIGS[configs.PUBLISHED], dit=published)
    monkeypatch.setitem(configs.CONFIGS, configs.PUBLISHED, entry)
    with pytest.raises(CheckpointError, match=r"of 'mochi-1-preview' but differs in timestep_freq_dim=256"):
        load_dit(native)


def test_fp16_values_whose_sum_overflows_are_not_mistaken_for_inf(tmp_path):
    from mochi_preview import checkpoint

    big = torch.full((4096,), 60000.0, dtype=torch.float16)  # finite, but their fp16 sum is inf
    save_file({"big": big}, str(tmp_path / "x.safetensors"))
    assert torch.equal(checkpoint.open_checkpoint(tmp_path / "x.safetensors").read("big"), big)
