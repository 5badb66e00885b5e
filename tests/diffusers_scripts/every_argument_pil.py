# Every argument of the call spelled out, with PIL frames out.
import torch

from mochi_preview import MochiPipeline, export_to_video

pipe = MochiPipeline.from_pretrained("genmo/mochi-1-preview", torch_dtype=torch.float32)

output = pipe(
    prompt="A yellow square moves up.",
    negative_prompt="blurry, low quality",
    height=64,
    width=64,
    num_frames=13,
    num_inference_steps=3,
    timesteps=None,
    guidance_scale=4.5,
    num_videos_per_prompt=1,
    generator=torch.Generator().manual_seed(7),
    latents=None,
    prompt_embeds=None,
    prompt_attention_mask=None,
    negative_prompt_embeds=None,
    negative_prompt_attention_mask=None,
    output_type="pil",
    return_dict=True,
    attention_kwargs=None,
    callback_on_step_end=None,
    callback_on_step_end_tensor_inputs=["latents"],
    max_sequence_length=256,
)
frames = output.frames[0]
frames[0].save("first_frame.png")
export_to_video(frames, "mochi_pil.mp4", fps=10)
