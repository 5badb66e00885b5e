"""One rank of the context-parallel tests: `python distributed_worker.py OUT SCENARIO...` with torchrun's env vars
(or `run(OUT, SCENARIOS)` in a forked process, as tests/test_distributed.py does).

Rank 0 saves what it computed to OUT (torch.save); tests/test_distributed.py compares it with one process.
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

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
GUIDANCE_WITH_1 = [4.5, 1.0, 4.5]  # step 2 runs the prompt alone (odd batch under CFG parallelism)
TILED = dict(tiles=(1, 2), overlap=1)  # two tiles across, sharing one latent column
# "auto" decode with a different free memory on each rank: alone, the ranks would choose different tiles
AUTO_SHAPE, AUTO_OVERLAP = (1, 12, 5, 4, 8), 1
FREE_MIB = (260, 235, 222)  # per rank
DECODERS = {
    "plain": DecoderConfig(channels=(32, 32, 32, 32), num_res_blocks=(1, 1, 1, 1, 1)),
    "attention": DecoderConfig(channels=(32, 32, 32, 32), num_res_blocks=(1, 1, 1, 1, 1), has_attention=(True,) * 5),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forked_ranks(body, folder: Path, n: int = 2, timeout: float = 300.0) -> list:
    """`body(rank)` in n forked ranks of a gloo group (torchrun's environment, one thread each, output to
    folder/rank{r}.log) -> every rank's return value. A rank that fails or outlives `timeout` fails the caller
    with every rank's log. Forked, not spawned: importing torch anew in each rank would take longer than the test."""
    port, out = free_port(), folder / "ranks.pt"
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_forked_rank, args=(body, r, n, port, out, folder / f"rank{r}.log")) for r in range(n)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    logs = "\n".join((folder / f"rank{r}.log").read_text() for r in range(n))
    assert [p.exitcode for p in procs] == [0] * n, logs
    return torch.load(out)


def _forked_rank(body, rank: int, n: int, port: int, out: Path, log: Path) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1), os.dup2(fd, 2)
    sys.stdout = sys.stderr = os.fdopen(os.dup(1), "w", buffering=1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n), RANK=str(rank))
    os.environ["LOCAL_RANK"] = str(rank)
    code = 0
    try:
        torch.set_num_threads(1)
        init_distributed(timeout=60, device="cpu")
        ranks = [None] * n
        dist.all_gather_object(ranks, body(rank))
        if rank == 0:
            torch.save(ranks, out)
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    os._exit(code)  # never back into pytest


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
            if shape == LATENT_SHAPES[0]:
                out[f"{shape}/latents_guidance_1"] = denoise(dit, z, SIGMAS, cond, uncond, GUIDANCE_WITH_1)
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
                if shape == LATENT_SHAPES[0]:
                    g1 = denoise(model, z, SIGMAS, cond, uncond, GUIDANCE_WITH_1, cfg_parallel)
                    out[f"{name}{shape}/latents_guidance_1"] = g1
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


def run_vae_auto() -> dict:
    """Mode "auto" where each rank sees its own free memory (FREE_MIB): every rank's video, gathered on rank 0."""
    rank = dist.get_rank()
    decode_module = sys.modules["mochi_preview.vae.decode"]
    with torch.no_grad(), mock.patch.object(decode_module, "free_memory", lambda device: FREE_MIB[rank] * 2**20):
        video = decode(make_decoder("plain"), make_latents(AUTO_SHAPE), overlap=AUTO_OVERLAP, group=dist.group.WORLD)
    # Every rank's video, shape included (a rank that planned differently would not even have the same shape).
    shapes = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, tuple(video.shape))
    assert len(set(shapes)) == 1, shapes
    videos = [torch.empty_like(video) for _ in shapes]
    dist.all_gather(videos, video)
    return {"videos": torch.stack(videos)}


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


def run_failure_in_denoise() -> None:
    """Rank 1 raises in the DiT's second block on its second call (the sampler's step 2 of 3), while the others wait
    for it in that block's all-to-all or in the CFG all-gather."""
    cp = ContextParallel()  # CFG parallel with an even rank count
    dit = make_dit().set_token_layout(cp.token_layout())
    calls = []

    def boom(module, args):
        calls.append(None)
        if cp.rank == 1 and len(calls) == 2:
            print(f"raising at {time.time():.3f} in step 2", flush=True)
            raise ValueError("boom from the test")

    dit.blocks[1].attn.qkv_x.register_forward_pre_hook(boom)
    cond, uncond, _ = make_text()
    cfg = cp.cfg_group is not None
    with cp.guard(), torch.no_grad():
        denoise(CFGParallelDiT(dit, cp) if cfg else dit, make_latents(LATENT_SHAPES[0]), SIGMAS, cond, uncond, 4.5, cfg)


def run_device() -> dict:
    """ContextParallel without a device in a group the user made, on a machine with GPUs (stand-in: torch.cuda
    patched; the group is gloo): each rank takes cuda:LOCAL_RANK and makes it current, whatever the current device."""
    made_current = []
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.current_device", return_value=0),
        mock.patch("torch.cuda.set_device", side_effect=made_current.append),
    ):
        cp = ContextParallel(cfg_parallel=False)
    cp.close()
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (os.environ["LOCAL_RANK"], str(cp.device), [str(d) for d in made_current]))
    return {"per_rank": seen}


PIPELINE_CALL = dict(
    width=48, height=32, num_frames=13, num_inference_steps=2, seed=3, progress=False, output_type="np"
)


def run_offload() -> dict:
    """Memory modes with a sharded DiT, on the tiny model folder named by $MOCHI_TEST_MODEL. Sequential CPU offload
    and context parallelism in both orders of calls: what each order says, and that it changed nothing before saying
    it. Model CPU offload (device stand-in: offload.LedgerMover, which copies every weight it "moves"): the frames of
    two generations in a row."""
    from mochi_preview import MochiPipeline
    from mochi_preview.distributed import is_sharded
    from mochi_preview.offload import LedgerMover

    folder = os.environ["MOCHI_TEST_MODEL"]
    load = lambda **kw: MochiPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu", **kw)
    out = {}
    pipe = load(context_parallel=True, shard_dit=True).set_memory_mode("model", mover=LedgerMover(2**34))
    out["model offload, sharded"] = [torch.from_numpy(pipe("a red ball", **PIPELINE_CALL).frames[0]) for _ in "12"]
    out["model offload, moved bytes"] = pipe.memory_record()["moved_bytes"]["dit"]
    pipe = load().enable_context_parallel(shard_dit=True)
    before = pipe.offload
    try:
        pipe.enable_sequential_cpu_offload()
        out["sharded, then sequential offload"] = None
    except ValueError as e:
        out["sharded, then sequential offload"] = (str(e), pipe.offload == before)
    pipe = load().enable_sequential_cpu_offload()
    try:
        pipe.enable_context_parallel(shard_dit=True)
        out["sequential offload, then sharded"] = None
    except ValueError as e:
        out["sequential offload, then sharded"] = (str(e), pipe.cp is None and not is_sharded(pipe.dit))
    return out


# ---- pixel inputs and LoRAs on several ranks ---------------------------------------------------------------------

PROMPT = "a red ball"
SMALL = dict(width=48, height=32, seed=3, progress=False)  # the tiny model's smallest size: 6 x 4 latent tokens


def pixel_inputs() -> dict[str, dict]:
    """An image, a video to redraw and a video to extend (random frames, the tiny model's size) as call arguments."""
    g = torch.Generator().manual_seed(7)
    frames = lambda t: torch.randint(0, 256, (t, 32, 48, 3), generator=g, dtype=torch.uint8).numpy()  # noqa: E731
    image, video, longer = frames(1)[0], frames(13), frames(19)
    steps = dict(num_inference_steps=2)
    return {
        "image": dict(image=image, num_frames=13, **steps),
        "image_guide": dict(image=image, image_mode="guide", image_release=0.5, num_frames=13, **steps),
        "video": dict(video=video, strength=0.6, **steps),
        "extend": dict(extend=longer, num_frames=13, **steps),
    }


def make_lora(folder, path) -> str:
    """A random LoRA on every attention projection of the tiny model in `folder`, strong enough to change a video."""
    from mochi_preview.dit import load_dit
    from mochi_preview.lora import GENMO_TARGETS, save_lora_native

    dit = load_dit(folder, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    layers = {}
    for i, block in enumerate(dit.blocks):
        for target in GENMO_TARGETS:
            layer = getattr(block.attn, target, None)
            if layer is not None:
                A = torch.randn(2, layer.in_features, generator=g) * 0.2
                layers[f"blocks.{i}.attn.{target}"] = (A, torch.randn(layer.out_features, 2, generator=g) * 0.2)
    return str(save_lora_native(path, layers, rank=2, alpha=2.0))


def generate(pipe, name: str, inputs: dict, output_type: str = "latent", **kw) -> torch.Tensor:
    return torch.as_tensor(pipe(PROMPT, output_type=output_type, **SMALL, **inputs[name], **kw).frames)


def conditioned(pipe, **kw) -> dict:
    """What `run_conditioning` computes with one pipeline, under the names the test compares (`kw`: call options)."""
    inputs = pixel_inputs()
    out = {name: generate(pipe, name, inputs, **kw) for name in inputs}
    out["extend/frames"] = generate(pipe, "extend", inputs, "np", **kw)  # the input, then the new frames
    return out


def pusa_conditioned(pipe, **kw) -> dict:
    """A Pusa V0.5 model's image to video and extension (per-frame sigmas), under the names the test compares."""
    inputs = pixel_inputs()
    return {f"pusa {name}": generate(pipe, name, inputs, **kw) for name in ("image", "extend")}


def with_loras(pipe, lora: str, **kw) -> dict:
    """What `run_lora` computes with one pipeline: a live LoRA (also under an image), fused, unfused (live again),
    unloaded."""
    inputs = pixel_inputs()
    out = {"none": generate(pipe, "video", inputs, **kw)}
    pipe.load_lora_weights(lora, strength=0.8)
    out["live"] = generate(pipe, "video", inputs, **kw)
    out["live, image"] = generate(pipe, "image", inputs, **kw)
    pipe.fuse_lora()
    out["fused"] = generate(pipe, "video", inputs, **kw)
    pipe.unfuse_lora()
    out["unfused"] = generate(pipe, "video", inputs, **kw)
    pipe.unload_lora_weights()
    out["unloaded"] = generate(pipe, "video", inputs, **kw)
    return out


def fp8_live(pipe, lora: str, **kw) -> dict:
    """fp8 weights take a LoRA live only: the video with it, and what fusing it says (nothing changed by that)."""
    inputs = pixel_inputs()
    pipe.load_lora_weights(lora, strength=0.8)
    out = {"fp8 live": generate(pipe, "video", inputs, **kw)}
    try:
        pipe.fuse_lora()
    except ValueError as e:
        out["fp8 fuse refused"] = str(e)
    out["fp8 live after refusal"] = generate(pipe, "video", inputs, **kw)
    return out


def load_pipeline(folder=None, **kwargs):
    """The tiny model in `folder` (default: $MOCHI_TEST_MODEL) in fp32 on the CPU."""
    from mochi_preview import MochiPipeline

    folder = folder or os.environ["MOCHI_TEST_MODEL"]
    return MochiPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu", **kwargs)


# The layouts of 2 ranks compared with one process: CFG halves (one branch per rank: the one-process code path,
# bitwise equal to it unbatched) and the tokens split (fp32 rounding); with the DiT's blocks sharded or not.
LAYOUTS = {
    "cfg": dict(cfg_parallel=True),
    "tokens": dict(cfg_parallel=False),
    "cfg, sharded": dict(cfg_parallel=True, shard_dit=True),
    "tokens, sharded": dict(cfg_parallel=False, shard_dit=True),
}


def run_conditioning() -> dict:
    """Image to video (replace and guide), video to video and extension on 2 ranks: CFG halves, sharded tokens; and
    a Pusa model's (the tiny model under Pusa's file name, $MOCHI_TEST_PUSA)."""
    out = {}
    for layout in ("cfg", "tokens, sharded"):
        out[layout] = conditioned(load_pipeline(context_parallel=True, **LAYOUTS[layout]))
        pusa = load_pipeline(os.environ["MOCHI_TEST_PUSA"], context_parallel=True, **LAYOUTS[layout])
        out[layout] |= pusa_conditioned(pusa)
    return out


def run_lora() -> dict:
    """LoRAs on 2 ranks with sharded blocks, CFG halves or split tokens (file: $MOCHI_TEST_LORA); also one fused
    before the blocks were sharded, one under model CPU offload (device stand-in), and one live on fp8 weights."""
    from mochi_preview.distributed import is_sharded
    from mochi_preview.dit import load_dit
    from mochi_preview.offload import LedgerMover

    lora = os.environ["MOCHI_TEST_LORA"]
    out = {
        layout: with_loras(load_pipeline(context_parallel=True, **LAYOUTS[layout]), lora)
        for layout in ("cfg, sharded", "tokens, sharded")
    }
    pipe = load_pipeline()
    pipe.load_lora_weights(lora, strength=0.8)
    pipe.fuse_lora()
    pipe.enable_context_parallel(cfg_parallel=False, shard_dit=True)  # fused on every rank, then sharded
    inputs = pixel_inputs()
    out["fused, then sharded"] = {"fused": generate(pipe, "video", inputs)}
    pipe.unfuse_lora()
    out["fused, then sharded"]["unfused"] = generate(pipe, "video", inputs)
    pipe = load_pipeline(context_parallel=True, shard_dit=True)
    pipe.set_memory_mode("model", mover=LedgerMover(2**34))
    out["model offload, sharded"] = with_loras(pipe, lora)
    given = load_pipeline(transformer=load_dit(os.environ["MOCHI_TEST_MODEL"], dtype=torch.float32), shard_dit=True,
                          context_parallel=True)  # fmt: skip
    out["a given transformer, sharded"] = {"sharded": is_sharded(given.dit), "video": generate(given, "video", inputs)}
    fp8 = load_pipeline(context_parallel=True, cfg_parallel=False, shard_dit=True, fp8="tensor")
    out["fp8, tokens, sharded"] = fp8_live(fp8, lora)
    return out


def run_disagreement() -> dict:
    """Ranks that pass different settings, or hold different models: every rank refuses (none waits forever)."""
    rank, out = dist.get_rank(), {}
    try:
        ContextParallel(cfg_parallel=rank == 0)  # rank 0 asks for CFG halves, the others do not
    except ValueError as e:
        out["cfg_parallel"] = str(e)
    cp = ContextParallel(cfg_parallel=False)
    dit = AsymmDiT(CFG if rank == 0 else dataclasses.replace(CFG, depth=CFG.depth + 1))
    try:
        shard_dit(dit, cp)
    except ValueError as e:
        out["depth"] = str(e)
    cp.close()
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, out)
    return {"per_rank": messages}


SCENARIOS = {
    "dit": lambda: run_dit(cfg_parallel=False),
    "dit_cfg": lambda: run_dit(cfg_parallel=True),
    "vae": run_vae,
    "vae_auto": run_vae_auto,
    "fail": lambda: run_failure(hang=False),
    "fail_hang": lambda: run_failure(hang=True),
    "fail_denoise": run_failure_in_denoise,
    "device": run_device,
    "offload": run_offload,
    "disagree": run_disagreement,
    "conditioning": run_conditioning,
    "lora": run_lora,
}


def run(out_path: str, scenarios: list[str]) -> None:
    """This rank's part: join the group (torchrun's env vars), run the scenarios, rank 0 saving after each."""
    torch.set_num_threads(1)
    with mock.patch("torch.cuda.is_available", return_value=True):  # as if on a GPU machine: --device cpu -> gloo
        device = init_distributed(timeout=60, device="cpu")
    results = {"setup": {"backend": dist.get_backend(), "device": str(device)}}
    for name in scenarios:  # the failure scenarios come last
        results[name] = SCENARIOS[name]()
        if dist.get_rank() == 0:
            torch.save(results, out_path)
    dist.destroy_process_group()


def main() -> None:
    run(sys.argv[1], sys.argv[2:])


if __name__ == "__main__":
    main()
