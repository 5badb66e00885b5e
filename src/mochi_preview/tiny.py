"""Tiny models with random weights, saved in the real file layouts Mochi loads (no network needed).

Used by the tests, the benchmarks, and by the CLI as its fallback model when no weights are given and the demo model
(`assets/demo/`) is missing: a random model makes noise, not video, and says so.
"""

import io
import shutil
import tempfile
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch

from .files import atomic_dir

# A small built-in English corpus: enough pieces for ordinary prompts, trained in well under a second.
CORPUS = """\
A hand with delicate fingers picks up a bright yellow lemon from a wooden bowl filled with lemons.
The hand gently tosses the lemon up and catches it, showcasing its smooth texture and sprigs of mint.
The scene is set against a peach-colored background.
A beige string bag sits beside the bowl, adding a rustic touch to the scene.
Additional lemons, one halved, are scattered around the base of the bowl.
The even lighting enhances the vibrant colors and creates a fresh, inviting atmosphere.
A cat sleeps on a sunny windowsill while the rain falls softly outside the old house.
The quick brown fox jumps over the lazy dog near the river at sunset.
Waves crash on the rocky shore as seagulls circle above a small fishing boat.
A red car drives slowly through a snowy forest at night, its headlights glowing.
Children laugh and play in a green park full of tall trees, flowers and birds.
A close-up video of coffee being poured into a white cup, steam rising in the morning light.
An astronaut walks on the surface of the moon, dust drifting behind every step.
"""


@lru_cache(maxsize=4)
def spiece_model_bytes(vocab_size: int = 200, corpus: str = CORPUS, model_type: str = "unigram") -> bytes:
    """Train (once per session and corpus) a deterministic unigram sentencepiece model, like T5's, with T5's pad 0,
    eos 1, unk 2.

    model_type "bpe": the pieces come from BPE training (on a small corpus unigram training keeps few pieces and cuts
    frequent words apart), then the model is stored as a unigram model with equal scores, i.e. the fewest pieces
    win. transformers' T5 tokenizer reads every spiece.model as unigram, so this is the form both agree on.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines() * 8),
        model_writer=buf,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # the corpus is small: take what it yields
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,  # T5 has no BOS
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,  # determinism
        minloglevel=2,
    )
    if model_type != "bpe":
        return buf.getvalue()
    model = pb.ModelProto.FromString(buf.getvalue())
    model.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    for piece in model.pieces:
        if piece.type == pb.ModelProto.SentencePiece.NORMAL:
            piece.score = -1.0
    return model.SerializeToString()


def save_tiny_t5_tokenizer(
    folder: Path, tokenizer_json: bool = True, vocab_size: int = 200, corpus: str = CORPUS, model_type: str = "unigram"
) -> None:
    """Write spiece.model (+ tokenizer.json and tokenizer_config.json when asked) like a T5 hub folder."""
    from transformers import T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(spiece_model_bytes(vocab_size, corpus, model_type))
    if tokenizer_json:
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(folder / "spiece.model", tmp)
            T5Tokenizer.from_pretrained(tmp, legacy=False, model_max_length=256).save_pretrained(folder)


@lru_cache(maxsize=1)
def _case_folding_charsmap() -> bytes:
    """sentencepiece's built-in case-folding normalisation (NFKC + case folding, rule "nmt_nfkc_cf"), as the compiled
    map a model file carries: read off a throwaway model trained with that rule."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c d e f g hello world"] * 8),
        model_writer=buf,
        vocab_size=17,
        normalization_rule_name="nmt_nfkc_cf",
        num_threads=1,
        minloglevel=2,
    )
    return pb.ModelProto.FromString(buf.getvalue()).normalizer_spec.precompiled_charsmap


def fold_case(folder: Path) -> None:
    """Make the T5 tokenizer in `folder` case-blind ("A RED BOX" reads as "a red box"): spiece.model normalises with
    sentencepiece's case-folding rule, and tokenizer.json / tokenizer_config.json, when present, are written again
    from it, so transformers' tokenizers give the same ids."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import T5Tokenizer

    folder = Path(folder)
    model = pb.ModelProto.FromString((folder / "spiece.model").read_bytes())
    model.normalizer_spec.name = "nmt_nfkc_cf"
    model.normalizer_spec.precompiled_charsmap = _case_folding_charsmap()
    (folder / "spiece.model").write_bytes(model.SerializeToString())
    if (folder / "tokenizer.json").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(folder / "spiece.model", tmp)
            T5Tokenizer.from_pretrained(tmp, legacy=False, model_max_length=256).save_pretrained(folder)


def tiny_vocab_size(vocab_size: int = 200, corpus: str = CORPUS, model_type: str = "unigram") -> int:
    """Embedding rows: tokenizer size with T5's 100 sentinels, padded to a multiple of 64 (T5 has 32128)."""
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_proto=spiece_model_bytes(vocab_size, corpus, model_type)).get_piece_size()
    n = pieces + 100
    return -(-n // 64) * 64


def save_tiny_t5(
    folder: Path,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 128,
    seed: int = 0,
    tokenizer_json: bool = True,
    with_tokenizer: bool = True,
    vocab_size: int = 200,
    corpus: str = CORPUS,
    model_type: str = "unigram",
) -> None:
    """Save a random T5 v1.1-style encoder (config.json, model.safetensors) and its tokenizer in `folder`; the
    sentencepiece tokenizer is trained on `corpus` with about `vocab_size` pieces."""
    from transformers import T5Config, T5EncoderModel

    folder = Path(folder)
    config = T5Config(
        vocab_size=tiny_vocab_size(vocab_size, corpus, model_type),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",  # T5 v1.1
        tie_word_embeddings=False,
        dropout_rate=0.0,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        model = T5EncoderModel(config).eval()
        # HF's init leaves some weights at exactly 0/1; perturb everything so tests compare real numbers.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    if with_tokenizer:
        save_tiny_t5_tokenizer(folder, tokenizer_json, vocab_size, corpus, model_type)


def save_tiny_t5_diffusers_layout(model_dir: Path, **kwargs) -> None:
    """Write `model_dir/text_encoder/` and `model_dir/tokenizer/`, as in genmo/mochi-1-preview."""
    model_dir = Path(model_dir)
    save_tiny_t5(model_dir / "text_encoder", with_tokenizer=False, **kwargs)
    save_tiny_t5_tokenizer(model_dir / "tokenizer", tokenizer_json=kwargs.get("tokenizer_json", True))


# ---- DiT + VAE ---------------------------------------------------------------------------------------------

RANDOM_DEFAULTS = dict(width=64, height=64, num_frames=13, num_steps=8, cfg_scale=4.5)


def _random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Small random values everywhere; norm weights near 1 so activations stay in range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("weight") and ("norm" in name or ".stack.0." in name or ".stack.3." in name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)
    return module


def save_random_model(folder: Path, seed: int = 0, text_dim: int = 64, encoder: bool = True) -> Path:
    """A complete random Mochi in the native layout: dit/decoder/encoder.safetensors and a t5/ folder.

    (Diffusers-layout folders are written by diffusers itself, in the tests.)
    """
    from safetensors.torch import save_file

    from .configs import CONFIGS
    from .dit import AsymmDiT, save_dit_native
    from .vae import Decoder, Encoder

    tiny = CONFIGS["tiny"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dit = _random_(AsymmDiT(replace(tiny.dit, text_dim=text_dim)), seed)
    save_dit_native(folder / "dit.safetensors", dit)
    save_file(_random_(Decoder(tiny.decoder), seed + 1).state_dict(), str(folder / "decoder.safetensors"))
    if encoder:
        save_file(_random_(Encoder(tiny.encoder), seed + 2).state_dict(), str(folder / "encoder.safetensors"))
    t5 = tiny.t5
    save_tiny_t5(folder / "t5", d_model=text_dim, num_layers=t5.num_layers, num_heads=t5.num_heads, d_ff=t5.d_ff,
                 seed=seed + 3)  # fmt: skip
    return folder


DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo"


def demo_model_dir() -> Path | None:
    """The small demo model shipped in the package (trained by `python -m mochi_preview.demo.build`), if present."""
    complete = all((DEMO_MODEL_DIR / name).is_file() for name in ("dit.safetensors", "decoder.safetensors"))
    return DEMO_MODEL_DIR if complete and (DEMO_MODEL_DIR / "mochi_defaults.json").is_file() else None


def default_model_dir() -> Path:
    """The model used when no --model_dir is given: the shipped demo model, else a small RANDOM model (noise)."""
    import json
    import os
    import sys

    demo = demo_model_dir()
    if demo is not None:
        return demo
    cache = Path(os.environ.get("MOCHI_CACHE", Path.home() / ".cache" / "mochi_preview")) / "random-tiny-v1"
    print(
        "warning: no --model_dir given and the demo model is missing from the package: generating with a small "
        "model with RANDOM weights. The output is noise, not a video of your prompt. Pass --model_dir with the "
        "published weights (see the README) for real videos.",
        file=sys.stderr,
    )
    if not (cache / "mochi_defaults.json").is_file():
        with atomic_dir(cache) as tmp:  # complete or absent; a concurrent process that finished first wins
            save_random_model(tmp)
            (tmp / "mochi_defaults.json").write_text(json.dumps(RANDOM_DEFAULTS))
    return cache
