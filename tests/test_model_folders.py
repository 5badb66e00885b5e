"""Model folders as users have them: Genmo's layout with T5 from the Hub cache, and manifests checked at load."""

import shutil

import pytest
import torch

from mochi_preview import MochiPipeline, infer
from mochi_preview.tiny import DEMO_MODEL_DIR
from mochi_preview.verify import CorruptFolderError


@pytest.fixture
def demo_copy(tmp_path):
    return shutil.copytree(DEMO_MODEL_DIR, tmp_path / "demo")


def no_loading(monkeypatch):
    import mochi_preview.pipeline as pipeline

    def fail(*args, **kwargs):
        pytest.fail("weights were read before the folder was checked")

    monkeypatch.setattr(pipeline, "load_dit", fail)


def test_a_weight_file_of_the_wrong_size_is_refused_before_loading(demo_copy, monkeypatch):
    with open(demo_copy / "decoder.safetensors", "ab") as f:
        f.write(b"\0")  # one byte more than the manifest says
    no_loading(monkeypatch)
    with pytest.raises(CorruptFolderError, match="decoder.safetensors"):
        MochiPipeline.from_pretrained(demo_copy)


def test_verify_checks_the_hashes_a_size_check_cannot_see(demo_copy, monkeypatch, capsys):
    dit = demo_copy / "dit.safetensors"
    data = bytearray(dit.read_bytes())
    data[-100] ^= 0x01  # same size, one bit flipped inside the last tensor's bytes
    dit.write_bytes(bytes(data))
    no_loading(monkeypatch)
    with pytest.raises(CorruptFolderError, match="dit.safetensors"):
        MochiPipeline.from_pretrained(demo_copy, verify_hashes=True)
    assert infer.main(["--model_dir", str(demo_copy), "--verify", "--out_dir", str(demo_copy / "out")]) == 2
    assert "dit.safetensors" in capsys.readouterr().err and not (demo_copy / "out").exists()


def test_genmos_folder_layout_reads_t5_from_the_hub_cache(demo_copy, tmp_path, monkeypatch):
    """Genmo's download script leaves T5 out of the model folder: its code reads google/t5-v1_1-xxl from the Hub."""
    import huggingface_hub.constants

    t5 = demo_copy / "t5"
    repo = tmp_path / "hub" / "models--google--t5-v1_1-xxl"
    shutil.copytree(t5, repo / "snapshots" / ("c" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    shutil.rmtree(t5)
    (demo_copy / "mochi_manifest.json").unlink()  # the folder no longer holds what its manifest lists
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"google/t5-v1_1-xxl is not in the local Hugging Face cache either"):
        MochiPipeline.from_pretrained(demo_copy)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    pipe = MochiPipeline.from_pretrained(demo_copy, torch_dtype=torch.float32)
    reference = MochiPipeline.from_pretrained(DEMO_MODEL_DIR, torch_dtype=torch.float32)
    kw = dict(seed=3, num_inference_steps=2, output_type="latent", progress=False)
    assert torch.equal(pipe("a red ball moving up", **kw).frames, reference("a red ball moving up", **kw).frames)


def test_the_demo_model_warns_about_prompts_outside_its_world():
    from mochi_preview.demo.vocabulary import DEMO_PROMPT

    pipe = MochiPipeline.from_pretrained(DEMO_MODEL_DIR, torch_dtype=torch.float32)
    kw = dict(seed=0, num_inference_steps=1, output_type="latent", progress=False)
    with pytest.warns(UserWarning, match=r"circle, ball, disc, square, box") as caught:
        pipe("Close-up of a chameleon's eye, with its scaly skin changing color.", **kw)
    assert caught[0].filename == __file__  # pointed at the caller's line
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(DEMO_PROMPT, **kw)  # a prompt the demo model draws: no warning
