# The whole pipeline moved to one device, with a generator on that device for reproducible noise.
import torch

from mochi_preview import MochiPipeline, export_to_video

device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = MochiPipeline.from_pretrained("genmo/mochi-1-preview", torch_dtype=torch.bfloat16)
pipe.to(device)

generator = torch.Generator(device).manual_seed(42)
video = pipe(
    prompt="A blue circle moves down.",
    negative_prompt="low quality",
    height=64,
    width=64,
    num_frames=13,
    num_inference_steps=3,
    guidance_scale=4.5,
    generator=generator,
).frames[0]

export_to_video(video, "mochi_on_device.mp4", fps=10)
