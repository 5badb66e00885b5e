"""The AsymmVAE: a causal video decoder and encoder with Genmo's native semantics, and latent normalization."""

from .decode import DecodePlan, decode, estimate_decode_bytes, plan_decode
from .latents import LATENTS_MEAN, LATENTS_STD, denormalize_latents, load_latent_stats, normalize_latents
from .layout import infer_decoder_config, infer_encoder_config, load_vae_decoder, load_vae_encoder
from .model import Decoder, DecoderConfig, Encoder, EncoderConfig, fourier_features
from .stream import RankBoundaryState, StreamState

__all__ = [
    "LATENTS_MEAN",
    "LATENTS_STD",
    "DecodePlan",
    "Decoder",
    "DecoderConfig",
    "Encoder",
    "EncoderConfig",
    "RankBoundaryState",
    "StreamState",
    "decode",
    "denormalize_latents",
    "load_latent_stats",
    "estimate_decode_bytes",
    "fourier_features",
    "infer_decoder_config",
    "infer_encoder_config",
    "load_vae_decoder",
    "load_vae_encoder",
    "normalize_latents",
    "plan_decode",
]
