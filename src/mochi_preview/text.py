"""T5-XXL text conditioning (spec section 4): prompts -> (features (B, 256, d_model), mask (B, 256) bool)."""

import gc
import warnings
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from transformers import T5EncoderModel, T5Tokenizer

MAX_LENGTH = 256
_DTYPE_KW = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def find_t5_folders(path: str | Path) -> tuple[Path, Path]:
    """(model dir, tokenizer dir) of a diffusers-layout or plain T5 folder; errors name the file expected."""
    path = Path(path)
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
    if not any((model_dir / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        expected = f"expected {model_dir / 'model.safetensors'} (or model.safetensors.index.json + shards)"
        bins = sorted(p.name for p in model_dir.glob("pytorch_model*.bin"))
        if bins:  # a pickle can run arbitrary code on load: refuse it rather than trust it
            raise FileNotFoundError(
                f"T5 weights in {model_dir} are PyTorch pickles ({bins[0]}), which are not loaded; "
                f"{expected}. If you trust the file, convert it once: python -c 'from transformers import "
                f'T5EncoderModel as M; M.from_pretrained("{model_dir}", use_safetensors=False)'
                f'.save_pretrained("{model_dir}")\' (or use the text_encoder/ and tokenizer/ folders of '
                "genmo/mochi-1-preview, which hold safetensors)"
            )
        raise FileNotFoundError(f"T5 weights not found: {expected}")
    if not any((tok_dir / f).is_file() for f in ("spiece.model", "tokenizer.json")):
        raise FileNotFoundError(f"T5 tokenizer not found: expected {tok_dir / 'spiece.model'} or tokenizer.json")
    return model_dir, tok_dir


class TextEncoder:
    """T5 encoder + tokenizer; fp32 like the reference (no autocast), bf16 on request."""

    def __init__(self, model: T5EncoderModel, tokenizer: T5Tokenizer, max_length: int = MAX_LENGTH):
        self.model: T5EncoderModel | None = model.eval().requires_grad_(False)
        self.tokenizer, self.max_length = tokenizer, max_length

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_length: int = MAX_LENGTH,
    ) -> "TextEncoder":
        """Load `path/text_encoder` + `path/tokenizer` (diffusers) or a plain T5 folder; safetensors only."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"T5 runs in float32 (reference) or bfloat16, not {dtype} (T5 v1.1 overflows in fp16)")
        model_dir, tok_dir = find_t5_folders(path)
        tokenizer = T5Tokenizer.from_pretrained(tok_dir, legacy=False)  # the reference's tokenizer settings
        model, info = T5EncoderModel.from_pretrained(
            model_dir, use_safetensors=True, output_loading_info=True, **{_DTYPE_KW: dtype}
        )
        # transformers would fill missing weights with random ones and only log it: a silently wrong encoder.
        if info["missing_keys"]:
            raise ValueError(f"T5 weights in {model_dir} lack {sorted(info['missing_keys'])[:4]}: wrong file?")
        return cls(model.to(device), tokenizer, max_length)

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

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids (B, max_length) long and mask (B, max_length) bool; EOS appended; "" fully masked."""
        if isinstance(prompts, str):
            raise TypeError("tokenize/encode take a list of prompts, not a single string")
        n = self.max_length
        for i, ids in enumerate(self.tokenizer(list(prompts), verbose=False).input_ids):  # untruncated: count
            if len(ids) > n:
                cut = len(ids) - n
                warnings.warn(
                    f"prompt {i} is {len(ids)} tokens; the last {cut} were cut (T5 sees at most {n})",
                    stacklevel=3,
                )
        enc = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=n,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = enc.input_ids, enc.attention_mask.bool()
        # Reference rule for the negative prompt "": no tokens at all (not even EOS), so the DiT sees no text.
        # Only the exact empty string: " " keeps its EOS token, as in the reference.
        empty = torch.tensor([p == "" for p in prompts], dtype=torch.bool)
        ids[empty], mask[empty] = 0, False
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

    def to(self, device: str | torch.device) -> "TextEncoder":
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
