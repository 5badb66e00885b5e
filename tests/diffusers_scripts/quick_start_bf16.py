# The quick start: the bf16 weights, offloading and VAE tiling, then an MP4.
import torch

from mochi_preview import MochiPipeline, export_to_video

pipe = MochiPipeline.from_pretrained("genmo/mochi-1-preview", variant="bf16", torch_dtype=torch.bfloat16)

# save memory: each model on the accelerator only while it runs, and the VAE decodes in tiles
pipe.enable_model_cpu_offload()
pipe.enable_vae_tiling()

prompt = "A red square moves to the right across a black background."
frames = pipe(prompt, height=64, width=64, num_frames=13, num_inference_steps=3).frames[0]

export_to_video(frames, "mochi.mp4", fps=30)
