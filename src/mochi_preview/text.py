"""T5-XXL text conditioning (spec section 4): prompts -> (features (B, 256, d_model), mask (B, 256) bool).

T5 comes from a folder (diffusers' text_encoder/ + tokenizer/, or a plain google/t5-v1_1-xxl download) or a Hub id in
the local Hugging Face cache. Its weights are read through `checkpoint` (safetensors, or `pytorch_model.bin` with
`torch.load(weights_only=True)`; NaN / Inf refused), and prompts are tokenized by `SentencePieceT5`: the rules of
the slow T5Tokenizer with legacy=False that Genmo ran, on sentencepiece itself, so no transformers version changes
the ids.
"""

from __future__ import annotations

import gc
import json
import re
import warnings
from pathlib import Path

import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from .checkpoint import CheckpointReader, PickleReader, Source, SubsetReader, load_module, open_checkpoint

MAX_LENGTH = 256
HUB_ID = "google/t5-v1_1-xxl"  # where Genmo's code reads T5 from
SPIECE_UNDERLINE = "\u2581"
PAD, EOS, UNK = 0, 1, 2
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_FILES = ["config.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json", *SAFETENSORS,
             "model-*.safetensors", *PICKLES, "pytorch_model-*.bin"]  # fmt: skip


class SentencePieceT5:
    """T5's slow tokenizer with legacy=False (Genmo's), on sentencepiece: a prompt's ids, EOS not yet added."""

    def __init__(self, model_file: str | Path, extra_ids: int = 100):
        proto = sentencepiece_model_pb2.ModelProto.FromString(Path(model_file).read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False  # legacy=False: the leading "▁" is added below instead
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        n = self.sp.get_piece_size()
        self.special = {"<pad>": PAD, "</s>": EOS, "<unk>": UNK}
        self.special |= {f"<extra_id_{i}>": n + extra_ids - 1 - i for i in range(extra_ids)}
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.special, key=len, reverse=True))) + ")")
        self._unk_pieces = len(self.sp.encode("<unk>"))

    def _pieces(self, chunk: str) -> list[str]:
        if not chunk.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp.encode(chunk, out_type=str)
        # A chunk starting with a space keeps it as "▁": encode after "<unk>" (which sentencepiece spells out in
        # pieces of its own), then drop those pieces.
        return self.sp.encode("<unk>" + chunk, out_type=str)[self._unk_pieces :]

    def ids(self, text: str) -> list[int]:
        if not text:
            return []
        # Special tokens written in the text are tokens; the sentinels <extra_id_N> swallow the spaces around them.
        chunks = self._split.split(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
        for i in range(1, len(chunks), 2):
            if chunks[i].startswith("<extra_id_"):
                chunks[i - 1], chunks[i + 1] = chunks[i - 1].rstrip(), chunks[i + 1].lstrip()
        pieces = []
        for i, chunk in enumerate(chunks):
            pieces += [chunk] if i % 2 else self._pieces(chunk) if chunk else []
        if len(pieces) > 1 and pieces[0] == SPIECE_UNDERLINE and pieces[1] in self.special:
            pieces = pieces[1:]
        return [self.special[p] if p in self.special else self.sp.piece_to_id(p) for p in pieces]


def with_eos(ids: list[int], max_length: int) -> list[int]:
    """Cut to `max_length` - 1 tokens and append EOS (unless the text ended with one), as the reference does."""
    ids = ids[: max_length - 1]
    return ids if ids and ids[-1] == EOS else ids + [EOS]


# ---- folders and weights -------------------------------------------------------------------------------------


def resolve_t5(path: str | Path) -> Path:
    """A local T5 folder as it is; a Hub id (`google/t5-v1_1-xxl`) through the local Hugging Face cache."""
    p = Path(path).expanduser()
    if p.exists() or str(path).count("/") != 1 or str(path).startswith((".", "/", "~")):
        return p
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(path), local_files_only=True, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"T5 folder not found: {path} is not a local folder and not in the local Hugging Face cache; download "
            f"it first (`hf download {path} {' '.join(HUB_FILES[:2])} pytorch_model.bin`, or "
            "`python -m mochi_preview.download DIR`, which puts T5 in DIR) or pass the folder that holds it"
        ) from e


def find_t5_folders(path: str | Path) -> tuple[Path, Path]:
    """(model dir, tokenizer dir) of a diffusers-layout or plain T5 folder or Hub id; errors name the file expected."""
    path = resolve_t5(path)
    if not path.is_dir():
        raise FileNotFoundError(f"T5 folder not found: {path}")
    if (path / "text_encoder").is_dir():  # diffusers layout: text_encoder/ + tokenizer/
        model_dir, tok_dir = path / "text_encoder", path / "tokenizer"
    elif (path / "config.json").is_file():  # plain google/t5-v1_1-xxl download: everything in one folder
        model_dir, tok_dir = path, path
    else:
        raise FileNotFoundError(
            f"no T5 config: expected {path / 'text_encoder' / 'config.json'} (diffusers layout) "
            f"or {path / 'config.json'} (plain T5 folder)"
        )
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"T5 config not found: expected {model_dir / 'config.json'}")
    if not any((model_dir / f).is_file() for f in SAFETENSORS + PICKLES):
        raise FileNotFoundError(
            f"T5 weights not found: expected {model_dir / 'model.safetensors'} (or model.safetensors.index.json + "
            "shards), or pytorch_model.bin"
        )
    if not (tok_dir / "spiece.model").is_file():
        raise FileNotFoundError(f"T5 tokenizer not found: expected {tok_dir / 'spiece.model'}")
    return model_dir, tok_dir


def open_t5_weights(model_dir: Path) -> CheckpointReader:
    """The encoder's tensors in a T5 folder: safetensors if there are any, else `pytorch_model.bin` (or shards)
    read with torch.load(weights_only=True). A full encoder-decoder checkpoint shows only its encoder half."""
    if any((model_dir / f).is_file() for f in SAFETENSORS):
        reader = open_checkpoint(model_dir)
    else:
        index = model_dir / "pytorch_model.bin.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            reader = PickleReader(model_dir / f for f in files)
        else:
            reader = PickleReader([model_dir / "pytorch_model.bin"])
    return SubsetReader(reader, lambda k: not k.startswith(("decoder.", "lm_head.")))


def load_t5_encoder(model_dir: Path, dtype: torch.dtype) -> T5EncoderModel:
    """A T5EncoderModel built from `config.json` and filled through `load_module` (strict, tensor by tensor)."""
    config = T5Config.from_pretrained(model_dir)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    reader = open_t5_weights(model_dir)
    # Tied names (the input embedding is `shared` and `encoder.embed_tokens`): a file stores one or both.
    params, layout, extra = model.state_dict(keep_vars=True), {}, set()
    for name, param in params.items():
        tied = [n for n, q in params.items() if q is param]
        stored = [n for n in tied if n in reader]
        if len(tied) > 1 and stored:
            layout[name] = Source((stored[0],))
            extra |= set(stored[1:])
    reader = SubsetReader(reader, lambda k: k not in extra)
    load_module(model, reader, layout, dtype, what=f"T5 weights in {model_dir}")
    return model


class TextEncoder:
    """T5 encoder + tokenizer; fp32 like the reference (no autocast), bf16 on request."""

    def __init__(
        self,
        model: T5EncoderModel,
        tokenizer: T5Tokenizer,
        max_length: int = MAX_LENGTH,
        sentencepiece: SentencePieceT5 | None = None,
    ):
        """`tokenizer`: transformers' (pipe.tokenizer); `sentencepiece`, when given, makes the ids (Genmo's rules)."""
        self.model: T5EncoderModel | None = model.eval().requires_grad_(False)
        self._tokenizer, self.sentencepiece, self.max_length = tokenizer, sentencepiece, max_length

    @property
    def tokenizer(self) -> T5Tokenizer:
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: T5Tokenizer) -> None:
        """Another tokenizer makes the ids from now on."""
        if tokenizer is not self._tokenizer:
            self._tokenizer, self.sentencepiece = tokenizer, None

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_length: int = MAX_LENGTH,
    ) -> TextEncoder:
        """Load `path/text_encoder` + `path/tokenizer` (diffusers), a plain T5 folder, or a cached Hub id."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"T5 runs in float32 (reference) or bfloat16, not {dtype} (T5 v1.1 overflows in fp16)")
        model_dir, tok_dir = find_t5_folders(path)
        with warnings.catch_warnings():  # the slow tokenizer is gone in transformers 5: no word about it
            warnings.simplefilter("ignore")
            tokenizer = T5Tokenizer.from_pretrained(tok_dir, legacy=False)  # pipe.tokenizer, for diffusers' API
        model = load_t5_encoder(model_dir, dtype)
        return cls(model.to(device), tokenizer, max_length, SentencePieceT5(tok_dir / "spiece.model"))

    @property
    def device(self) -> torch.device:
        """Device of the T5 weights."""
        return self._model().device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the T5 weights (and of the features)."""
        return self._model().dtype

    def _model(self) -> T5EncoderModel:
        """The model, or a clear error after unload()."""
        if self.model is None:
            raise RuntimeError("the text encoder was unloaded; load it again with TextEncoder.from_folder")
        return self.model

    def _ids(self, prompt: str) -> list[int]:
        """A prompt's token ids, untruncated, EOS not yet added."""
        if self.sentencepiece is not None:
            return self.sentencepiece.ids(prompt)
        return self._tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens of each prompt with its EOS, before cutting to max_length ("" counts 0: no tokens at all)."""
        return [0 if p == "" else len(with_eos(self._ids(p), 1 << 62)) for p in _listed(prompts)]

    def truncated(self, prompts: list[str]) -> list[str | None]:
        """For each prompt, None if T5 sees all of it, else a message saying how many tokens were cut."""
        n = self.max_length
        return [
            None if count <= n else f"prompt {i} is {count} tokens; the last {count - n} were cut (T5 sees at most {n})"
            for i, count in enumerate(self.token_counts(prompts))
        ]

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids (B, max_length) long and mask (B, max_length) bool; EOS appended; "" fully masked; a prompt cut to
        max_length gives a UserWarning (`truncated` says which, before any work)."""
        for message in filter(None, self.truncated(prompts)):
            warnings.warn(message, stacklevel=3)
        n = len(prompts)
        ids, mask = torch.zeros(n, self.max_length, dtype=torch.long), torch.zeros(n, self.max_length, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            # Reference rule for the negative prompt "": no tokens at all (not even EOS), so the DiT sees no text.
            # Only the exact empty string: " " keeps its EOS token, as in the reference.
            if prompt != "":
                row = with_eos(self._ids(prompt), self.max_length)
                ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), True
        return ids, mask

    @torch.no_grad()  # not inference_mode: the features may feed a training graph (LoRA) as plain inputs
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, max_length, d_model) in the model dtype, mask (B, max_length) bool; on its device."""
        model = self._model()
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(model.device), mask.to(model.device)
        with torch.autocast(model.device.type, enabled=False):  # the reference runs T5 outside any autocast
            feats = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return feats, mask

    def to(self, device: str | torch.device) -> TextEncoder:
        """Move T5 to `device` (e.g. to the GPU for encoding, back to "cpu" to offload); returns self."""
        self._model().to(device)
        return self

    def unload(self) -> None:
        """Drop the T5 weights so their memory can be freed; the tokenizer stays."""
        if self.model is None:
            return
        device, self.model = self.model.device, None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _listed(prompts: list[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("tokenize/encode take a list of prompts, not a single string")
    return list(prompts)
