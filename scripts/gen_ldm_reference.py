"""Latent diffusion reference fixtures for tests/ldm.rs (run once; commit the output).

    .venv/bin/python scripts/gen_ldm_reference.py

Uses the tiny AutoencoderKL of tests/fixtures/sd/tiny_sd/vae (float16 weights, computed in
float32) and writes tests/fixtures/ldm/reference.safetensors with, for fixed images `x` and
fixed posterior noise `eps`:
- `z`: the posterior sample, diffusers' `DiagonalGaussianDistribution.sample`
  (`mean + std * eps`);
- `recon`: `vae.decode(z)`;
- `kl`: `posterior.kl()` per image;
- `loss_l1`, `rec_l1`, `kl_loss`: CompVis' `LPIPSWithDiscriminator` stage-1 loss with the
  perceptual and adversarial terms off (`perceptual_weight = 0`, discriminator not started) and
  its learned `logvar` at its initial 0: `nll = sum(|x - recon| / exp(logvar) + logvar) / b`,
  `kl_loss = sum(kl) / b`, `loss = nll + kl_weight * kl_loss` with `kl_weight = 1e-6`;
- `rec_mse`: the same with squared error;
- `scale`: CompVis' `scale_by_std`, `1 / z.flatten().std()` (torch's unbiased std).

and, for the text path of stage 2 (tiny_sd's CLIP text encoder and U-Net, float32), the
gradients of `L = sum(unet(x_t, t, text_encoder(ids)) * w)`:
- `grad.ids`, `grad.x_t`, `grad.t`, `grad.w` (inputs) and `grad.out` (the U-Net output);
- `grad.d_x_t`, `grad.d_context` (w.r.t. the text embeddings), and w.r.t. the parameters named
  `grad.param.<name>` (cross-attention keys/values, the text encoder's token embedding, its
  first attention layer, the U-Net's input convolution).
Generated with diffusers 0.42.1, torch 2.15 on CPU in float32.
"""
import os

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VAE = os.path.join(ROOT, "tests", "fixtures", "sd", "tiny_sd", "vae")
OUT = os.path.join(ROOT, "tests", "fixtures", "ldm")
KL_WEIGHT = 1e-6


GRAD_PARAMS = [
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight",
    "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q.weight",
    "unet.conv_in.weight",
    "text_encoder.text_model.embeddings.token_embedding.weight",
    "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.weight",
    "text_encoder.text_model.final_layer_norm.weight",
]


def text_path_gradients():
    sd = os.path.join(ROOT, "tests", "fixtures", "sd", "tiny_sd")
    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet", variant="fp16",
                                                torch_dtype=torch.float32).eval()
    te = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder", variant="fp16",
                                       torch_dtype=torch.float32).eval()
    ids = torch.tensor([[49406, 320, 1000, 2000, 49407] + [49407] * 72,
                        [49406, 49407] + [49407] * 75])
    ids = ids.clamp(max=te.config.vocab_size - 1)
    x_t = torch.randn(2, 4, 8, 8, requires_grad=True)
    t = torch.tensor([900.0, 37.0])
    context = te(ids).last_hidden_state
    context.retain_grad()
    out = unet(x_t, t, context).sample
    w = torch.randn(out.shape)
    (out * w).sum().backward()
    params = dict([("unet." + k, v) for k, v in unet.named_parameters()] +
                  # transformers 5 names CLIPTextModel's parameters without the "text_model."
                  # its checkpoints (SD 1.5's among them) and difftrain use.
                  [("text_encoder.text_model." + k.removeprefix("text_model."), v)
                   for k, v in te.named_parameters()])
    ref = {"grad.ids": ids.float(), "grad.x_t": x_t.detach(), "grad.t": t, "grad.w": w,
           "grad.out": out.detach(), "grad.d_x_t": x_t.grad, "grad.d_context": context.grad}
    for name in GRAD_PARAMS:
        ref["grad.param." + name] = params[name].grad
    return ref


def main():
    torch.manual_seed(1)
    vae = AutoencoderKL.from_pretrained(VAE, variant="fp16", torch_dtype=torch.float32).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        eps = torch.randn(post.mean.shape)
        z = post.mean + post.std * eps
        recon = vae.decode(z).sample
        kl = post.kl()
        b = x.shape[0]
        logvar = torch.zeros(())  # LPIPSWithDiscriminator's logvar_init = 0
        rec_l1 = torch.abs(x - recon)
        nll = rec_l1 / torch.exp(logvar) + logvar
        nll_loss = torch.sum(nll) / b
        kl_loss = torch.sum(kl) / b
        loss_l1 = nll_loss + KL_WEIGHT * kl_loss
        rec_mse = torch.sum((x - recon) ** 2) / b
        scale = 1.0 / z.flatten().std()
    os.makedirs(OUT, exist_ok=True)
    ref = {}
    ref.update({
        "x": x, "eps": eps, "z": z, "recon": recon, "kl": kl,
        "rec_l1": nll_loss.reshape(1), "rec_mse": rec_mse.reshape(1), "kl_loss": kl_loss.reshape(1),
        "loss_l1": loss_l1.reshape(1), "scale": scale.reshape(1),
    })
    ref.update(text_path_gradients())
    save_file({k: v.contiguous().float() for k, v in ref.items()}, os.path.join(OUT, "reference.safetensors"))
    print({k: (list(v.shape), float(v.flatten()[0])) for k, v in ref.items()})


if __name__ == "__main__":
    main()
