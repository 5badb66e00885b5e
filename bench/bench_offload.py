"""Bytes each memory mode moves to the device, per sampling step and per video, at the published sizes; and on a
CUDA machine the seconds per step of each mode.

Bytes come from the offload ledger run through the real machinery (`offload.DeviceMemory`, `BlockStreamer`) on the
published models built on the meta device: the ledger device "copies" meta tensors, so nothing is allocated, and
each DiT forward is replayed as its blocks' forward hooks (`BlockStreamer.before` / `after`). "Before" is what the
code of issue 22 moved: model offload copied every component back after its stage; sequential offload loaded and
copied back every DiT and T5 block at every forward, synchronously.

    python bench/bench_offload.py [--frames 31 85 163] [--gib 80 48 40 24 16 12] [--steps 64]
    python bench/bench_offload.py --time [--depth 48] [--time-frames 31] [--time-steps 3]   # s/step (CUDA)

`--time` builds a randomly initialised DiT of the published width (`--depth` blocks; bf16) on the GPU, keeps its
master on the host, and times `--time-steps` CFG steps (batched and not) in each mode: resident, model offload
(the per-video upload timed apart), sequential offload with the blocks the free memory allows resident, with none
resident (everything streamed), and the issue-22 way (each block to the GPU and back, synchronously). Without CUDA
it runs the same code at a toy size on the CPU with a ledger device, as a check of the script (no timings).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mochi_preview.offload import (  # noqa: E402
    BUDGET_FRACTION,
    GIB,
    DeviceMemory,
    Footprint,
    Ledger,
    LedgerMover,
    Mover,
    Plan,
    choose,
    footprint,
)

GB = 1e9


def published_models():
    """The published DiT (bf16, its norms and RoPE frequencies fp32, as `load_dit` keeps them), VAE decoder (bf16)
    and T5-XXL encoder (fp32), on the meta device."""
    from transformers import T5Config, T5EncoderModel

    from mochi_preview.dit import AsymmDiT, DiTConfig
    from mochi_preview.vae import Decoder, DecoderConfig

    with torch.device("meta"):
        dit = AsymmDiT(DiTConfig()).to(torch.bfloat16)
        for name in dit.fp32_parameter_names():
            p = dit.get_parameter(name)
            p.data = p.data.float()
        decoder = Decoder(DecoderConfig()).to(torch.bfloat16)
        t5 = T5EncoderModel(
            T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu")
        )
    return dit, decoder, t5


def memory_for(dit, decoder, t5, mover) -> DeviceMemory:
    parts = {
        "text_encoder": lambda: (t5, t5.encoder.block),
        "dit": lambda: (dit, dit.blocks),
        "decoder": lambda: (decoder, None),
    }
    return DeviceMemory(parts, mover)


def replay(mem: DeviceMemory, n_blocks: int) -> None:
    """One forward of the model whose stage is open: its blocks' hooks, in order (what the forward would fire)."""
    if mem.streamer is not None:
        for i in range(n_blocks):
            mem.streamer.before(i)
            mem.streamer.after(i)


def simulate(models, plan: Plan, steps: int, batched: bool) -> dict[str, int]:
    """Bytes moved to the (ledger) device by one generation of `steps` CFG steps under `plan`, per stage."""
    dit, decoder, t5 = models
    mem = memory_for(dit, decoder, t5, LedgerMover(2**60, Ledger(), strict=False))
    ledger = mem.ledger
    mem.mode = plan.asked
    mem.apply(plan)
    with ledger.during("text"), mem.use("text_encoder", plan):
        replay(mem, len(t5.encoder.block))
    if plan.mode != "resident":
        assert ledger.live == 0 or plan.mode == "resident"
    with ledger.during("dit"), mem.use("dit", plan):
        for _ in range(steps * (1 if batched else 2)):
            replay(mem, len(dit.blocks))
    with ledger.during("vae"), mem.use("decoder", plan):
        pass
    mem.drop_all()
    moved = dict(ledger.last_moved)
    moved.pop("placement", None)
    moved["placement"] = ledger.moved.get("placement", 0)  # resident: the one-time upload
    return moved


def before_issue22(fp: Footprint, mode: str, steps: int, batched: bool) -> tuple[float, float]:
    """(bytes per step, bytes per video) the code of issue 22 copied, both directions: model offload moved each
    component up and back per video; sequential offload also every block up and back at every forward."""
    if mode == "model":
        return 0.0, 2.0 * (fp.t5 + fp.dit + fp.vae)
    if mode == "sequential":
        blocks = fp.dit - fp.dit_rest
        per_step = 2.0 * blocks * (1 if batched else 2)
        return per_step, per_step * steps + 2.0 * (fp.t5 + fp.dit_rest + fp.vae)
    return 0.0, 0.0


def bytes_tables(frames_list: list[int], gibs: list[float], steps: int) -> None:
    from mochi_preview.geometry import MOCHI

    models = published_models()
    dit, decoder, t5 = models
    for frames in frames_list:
        shape = (1, *MOCHI.latent_shape(frames, 480, 848))
        fp = footprint(dit, decoder, t5, shape)
        print(
            f"\n### {frames} frames at 848x480, {steps} steps (weights: T5 {fp.t5 / GB:.1f} GB, DiT {fp.dit / GB:.1f} "
            f"GB in {fp.dit_blocks} blocks of {fp.dit_block / GB:.2f} GB, VAE {fp.vae / GB:.2f} GB; DiT working memory "
            f"{fp.dit_work / GIB:.1f} GiB, batched CFG {fp.dit_work_batched / GIB:.1f} GiB)\n"
        )
        print("| mode | DiT blocks resident | CFG | GB to the device per step | per video | copied back | before: "
              "per step | before: per video |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        rows = [("resident", None), ("model", None), ("sequential, none resident", 0)]
        rows += [(f"sequential, budget {g:g} GiB", g) for g in gibs if g < 40]
        for name, gib in rows:
            mode = name.split(",")[0]
            budget = int(gib * GIB) if gib else 2**60
            if gib == 0:  # the least memory: room for the rest and two streamed blocks
                budget = fp.dit_rest + 2 * fp.dit_block + fp.dit_work
            for batched in (False, True):
                plan = choose(mode, fp, budget, torch.device("cuda"), copies=True, batch_cfg=batched)
                one, two = simulate(models, plan, 1, batched), simulate(models, plan, 2, batched)
                per_step = two["dit"] - one["dit"]  # every step moves the same: a video is linear in the steps
                video = sum(one[k] for k in ("text", "dit", "vae")) + (steps - 1) * per_step
                old_step, old_video = before_issue22(fp, mode, steps, batched)
                k = f"{plan.dit_blocks_resident}/{plan.dit_blocks}"
                first = f" (+{one['placement'] / GB:.1f} GB once)" if mode == "resident" else ""
                print(
                    f"| {name} | {k} | {'batched' if batched else 'one by one'} | {per_step / GB:.1f} | "
                    f"{video / GB:.1f}{first} | 0 | {old_step / GB:.1f} | {old_video / GB:.1f} |"
                )
        print("\nauto's choice by free device memory (the budget is 90% of it):\n")
        print("| device GiB free | auto chose | DiT blocks resident | CFG | estimated peak GiB | GB per step |")
        print("|---|---|---|---|---|---|")
        for gib in gibs:
            plan = choose("auto", fp, int(BUDGET_FRACTION * gib * GIB), torch.device("cuda"), copies=True)
            one, two = simulate(models, plan, 1, plan.batch_cfg), simulate(models, plan, 2, plan.batch_cfg)
            per_step = two["dit"] - one["dit"]
            what = plan.mode + (", T5 leaves after encoding" if plan.mode == "resident" and plan.t5_leaves else "")
            print(
                f"| {gib:g} | {what} | {plan.dit_blocks_resident}/{plan.dit_blocks} | "
                f"{'batched' if plan.batch_cfg else 'one by one'} | {plan.need / GIB:.1f} | {per_step / GB:.1f} |"
            )


# ---- seconds per step (CUDA) -----------------------------------------------------------------------------------


@contextmanager
def naive_streaming(dit, device):
    """The issue-22 sequential offload: each block to the device before it runs, back to the CPU after."""

    def load(module, args):
        module.to(device)

    def unload(module, args, output):
        module.to("cpu")

    hooks = [h for b in dit.blocks for h in (b.register_forward_pre_hook(load), b.register_forward_hook(unload))]
    rest = [t for n, t in [*dit.named_parameters(), *dit.named_buffers()] if not n.startswith("blocks.")]
    masters = [t.data for t in rest]
    for t in rest:
        t.data = t.data.to(device)
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for t, m in zip(rest, masters):
            t.data = m


def time_modes(depth: int, frames: int, steps: int) -> None:
    from mochi_preview.dit import AsymmDiT, DiTConfig, init_weights
    from mochi_preview.geometry import MOCHI
    from mochi_preview.sampling import TextCondition, denoise, linear_quadratic_schedule

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = DiTConfig(depth=depth) if cuda else DiTConfig(depth=depth, num_heads=2, head_dim=32, dim_y=64,
                                                       mlp_hidden_x=128, mlp_hidden_y=128, text_dim=64)  # fmt: skip
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device("meta"):
        dit = AsymmDiT(cfg, attention_backend="sdpa")
    dit = init_weights(dit.to_empty(device=device).to(dtype)).eval().requires_grad_(False)
    for name in dit.fp32_parameter_names():  # as load_dit keeps them
        p = dit.get_parameter(name)
        p.data = p.data.float()
    dit = dit.to("cpu")  # the host master, as loading leaves it
    if cuda:
        torch.cuda.empty_cache()
    shape = (1, *MOCHI.latent_shape(frames, 480, 848)) if cuda else (1, 12, 2, 8, 8)
    text_len = 256
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, text_len, cfg.text_dim, generator=g).to(device, dtype)
    mask = torch.zeros(1, text_len, dtype=torch.bool, device=device)
    mask[0, :64] = True
    cond = TextCondition(feats, mask)
    uncond = TextCondition(torch.zeros_like(feats), torch.zeros_like(mask))
    z = torch.randn(shape, generator=g).to(device)
    print(f"\n### seconds per step, {depth}-block DiT ({'bf16, ' + torch.cuda.get_device_name() if cuda else 'toy'}),"
          f" {shape[2]} latent frames ({frames} frames at 848x480), CFG 6\n")  # fmt: skip
    unit, unit_name = (GB, "GB") if cuda else (1e6, "MB")
    print(f"| mode | DiT blocks resident | CFG | s/step | {unit_name} to the device per step | peak GiB | upload s |")
    print("|---|---|---|---|---|---|---|")

    def mover() -> Mover:
        return Mover(device) if cuda else LedgerMover(2**40, Ledger())

    rest = sum(t.numel() * t.element_size() for n, t in dit.state_dict(keep_vars=True).items() if "blocks." not in n)
    block = max(sum(t.numel() * t.element_size() for t in b.parameters()) for b in dit.blocks)
    free = (torch.cuda.mem_get_info()[0] if cuda else 2**40) * BUDGET_FRACTION
    whole = sum(t.numel() * t.element_size() for t in dit.parameters())
    cases = [("resident", dit.cfg.depth), ("model", dit.cfg.depth)]
    # sequential: what the free memory leaves after a working reserve (here: half of it, to show partial loading)
    partial = int(max(0, min(depth - 2, (free / 2 - rest - 2 * block) // block)))
    cases += [("sequential", partial), ("sequential", 0), ("before", 0)]
    for mode, resident in cases:
        for batched in (True, False):
            if mode == "before" and batched is False and cuda:
                continue  # slow: one run is enough to show it
            m = mover()
            mem = DeviceMemory({"dit": lambda: (dit, dit.blocks)}, m)
            plan = Plan("bench", mode if mode != "before" else "sequential", True, resident, depth, batched, 0, 0,
                        str(device))  # fmt: skip
            sync = torch.cuda.synchronize if cuda else (lambda: None)

            def run(n: int, batched: bool = batched) -> None:
                denoise(dit, z, linear_quadratic_schedule(n), cond, uncond, 6.0, batched)

            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            context = naive_streaming(dit, device) if mode == "before" else mem.use("dit", plan)
            with torch.inference_mode(), context:
                sync()
                upload = time.perf_counter() - t0
                run(1)  # warm-up (kernels, allocator)
                moved0 = m.ledger.moved.get("placement", 0)
                sync()
                t1 = time.perf_counter()
                run(steps)
                sync()
                per_step = (time.perf_counter() - t1) / steps
                moved = (m.ledger.moved.get("placement", 0) - moved0) / steps
            peak = torch.cuda.max_memory_allocated() / GIB if cuda else 0.0
            if mode == "before":
                moved = 2 * (whole - rest) * (1 if batched else 2)  # every block up and back per forward
            shown = f"{per_step:.2f}" if cuda else "-"
            k = f"{resident}/{depth}" if mode != "model" else f"{depth}/{depth}"
            print(
                f"| {mode if mode != 'before' else 'sequential, before (issue 22)'} | {k} | "
                f"{'batched' if batched else 'one by one'} | {shown} | {moved / unit:.1f} | {peak:.1f} | {upload:.2f} |"
            )
            mem.drop_all()
            if cuda:
                torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[31, 163])
    parser.add_argument("--gib", type=float, nargs="+", default=[80, 48, 40, 24, 16, 12])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--time", action="store_true", help="also time each mode (CUDA; a toy check on the CPU)")
    parser.add_argument("--depth", type=int, default=48)
    parser.add_argument("--time-frames", type=int, default=31)
    parser.add_argument("--time-steps", type=int, default=3)
    parser.add_argument("--no-bytes", action="store_true", help="skip the ledger tables")
    args = parser.parse_args()
    if not args.no_bytes:
        bytes_tables(args.frames, args.gib, args.steps)
    if args.time:
        time_modes(args.depth if torch.cuda.is_available() else min(args.depth, 4), args.time_frames, args.time_steps)


if __name__ == "__main__":
    main()
