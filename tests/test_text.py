"""T5 conditioning: folder layouts, T5 weights (safetensors, pytorch_model.bin, Hub cache), the reference's
tokenization rules, features equal to plain T5."""

import hashlib
import json
import random
import shutil
import textwrap
import weakref
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file
from transformers import T5EncoderModel

from mochi_preview.checkpoint import CheckpointError
from mochi_preview.text import SentencePieceT5, TextEncoder
from mochi_preview.tiny import CORPUS, save_tiny_t5, save_tiny_t5_diffusers_layout, spiece_model_bytes

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


# ---- T5 from pytorch_model.bin and from the Hub cache (Genmo reads google/t5-v1_1-xxl, a pickle) -------------


def full_t5_pickle(folder: Path, plain: Path) -> Path:
    """`plain`'s T5 as google/t5-v1_1-xxl stores it: pytorch_model.bin of the whole encoder-decoder (decoder and
    lm_head tensors, the input embedding under both tied names), next to config.json and spiece.model."""
    shutil.copytree(plain, folder)
    sd = load_file(folder / "model.safetensors")
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    sd |= {"decoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(4, 4), "lm_head.weight": torch.randn(8, 4)}
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin")
    return folder


def test_pytorch_model_bin_loads_its_encoder_like_safetensors(dirs, tmp_path):
    folder = full_t5_pickle(tmp_path / "t5", dirs / "plain")
    te, ref = TextEncoder.from_folder(folder), TextEncoder.from_folder(dirs / "plain")
    assert torch.equal(te.encode(PROMPTS)[0], ref.encode(PROMPTS)[0])
    assert te.model.shared.weight.data_ptr() == te.model.encoder.embed_tokens.weight.data_ptr()  # read once, tied


def test_pickle_needing_code_is_refused_without_running_it(dirs, tmp_path):
    folder = full_t5_pickle(tmp_path / "t5", dirs / "plain")
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return Path.touch, (marker,)

    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save(sd | {"payload": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin holds more than tensors.*full unpickling.*refused"):
        TextEncoder.from_folder(folder)
    assert not marker.exists()
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 64)  # not a pickle at all
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is not a PyTorch checkpoint"):
        TextEncoder.from_folder(folder)


def test_nan_in_t5_weights_names_file_and_tensor(dirs, tmp_path):
    folder = full_t5_pickle(tmp_path / "t5", dirs / "plain")
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"][3, 5] = float("nan")
    torch.save(sd, folder / "pytorch_model.bin")
    match = r"pytorch_model\.bin: tensor 'encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight' holds 1 NaN"
    with pytest.raises(CheckpointError, match=match):
        TextEncoder.from_folder(folder)


def test_hub_id_is_read_from_the_local_cache(dirs, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"google/t5-v1_1-xxl is not a local folder and not in the local"):
        TextEncoder.from_folder("google/t5-v1_1-xxl")
    repo = tmp_path / "hub" / "models--google--t5-v1_1-xxl"
    full_t5_pickle(repo / "snapshots" / ("c" * 40), dirs / "plain")  # Genmo's T5 as the Hub cache holds it
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    te = TextEncoder.from_folder("google/t5-v1_1-xxl")
    assert torch.equal(te.encode(PROMPTS)[0], TextEncoder.from_folder(dirs / "plain").encode(PROMPTS)[0])


# ---- tokenization parity with the slow T5Tokenizer(legacy=False) that Genmo ran -------------------------------

WORDS = (
    "A hand picks up a bright yellow lemon from the wooden bowl; the cat sleeps on a sunny windowsill while "
    "rain falls. Zebras? 日本 ümlaut café naïve Ωmega 😀 ﬁne １２３ ½ x² — … «quote» ＡＢＣ Ⅻ ㎏ ⁴ e\u0301 "
    "tab\there a\u00a0b \u200bzero don't U.S.A. 3.14 1,000,000 #hashtag @user http://x.y/z?q=1&r=2"
).split(" ")
PUNCT = ".,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`"
SEPS = (" ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "", "\r\n", "\u3000")


def varied_prompts(n: int = 1000, seed: int = 0) -> list[str]:
    """Prompts of 1 to 300 words: punctuation, digits, unicode, repeated spaces, tabs, newlines."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.choice((1, 3, 10, 40, 300))):
            r = rng.random()
            if r < 0.6:
                word = rng.choice(WORDS)
            elif r < 0.75:
                word = str(rng.randrange(10 ** rng.randint(1, 8)))
            else:
                word = "".join(rng.choices(PUNCT, k=rng.randint(1, 3)))
            parts.append(word + rng.choice(SEPS))
        prompts.append(rng.choice(SEPS) * (rng.random() < 0.2) + "".join(parts))
    return prompts


def slow_t5_ids(model: bytes, text: str) -> list[int]:
    """The slow T5Tokenizer's rule with legacy=False (transformers 4.x, no special tokens in `text`): sentencepiece
    without its dummy prefix on "▁" + text, after "<unk>" whose pieces are dropped; then EOS."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(model)
    proto.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    if not text:
        return [1]
    skip = len(sp.encode("<unk>"))
    return sp.encode("<unk>\u2581" + text.replace("\u2581", " "))[skip:] + [1]


# The package's generic tiny tokenizer as the demo model trained with (before `fold_case`): the recordings below.
CASED_SPIECE = Path(__file__).parent / "data" / "cased_spiece.model"


def ids_only(sp: SentencePieceT5) -> TextEncoder:
    """A TextEncoder for tokenizing only (no T5 weights)."""
    return TextEncoder(torch.nn.Identity(), None, sentencepiece=sp)


def test_ids_equal_transformers_4_slow_tokenizer_on_1000_prompts():
    """Digests of the ids transformers 4.46.3's slow T5Tokenizer(legacy=False) gave for these prompts with
    `CASED_SPIECE` (recorded once; transformers 5 has no slow tokenizer), untruncated and as padded 256-token rows."""
    te = ids_only(SentencePieceT5(CASED_SPIECE))
    prompts = varied_prompts()
    untruncated = [te.sentencepiece.ids(p) + [1] for p in prompts]
    assert sum(len(ids) > 256 for ids in untruncated) > 100  # many are cut
    digest = lambda ids: hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    assert digest(untruncated) == "d3e3e8f2c96c02f3cd121b71a7a12ffacf21d6b30860e21ec29a63887fd24d76"
    with pytest.warns(UserWarning, match="were cut"):
        rows = te.tokenize(prompts)[0].tolist()
    assert digest(rows) == "21be171480ff2dfd3531343727d9f0fca961fcac56d4eda2883d2afedada54ca"


def test_special_tokens_in_the_text_follow_the_slow_tokenizer():
    sp = SentencePieceT5(CASED_SPIECE)
    recorded = {  # transformers 4.46.3, T5Tokenizer(legacy=False), CASED_SPIECE
        "a <extra_id_0> b": [5, 276, 172, 1], "x</s>y": [3, 68, 1, 10, 1], " <pad> q": [0, 3, 142, 1],
        "<unk>": [2, 1], "lemon</s>": [61, 1], "<extra_id_99>  lemon <extra_id_1>": [177, 108, 124, 13, 275, 1],
        "\u2581\u2581 lead": [3, 108, 155, 1], "a\u2581b": [5, 109, 1], "  ": [1], "\n": [1], "lemon </s> ": [61, 1],
    }  # fmt: skip
    for text, ids in recorded.items():
        te = ids_only(sp)
        assert te.tokenize([text])[0][0, : len(ids)].tolist() == ids, text


def test_ids_follow_the_slow_rules_on_a_larger_vocabulary(tmp_path):
    """A 800-piece unigram model with T5's normaliser (nmt_nfkc, dummy prefix, extra whitespace removed), trained on
    text with the prompts' characters, so that most words are whole pieces and ties between segmentations occur
    (transformers 5's T5Tokenizer breaks one of them differently in these 1000 prompts)."""
    model = spiece_model_bytes(800, CORPUS + "\n".join(varied_prompts(300, seed=5)))
    (tmp_path / "spiece.model").write_bytes(model)
    sp = SentencePieceT5(tmp_path / "spiece.model")
    bad = [p for p in varied_prompts(1000, seed=1) if sp.ids(p) + [1] != slow_t5_ids(model, p)]
    assert not bad, f"{len(bad)} of 1000 differ, e.g. {bad[0]!r}"


def test_truncated_says_which_prompts_are_cut_before_any_work(enc):
    long = "lemon " * 300
    assert enc.token_counts([LEMON, long, "", " "]) == [len(sp_ids(LEMON)), 301, 0, 1]
    assert enc.truncated([LEMON, long, ""]) == [
        None, "prompt 1 is 301 tokens; the last 45 were cut (T5 sees at most 256)", None
    ]  # fmt: skip


def test_a_tokenizer_set_by_the_caller_makes_the_ids(dirs):
    """pipe.tokenizer stays transformers' (diffusers' API); replacing it (tokenizer= overrides) is honoured."""
    te = TextEncoder.from_folder(dirs / "plain")
    assert te.sentencepiece is not None
    te.tokenizer = te.tokenizer  # the same one: Genmo's rules stay
    assert te.sentencepiece is not None

    class Shifted:
        def __call__(self, text, **kwargs):
            return type("Encoding", (), {"input_ids": [7, 8, 9]})()

    te.tokenizer = Shifted()
    assert te.sentencepiece is None
    ids, mask = te.tokenize([LEMON])
    assert ids[0, :4].tolist() == [7, 8, 9, 1] and mask.sum() == 4


def test_fold_case_makes_every_tokenizer_of_a_folder_read_capitals_as_lower_case(tmp_path):
    """The demo's tokenizer is case-blind (`tiny.fold_case`, applied by the demo build's export): our ids, and
    transformers' tokenizers loaded from the same folder, give a prompt in capitals the ids of its lower case."""
    from transformers import T5Tokenizer, T5TokenizerFast

    from mochi_preview.tiny import fold_case, save_tiny_t5_tokenizer

    save_tiny_t5_tokenizer(tmp_path)
    cased = SentencePieceT5(tmp_path / "spiece.model")
    prompts = ["ONE RED BOX GLIDES LEFT!", "The Lemon <extra_id_0> Rolls", "A CAT sleeps on a Sunny Windowsill."]
    assert all(cased.ids(p) != cased.ids(p.lower()) for p in prompts)  # case-sensitive to begin with
    fold_case(tmp_path)
    sp = SentencePieceT5(tmp_path / "spiece.model")
    for p in prompts:
        assert sp.ids(p) == sp.ids(p.lower()) == cased.ids(p.lower()), p  # lower case reads as before
    # (not after a sentinel: there transformers 5 cuts the next word unlike the slow tokenizer, recorded above)
    for tokenizer in (T5Tokenizer, T5TokenizerFast):
        tok = tokenizer.from_pretrained(tmp_path, legacy=False)
        assert [tok(p).input_ids for p in prompts[::2]] == [sp.ids(p) + [1] for p in prompts[::2]], tokenizer
