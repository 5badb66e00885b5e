"""One rank of the context-parallel tests: `python distributed_worker.py OUT SCENARIO...` with torchrun's env vars
(or `run(OUT, SCENARIOS)` in a forked process, as tests/test_distributed.py does).

Rank 0 saves what it computed to OUT (torch.save); tests/test_distributed.py compares it with one process.
"""

from __future__ import annotations

import copy
import sys
import time

import torch
import torch.distributed as dist
from dit_fixtures import randomize_, text_inputs

from mochi_preview import AsymmDiT, DiTConfig
from mochi_preview.distributed import CFGParallelDiT, ContextParallel, SequenceParallel, init_distributed, shard_dit
from mochi_preview.dit.tokens import TokenLayout
from mochi_preview.sampling import TextCondition, denoise, linear_quadratic_schedule
from mochi_preview.vae import Decoder, DecoderConfig, decode

# 6 heads: 2, 3 and 6 ranks divide them. Token counts 20 = 2*2*5 (not divisible by 3) and 15 = 3*1*5 (not by 2).
CFG = DiTConfig(depth=2, num_heads=6, head_dim=32, dim_y=64, mlp_hidden_x=256, mlp_hidden_y=128, text_dim=32)
LATENT_SHAPES = [(1, 12, 2, 4, 10), (1, 12, 3, 2, 10)]
SIGMAS = linear_quadratic_schedule(3)
GUIDANCE = 4.5
TILED = dict(tiles=(1, 2), overlap=1)  # two tiles across, sharing one latent column
DECODERS = {
    "plain": DecoderConfig(channels=(32, 32, 32, 32), num_res_blocks=(1, 1, 1, 1, 1)),
    "attention": DecoderConfig(channels=(32, 32, 32, 32), num_res_blocks=(1, 1, 1, 1, 1), has_attention=(True,) * 5),
}


def make_dit() -> AsymmDiT:
    return randomize_(AsymmDiT(CFG), seed=11).eval()


def make_text():
    cond = TextCondition(*text_inputs(1, length=16, dim=CFG.text_dim, valid=(7,), seed=1))
    uncond = TextCondition(*text_inputs(1, length=16, dim=CFG.text_dim, valid=(2,), seed=2))
    batch = text_inputs(2, length=16, dim=CFG.text_dim, valid=(3, 11), seed=3)  # B = 2, different lengths
    return cond, uncond, batch


def make_latents(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))


def make_decoder(name: str) -> Decoder:
    torch.manual_seed(5)
    decoder = Decoder(DECODERS[name]).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.mul_(2.0 if p.ndim > 1 else 1.0)  # default init shrinks activations to ~0: make the frames busy
    return decoder


def reference(dit: AsymmDiT) -> dict:
    """What one process computes, under the same names as `run_dit`."""
    cond, uncond, batch = make_text()
    out = {}
    with torch.no_grad():
        for shape in LATENT_SHAPES:
            z = make_latents(shape)
            out[f"{shape}/latents"] = denoise(dit, z, SIGMAS, cond, uncond, GUIDANCE)
            zz = torch.cat([z, -z])
            out[f"{shape}/batch2"] = dit(zz, torch.tensor([0.7, 0.2]), *batch)
    return out


def run_dit(cfg_parallel: bool) -> dict:
    world = dist.get_world_size()
    base = make_dit()
    sharded = copy.deepcopy(base)
    cp = ContextParallel(cfg_parallel=cfg_parallel)
    cond, uncond, batch = make_text()
    layout = cp.token_layout()
    # One rank per CFG half (2 ranks, CFG parallel): the DiT shares nothing, so it gets the one-process layout.
    assert type(layout) is (SequenceParallel if cp.seq_size > 1 else TokenLayout), (cp.seq_size, layout)
    out = {}
    for name, dit in (("", base), ("sharded/", shard_dit(sharded, cp))):
        dit.set_token_layout(layout)
        model = CFGParallelDiT(dit, cp) if cfg_parallel else dit
        with torch.no_grad():
            for shape in LATENT_SHAPES:
                z = make_latents(shape)
                out[f"{name}{shape}/latents"] = denoise(model, z, SIGMAS, cond, uncond, GUIDANCE, cfg_parallel)
                if not cfg_parallel:
                    zz = torch.cat([z, -z])
                    out[f"{name}{shape}/batch2"] = dit(zz, torch.tensor([0.7, 0.2]), *batch)
    assert world == 1 or sum(p.numel() for p in sharded.blocks.parameters()) < sum(
        p.numel() for p in base.blocks.parameters()
    ), "sharding kept every block"
    out["bytes_sent"] = cp.bytes_sent
    return out


def run_vae() -> dict:
    out = {}
    with torch.no_grad():
        for name in DECODERS:
            decoder = make_decoder(name)
            for t in (1, 2, 5):  # fewer latent frames than ranks, and uneven slices
                z = make_latents((1, 12, t, 3, 4))
                out[f"{name}/{t}"] = decode(decoder, z, group=dist.group.WORLD)
        z = make_latents((1, 12, 5, 3, 4))
        out["plain/5/tiled"] = decode(make_decoder("plain"), z, mode="tiled", group=dist.group.WORLD, **TILED)
    return out


def run_failure(hang: bool) -> None:
    """Rank 1 raises in the first block while the others wait for it in the all-to-all."""
    cp = ContextParallel(cfg_parallel=False)  # sequence parallel: every rank needs rank 1 inside every block
    dit = make_dit().set_token_layout(cp.token_layout())

    def boom(module, args):
        if cp.rank == 1:
            print(f"raising at {time.time():.3f}", flush=True)
            raise ValueError("boom from the test")

    dit.blocks[0].attn.qkv_x.register_forward_pre_hook(boom)
    cond, _, _ = make_text()
    try:
        with cp.guard(), torch.no_grad():
            dit(make_latents(LATENT_SHAPES[0]), 0.5, cond.features, cond.mask)
    except ValueError as e:
        if hang:  # this process lives on (e.g. a notebook that caught the error): the others must still stop
            print(f"caught {e!r}, living on", flush=True)
            time.sleep(120)
        raise


SCENARIOS = {
    "dit": lambda: run_dit(cfg_parallel=False),
    "dit_cfg": lambda: run_dit(cfg_parallel=True),
    "vae": run_vae,
    "fail": lambda: run_failure(hang=False),
    "fail_hang": lambda: run_failure(hang=True),
}


def run(out_path: str, scenarios: list[str]) -> None:
    """This rank's part: join the group (torchrun's env vars), run the scenarios, rank 0 saving after each."""
    torch.set_num_threads(1)
    init_distributed(timeout=60)
    results = {}
    for name in scenarios:  # the failure scenarios come last
        results[name] = SCENARIOS[name]()
        if dist.get_rank() == 0:
            torch.save(results, out_path)
    dist.destroy_process_group()


def main() -> None:
    run(sys.argv[1], sys.argv[2:])


if __name__ == "__main__":
    main()
