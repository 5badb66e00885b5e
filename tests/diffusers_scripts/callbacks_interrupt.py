# Two prompts with a generator each, a silent progress bar, and a callback that watches the steps and stops early.
import torch

from mochi_preview import MochiPipeline, export_to_video

pipe = MochiPipeline.from_pretrained("genmo/mochi-1-preview", torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)

steps_seen = []


def stop_after_two_steps(pipe, step, timestep, callback_kwargs):
    latents = callback_kwargs["latents"]
    steps_seen.append((step, float(timestep), tuple(latents.shape)))
    if step == 1:
        pipe._interrupt = True
    return callback_kwargs


prompts = ["A red circle moves to the right.", "A white square moves down."]
generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
output = pipe(
    prompt=prompts,
    height=64,
    width=64,
    num_frames=13,
    num_inference_steps=4,
    generator=generators,
    output_type="np",
    callback_on_step_end=stop_after_two_steps,
    callback_on_step_end_tensor_inputs=["latents"],
)
assert [step for step, _, _ in steps_seen] == [0, 1], steps_seen
for k, video in enumerate(output.frames):
    export_to_video(video, f"mochi_{k}.mp4", fps=10)
