"""Per-frame sigmas in the DiT (Pusa V0.5) and the per-frame sampler: equal sigmas are the one-sigma path bit for
bit, each token is modulated by its own frame's conditioning, the sampler steps each frame by its own d sigma, and a
Pusa model folder is found and loads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dit_fixtures import randomize_, text_inputs
from einops import rearrange

from mochi_preview import AsymmDiT, pusa
from mochi_preview.configs import CONFIGS, dit_config
from mochi_preview.dit import load_dit, save_dit_native
from mochi_preview.dit.tokens import TokenLayout
from mochi_preview.sampling import TextCondition, denoise, linear_quadratic_schedule

CFG = dit_config(depth=3, num_heads=2, dim_y=128, text_dim=64)
SHAPE = (2, 12, 3, 2, 6)  # 3 latent frames of 1 x 3 tokens: N = 9, split 5 + 4 (one padding token) over 2 ranks
SIGMA = torch.tensor([[0.9, 0.5, 0.05], [1.0, 0.3, 0.3]])


def make_model() -> AsymmDiT:
    return randomize_(AsymmDiT(CFG), seed=3).eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


def make_inputs():
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    return latents, *text_inputs(2, valid=(5, 9))


def text(seed: int) -> TextCondition:
    return TextCondition(*text_inputs(1, valid=(6,), seed=seed))


# ---- the DiT -------------------------------------------------------------------------------------------------


def test_equal_frame_sigmas_are_bitwise_the_one_sigma_path(model):
    dit = model
    latents, feats, mask = make_inputs()
    with torch.no_grad():
        one = dit(latents, torch.tensor([0.7, 0.25]), feats, mask)
        per_frame = dit(latents, torch.tensor([[0.7] * 3, [0.25] * 3]), feats, mask)
        one_row = dit(latents[:1], 0.7, feats[:1], mask[:1])
        per_frame_row = dit(latents[:1], torch.full((1, 3), 0.7), feats[:1], mask[:1])
    assert torch.equal(per_frame, one)
    assert torch.equal(per_frame_row, one_row)


def per_token_reference(dit: AsymmDiT, latents, sigma, feats, mask) -> torch.Tensor:
    """The DiT written out with an explicit conditioning vector per visual token (as Pusa's own code builds it):
    c for token n = t_embedder(sigma of n's frame) + pooled caption, modulations computed per token; the text
    stream's c is the mean over frames of c (before the SiLU). Norms written out here, not taken from layers.py."""
    b, _, t, h, w = latents.shape
    rows, cols = h // 2, w // 2
    n = t * rows * cols
    rms = lambda v, eps=1e-6: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)  # noqa: E731
    x = rearrange(
        dit.x_embedder.proj(rearrange(latents, "b c t h w -> (b t) c h w")), "(b t) d h w -> b (t h w) d", b=b
    )
    token_sigma = sigma.repeat_interleave(rows * cols, dim=1)  # (B, N): token n lies in frame n // (rows * cols)
    pooled = dit.t5_y_embedder(feats, mask)  # (B, Dx)
    c = torch.stack([dit.t_embedder(token_sigma[:, i]) for i in range(n)], dim=1) + pooled[:, None]  # (B, N, Dx)
    c_text = c[:, :: rows * cols].mean(dim=1)  # (B, Dx): mean over the frames (one token of each)
    y = dit.t5_yproj(feats)
    attn = dit.attention.plan(mask, n, x.device, x.dtype, dit.cfg.head_dim)
    rope = dit.rope_tables(t, rows, cols, x.device)
    for block in dit.blocks:
        s_msa, g_msa, s_mlp, g_mlp = block.mod_x(F.silu(c)).chunk(4, dim=-1)  # (B, N, Dx) each
        mod_y = block.mod_y(F.silu(c_text))[:, None]  # (B, 1, 4 Dy or Dy)
        y_scale = mod_y.chunk(4, dim=-1) if block.update_y else (mod_y,)
        x_attn, y_attn = block.attn(rms(x) * (1 + s_msa), rms(y) * (1 + y_scale[0]), rope, attn, TokenLayout())
        x = x + rms(x_attn) * torch.tanh(g_msa)
        x = x + rms(block.mlp_x(rms(x) * (1 + s_mlp))) * torch.tanh(g_mlp)
        if block.update_y:
            y = y + rms(y_attn) * torch.tanh(y_scale[1])
            y = y + rms(block.mlp_y(rms(y) * (1 + y_scale[2]))) * torch.tanh(y_scale[3])
    shift, scale = dit.final_layer.mod(F.silu(c)).chunk(2, dim=-1)  # (B, N, Dx) each
    x = dit.final_layer.linear(F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift)
    return rearrange(x, "b (t h w) (p1 p2 c) -> b c t (h p1) (w p2)", t=t, h=rows, w=cols, p1=2, p2=2)


def test_per_frame_modulation_matches_a_per_token_construction(model):
    latents, feats, mask = make_inputs()
    with torch.no_grad():
        ours = model(latents, SIGMA, feats, mask)
        ref = per_token_reference(model, latents, SIGMA, feats, mask)
        one_sigma = model(latents, SIGMA[:, 0], feats, mask)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert (ours - one_sigma)[0].abs().amax() > 1e-2  # the frames' sigmas matter


def test_frame_sigma_shape_errors_name_the_valid_shapes(model):
    latents, feats, mask = make_inputs()
    with pytest.raises(ValueError, match=r"sigma must be a number, \(2,\) or \(2, 3\)"):
        model(latents, torch.zeros(2, 4), feats, mask)


def _cp_velocity(rank: int) -> torch.Tensor:
    """One rank of a 2-process gloo group: the per-frame forward with its share of the tokens."""
    from mochi_preview.distributed import ContextParallel, SequenceParallel

    cp = ContextParallel(cfg_parallel=False, device="cpu")
    dit = make_model().set_token_layout(cp.token_layout())
    assert isinstance(dit.token_layout, SequenceParallel)
    with torch.no_grad():
        return dit(*make_inputs()[:1], SIGMA, *make_inputs()[1:])


def test_per_frame_path_under_context_parallelism(model, tmp_path):
    from distributed_worker import forked_ranks

    got = forked_ranks(_cp_velocity, tmp_path, timeout=60)[0]
    latents, feats, mask = make_inputs()
    with torch.no_grad():
        expected = model(latents, SIGMA, feats, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---- the sampler ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cond_frames, multiplier, batch_cfg", [((), 0.0, False), ((0,), 1.0, True)])
def test_one_shared_schedule_is_sampling_denoise(model, cond_frames, multiplier, batch_cfg):
    # No conditioning frame, or one noised as much as the rest (multiplier 1): every frame shares one schedule.
    z = torch.randn(1, 12, 3, 2, 4, generator=torch.Generator().manual_seed(1))
    sigmas = linear_quadratic_schedule(3)
    with torch.no_grad():
        expected = denoise(model, z, sigmas, text(1), text(2), [4.5, 1.0, 3.0], batch_cfg)
        ours = pusa.denoise_per_frame(
            model, z, sigmas, text(1), text(2), [4.5, 1.0, 3.0], cond_frames, multiplier, batch_cfg
        )
    assert torch.equal(ours, expected)


class Recorder:
    """A stand-in DiT recording the sigmas it is given, returning a fixed velocity."""

    def __init__(self, velocity: torch.Tensor):
        self.velocity, self.sigmas = velocity, []

    def __call__(self, z, sigma, features, mask):
        self.sigmas.append(sigma.clone())
        return self.velocity.expand(z.shape[0], -1, -1, -1, -1)


def test_conditioning_frames_are_held_at_their_noise_level():
    g = torch.Generator().manual_seed(2)
    noise, v = torch.randn(1, 12, 4, 2, 2, generator=g), torch.randn(1, 12, 4, 2, 2, generator=g)
    image = torch.randn(1, 12, 1, 2, 2, generator=g)
    sigmas = linear_quadratic_schedule(6)

    # Clean conditioning (multiplier 0): frame 0 starts at the image, the model sees sigma 0 there, it never moves.
    z0 = pusa.start_latents(noise, image, (0,))
    assert torch.equal(z0[:, :, :1], image) and torch.equal(z0[:, :, 1:], noise[:, :, 1:])
    model = Recorder(v)
    z = pusa.denoise_per_frame(model, z0, sigmas, text(1), cond_frames=(0,))
    assert torch.equal(z[:, :, 0], image[:, :, 0])
    for i, seen in enumerate(model.sigmas):
        assert seen.shape == (1, 4) and seen[0, 0] == 0 and torch.all(seen[0, 1:] == torch.tensor(sigmas[i]).float())
    # The other frames took every Euler step: noise + (1 - 0) * v.
    torch.testing.assert_close(z[:, :, 1:], noise[:, :, 1:] + v[:, :, 1:], rtol=0, atol=1e-6)

    # Noised conditioning: frame 0 starts at (1 - m) x + m eps, is seen at sigma_i * m and steps by m * d sigma.
    m = 0.3
    z0 = pusa.start_latents(noise, image, (0,), noise_multiplier=m)
    torch.testing.assert_close(z0[:, :, :1], (1 - m) * image + m * noise[:, :, :1])
    model = Recorder(v)
    z = pusa.denoise_per_frame(model, z0, sigmas, text(1), cond_frames=(0,), noise_multiplier=m)
    seen = torch.stack(model.sigmas)[:, 0]  # (steps, T)
    torch.testing.assert_close(seen[:, 0], m * torch.tensor(sigmas[:-1]).float())
    torch.testing.assert_close(z[:, :, 0], z0[:, :, 0] + m * v[:, :, 0], rtol=0, atol=1e-6)


def test_task_schedules():
    sigmas = [1.0, 0.6, 0.0]
    assert pusa.conditioned_frames("text_to_video", 5) == ()
    assert pusa.conditioned_frames("image_to_video", 5) == (0,)
    assert pusa.conditioned_frames("extension", 5, num_cond=2) == (0, 1)
    table = pusa.frame_sigmas(sigmas, 4, pusa.conditioned_frames("extension", 4, 2), noise_multiplier=0.25)
    expected = torch.tensor([[0.25, 0.25, 1.0, 1.0], [0.15, 0.15, 0.6, 0.6], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(table, expected)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: pusa.conditioned_frames("i2v", 5), "task must be one of"),
        (lambda: pusa.conditioned_frames("extension", 3, num_cond=3), "extension conditions 1 to 2"),
        (lambda: pusa.frame_sigmas([1.0, 0.0], 3, (0,), noise_multiplier=1.5), r"noise_multiplier must be in \[0, 1\]"),
        (
            lambda: pusa.frame_sigmas([1.0, 0.0], 3, (3,)),
            r"cond_frames must be distinct latent frame indices in \[0, 3\)",
        ),
        (lambda: pusa.frame_sigmas([1.0, 0.0], 2, (0, 1)), "nothing is left to generate"),
        (
            lambda: pusa.start_latents(torch.zeros(1, 12, 3, 2, 2), None, (0,)),
            r"cond_latents must be \(B, C, 1, 2, 2\)",
        ),
    ],
)
def test_bad_settings_are_explained(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- the model folder ----------------------------------------------------------------------------------------


def test_pusa_folder_is_detected_and_its_dit_loads(tmp_path):
    tiny = CONFIGS["tiny"].dit
    base, tuned = randomize_(AsymmDiT(tiny), seed=1), randomize_(AsymmDiT(tiny), seed=2)
    plain = tmp_path / "mochi"
    plain.mkdir()
    save_dit_native(plain / "dit.safetensors", base)
    assert not pusa.is_pusa_folder(plain) and pusa.dit_file(plain) == plain

    folder = tmp_path / "pusa"
    folder.mkdir()
    save_dit_native(folder / "dit.safetensors", base)  # a base DiT beside it must not be the one loaded
    save_dit_native(folder / pusa.PUSA_DIT_FILE, tuned)
    assert pusa.is_pusa_folder(folder)
    loaded = load_dit(pusa.dit_file(folder), dtype=torch.float32)
    state = tuned.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
