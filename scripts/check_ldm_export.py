"""Loads a difftrain latent diffusion export in diffusers and generates from it, next to
difftrain's own `sample` on the same initial latents.

    .venv/bin/python scripts/check_ldm_export.py checkpoints/ldm_quickstart/export \
        --sample target/release/sample --prompt "a blue square"
    .venv/bin/python scripts/check_ldm_export.py checkpoints/ldm_quickstart_class/export \
        --sample target/release/sample --class-label 2

A text-conditioned export (model_index.json) loads as a `StableDiffusionPipeline`; a
class-conditioned one as its parts (UNet2DConditionModel, AutoencoderKL, DDIMScheduler) with
the denoising loop written out, passing `class_labels` and a zero cross-attention token as
difftrain does. Prints the mean colour of each image and the largest pixel difference between
diffusers' and difftrain's images (8-bit PNG values). Needs torch, diffusers, transformers.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file


def mean_rgb(img):
    return [round(float(v), 3) for v in img.reshape(-1, 3).mean(0)]


def diffusers_text(export, prompt, latents, steps, guidance):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(export, safety_checker=None, requires_safety_checker=False)
    print(f"loaded {type(pipe).__name__}: unet {sum(p.numel() for p in pipe.unet.parameters())} params, "
          f"vae {sum(p.numel() for p in pipe.vae.parameters())}, "
          f"text encoder {sum(p.numel() for p in pipe.text_encoder.parameters())}, "
          f"scheduler {type(pipe.scheduler).__name__}, tokenizer max length {pipe.tokenizer.model_max_length}")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = pipe(prompt, height=size, width=size, latents=latents, num_images_per_prompt=len(latents),
               num_inference_steps=steps,
               guidance_scale=guidance, output_type="np")
    return out.images


def diffusers_class(export, label, latents, steps, guidance):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(export, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(export, subfolder="vae").eval()
    scheduler = DDIMScheduler.from_pretrained(export, subfolder="scheduler")
    null = unet.config.num_class_embeds - 1  # the last class is the "no class" of guidance
    print(f"loaded UNet2DConditionModel ({unet.config.num_class_embeds} class embeddings, null = {null}), "
          f"AutoencoderKL (scaling_factor {vae.config.scaling_factor}), {type(scheduler).__name__}")
    n = latents.shape[0]
    context = torch.zeros(2 * n, 1, unet.config.cross_attention_dim)
    labels = torch.tensor([null] * n + [label] * n)
    scheduler.set_timesteps(steps)
    x = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(torch.cat([x, x]), t, context, class_labels=labels).sample
            uncond, cond = eps.chunk(2)
            x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        img = vae.decode(x / vae.config.scaling_factor).sample
    return ((img / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--sample", help="difftrain's sample binary, to compare on the same latents")
    ap.add_argument("--prompt", default="a blue square")
    ap.add_argument("--class-label", type=int)
    ap.add_argument("--num", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=4.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    unet_cfg = json.load(open(os.path.join(args.export, "unet", "config.json")))
    vae_cfg = json.load(open(os.path.join(args.export, "vae", "config.json")))
    latents = torch.randn(args.num, unet_cfg["in_channels"], unet_cfg["sample_size"], unet_cfg["sample_size"])
    text = os.path.isfile(os.path.join(args.export, "model_index.json"))
    if text:
        ours_args = ["--prompt", args.prompt]
        images = diffusers_text(args.export, args.prompt, latents, args.steps, args.guidance)
        what = repr(args.prompt)
    else:
        if args.class_label is None:
            sys.exit("a class-conditioned export: give --class-label N")
        ours_args = ["--class", str(args.class_label)]
        images = diffusers_class(args.export, args.class_label, latents, args.steps, args.guidance)
        what = f"class {args.class_label}"
    print(f"diffusers, {what}: {len(images)} images {images.shape[1]}x{images.shape[2]}, "
          f"latent scale {vae_cfg['scaling_factor']:.5f}")
    for i, img in enumerate(images):
        print(f"  image {i}: mean RGB {mean_rgb(img)}")
    if not args.sample:
        return
    with tempfile.TemporaryDirectory() as tmp:
        lat = os.path.join(tmp, "latents.safetensors")
        save_file({"latents": latents.contiguous()}, lat)
        out = os.path.join(tmp, "ours")
        cmd = [args.sample, "--checkpoint", args.export, *ours_args, "--latents", lat,
               "--num", str(args.num), "--steps", str(args.steps), "--guidance-scale", str(args.guidance),
               "--sampler", "ddim", "--out", out]
        subprocess.run(cmd, check=True)
        ours = np.stack([np.asarray(Image.open(os.path.join(out, f))) for f in sorted(os.listdir(out))])
    theirs = np.round(images * 255).astype(np.int32)
    diff = np.abs(ours.astype(np.int32) - theirs).max()
    print(f"difftrain sample on the same latents: largest pixel difference {diff}/255")
    if diff > 3:
        sys.exit("difftrain and diffusers disagree")


if __name__ == "__main__":
    main()
