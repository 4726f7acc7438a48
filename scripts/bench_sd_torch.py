"""The PyTorch side of scripts/bench_sd.sh: the same Stable Diffusion 1.5-architecture
measurements as `bench_sd`, with diffusers, random weights, eager float32 on the CPU. One JSON line.

    .venv/bin/python scripts/bench_sd_torch.py unet --latent 32 --batch 1 --threads 2
    .venv/bin/python scripts/bench_sd_torch.py txt2img --size 512 --steps 20 --threads 2
    .venv/bin/python scripts/bench_sd_torch.py lora --latent 64 --threads 2   # LoRA step (peft)
"""
import argparse
import json
import os
import resource
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def sd15_unet():
    from diffusers import UNet2DConditionModel

    # runwayml/stable-diffusion-v1-5's unet/config.json (diffusers' defaults + these).
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unet(args):
    model = sd15_unet()
    b, s = args.batch, args.latent
    x, target = torch.randn(b, 4, s, s), torch.randn(b, 4, s, s)
    ctx, t = torch.randn(b, 77, 768), torch.full((b,), 500.0)
    times, fwd = [], 0.0
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x, t, ctx).sample, target)
        loss.item()
        f = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        loss.backward()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            fwd += f
    times.sort()
    return {"case": "sd15_unet_fwd_bwd", "params": sum(p.numel() for p in model.parameters()),
            "latent": s, "batch": b, "steps": args.steps, "median_s": times[len(times) // 2],
            "forward_share": fwd / sum(times)}


def vm_hwm_mib():
    """Peak resident memory since the last reset_peak() (Linux VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        kib = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    return kib / 1024


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def lora(args):
    """diffusers' train_text_to_image_lora.py step: the U-Net frozen, a PEFT LoRA (rank 8,
    alpha 8, gaussian init) on to_q/to_k/to_v/to_out.0, MSE, backward, AdamW on the adapters.

    --precision bf16|fp16 is what that script does under accelerate's mixed precision: the base
    cast to weight_dtype, the adapters kept in f32 (`cast_training_params`), the forward under
    `torch.autocast`, the loss in f32, and for fp16 a GradScaler."""
    import transformers.integrations.peft as tp
    from peft import LoraConfig

    tp.check_peft_version = lambda min_version: None  # peft 0.21.2 is the newest on PyPI
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    model = sd15_unet()
    model.requires_grad_(False)
    model.to(dtype=dtype)
    model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=args.precision == "fp16")
    b, s = args.batch, args.latent
    x, target = torch.randn(b, 4, s, s), torch.randn(b, 4, s, s)
    ctx, t = torch.randn(b, 77, 768), torch.full((b,), 500.0)
    setup_peak = vm_hwm_mib()
    reset_peak()
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=args.precision != "no"):
            pred = model(x, t, ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return {"case": "sd15_lora_step", "trainable": sum(p.numel() for p in params),
            "latent": s, "batch": b, "steps": args.steps, "precision": args.precision,
            "median_s": times[len(times) // 2], "setup_peak_rss_mib": setup_peak,
            "step_peak_rss_mib": vm_hwm_mib()}


def txt2img(args):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                          down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                          sample_size=512),
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                  num_attention_heads=12, hidden_act="quick_gelu", vocab_size=49408)),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(ROOT, "tests/fixtures/sd/tokenizer")),
        unet=sd15_unet(),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    with torch.no_grad():
        pipe("a photo of a mountain at sunrise", height=args.size, width=args.size,
             num_inference_steps=args.steps, guidance_scale=7.5, output_type="np",
             generator=torch.Generator().manual_seed(0))
    return {"case": "sd15_txt2img", "size": args.size, "steps": args.steps,
            "seconds": time.perf_counter() - start}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["unet", "txt2img", "lora"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    row = {"unet": unet, "txt2img": txt2img, "lora": lora}[args.what](args)
    row.update({"impl": f"pytorch-{torch.__version__}", "peak_rss_mib": peak_rss_mib(),
                "threads": torch.get_num_threads()})
    print(json.dumps(row))


if __name__ == "__main__":
    main()
