"""mochi_preview: Genmo's Mochi 1 preview text-to-video model, in clear and lean PyTorch.

The names below are imported on first use, so that `python -m mochi_preview.verify` (and other light commands)
start without importing torch and transformers.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    ".components": ("MochiScheduler", "MochiVAE", "VideoProcessor"),
    ".dit": ("AsymmDiT", "DiTConfig", "load_dit"),
    ".lora": ("LoraMixin", "load_lora"),
    ".pipeline": ("MochiOutput", "MochiPipeline"),
    ".sampling": ("DiTCall", "TextCondition", "denoise", "get_noise", "linear_quadratic_schedule"),
    ".text": ("TextEncoder",),
    ".vae": ("denormalize_latents", "load_vae_decoder", "load_vae_encoder", "normalize_latents"),
    ".video": (
        "encode_video",
        "export_to_gif",
        "export_to_video",
        "frames_digest",
        "load_image",
        "load_video",
        "read_video",
        "stream_digest",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'mochi_preview' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
