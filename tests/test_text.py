"""T5 conditioning: folder layouts, the reference's tokenization rules, features equal to plain T5."""

import shutil
import textwrap
import weakref

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file
from transformers import T5EncoderModel

from mochi_preview.text import TextEncoder
from mochi_preview.tiny import save_tiny_t5, save_tiny_t5_diffusers_layout, spiece_model_bytes

torch.set_num_threads(1)

LEMON = textwrap.dedent("""\
    A hand with delicate fingers picks up a bright yellow lemon from a wooden bowl
    filled with lemons and sprigs of mint against a peach-colored background.""")
PROMPTS = [LEMON, "A cat  sleeps\non a sunny windowsill!", "Zebras? 日本 ümlaut", " "]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A diffusers-layout folder (with tokenizer.json) and a plain T5 folder (spiece.model only)."""
    root = tmp_path_factory.mktemp("t5")
    save_tiny_t5_diffusers_layout(root / "mochi")
    save_tiny_t5(root / "plain", tokenizer_json=False)
    return root


@pytest.fixture(scope="module")
def enc(dirs):
    return TextEncoder.from_folder(dirs / "mochi")


def sp_ids(text: str) -> list[int]:
    """What the reference's slow sentencepiece T5Tokenizer yields: pieces + EOS."""
    return spm.SentencePieceProcessor(model_proto=spiece_model_bytes()).encode(text) + [1]


@pytest.mark.parametrize("layout", ["mochi", "plain"])
def test_layouts_load_and_tokenize_like_sentencepiece(dirs, layout):
    te = TextEncoder.from_folder(dirs / layout)
    ids, mask = te.tokenize(PROMPTS)
    assert ids.shape == mask.shape == (4, 256) and ids.dtype == torch.long and mask.dtype == torch.bool
    for row, m, p in zip(ids, mask, PROMPTS, strict=True):
        want = sp_ids(p)
        assert row[: len(want)].tolist() == want and row[len(want) :].eq(0).all()  # EOS, then pad id 0
        assert m.sum() == len(want) and m[: len(want)].all()  # valid tokens = tokens incl. EOS
    assert mask[3].sum() == 1  # " " is not "": it keeps its EOS token, as in the reference


def test_encode_matches_plain_t5(dirs, enc):
    feats, mask = enc.encode(PROMPTS[:2])
    assert feats.shape == (2, 256, 64) and feats.dtype == torch.float32 and mask.shape == (2, 256)
    ids, mask2 = enc.tokenize(PROMPTS[:2])
    ref = T5EncoderModel.from_pretrained(dirs / "mochi" / "text_encoder").eval()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask2.long()).last_hidden_state
    assert torch.equal(mask, mask2) and torch.equal(feats, want)
    assert not feats.requires_grad and not feats.is_inference()  # usable as plain input of a training graph


def test_encode_ignores_outer_autocast(enc):
    feats, _ = enc.encode([LEMON])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats_ac, _ = enc.encode([LEMON])
    assert feats_ac.dtype == torch.float32 and torch.equal(feats, feats_ac)


def test_empty_prompt_has_no_tokens_anywhere_in_batch(enc):
    ids, mask = enc.tokenize(["", LEMON, ""])
    for i in (0, 2):
        assert ids[i].eq(0).all() and not mask[i].any()
    assert mask[1].sum() == len(sp_ids(LEMON))
    feats, mask = enc.encode(["", LEMON, ""])
    assert not mask[0].any() and not mask[2].any() and feats.isfinite().all()  # T5 still runs on the row


def test_long_prompt_warns_with_cut_count(enc):
    prompt = "lemon " * 300
    n = len(sp_ids(prompt))
    assert n == 301
    with pytest.warns(UserWarning, match=r"is 301 tokens; the last 45 were cut \(T5 sees at most 256\)"):
        ids, mask = enc.tokenize([LEMON, prompt])
    assert mask[1].all() and ids[1, -1] == 1 and ids[1, :255].tolist() == sp_ids(prompt)[:255]  # EOS kept


def test_bf16_on_request(dirs, enc):
    te = TextEncoder.from_folder(dirs / "plain", dtype=torch.bfloat16)
    feats, _ = te.encode([LEMON])
    assert te.dtype == feats.dtype == torch.bfloat16
    assert torch.allclose(feats.float(), enc.encode([LEMON])[0], atol=0.1, rtol=0.1)
    with pytest.raises(ValueError, match="float16"):
        TextEncoder.from_folder(dirs / "plain", dtype=torch.float16)


def test_to_and_unload(dirs):
    te = TextEncoder.from_folder(dirs / "mochi")
    assert te.to("cpu") is te and te.device == torch.device("cpu")
    model = weakref.ref(te.model)
    te.unload()
    assert model() is None  # nothing else keeps the weights alive
    with pytest.raises(RuntimeError, match="unloaded"):
        te.encode([LEMON])
    assert te.tokenize([LEMON])[1].sum() == len(sp_ids(LEMON))  # the tokenizer stays


def test_pickle_only_folder_is_refused(dirs, tmp_path):
    folder = tmp_path / "t5"
    shutil.copytree(dirs / "plain", folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # content never read
    match = r"pytorch_model\.bin.*not loaded.*model\.safetensors.*convert"
    with pytest.raises(FileNotFoundError, match=match):
        TextEncoder.from_folder(folder)


def test_missing_files_are_named(dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="T5 folder not found"):
        TextEncoder.from_folder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder.from_folder(tmp_path)
    mochi = tmp_path / "mochi"
    shutil.copytree(dirs / "mochi" / "text_encoder", mochi / "text_encoder")
    with pytest.raises(FileNotFoundError) as err:
        TextEncoder.from_folder(mochi)
    assert str(mochi / "tokenizer" / "spiece.model") in str(err.value)
    (mochi / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="T5 weights not found.*model.safetensors"):
        TextEncoder.from_folder(mochi)


def test_incomplete_weights_are_refused(dirs, tmp_path):
    folder = tmp_path / "t5"
    shutil.copytree(dirs / "plain", folder)
    sd = load_file(folder / "model.safetensors")
    del sd["encoder.final_layer_norm.weight"]
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="final_layer_norm"):
        TextEncoder.from_folder(folder)


def test_single_string_is_rejected(enc):
    with pytest.raises(TypeError, match="list of prompts"):
        enc.encode(LEMON)
