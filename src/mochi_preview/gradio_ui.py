"""Web UI: `python -m mochi_preview.gradio_ui [--model_dir DIR]`, then open http://127.0.0.1:7860.

The form holds the CLI's settings and generates through the CLI's own code (`infer.generate`), so every video lands in
`--out_dir` as `output_<timestamp>.mp4` with its JSON sidecar, exactly as `python -m mochi_preview.infer` writes it.
The pipeline is loaded once at startup; one generation runs at a time and at most `--max_queue` more wait.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before importing gradio: no calls home
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gradio as gr  # noqa: E402

from . import infer  # noqa: E402
from .pipeline import DeviceMemoryError, MochiPipeline, NonFiniteLatentsError  # noqa: E402
from .tiny import DEMO_MODEL_DIR  # noqa: E402

# What the user can get wrong (settings, memory, NaNs, files): shown as a message in the page, never as a traceback.
USER_ERRORS = (ValueError, OSError, NonFiniteLatentsError, DeviceMemoryError)
# The form's fields, in the order the handler takes them.
FORM = ("prompt", "negative_prompt", "width", "height", "num_frames", "seed", "random_seed", "cfg_scale", "num_steps",
        "threshold_noise", "linear_steps")  # fmt: skip


def _number(name: str, value, whole: bool = False, optional: bool = False) -> float | int | None:
    """A form field as a number: empty only where optional, finite, and never silently rounded."""
    if value is None or value == "":
        if optional:
            return None
        raise ValueError(f"{name} is empty; enter a number")
    value = float(value)
    if not math.isfinite(value) or (whole and value != int(value)):
        raise ValueError(f"{name} must be a {'whole' if whole else 'finite'} number; got {value}")
    return int(value) if whole else value


def read_form(values: dict) -> infer.Settings:
    """The form's values as checked CLI `Settings` (a random seed drawn here when asked for)."""
    seed = random.randrange(2**32) if values["random_seed"] else _number("seed", values["seed"], whole=True)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be between 0 and 2**64 - 1; got {seed}")
    return infer.Settings(
        prompt=values["prompt"] or "",
        negative_prompt=values["negative_prompt"] or "",
        width=_number("width", values["width"], whole=True),
        height=_number("height", values["height"], whole=True),
        num_frames=_number("number of frames", values["num_frames"], whole=True),
        seed=seed,
        cfg_scale=_number("CFG scale", values["cfg_scale"]),
        num_steps=_number("steps", values["num_steps"], whole=True),
        threshold_noise=_number("threshold noise", values["threshold_noise"]),
        linear_steps=_number("linear steps", values["linear_steps"], whole=True, optional=True),
    ).check()


def make_handler(pipe: MochiPipeline, args: argparse.Namespace, model_dir: Path):
    """The Generate button's function: form values in; (video path, sidecar dict, seed used) out, or a gr.Error."""

    # Named parameters, not *values: gradio finds gr.Progress only among positional parameters.
    def generate(prompt, negative_prompt, width, height, num_frames, seed, random_seed, cfg_scale, num_steps,
                 threshold_noise, linear_steps, progress=gr.Progress()):  # fmt: skip # noqa: B008 (gradio's idiom)
        try:
            s = read_form({k: v for k, v in locals().items() if k in FORM})
            steps = s.num_steps

            def on_step(pipe, i, sigma, state):
                progress((i + 1, steps), desc="sampling" if i + 1 < steps else "decoding", unit="steps")

            progress((0, steps), desc="encoding the prompt", unit="steps")
            video = infer.generate(pipe, s, args, infer.new_output_path(args.out_dir), model_dir, callback=on_step)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            raise gr.Error(str(e), print_exception=False) from e
        return str(video), json.loads(video.with_suffix(".json").read_text()), s.seed

    return generate


def build_ui(pipe: MochiPipeline, args: argparse.Namespace, model_dir: Path) -> gr.Blocks:
    """The page: settings on the left, the video and its sidecar on the right."""
    d = infer.settings_from_args(args, infer.model_defaults(model_dir))  # flags > the folder's defaults > CLI's
    # gradio serves copies of the videos from its cache; drop copies older than a day (the originals stay in out_dir)
    with gr.Blocks(title="Mochi 1 preview", delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## Mochi 1 preview\nModel: `{model_dir}` · videos are saved in `{args.out_dir.resolve()}`")
        if args.model_dir is None and model_dir == DEMO_MODEL_DIR:
            gr.Markdown("No --model_dir given: the small demo model (one coloured shape moving; try its prompts).")
        elif args.model_dir is None:
            gr.Markdown("**No --model_dir given: this model has RANDOM weights; it makes noise, not video.**")
        with gr.Row():
            with gr.Column():
                form = dict(
                    prompt=gr.Textbox(d.prompt, label="Prompt", lines=4),
                    negative_prompt=gr.Textbox(d.negative_prompt, label="Negative prompt", placeholder="(none)"),
                )
                with gr.Row():
                    form["width"] = gr.Number(d.width, label="Width", precision=0, step=16, info="multiple of 16")
                    form["height"] = gr.Number(d.height, label="Height", precision=0, step=16, info="multiple of 16")
                    form["num_frames"] = gr.Number(d.num_frames, label="Frames", precision=0, step=6, info="6k+1")
                with gr.Row():
                    form["seed"] = gr.Number(d.seed, label="Seed", precision=0)
                    form["random_seed"] = gr.Checkbox(False, label="Random seed", info="draw a new seed each time")
                with gr.Row():
                    form["cfg_scale"] = gr.Number(d.cfg_scale, label="CFG scale", step=0.5, info="1 = no guidance")
                    form["num_steps"] = gr.Number(d.num_steps, label="Steps", precision=0)
                with gr.Accordion("Advanced", open=False):
                    form["threshold_noise"] = gr.Number(d.threshold_noise, label="Threshold noise", step=0.005)
                    form["linear_steps"] = gr.Number(
                        d.linear_steps, label="Linear steps", precision=0, info="empty: half the steps"
                    )
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                video = gr.Video(label="Video", format="mp4", interactive=False, autoplay=True, loop=True)
                record = gr.JSON(label="Settings (the sidecar JSON)")
        outputs = [video, record, form["seed"]]
        button.click(make_handler(pipe, args, model_dir), [form[k] for k in FORM], outputs, api_name="generate")
    return demo


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags (generation flags set the form's initial values) plus the server's."""
    p = infer.build_parser()
    p.prog, p.description = "python -m mochi_preview.gradio_ui", "Web UI for Mochi 1 preview."
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: the whole network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--max_queue", type=int, default=8, help="requests that may wait for the device (default 8)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sweep_file is not None or args.output is not None:
        parser.error("--sweep-file and --output belong to the CLI (python -m mochi_preview.infer)")
    try:
        pipe, model_dir = infer.load_pipeline(args)  # once, before serving: requests never wait for loading
        infer.settings_from_args(args, infer.model_defaults(model_dir)).check()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    demo = build_ui(pipe, args, model_dir)
    # One generation on the device at a time; a bounded queue refuses requests beyond it instead of piling up.
    demo.queue(default_concurrency_limit=1, max_size=args.max_queue)
    # show_error: an unexpected failure still shows its message in the page (the traceback stays in the console)
    out = str(args.out_dir.resolve())
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=[out], show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
