"""torch.compile of the VAE decoder without recompiles: one compiled function (`layers.norm_silu_pad`) serves every
ResBlock, with the stream state kept outside it, so the number of compilations does not grow with the blocks, the
video lengths or the decode modes, dynamo's recompile limit is never reached, and the video is the eager one.

Compilations are counted with a counting backend that runs the captured graphs as they are (no inductor builds).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from mochi_preview.vae import Decoder, DecoderConfig, StreamState, decode
from mochi_preview.vae import layers as vae_layers


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code is cached per function: every test counts its own compilations."""
    torch._dynamo.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


def tiny_decoder(blocks: int, attention: bool = False, seed: int = 1) -> Decoder:
    config = DecoderConfig(
        channels=(32, 32, 32, 32),
        num_res_blocks=(blocks,) * 5,
        has_attention=(False, False, attention, False, False),
    )
    decoder = Decoder(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if name.endswith("weight") and ("norm" in name or ".stack.0." in name or ".stack.3." in name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g) / max(p[0].numel() if p.ndim > 1 else 1, 1) ** 0.5)
    return decoder


def latents(t: int, h: int = 2, w: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 12, t, h, w, generator=torch.Generator().manual_seed(seed))


def decodes(decoder: Decoder, lengths=(2, 3)) -> list[torch.Tensor]:
    """Full and streaming decodes (1 and 2 latent frames per chunk) of videos of several lengths."""
    out = []
    with torch.no_grad():
        for t in lengths:
            z = latents(t, seed=t)
            out += [decode(decoder, z, mode="full"), decode(decoder, z, mode="streaming", frames_per_chunk=1)]
            out.append(decode(decoder, z, mode="streaming", frames_per_chunk=2))
    return out


def compiled_counts(blocks: int, lengths=(2, 3), attention: bool = False) -> tuple[int, list, list]:
    """(compiled frames, the compiled decodes, the eager decodes) for a decoder with `blocks` ResBlocks per level."""
    decoder = tiny_decoder(blocks, attention)
    eager = decodes(decoder, lengths)
    counter = CompileCounter()
    decoder.compile_blocks(backend=counter)
    compiled = decodes(decoder, lengths)
    return counter.frame_count, compiled, eager


def test_compilations_do_not_grow_with_blocks_or_lengths(caplog):
    caplog.set_level(logging.WARNING, logger="torch._dynamo")
    one, compiled, eager = compiled_counts(blocks=1)
    torch._dynamo.reset()
    three, _, _ = compiled_counts(blocks=3)
    torch._dynamo.reset()
    longer, _, _ = compiled_counts(blocks=3, lengths=(1, 2, 3, 5, 6))
    # {a chunk of 1 frame, of more} x {a chunk that starts the video, a later one}: 4 graphs, however many blocks
    # (15 or 45 ResBlocks here, each run twice per chunk), chunks and lengths
    assert one == three == longer <= 4
    assert not [r for r in caplog.records if "recompile" in r.getMessage()]  # no recompile-limit warning
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_compiled_decoder_with_attention_and_stepping_is_the_eager_one(monkeypatch):
    """Levels stepping one frame at a time (each step a strided view of the level) and an attention level (run
    outside the compiled code, with its keys and values in the stream state) give the eager video."""
    monkeypatch.setattr(vae_layers, "STEP_ELEMENTS", 1)  # every level steps one frame at a time
    frames, compiled, eager = compiled_counts(blocks=2, attention=True)
    assert frames <= 4
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_the_state_is_kept_outside_the_compiled_code():
    """The compiled function never sees the stream state: it gets tensors and returns the frames to carry."""
    decoder = tiny_decoder(1)
    seen = []

    def math(*args):
        seen.append(tuple(type(a).__name__ for a in args))
        return vae_layers.norm_silu_pad(*args)

    for block in decoder.modules():
        if isinstance(block, vae_layers.ResBlock):
            block.use_compiled(math)
    state = StreamState()
    with torch.no_grad():
        decoder(latents(1), state)
        decoder(latents(1, seed=1), state)
    assert seen and all("StreamState" not in kinds for kinds in seen)
    assert {kinds[1] for kinds in seen} == {"NoneType", "Tensor"}  # the video's start, then the carried frames
    assert len(list(state.tensors())) == 2 * 5  # the last frames of both convolutions of each of the 5 ResBlocks


def test_compiled_blocks_keep_the_weights_and_keys():
    decoder = tiny_decoder(1)
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    decoder.compile_blocks(backend=CompileCounter())
    after = decoder.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
