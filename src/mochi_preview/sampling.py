"""Flow-matching sampling: the linear-quadratic sigma schedule, initial noise, and the Euler loop with CFG.

Convention: z_sigma = (1 - sigma) * z0 + sigma * noise, sigma = 1 is pure noise, the model predicts v = z0 - noise,
and an Euler step moves z by (sigma_i - sigma_{i+1}) * v. The sampler state stays fp32 whatever the model's dtype.

The model is any callable `model(z, sigma, features, mask) -> velocity` (the DiT, or distributed.CFGParallelDiT);
prompts travel as `TextCondition`s. A `dit_hook` sees every model call as a `DiTCall` and returns its velocity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .geometry import MOCHI

# ---- schedule and noise ----------------------------------------------------------------------------------------


def linear_quadratic_schedule(
    num_steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> list[float]:
    """num_steps + 1 sigmas from 1.0 to 0.0: linear down to 1 - threshold_noise over `linear_steps`, then quadratic."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1; got {num_steps}")
    if num_steps == 1:
        return [1.0, 0.0]
    if linear_steps is None:
        linear_steps = num_steps // 2
    if not 0 < linear_steps < num_steps:
        raise ValueError(f"linear_steps must be in [1, {num_steps - 1}] for {num_steps} steps; got {linear_steps}")
    if not 0.0 <= threshold_noise <= 1.0:
        raise ValueError(f"threshold_noise must be in [0, 1]; got {threshold_noise}")
    lin, tau, n = linear_steps, threshold_noise, num_steps
    quad = n - lin
    d = lin - tau * n
    a = d / (lin * quad**2)
    b = tau / lin - 2 * d / quad**2
    c = a * lin**2
    progress = [i * tau / lin for i in range(lin)] + [a * i**2 + b * i + c for i in range(lin, n)] + [1.0]
    return [1.0 - x for x in progress]


def pcm_linear_quadratic_schedule(
    num_steps: int = 8, phases: int = 50, threshold_noise: float = 0.1, linear_steps: int = 750, points: int = 1000
) -> list[float]:
    """FastMochi's schedule: `num_steps` evenly spaced picks from `phases` of a `points`-step linear-quadratic schedule.

    The fine schedule (without its terminal 0) is thinned to every (points / phases)-th value, the values at
    floor(linspace(0, phases, num_steps, endpoint=False)) are kept, and 0 is appended (spec 13.6: phases 50 in
    FastMochi's distillation and demo, 100 in its inference script).
    """
    if phases < 1 or points % phases:
        raise ValueError(f"phases must divide points ({points}); got {phases}")
    if not 1 <= num_steps <= phases:
        raise ValueError(f"num_steps must be in [1, {phases}] (the phases); got {num_steps}")
    coarse = linear_quadratic_schedule(points, threshold_noise, linear_steps)[: -1 : points // phases]
    return [coarse[i * phases // num_steps] for i in range(num_steps)] + [0.0]


SCHEDULES = ("linear_quadratic", "pcm_linear_quadratic")
PRESETS: dict[str, dict[str, object]] = {
    "fast": {"num_steps": 8, "cfg_scale": 1.5, "schedule": "pcm_linear_quadratic"},  # FastMochi (spec 13.6)
}
"""Named sampling recipes, as settings under their file names (like a model folder's `mochi_defaults.json`)."""


def schedule_sigmas(
    schedule: str, num_steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> list[float]:
    """The sigmas of a named schedule: "linear_quadratic" (Mochi's) or "pcm_linear_quadratic" (FastMochi's, which
    has its own fixed threshold and linear steps)."""
    if schedule == "linear_quadratic":
        return linear_quadratic_schedule(num_steps, threshold_noise, linear_steps)
    if schedule == "pcm_linear_quadratic":
        return pcm_linear_quadratic_schedule(num_steps)
    raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")


def check_sigmas(sigmas: Sequence[float]) -> list[float]:
    """Validate a custom schedule: at least two values in [0, 1], strictly decreasing."""
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2:
        raise ValueError(f"a sigma schedule needs at least 2 values (start and end); got {len(sigmas)}")
    if any(not 0.0 <= s <= 1.0 for s in sigmas):
        raise ValueError("sigmas must lie in [0, 1] (1 = pure noise, 0 = clean)")
    if any(s0 <= s1 for s0, s1 in zip(sigmas, sigmas[1:])):
        raise ValueError("sigmas must be strictly decreasing (from noise towards data)")
    return sigmas


def guidance_per_step(guidance: float | Sequence[float], steps: int) -> list[float]:
    """One CFG scale per step: a single value repeated, or a list that must hold exactly one value per step."""
    scales = [float(guidance)] * steps if isinstance(guidance, (int, float)) else [float(g) for g in guidance]
    if len(scales) != steps:
        raise ValueError(f"guidance has {len(scales)} values but there are {steps} steps")
    return scales


def get_noise(
    batch: int, num_frames: int, height: int, width: int, seed: int | None = None, generator=None
) -> torch.Tensor:
    """Initial fp32 noise (B, 12, T, H/8, W/8), drawn on the generator's device.

    By default from a CPU generator seeded with `seed`: the same seed gives the same video on any device (and matches
    diffusers' MochiPipeline called with a CPU generator of that seed). A `generator` on another device (a CUDA
    generator) draws the noise there, so it comes back on that device, and differs from a CPU draw of the same seed.
    """
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(0 if seed is None else seed)
    shape = (batch, *MOCHI.latent_shape(num_frames, height, width))
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


# ---- text conditions and model calls ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TextCondition:
    """Encoded prompts, one row per video: T5 features (B, L, D) and their mask (B, L), True on real text tokens."""

    features: torch.Tensor
    mask: torch.Tensor

    def __getitem__(self, rows: slice) -> TextCondition:
        """The prompts in `rows` (a slice of the batch)."""
        return TextCondition(self.features[rows], self.mask[rows])

    @staticmethod
    def cat(first: TextCondition, second: TextCondition) -> TextCondition:
        """One batch of both, the shorter text padded (features with zeros, the mask with False)."""
        return TextCondition(_pad_cat(first.features, second.features), _pad_cat(first.mask, second.mask))


def _pad_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate along the batch, padding the text axis of the shorter one with zeros."""
    n = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.cat([t, t.new_zeros(t.shape[0], n - t.shape[1], *t.shape[2:])], dim=1)
    return torch.cat([pad(a), pad(b)])


@dataclass(frozen=True)
class DiTCall:
    """One model call of the sampler, as a `dit_hook` sees it. `call()` runs the model on these inputs and returns
    the velocity; `call(latents=..., text=...)` runs it on edited ones.

    `branch` is "cond" (the prompts), "uncond" (the negative prompts) or "both" (batched CFG: `latents` and `text`
    hold the cond rows, then the uncond rows). `sigma` is the noise level of `latents`, `step` the Euler step of
    `num_steps` (None when the caller did not say).
    """

    model: Callable[..., torch.Tensor]
    step: int
    sigma: float
    latents: torch.Tensor
    text: TextCondition
    branch: str
    num_steps: int | None = None

    def inputs(self, latents: torch.Tensor | None = None, text: TextCondition | None = None) -> tuple:
        """The model's arguments (latents, sigma (B,) fp32, text features, text mask), with any edits applied."""
        z = self.latents if latents is None else latents
        text = self.text if text is None else text
        sigma = torch.full((z.shape[0],), self.sigma, dtype=torch.float32, device=z.device)
        return z, sigma, text.features, text.mask

    def __call__(self, latents: torch.Tensor | None = None, text: TextCondition | None = None) -> torch.Tensor:
        return self.model(*self.inputs(latents, text))


DiTHook = Callable[[DiTCall], torch.Tensor]
"""Wraps each model call: `hook(call) -> velocity`, e.g. `call()` plus bookkeeping, a cached velocity, or
`call(latents=edited)`."""


# ---- the sampler -----------------------------------------------------------------------------------------------


def cfg_velocity(
    model: Callable[..., torch.Tensor],
    z: torch.Tensor,
    sigma: float,
    cond: TextCondition,
    uncond: TextCondition | None,
    scale: float,
    batch_cfg: bool = False,
    step: int = 0,
    dit_hook: DiTHook | None = None,
    num_steps: int | None = None,
) -> torch.Tensor:
    """Classifier-free guided velocity at noise level `sigma`: v_u + scale * (v_c - v_u), in fp32."""

    def velocity(branch: str, latents: torch.Tensor, text: TextCondition) -> torch.Tensor:
        call = DiTCall(model, step, sigma, latents, text, branch, num_steps)
        return (call() if dit_hook is None else dit_hook(call)).float()

    if uncond is None or scale == 1.0:
        return velocity("cond", z, cond)
    if batch_cfg:
        v_c, v_u = velocity("both", torch.cat([z, z]), TextCondition.cat(cond, uncond)).chunk(2)
    else:
        v_c = velocity("cond", z, cond)
        v_u = velocity("uncond", z, uncond)
    return v_u + scale * (v_c - v_u)


def denoise(
    model: Callable[..., torch.Tensor],
    z: torch.Tensor,
    sigmas: Sequence[float],
    cond: TextCondition,
    uncond: TextCondition | None = None,
    guidance: float | Sequence[float] = 4.5,
    batch_cfg: bool = False,
    callback: Callable[[int, float, torch.Tensor], torch.Tensor | None] | None = None,
    dit_hook: DiTHook | None = None,
) -> torch.Tensor:
    """Euler integration of the flow from sigmas[0] to sigmas[-1]; `guidance` is a scale or one scale per step.

    `callback(step, sigma_next, z)` runs after each step; a tensor it returns replaces z. `dit_hook` wraps each
    model call (see `DiTCall`).
    """
    sigmas = check_sigmas(sigmas)
    scales = guidance_per_step(guidance, len(sigmas) - 1)
    z = z.float()
    for i, scale in enumerate(scales):
        v = cfg_velocity(model, z, sigmas[i], cond, uncond, scale, batch_cfg, i, dit_hook, num_steps=len(scales))
        z = z + (sigmas[i] - sigmas[i + 1]) * v  # the step size is a float64 difference, applied to fp32
        if callback is not None and (replaced := callback(i, sigmas[i + 1], z)) is not None:
            z = replaced.float()
    return z
