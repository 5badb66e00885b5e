"""LoRAs: the three file formats, merged and live application, fuse/unfuse, fp8, offload, and the bad inputs.

Every file here is written by the test itself from one set of random A/B matrices, in each format's own layout.
Tolerances: fp32 merged weights agree to a few ulps of the weights (the update is one fp32 matmul, computed in a
different order per format); fp32 outputs of merged vs live DiTs agree to 1e-5 relative (the same products
summed in another order through 3 blocks); bf16 comparisons are avoided where bitwise answers exist.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from dit_fixtures import save_diffusers_transformer, text_inputs
from safetensors.torch import save_file

from mochi_preview import load_dit
from mochi_preview.checkpoint import CheckpointError
from mochi_preview.dit.fp8 import quantize_dit_fp8
from mochi_preview.lora import TARGETS as ALL_TARGETS
from mochi_preview.lora import (
    LoraError,
    LoraMixin,
    LoraSet,
    check_lora_file,
    check_strength,
    load_lora,
    parse_lora_arg,
    read_lora,
    save_lora_diffusers,
    save_lora_native,
)

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK
TARGETS = ("qkv_x", "qkv_y", "proj_x", "proj_y")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A diffusers folder and the DiT loaded from it (3 blocks, the last without proj_y)."""
    root = tmp_path_factory.mktemp("lora_dit")
    folder = save_diffusers_transformer(root)
    return folder, load_dit(folder, dtype=torch.float32)


def fresh(base) -> torch.nn.Module:
    return load_dit(base[0], dtype=torch.float32)


@pytest.fixture(scope="module")
def pairs(base):
    """Native layer -> (A (r, in), B (out, r)), random, for Genmo's four targets."""
    dit = base[1]
    g = torch.Generator().manual_seed(3)
    out = {}
    for i, block in enumerate(dit.blocks):
        for t in TARGETS:
            layer = getattr(block.attn, t)
            if layer is None:
                continue
            out[f"blocks.{i}.attn.{t}"] = (
                torch.randn(RANK, layer.in_features, generator=g) * 0.1,
                torch.randn(layer.out_features, RANK, generator=g) * 0.1,
            )
    return out


def write_genmo(path: Path, pairs, with_mask: bool = True) -> Path:
    tensors = {f"{n}.lora_{p}": t for n, (A, B) in pairs.items() for p, t in (("A", A), ("B", B))}
    if with_mask:  # files from before Genmo's commit 519c424
        tensors["blocks.0.attn.qkv_proj_lora_mask"] = torch.ones(3)
    kwargs = {f"{k}_lora_{p}": v for k in ("qkv_proj", "out_proj") for p, v in (("rank", RANK), ("alpha", ALPHA))}
    save_file(tensors, str(path), metadata={"kwargs": json.dumps(kwargs)})
    return path


def write_comfy(path: Path, pairs) -> Path:
    tensors = {}
    for n, (A, B) in pairs.items():
        tensors |= {f"{n}.lora_A": A, f"{n}.lora_B": B, f"{n}.alpha": torch.tensor(ALPHA)}
    save_file(tensors, str(path))
    return path


def write_diffusers(path: Path, pairs, metadata: bool = True, alpha: float = ALPHA) -> Path:
    names = {
        "qkv_x": ("to_q", "to_k", "to_v"),
        "qkv_y": ("add_q_proj", "add_k_proj", "add_v_proj"),
        "proj_x": ("to_out.0",),
        "proj_y": ("to_add_out",),
    }
    tensors = {}
    for n, (A, B) in pairs.items():
        i, t = n.split(".")[1], n.split(".")[-1]
        for j, d in enumerate(names[t]):
            rows = B.shape[0] // len(names[t])
            key = f"transformer.transformer_blocks.{i}.attn1.{d}"
            tensors |= {
                f"{key}.lora_A.weight": A.clone(),
                f"{key}.lora_B.weight": B[j * rows : (j + 1) * rows].contiguous(),
            }
    meta = {"format": "pt"}
    if metadata:
        targets = sorted(d for ds in names.values() for d in ds)
        config = {"r": RANK, "lora_alpha": alpha, "target_modules": targets}
        meta["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in config.items()})
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, pairs):
    root = tmp_path_factory.mktemp("lora_files")
    return {
        "genmo": write_genmo(root / "genmo.safetensors", pairs),
        "comfyui": write_comfy(root / "comfy.safetensors", pairs),
        "diffusers": write_diffusers(root / "pytorch_lora_weights.safetensors", pairs),
        "ours": save_lora_native(root / "ours.safetensors", pairs, RANK, ALPHA),
        "ours_diffusers": save_lora_diffusers(root / "ours_diffusers.safetensors", pairs, RANK, ALPHA),
    }


# ---- formats and merging ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["genmo", "comfyui", "diffusers", "ours", "ours_diffusers"])
def test_every_format_merges_to_w_plus_scaled_ba(base, pairs, files, name):
    expected_format = {"ours": "genmo", "ours_diffusers": "diffusers"}.get(name, name)
    assert read_lora(files[name], base[1]).format == expected_format
    dit = load_lora(fresh(base), files[name], strength=0.7)
    reference = base[1].state_dict()
    for key, w in dit.state_dict().items():
        layer = key.removesuffix(".weight")
        if layer in pairs:  # computed independently of lora.py: W + strength * alpha/r * B @ A, in float64
            A, B = pairs[layer]
            want = (reference[key].double() + 0.7 * SCALE * (B.double() @ A.double())).float()
            assert (w - want).abs().max() <= 4 * torch.finfo(torch.float32).eps * want.abs().max(), key
        else:
            assert torch.equal(w, reference[key]), key  # nothing else is touched


def test_formats_give_the_same_weights(base, files):
    merged = {name: load_lora(fresh(base), path).state_dict() for name, path in files.items()}
    for name in ("comfyui", "ours"):  # the same update, the same arithmetic: bit for bit
        assert all(torch.equal(merged[name][k], merged["genmo"][k]) for k in merged["genmo"])
    for name in ("diffusers", "ours_diffusers"):
        assert all(torch.equal(merged[name][k], merged["genmo"][k]) for k in merged["genmo"]), name


def test_diffusers_without_metadata_means_alpha_equals_rank(base, pairs, tmp_path):
    path = write_diffusers(tmp_path / "old_trainer.safetensors", pairs, metadata=False)
    lora = read_lora(path, base[1])
    assert {layer.scale for layer in lora.layers.values()} == {1.0}


def test_diffusers_visual_stream_only_and_separate_qkv_ranks(base, pairs, tmp_path):
    """Trainers of the diffusers format often train only to_q/to_k/to_v/to_out.0, and q, k, v need not share A."""
    g = torch.Generator().manual_seed(5)
    tensors, want = {}, {}
    dim = base[1].cfg.dim_x
    for d, r in (("to_q", 2), ("to_v", 3)):
        A, B = torch.randn(r, dim, generator=g), torch.randn(dim, r, generator=g)
        tensors |= {f"transformer.transformer_blocks.1.attn1.{d}.lora_A.weight": A}
        tensors |= {f"transformer.transformer_blocks.1.attn1.{d}.lora_B.weight": B}
        want[d] = B @ A  # alpha = r without metadata
    save_file(tensors, str(tmp_path / "visual.safetensors"))
    dit = load_lora(fresh(base), tmp_path / "visual.safetensors")
    delta = dit.blocks[1].attn.qkv_x.weight - base[1].blocks[1].attn.qkv_x.weight
    assert torch.allclose(delta[:dim], want["to_q"], atol=1e-5)
    assert torch.equal(delta[dim : 2 * dim], torch.zeros(dim, dim))  # k untouched
    assert torch.allclose(delta[2 * dim :], want["to_v"], atol=1e-5)


def test_strength_zero_is_no_lora(base, files):
    assert all(torch.equal(a, b) for a, b in zip(load_lora(fresh(base), files["genmo"], 0.0).state_dict().values(),
                                                 base[1].state_dict().values()))  # fmt: skip
    dit = fresh(base)
    loras = LoraSet(dit)
    loras.load(files["diffusers"], strength=0.0)
    x, s, f, m = inputs()
    with torch.no_grad():
        assert torch.equal(dit(x, s, f, m), base[1](x, s, f, m))


def inputs():
    torch.manual_seed(0)
    return torch.randn(2, 12, 3, 4, 6), torch.tensor([0.6, 0.3]), *text_inputs(2)


# ---- live ----------------------------------------------------------------------------------------------------


def test_merged_equals_live(base, files):
    x, s, f, m = inputs()
    merged = load_lora(load_lora(fresh(base), files["genmo"], 0.8), files["diffusers"], -0.5)
    live = fresh(base)
    loras = LoraSet(live)
    loras.load(files["genmo"], "a", 0.8)
    loras.load(files["diffusers"], "b", -0.5)
    assert set(live.state_dict()) == set(base[1].state_dict())  # live tensors are not part of the checkpoint
    with torch.no_grad():
        want, got, plain = merged(x, s, f, m), live(x, s, f, m), base[1](x, s, f, m)
    assert rel_err(want, plain) > 1e-2  # the LoRAs change the output...
    assert rel_err(got, want) <= 1e-5  # ...and live equals merged (fp32)


def test_switching_adapters_between_generations(base, files):
    x, s, f, m = inputs()
    live = fresh(base)
    loras = LoraSet(live)
    loras.load(files["genmo"], "a")
    loras.load(files["comfyui"], "b")
    with torch.no_grad():
        loras.set_adapters("a", 0.5)
        only_a = live(x, s, f, m)
        loras.set_adapters(["a", "b"], [0.0, 0.0])
        assert torch.equal(live(x, s, f, m), base[1](x, s, f, m))
        loras.set_adapters(["b"], [0.5])
        assert torch.equal(live(x, s, f, m), only_a)  # b is the same LoRA in ComfyUI's layout
    with pytest.raises(ValueError, match="unknown adapter"):
        loras.set_adapters("c")
    with pytest.raises(ValueError, match="finite"):
        loras.set_adapters("a", float("inf"))
    loras.unload()
    assert not any(hasattr(mod, "lora_scales") for mod in live.modules())
    with torch.no_grad():
        assert torch.equal(live(x, s, f, m), base[1](x, s, f, m))


def test_fuse_then_unfuse_restores_the_bf16_weights_exactly(base, files):
    x, s, f, m = inputs()
    dit = load_dit(base[0], dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    pipe = type("Pipe", (LoraMixin,), {})()
    pipe.dit = dit
    pipe.load_lora_weights(files["genmo"], strength=0.9)
    with torch.no_grad():
        live = dit(x, s, f, m)
        pipe.fuse_lora()
        fused = dit(x, s, f, m)
        assert not torch.equal(dit.blocks[0].attn.qkv_x.weight, before["blocks.0.attn.qkv_x.weight"])
        assert rel_err(fused, live) <= 2e-2  # bf16 weights: the merged update is rounded once more
        pipe.unfuse_lora()
        assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())  # bit for bit
        assert torch.equal(dit(x, s, f, m), live)  # back to live
    pipe.unload_lora_weights()
    assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())


def test_record_for_the_sidecar(base, files):
    pipe = type("Pipe", (LoraMixin,), {})()
    pipe.dit = fresh(base)
    name = pipe.load_lora_weights(files["diffusers"], strength=0.25)
    (entry,) = pipe.lora_record()
    path = files["diffusers"]
    assert entry == {
        "adapter": name,
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "format": "diffusers",
        "strength": 0.25,
        "fused": False,
    }


def test_fp8_weights_take_loras_live_only(base, files):
    x, s, f, m = inputs()
    fp8 = quantize_dit_fp8(fresh(base))
    # The same fp8 values, dequantized into a plain fp32 DiT: the reference to merge into.
    plain = fresh(base)
    with torch.no_grad():
        for name, module in fp8.named_modules():
            if hasattr(module, "dequantized"):
                plain.get_submodule(name).weight.copy_(module.dequantized(torch.float32))
    with pytest.raises(LoraError, match="fp8"):
        load_lora(fp8, files["genmo"])
    loras = LoraSet(fp8)
    loras.load(files["genmo"], strength=0.6)
    with pytest.raises(LoraError, match="fp8"):
        loras.fuse()
    with torch.no_grad():
        assert rel_err(fp8(x, s, f, m), load_lora(plain, files["genmo"], 0.6)(x, s, f, m)) <= 1e-5


# ---- the oracle: diffusers + peft -------------------------------------------------------------------------------


def test_peft_oracle_gives_the_same_velocity(base, files):
    pytest.importorskip("peft")
    from dit_fixtures import diffusers_transformer

    x, s, f, m = inputs()
    from diffusers.loaders.lora_pipeline import Mochi1LoraLoaderMixin

    # What diffusers' MochiPipeline.load_lora_weights does: read the file with its adapter metadata, then peft.
    state, metadata = Mochi1LoraLoaderMixin.lora_state_dict(str(files["diffusers"]), return_lora_metadata=True)
    assert metadata["transformer.lora_alpha"] == ALPHA
    oracle = diffusers_transformer()
    oracle.load_lora_adapter(state, prefix="transformer", metadata=metadata, adapter_name="x")
    with torch.no_grad():
        want = oracle(x, f, 1000.0 * (1.0 - s), m.long(), return_dict=False)[0]
        for name in ("diffusers", "genmo"):
            got = load_lora(fresh(base), files[name])(x, s, f, m)
            assert rel_err(got, want) <= 1e-5, name
    assert rel_err(want, base[1](x, s, f, m)) > 1e-2  # peft did apply it


def test_every_trainable_layer_written_in_diffusers_form_is_read_by_peft_as_ours(base, tmp_path):
    """Modulation and MLP LoRAs (the demo proof's mod_x/mod_y; w1's halves swapped; the last block's mod_y is
    diffusers' norm1_context.linear_1): the diffusers file, loaded by diffusers + peft, moves the oracle's velocity
    exactly as the native file moves ours."""
    pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import Mochi1LoraLoaderMixin
    from dit_fixtures import diffusers_transformer

    dit, g = base[1], torch.Generator().manual_seed(11)
    layers = {}
    for i, block in enumerate(dit.blocks):
        for t in ALL_TARGETS:
            path = f"attn.{t}" if t in TARGETS else t
            layer = _linear_or_none(block, path)
            if layer is not None:
                layers[f"blocks.{i}.{path}"] = (torch.randn(RANK, layer.in_features, generator=g) * 0.1,
                                                torch.randn(layer.out_features, RANK, generator=g) * 0.1)  # fmt: skip
    assert f"blocks.{len(dit.blocks) - 1}.mod_y" in layers and "blocks.0.mlp_y.w1" in layers
    native = save_lora_native(tmp_path / "all.safetensors", layers, RANK, ALPHA)
    peft_file = save_lora_diffusers(tmp_path / "all_peft.safetensors", layers, RANK, ALPHA, len(dit.blocks) - 1)
    with pytest.raises(ValueError, match="last_block"):
        save_lora_diffusers(tmp_path / "no.safetensors", layers, RANK, ALPHA)
    x, s, f, m = inputs()
    state, metadata = Mochi1LoraLoaderMixin.lora_state_dict(str(peft_file), return_lora_metadata=True)
    oracle = diffusers_transformer()
    oracle.load_lora_adapter(state, prefix="transformer", metadata=metadata, adapter_name="x")
    with torch.no_grad():
        want = oracle(x, f, 1000.0 * (1.0 - s), m.long(), return_dict=False)[0]
        for path in (native, peft_file):
            assert rel_err(load_lora(fresh(base), path)(x, s, f, m), want) <= 1e-5, path.name
    assert rel_err(want, base[1](x, s, f, m)) > 1e-2  # peft did apply it


def _linear_or_none(block, path: str):
    """The block's Linear at `path`, or None (the last block has no proj_y nor mlp_y)."""
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


# ---- bad input ------------------------------------------------------------------------------------------------


def test_bad_files_fail_clearly_and_change_nothing(base, pairs, files, tmp_path):
    dit = fresh(base)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    torch.save({"blocks.0.attn.qkv_x.lora_A": torch.zeros(1)}, tmp_path / "lora.pt")
    for check in (lambda p: load_lora(dit, p), check_lora_file):  # the CLI's check runs before any weights load
        with pytest.raises(CheckpointError, match="pickle"):
            check(tmp_path / "lora.pt")
    with pytest.raises(CheckpointError, match="not found"):
        check_lora_file(tmp_path / "missing.safetensors")
    assert check_lora_file(files["diffusers"]) == "diffusers"

    big = {"blocks.0.attn.qkv_x": (torch.zeros(RANK, 3072), torch.zeros(9216, RANK))}  # the published size
    with pytest.raises(LoraError, match=r"blocks\.0\.attn\.qkv_x.*\(9216, 3072\).*\(768, 256\)"):
        load_lora(dit, write_genmo(tmp_path / "big.safetensors", big))

    save_file({"lora_unet_blocks_0_attn_qkv_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "k.safetensors"))
    for check in (lambda p: load_lora(dit, p), check_lora_file):
        with pytest.raises(LoraError, match="unknown LoRA key layout.*Genmo.*diffusers.*ComfyUI"):
            check(tmp_path / "k.safetensors")

    odd = {**pairs, "blocks.0.attn.q_norm_x": (torch.zeros(RANK, 128), torch.zeros(128, RANK))}
    with pytest.raises(LoraError, match=r"unknown LoRA key 'blocks\.0\.attn\.q_norm_x\.lora_A'"):
        load_lora(dit, write_genmo(tmp_path / "odd.safetensors", odd))

    A, B = pairs["blocks.1.attn.proj_x"]
    ranks = {**pairs, "blocks.1.attn.proj_x": (A, B[:, :2].contiguous())}
    with pytest.raises(LoraError, match=r"rank mismatch.*blocks\.1\.attn\.proj_x"):
        load_lora(dit, write_genmo(tmp_path / "ranks.safetensors", ranks))

    A, B = pairs["blocks.2.attn.qkv_y"]
    nan = {**pairs, "blocks.2.attn.qkv_y": (A, torch.where(B > 0.1, math.nan, B))}
    with pytest.raises(ValueError, match=r"'blocks\.2\.attn\.qkv_y\.lora_B' holds .*NaN"):  # the reader's check
        load_lora(dit, write_genmo(tmp_path / "nan.safetensors", nan))

    with pytest.raises(ValueError, match="strength must be a finite number"):
        load_lora(dit, files["genmo"], strength=float("nan"))
    assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())


def test_strength_and_cli_argument():
    assert parse_lora_arg("my.safetensors") == (Path("my.safetensors"), 1.0)
    assert parse_lora_arg("dir/my.safetensors:0.5") == (Path("dir/my.safetensors"), 0.5)
    assert parse_lora_arg("C:\\loras\\x.safetensors") == (Path("C:\\loras\\x.safetensors"), 1.0)
    with pytest.raises(ValueError, match="finite"):
        parse_lora_arg("x.safetensors:inf")
    for bad in (None, "a", True, math.inf):
        with pytest.raises(ValueError, match="finite number"):
            check_strength(bad)


# ---- offload ----------------------------------------------------------------------------------------------------


def test_live_lora_tensors_move_with_their_layer_under_offload(tmp_path):
    from model_folders import save_native_model

    from mochi_preview.offload import GIB, Ledger, LedgerMover
    from mochi_preview.pipeline import MochiPipeline

    folder = save_native_model(tmp_path / "model")
    ledger = Ledger()
    pipe = MochiPipeline.from_pretrained(
        folder, torch_dtype=torch.float32, device="cpu", mover=LedgerMover(GIB, ledger)
    )
    g = torch.Generator().manual_seed(1)
    layer = pipe.dit.blocks[1].attn.qkv_x
    pairs = {"blocks.1.attn.qkv_x": (torch.randn(2, layer.in_features, generator=g),
                                     torch.randn(layer.out_features, 2, generator=g))}  # fmt: skip
    path = save_lora_native(tmp_path / "l.safetensors", pairs, 2, 2.0)
    size = dict(height=32, width=48, num_frames=7, num_inference_steps=2, progress=False, output_type="latent")
    for mode in ("model", "sequential"):
        pipe.set_memory_mode(mode)
        plain = pipe("a cat", seed=1, **size).frames
        pipe.load_lora_weights(path)
        master = layer.lora_A_default_0.data_ptr()
        seen = []
        hook = layer.register_forward_hook(lambda mod, *_, seen=seen: seen.append(mod.lora_A_default_0.data_ptr()))
        with_lora = pipe("a cat", seed=1, **size).frames
        hook.remove()
        assert seen and master not in seen  # during the DiT stage the layer computed with "device" copies
        assert layer.lora_A_default_0.data_ptr() == master and ledger.live == 0  # and nothing stays behind
        assert not torch.equal(with_lora, plain)
        pipe.set_adapters("default_0", 0.0)
        assert torch.equal(pipe("a cat", seed=1, **size).frames, plain)
        pipe.unload_lora_weights()


# ---- training ---------------------------------------------------------------------------------------------------


def tiny_data():
    from mochi_preview.train import LatentData

    g = torch.Generator().manual_seed(4)
    feats, mask = text_inputs(4)
    return LatentData(torch.randn(4, 12, 2, 4, 4, generator=g), feats, mask)


def lora_config(**kw):
    from mochi_preview.train.lora import LoraTrainConfig

    return LoraTrainConfig(**{"steps": 4, "batch_size": 2, "rank": 2, "alpha": 6.0, "threads": 1, "warmup": 1, **kw})


def test_trained_lora_is_written_in_genmo_format_and_reads_back(base, tmp_path):
    from mochi_preview.train.lora import LoraTrainer

    trainer = LoraTrainer(fresh(base), tiny_data(), lora_config())
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == {
        f"{n}.lora_{p}_train" for n in trainer.layers for p in "AB"
    }  # only the LoRA trains
    trainer.fit(progress=False)
    native = trainer.export(tmp_path / "t.safetensors", diffusers=tmp_path / "t_diffusers.safetensors")
    trained = trainer.lora()
    assert all(B.abs().max() > 0 for _, B in trained.values())  # B starts at zero and has moved
    lora = read_lora(native, base[1])
    assert lora.format == "genmo" and set(lora.layers) == set(trained)
    assert all(layer.scale == 3.0 and torch.equal(layer.A, trained[n][0]) for n, layer in lora.layers.items())
    x, s, f, m = inputs()
    with torch.no_grad():
        want = trainer.model(x, s, f, m)  # the trainer's DiT, its LoRA live
        for path in (native, tmp_path / "t_diffusers.safetensors"):
            assert rel_err(load_lora(fresh(base), path)(x, s, f, m), want) <= 1e-5


def test_lora_training_resumes_exactly(base, tmp_path):
    from mochi_preview.train.lora import LoraTrainer

    straight = LoraTrainer(fresh(base), tiny_data(), lora_config())
    straight.fit(progress=False)
    LoraTrainer(fresh(base), tiny_data(), lora_config()).fit(until=2, checkpoint=tmp_path / "ck", progress=False)
    resumed = LoraTrainer(fresh(base), tiny_data(), lora_config())
    resumed.fit(checkpoint=tmp_path / "ck", progress=False)  # picks up at step 2
    assert resumed.history[-1]["step"] == 4
    for n, (A, B) in straight.lora().items():
        assert torch.equal(resumed.lora()[n][0], A) and torch.equal(resumed.lora()[n][1], B)


def test_lora_training_settings_are_checked(base):
    from mochi_preview.train.lora import LoraTrainer

    with pytest.raises(ValueError, match="LoRA targets must be among"):
        LoraTrainer(fresh(base), tiny_data(), lora_config(targets=("mlp_x",)))


def test_modulation_and_mlp_targets_train_and_read_back(base, tmp_path):
    from mochi_preview.train.lora import LoraTrainer

    cfg = lora_config(targets=("qkv_y", "mod_x", "mod_y", "mlp_x.w2", "mlp_y.w1"))
    trainer = LoraTrainer(fresh(base), tiny_data(), cfg)
    depth = len(base[1].blocks)
    names = set(trainer.layers)
    assert {f"blocks.{i}.mod_x" for i in range(depth)} <= names and "blocks.0.attn.qkv_y" in names
    assert f"blocks.{depth - 1}.mlp_y.w1" not in names and "blocks.0.mlp_y.w1" in names  # the last block has none
    trainer.fit(progress=False)
    native = trainer.export(tmp_path / "mod.safetensors")
    assert set(read_lora(native, base[1]).layers) == names
    x, s, f, m = inputs()
    with torch.no_grad():
        want = trainer.model(x, s, f, m)
        assert rel_err(load_lora(fresh(base), native)(x, s, f, m), want) <= 1e-5
        assert rel_err(want, base[1](x, s, f, m)) > 1e-4  # the modulation LoRA does change the output
    trainer.export(tmp_path / "mod2.safetensors", diffusers=tmp_path / "mod_d.safetensors")  # every target
    assert set(read_lora(tmp_path / "mod_d.safetensors", base[1]).layers) == names
    with torch.no_grad():
        assert rel_err(load_lora(fresh(base), tmp_path / "mod_d.safetensors")(x, s, f, m), want) <= 1e-5


# ---- the demo proof ---------------------------------------------------------------------------------------------


def test_lime_is_rendered_seen_and_captioned_as_a_new_colour():
    import numpy as np

    from mochi_preview.demo.evaluate import ALL_HUES, observe
    from mochi_preview.demo.world import COLOURS, NEW_COLOURS, to_frames
    from mochi_preview.train.lora import concept_prompts, demo_clips, shows

    assert set(NEW_COLOURS).isdisjoint(COLOURS)
    videos, captions, attrs = demo_clips(24, seed=1, concept="lime", share=0.5)
    lime = [a.colour == "lime" for a in attrs]
    assert 0 < sum(lime) < len(attrs)  # both the concept and the demo's own clips
    for video, text, a in zip(videos, captions, attrs):
        seen = observe(to_frames(video), hues=ALL_HUES)
        assert seen.colour == a.colour and ("lime" in text.lower()) == (a.colour == "lime")
        assert shows("lime", seen) == (a.colour == "lime")
        assert observe(to_frames(video)).colour != "lime"  # the default palette stays the demo's seven
    prompts = concept_prompts("lime", seed=0)
    combos = {a for _, a in prompts}
    assert len(prompts) == 60 and len(combos) == 12 and all("lime" in p.lower() for p, _ in prompts)
    from mochi_preview.demo.world import HELDOUT_TEMPLATES, TRAIN_TEMPLATES

    assert set(HELDOUT_TEMPLATES).isdisjoint(TRAIN_TEMPLATES)
    assert np.array_equal(demo_clips(4, 2)[0], demo_clips(4, 2)[0])  # seeded


def test_base_frames_are_cached_per_prompts_and_dit(tmp_path):
    import numpy as np

    from mochi_preview.train.lora import cached_frames

    model = tmp_path / "model"
    model.mkdir()
    (model / "dit.safetensors").write_bytes(b"one")
    calls = []
    make = lambda: calls.append(1) or np.full((2, 3), float(len(calls)))  # noqa: E731
    cache = tmp_path / "base.npz"
    first = cached_frames(cache, ["a", "b"], model, make)
    assert np.array_equal(cached_frames(cache, ["a", "b"], model, make), first) and len(calls) == 1
    assert cached_frames(cache, ["a", "c"], model, make)[0, 0] == 2.0  # other prompts: made again
    (model / "dit.safetensors").write_bytes(b"two")
    assert cached_frames(cache, ["a", "c"], model, make)[0, 0] == 3.0  # another DiT: made again


@pytest.mark.parametrize(
    "args, message",
    [
        (["--targets", "qkv_x,mlp_x"], "LoRA targets must be among"),
        (["--rank", "0"], "rank >= 1"),
        (["--share", "0"], "--share must be in"),
        (["--concept", "pink"], None),
    ],
)
def test_demo_proof_command_rejects_bad_settings_before_any_work(tmp_path, capsys, args, message):
    from mochi_preview.train.lora import main

    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "x.safetensors"), "--model_dir", str(tmp_path / "missing"), *args])
    text = str(e.value.code) + capsys.readouterr().err
    assert (message or "invalid choice: 'pink'") in text
    assert not list(tmp_path.iterdir())  # nothing written


def test_recaptioned_training_keeps_t5_frozen_and_resumes_exactly(tmp_path):
    from mochi_preview.text import TextEncoder
    from mochi_preview.tiny import default_model_dir
    from mochi_preview.train import LatentData
    from mochi_preview.train.lora import LoraTrainer, recaptioner

    folder = default_model_dir()  # the shipped demo model: its T5 feeds its DiT
    data = LatentData(torch.randn(4, 12, 2, 4, 4, generator=torch.Generator().manual_seed(5)), None, None)
    cfg = lora_config(targets=("qkv_y", "mod_y"))

    def trainer():
        text = TextEncoder.from_folder(folder / "t5")
        return LoraTrainer(load_dit(folder, dtype=torch.float32), data, cfg, text, recaptioner(4, seed=0))

    straight = trainer()
    assert {n for n, p in straight.model.named_parameters() if p.requires_grad} == {
        f"dit.{n}.lora_{p}_train" for n in straight.layers for p in "AB"
    }  # T5 and the DiT stay frozen
    straight.fit(progress=False)
    trainer().fit(until=2, checkpoint=tmp_path / "ck", progress=False)
    resumed = trainer()
    resumed.fit(checkpoint=tmp_path / "ck", progress=False)
    for n, (A, B) in straight.lora().items():
        assert torch.equal(resumed.lora()[n][0], A) and torch.equal(resumed.lora()[n][1], B)
    assert B.abs().max() > 0
