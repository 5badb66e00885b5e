"""Web UI: `python -m mochi_preview.gradio_ui [--model_dir DIR]`, then open http://127.0.0.1:7860.

The form holds the CLI's settings and generates through the CLI's own code (`infer.generate`), so every video lands in
`--out_dir` as `output_<timestamp>.mp4` with its JSON sidecar, exactly as `python -m mochi_preview.infer` writes it.
The pipeline is loaded once at startup; one generation runs at a time and at most `--max_queue` more wait.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import secrets
import sys
import traceback
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before importing gradio: no calls home
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from . import infer  # noqa: E402
from . import settings as table  # noqa: E402
from .pipeline import DeviceMemoryError, MochiPipeline, NonFiniteLatentsError, release_memory  # noqa: E402
from .settings import SETTINGS, Settings  # noqa: E402
from .tiny import DEMO_MODEL_DIR  # noqa: E402

# What the user can get wrong (settings, memory, NaNs, files): shown as a message in the page, never as a traceback.
USER_ERRORS = (ValueError, OSError, NonFiniteLatentsError, DeviceMemoryError)
RANDOM_SEED = "random_seed"  # the form's one field that is not a setting: draw a new seed each time
# The form's fields (the settings' file names, as in sweep files and sidecars), in the order the handler takes them.
FORM = tuple(k for s in SETTINGS for k in ((s.file, RANDOM_SEED) if s.api == "seed" else (s.file,)))
SECTIONS = {"size": "row", "seed": "row", "sampling": "row", "advanced": "Advanced"}  # ui_group -> how it is laid out


def read_form(values: dict) -> Settings:
    """The form's values (keyed as FORM) as checked `Settings`; errors name the form's labels.

    "Random seed" (or an empty Seed) draws the seed here, below 2**32: a browser shows numbers above 2**53 rounded,
    so a seed the page shows must be one the page can give back.
    """
    s = Settings().updated({k: v for k, v in values.items() if k != RANDOM_SEED}, "ui")
    if values.get(RANDOM_SEED) or s.seed is None:
        s = replace(s, seed=secrets.randbelow(2**32))
    return s.check("ui")


def make_handler(pipe: MochiPipeline, out_dir: Path, options: infer.RunOptions):
    """The Generate button's function: form values in (FORM's order); (video path, sidecar dict, seed used) out,
    or a gr.Error with the message."""

    def generate(*values, progress=None):
        if len(values) == len(FORM) + 1:  # gradio passes its gr.Progress positionally, after the form's values
            *values, progress = values
        if progress is None:
            progress = lambda *a, **k: None  # noqa: E731
        try:
            s = read_form(dict(zip(FORM, values, strict=True)))
            steps = s.num_inference_steps

            def on_step(pipe, i, sigma, state):
                progress((i + 1, steps), desc="sampling" if i + 1 < steps else "decoding", unit="steps")

            progress((0, steps), desc="encoding the prompt", unit="steps")
            video = infer.generate(pipe, s, infer.new_output_path(out_dir), options, callback=on_step)
        except (DeviceMemoryError, torch.OutOfMemoryError) as e:
            # Out of memory: give the memory back before the next job in the queue runs (the error's traceback holds
            # the failed job's tensors; a decode that failed left its latents in a file the message names).
            message = str(e)
            print(f"error: {message}", file=sys.stderr)
            _drop_tracebacks(e)
            del e
            release_memory(pipe.device)
            raise gr.Error(message, print_exception=False) from None
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            raise gr.Error(str(e), print_exception=False) from e
        record = json.loads(video.with_suffix(".json").read_text())
        return str(video), record, record["seed"]

    # gradio reads a function's parameters to pass the form's values and finds gr.Progress by a parameter's default
    # value; this signature names one parameter per form field (as the API docs show them), then `progress`.
    P = inspect.Parameter
    params = [P(k, P.POSITIONAL_OR_KEYWORD) for k in FORM] + [
        P("progress", P.POSITIONAL_OR_KEYWORD, default=gr.Progress())
    ]
    generate.__signature__ = inspect.Signature(params)
    return generate


def _drop_tracebacks(error: BaseException) -> None:
    """Let go of the frames (and so the tensors) an exception and the ones it chained to still reference."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if error.__traceback__ is not None:
            traceback.clear_frames(error.__traceback__)
            error.__traceback__ = None
        error = error.__cause__ or error.__context__


def _input(s: table.Setting, value) -> gr.components.Component:
    """The form's input for one setting: its label, initial value and hints all come from the settings table."""
    if s.kind is str:
        return gr.Textbox(value, label=s.label, **s.ui)
    return gr.Number(value, label=s.label, **s.ui)


def build_ui(pipe: MochiPipeline, args: argparse.Namespace, model_dir: Path) -> gr.Blocks:
    """The page: settings on the left (one input per row of the settings table), the video and its sidecar right."""
    d = table.from_arguments(args, table.model_defaults(model_dir))  # flags > the folder's defaults > the table's
    options = infer.RunOptions.from_args(args)
    # gradio serves copies of the videos from its cache; drop copies older than a day (the originals stay in out_dir)
    with gr.Blocks(title="Mochi 1 preview", delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## Mochi 1 preview\nModel: `{model_dir}` · videos are saved in `{args.out_dir.resolve()}`")
        if args.model_dir is None and model_dir == DEMO_MODEL_DIR:
            gr.Markdown("No --model_dir given: the small demo model (one coloured shape moving; try its prompts).")
        elif args.model_dir is None:
            gr.Markdown("**No --model_dir given: this model has RANDOM weights; it makes noise, not video.**")
        with gr.Row():
            with gr.Column():
                form = {}
                for group in dict.fromkeys(s.ui_group for s in SETTINGS):  # the table's groups, in its order
                    layout = SECTIONS.get(group)
                    box = gr.Row() if layout == "row" else gr.Accordion(layout, open=False) if layout else None
                    with box or nullcontext():
                        for s in (s for s in SETTINGS if s.ui_group == group):
                            form[s.file] = _input(s, getattr(d, s.api))
                            if s.api == "seed":
                                form[RANDOM_SEED] = gr.Checkbox(
                                    False, label="Random seed", info="draw a new seed each time"
                                )
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                video = gr.Video(label="Video", format="mp4", interactive=False, autoplay=True, loop=True)
                record = gr.JSON(label="Settings (the sidecar JSON)")
        outputs = [video, record, form["seed"]]
        handler = make_handler(pipe, args.out_dir, options)
        button.click(handler, [form[k] for k in FORM], outputs, api_name="generate")
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
    if args.save_latents is not None or args.decode_latents is not None:  # a decode that fails writes them anyway
        parser.error("--save_latents and --decode_latents belong to the CLI (python -m mochi_preview.infer)")
    if args.fps <= 0:
        parser.error(f"--fps must be a positive number; got {args.fps}")
    try:
        # the flags are checked before the weights load (slow): a typo is reported at once
        model_dir = infer.find_model_dir(args.model_dir)
        table.from_arguments(args, table.model_defaults(model_dir)).check("cli")
        pipe, model_dir = infer.load_pipeline(args, model_dir)  # once, before serving: requests never wait for it
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
