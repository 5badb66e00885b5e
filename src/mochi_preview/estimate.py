"""What a generation will cost before it runs: its FLOPs, its seconds on this device and its memory.

Seconds come from the FLOP count and rates measured once per process on the pipeline's own models (`Rates.measure`:
a DiT forward, a VAE decode and the MP4 writer at two small sizes each give a fixed cost per call and a rate; T5 is
timed on one prompt pair), corrected by what finished jobs took (`Rates.observe`). Measure on the thread that will
run the jobs: on a CPU a thread's intra-op threading, and so its speed, is its own. Memory comes from the pipeline's
footprint model (`offload.footprint`, `offload.choose`): the same numbers that pick its memory mode.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import MOCHI
from .offload import choose
from .settings import Settings
from .vae.decode import free_memory, output_bytes
from .video import export_to_video

TEXT_LEN = 256  # T5 positions the DiT's text stream holds (spec §4.2)
PROBE_SECONDS = 0.5  # the larger probe of each model is sized to take about this long
PROBE_TEXT = 16  # valid text tokens in the DiT probes (a short prompt)
REPEATS = 2  # timings per probe size; the fastest counts (spikes from other processes are not the model's cost)


def dit_flops(cfg, visual: int, text: int = TEXT_LEN, text_len: int = TEXT_LEN) -> float:
    """FLOPs (2 per multiply-add) of one forward of one video: every matmul of the joint blocks, attention over the
    `visual` + `text` valid tokens, the patch embedding and the final layer. Text q/k/v use the valid tokens, the text
    projection and MLP all `text_len` positions (as the model runs them); the last block has neither."""
    dx, dy, hx, hy = cfg.dim_x, cfg.dim_y, cfg.mlp_hidden_x, cfg.mlp_hidden_y
    per_block = 2 * (visual * dx + text * dy) * 3 * dx + 4 * (visual + text) ** 2 * dx  # qkv; QK^T and PV
    per_block += 2 * visual * (dx * dx + 3 * dx * hx)  # proj_x, SwiGLU (w1 is 2 hx wide, w2 hx)
    text_stream = 2 * text_len * (dx * dy + 3 * dy * hy)  # proj_y, text SwiGLU
    p2c = cfg.patch_size**2 * cfg.in_channels
    return cfg.depth * per_block + (cfg.depth - 1) * text_stream + 4 * visual * p2c * dx


def attention_flops(cfg, visual: int, text: int = TEXT_LEN) -> float:
    """The part of `dit_flops` in attention (QK^T and PV over the joint sequence): it grows with the square of the
    tokens and runs at its own rate, so it is timed apart from the matmuls."""
    return cfg.depth * 4 * (visual + text) ** 2 * cfg.dim_x


def decoder_flops(cfg, t: int, h: int, w: int) -> float:
    """FLOPs of decoding latents (12, t, h, w) of one video: the 3x3x3 convolutions of every ResBlock and the 1x1
    projections, level by level (each upsampling turns t frames into (t - 1) * st + 1)."""
    c, n = cfg.channels, cfg.num_res_blocks
    resblock = lambda ch, vox: 2 * 2 * 27 * ch * ch * vox  # noqa: E731  (two convolutions)
    vox = t * h * w
    flops = 2 * cfg.latent_dim * c[-1] * vox + n[-1] * resblock(c[-1], vox)
    for i in range(len(c) - 1, 0, -1):
        st, sp = cfg.temporal_expansions[i - 1], cfg.spatial_expansions[i - 1]
        flops += n[i] * resblock(c[i], vox) + 2 * c[i] * c[i - 1] * st * sp * sp * vox
        t, h, w = (t - 1) * st + 1, h * sp, w * sp
        vox = t * h * w
    return flops + n[0] * resblock(c[0], vox) + 2 * c[0] * cfg.out_channels * vox


@dataclass
class Cost:
    """A cost model of one kind of call: `fixed` seconds per call plus `flops / rate`, times `scale` (observed)."""

    fixed: float
    rate: float  # FLOP/s
    scale: float = 1.0

    def seconds(self, flops: float, calls: int = 1) -> float:
        return self.scale * (calls * self.fixed + flops / self.rate)


@dataclass
class Rates:
    """This device's speed for one pipeline (T5 seconds per request; cost models of the DiT's matmuls, its attention,
    the VAE and the MP4 writer), and its free memory when no job runs (`free`: for the job on the device,
    `host_free`: RAM), taken by `refresh` between jobs. The DiT's `scale` corrects its attention too."""

    text: float
    dit: Cost
    vae: Cost
    attention: Cost = field(default_factory=lambda: Cost(fixed=0.0, rate=float("inf")))
    write: Cost = field(default_factory=lambda: Cost(fixed=0.0, rate=float("inf")))  # "FLOPs": the video's values
    other: float = 0.0  # seconds per job outside the stages (the caller's cleanup), as last seen
    free: int = 0
    host_free: int = 0
    observed: int = 0  # finished jobs that corrected the models

    def __str__(self) -> str:
        per = lambda c, unit: f"{c.rate / 1e9:.2f} G{unit}/s + {c.fixed * 1e3:.0f} ms per call"  # noqa: E731
        return (f"T5 {self.text:.2f} s per request; DiT {per(self.dit, 'FLOP')}, attention "
                f"{self.attention.rate / 1e9:.1f} GFLOP/s; VAE {per(self.vae, 'FLOP')}; writing "
                f"{per(self.write, 'value')}; {gib(self.free)} free")  # fmt: skip

    def refresh(self, pipe) -> Rates:
        """Read the free memory now (call it when no job runs: a running job's memory is not free for the next)."""
        m = pipe.memory
        self.host_free = free_memory("cpu")
        self.free = m.budget() if m.mover.copies else int(m.mover.budget_fraction * self.host_free)
        return self

    @classmethod
    @torch.inference_mode()
    def measure(cls, pipe) -> Rates:
        """Time the pipeline's own models on this device (a few seconds at most): T5 on a prompt pair; the DiT and
        the decoder each at a minimal size, then at a size the first timing says takes about PROBE_SECONDS."""
        text = _fastest(lambda: pipe.encode_prompt("a probe", "", do_classifier_free_guidance=True), pipe.device)
        dit, p = pipe.dit, pipe.dit.cfg.patch_size

        def run_dit(side: int) -> float:  # one frame of side x side patches, with a full text
            z = torch.zeros(1, dit.cfg.in_channels, 1, side * p, side * p, device=pipe.device)
            feats = torch.zeros(1, TEXT_LEN, dit.cfg.text_dim, device=pipe.device, dtype=dit.dtype)
            mask = torch.arange(TEXT_LEN, device=pipe.device)[None] < PROBE_TEXT
            return _fastest(lambda: dit(z, torch.tensor([0.5], device=pipe.device), feats, mask), pipe.device)

        def run_attention(n: int) -> float:  # the DiT's heads over a joint sequence of n tokens
            dtype = dit.dtype if pipe.device.type == "cuda" else torch.float32  # CPU attention runs in fp32
            q = torch.zeros(1, dit.cfg.num_heads, n, dit.cfg.head_dim, device=pipe.device, dtype=dtype)
            return _fastest(lambda: F.scaled_dot_product_attention(q, q, q), pipe.device)

        with pipe._on_device(pipe.dit):
            dit_cost = _fit(run_dit, lambda side: dit_flops(dit.cfg, side * side, PROBE_TEXT))
            pipe._release_dit_tables()
        sequences = tuple(2**k for k in range(8, 16))
        attention = _fit(run_attention, lambda n: attention_flops(dit.cfg, n, 0) / dit.cfg.depth, sides=sequences)
        cfg = pipe.decoder.config

        def run_vae(side: int) -> float:
            z = torch.zeros(1, cfg.latent_dim, 2, side, side, device=pipe.device, dtype=_dtype(pipe.decoder))
            return _fastest(lambda: decoder(z), pipe.device)

        with pipe._on_device(pipe.decoder) as decoder:
            vae_cost = _fit(run_vae, lambda side: decoder_flops(cfg, 2, side, side), sides=(1, 2, 4, 8, 16, 32))
        with tempfile.TemporaryDirectory() as folder:

            def run_write(side: int) -> float:  # 13 frames of 16 side x 16 side pixels, encoded as a run's are
                t, y, x = np.ogrid[:13, : 16 * side, : 16 * side]  # moving ramps: smooth, as videos are (noise
                ramp = ((x + 2 * y + 8 * t) % 256 / 255).astype(np.float32)  # costs the encoder far more)
                frames = np.stack([ramp, ramp[:, ::-1], 1 - ramp], axis=-1)
                return _fastest(lambda: export_to_video(frames, Path(folder) / "probe.mp4", fps=30), pipe.device)

            write_cost = _fit(run_write, lambda side: 13 * 3 * (16 * side) ** 2, sides=(1, 2, 4, 8, 16, 32))
        return cls(text, dit_cost, vae_cost, attention, write_cost).refresh(pipe)

    def observe(self, estimate: Estimate, timings: dict[str, float]) -> None:
        """Correct the models by a finished job's seconds: its stages (`MochiOutput.timings`) and "rest" (its wall
        time outside them). The DiT's and VAE's scales become the ratio of what they took to what the probes
        predicted (after the first job, halfway, geometrically); `other` is the rest beyond the predicted writing."""
        if "rest" in timings:
            other = max(timings["rest"] - estimate.stages.get("write", 0), 0.0)
            self.other = (self.other + other) / 2 if self.observed else other
        for name, cost in (("dit", self.dit), ("vae", self.vae)):
            predicted = estimate.stages.get(name, 0) / cost.scale
            if timings.get(name) and predicted > 0:
                ratio = timings[name] / predicted
                cost.scale = math.sqrt(cost.scale * ratio) if self.observed else ratio
        if timings.get("text"):
            self.text = (self.text + timings["text"]) / 2 if self.observed else timings["text"]
        self.observed += 1


@dataclass
class Estimate:
    """One request's predicted cost: seconds per stage, seconds per step, FLOPs, and memory against what is free."""

    stages: dict[str, float]  # text, dit, vae, write (encoding and writing the MP4 and its sidecar), other
    step_seconds: float
    flops: float
    memory: int  # bytes it needs on `where`: the plan's peak, weights included (CPU: its working memory only)
    available: int  # bytes free for it
    host_memory: int  # host bytes for the finished video (float frames, then uint8 for the encoder)
    host_available: int
    where: str  # the device the memory figures are about
    problems: list[str] = field(default_factory=list)  # why it cannot run here (memory), empty when it can

    @property
    def seconds(self) -> float:
        return sum(self.stages.values())


def estimate(
    pipe, settings: Settings, rates: Rates, text_tokens: tuple[int, int] = (TEXT_LEN, 0), batch_cfg: bool | str = "auto"
) -> Estimate:
    """What generating `settings` (checked) with `pipe` will cost. `text_tokens`: valid T5 tokens of the prompt and
    of the negative prompt (the empty negative prompt has none); `batch_cfg` as the run will ask for it."""
    s = settings
    shape = (1, *MOCHI.latent_shape(s.num_frames, s.height, s.width))
    _, _, t, h, w = shape
    p = pipe.dit.cfg.patch_size
    visual = t * (h // p) * (w // p)
    scales = s.guidance_scale if isinstance(s.guidance_scale, list | tuple) else [s.guidance_scale]
    guided = any(g != 1.0 for g in scales)
    texts = [min(n, TEXT_LEN) for n in (text_tokens if guided else text_tokens[:1])]
    step_flops = sum(dit_flops(pipe.dit.cfg, visual, n) for n in texts)
    step_attention = sum(attention_flops(pipe.dit.cfg, visual, n) for n in texts)
    cfg = pipe.decoder.config
    frames = output_bytes(cfg, shape) * 9 // 4  # the float32 frames twice (decoded, converted), then as uint8
    need, batched, where = _memory(pipe, shape, guided, frames, rates.free, batch_cfg)
    calls = 2 if guided and not batched else 1
    attention = rates.dit.scale * step_attention / rates.attention.rate  # the probe's fixed cost is the DiT's
    step_seconds = rates.dit.seconds(step_flops - step_attention, calls) + attention
    vae_flops = decoder_flops(cfg, t, h, w)
    stages = {
        "text": rates.text,
        "dit": s.num_inference_steps * step_seconds,
        "vae": rates.vae.seconds(vae_flops),
        "write": rates.write.seconds(cfg.num_frames(t) * s.height * s.width * 3),
        "other": rates.other,
    }
    host = frames if pipe.memory.mover.copies else 0  # on a CPU device the frames are part of `need`
    problems = []
    if need > rates.free:
        problems.append(f"it needs about {gib(need)} of memory on {where}; {gib(rates.free)} is free")
    if host > rates.host_free:
        problems.append(f"its frames need about {gib(host)} of RAM; {gib(rates.host_free)} is free")
    total_flops = s.num_inference_steps * step_flops + vae_flops
    return Estimate(stages, step_seconds, total_flops, need, rates.free, host, rates.host_free, where, problems)


def _memory(
    pipe, shape: tuple[int, ...], guided: bool, frames: int, budget: int, batch_cfg: bool | str
) -> tuple[int, bool, str]:
    """(bytes the job needs, whether its CFG branches share a DiT call, where) by the pipeline's footprint model and
    memory-mode choice. On a CPU device the weights already sit in RAM: the job needs the largest stage's working
    memory (the decode's with the frames)."""
    fp, m = pipe._footprint(shape, guided), pipe.memory
    plan = choose(m.mode, fp, budget, pipe.device, m.mover.copies, batch_cfg, sequential_ok=pipe.cp is None)
    if not m.mover.copies:
        dit = fp.dit_work_batched if plan.batch_cfg else fp.dit_work
        return max(fp.t5_work, dit, fp.vae_work + frames), plan.batch_cfg, str(pipe.device)
    return plan.need, plan.batch_cfg, f"{pipe.device} ({plan.mode} memory mode)"


def _fit(run, flops, sides=(1, 2, 4, 8, 16, 32, 64, 128)) -> Cost:
    """A cost model from timings at the smallest size and at the largest size whose predicted time is within
    PROBE_SECONDS (the first timing, all taken as compute, bounds the rate from below)."""
    t0, f0 = run(sides[0]), flops(sides[0])
    floor_rate = f0 / max(t0, 1e-6)
    big = max((s for s in sides[1:] if flops(s) / floor_rate <= PROBE_SECONDS), default=sides[1])
    t1, f1 = run(big), flops(big)
    rate = (f1 - f0) / (t1 - t0) if t1 > t0 else f1 / max(t1, 1e-6)
    return Cost(fixed=max(t0 - f0 / rate, 0.0), rate=rate)


def _fastest(fn, device: torch.device) -> float:
    """The fastest of REPEATS timed calls of `fn`, after one untimed call (kernels, allocator, lazy tables)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda *a: None
    times = []
    for _ in range(REPEATS + 1):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def describe(seconds: float) -> str:
    """A duration for people: 0.4 s, 12 s, 3 min 10 s, 2 h 05 min."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
