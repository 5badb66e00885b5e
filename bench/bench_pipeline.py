"""The whole pipeline on the shipped demo model: ours next to diffusers' MochiPipeline, same weights, one process run.

The demo model (src/mochi_preview/assets/demo, native layout) is converted in memory to diffusers' classes: the DiT
through the inverse of our diffusers recipes (q/k/v split, SwiGLU and final-layer halves swapped back), the VAE
decoder likewise (its encoder is not used by generation), T5 as it is. Both sides then generate the same prompt
with the same seed, steps and guidance on the same threads, interleaved; the table gives the per-stage and total
time, and how far the final latents are apart (diffusers decodes differently from native, spec 12, so the videos
are not compared).

    python bench/bench_pipeline.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

PROMPT = "a red ball moving to the right"


def to_layout(native: dict[str, torch.Tensor], layout: dict, target: dict[str, torch.Tensor]) -> dict:
    """Invert native <- recipe(sources): split concatenated rows by the target shapes, swap halves back."""
    from mochi_preview.checkpoint import concat_rows, swap_halves

    out = {}
    for key, recipe in layout.items():
        tensor = native[key]
        if recipe.transform is None:
            out[recipe.keys[0]] = tensor
        elif recipe.transform is swap_halves:
            out[recipe.keys[0]] = swap_halves(tensor)
        elif recipe.transform is concat_rows:
            sizes = [target[k].shape[0] for k in recipe.keys]
            out.update(zip(recipe.keys, tensor.split(sizes)))
        else:
            raise NotImplementedError(f"no inverse for {recipe.transform} ({key})")
    return out


def diffusers_pipeline(ours):
    """diffusers' MochiPipeline holding our demo model's weights."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiTransformer3DModel
    from diffusers import MochiPipeline as TheirPipeline

    from mochi_preview.dit.layout import diffusers_layout as dit_layout
    from mochi_preview.vae.layout import diffusers_layout as vae_layout

    cfg = ours.dit.cfg
    transformer = MochiTransformer3DModel(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        num_layers=cfg.depth,
        pooled_projection_dim=cfg.dim_y,
        text_embed_dim=cfg.text_dim,
    ).eval()
    # diffusers sizes the text MLP as int(8 * dim_y / 3) (exact only at the published 1536); native rounds it up to a
    # multiple of 256. Give the diffusers blocks the width of the weights.
    from diffusers.models.attention import FeedForward

    for block in transformer.transformer_blocks:
        if block.ff_context is not None:
            block.ff_context = FeedForward(cfg.dim_y, inner_dim=cfg.mlp_hidden_y, activation_fn="swiglu", bias=False)
    target = transformer.state_dict()
    transformer.load_state_dict(to_layout(ours.dit.state_dict(), dit_layout(list(target)), target))

    dc = ours.decoder.config
    mean, std = ours.latent_stats
    vae = AutoencoderKLMochi(
        encoder_block_out_channels=dc.channels,
        decoder_block_out_channels=dc.channels,
        layers_per_block=dc.num_res_blocks,
        latents_mean=tuple(mean),
        latents_std=tuple(std),
    ).eval()
    target = {k.removeprefix("decoder."): v for k, v in vae.state_dict().items() if k.startswith("decoder.")}
    decoder_state = to_layout(ours.decoder.state_dict(), vae_layout(list(target), "decoder"), target)
    vae.decoder.load_state_dict(decoder_state)
    return TheirPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        vae=vae,
        text_encoder=ours.text_encoder,
        tokenizer=ours.tokenizer,
        transformer=transformer,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mochi_preview import MochiPipeline
    from mochi_preview.tiny import demo_model_dir

    ours = MochiPipeline.from_pretrained(demo_model_dir(), torch_dtype=torch.float32, device="cpu")
    theirs = diffusers_pipeline(ours)
    d = json.loads((demo_model_dir() / "mochi_defaults.json").read_text())
    common = dict(height=d["height"], width=d["width"], num_frames=d["num_frames"], guidance_scale=d["cfg_scale"])
    steps = d["num_steps"]

    negative = "blurry"  # not "": diffusers keeps an EOS token for "", native (and we) encode no text at all

    def run_ours(output_type="np", batch_cfg=False):
        g = torch.Generator().manual_seed(0)
        out = ours(PROMPT, negative, num_inference_steps=steps, generator=g, output_type=output_type, progress=False,
                   batch_cfg=batch_cfg, **common)  # fmt: skip
        return out.frames

    def run_theirs(output_type="np"):
        g = torch.Generator().manual_seed(0)
        out = theirs(PROMPT, negative_prompt=negative, num_inference_steps=steps, generator=g,
                     output_type=output_type, **common)  # fmt: skip
        return out.frames

    theirs.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        z_ours, z_theirs = run_ours("latent"), run_theirs("latent")
        run_ours(), run_ours(batch_cfg=True), run_theirs()  # warm-up
        t_ours, t_batched, t_theirs = [], [], []
        for _ in range(args.repeats):  # interleaved: machine noise hits both sides alike
            for times, run in (
                (t_ours, run_ours),
                (t_batched, lambda: run_ours(batch_cfg=True)),
                (t_theirs, run_theirs),
            ):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
    a, ab, b = statistics.median(t_ours), statistics.median(t_batched), statistics.median(t_theirs)
    err = float((z_ours - z_theirs).abs().max() / z_theirs.abs().max())
    size = f"{common['num_frames']} frames of {common['width']}x{common['height']}"
    print(f"torch {torch.__version__}, {args.threads} threads; demo model, {size}, {steps} steps, CFG {d['cfg_scale']}")
    print("| pipeline, prompt to frames | median s | ours / diffusers |")
    print("|---|---|---|")
    print(f"| ours, CFG branches one after the other (`batch_cfg=False`: less memory) | {a:.3f} | **{a / b:.2f}** |")
    print(f"| ours, CFG branches batched (`batch_cfg=True`; the default `auto` does) | {ab:.3f} | **{ab / b:.2f}** |")
    print(f"| diffusers MochiPipeline | {b:.3f} | |")
    print(f"final latents, max abs difference / max abs: {err:.1e}")


if __name__ == "__main__":
    main()
