"""Stable Diffusion reference fixtures for tests/ (run once; commit the outputs).

    .venv/bin/pip install torch diffusers transformers safetensors numpy
    .venv/bin/python scripts/gen_sd_reference.py

Everything is made offline with random weights, using the tiny configs of diffusers' own
pipeline tests. Weights are rounded to float16 and stored as float16 (the `fp16` variant), and
every reference output is computed in float32 from those same weights, so the Rust side, which
loads the float16 files into float32 models, can be compared at 1e-4.

Writes tests/fixtures/sd/:
- tokenizer/: a byte-level BPE vocabulary learned here (512 byte tokens, ~470 merges, the two
  special tokens) as SD 1.5 ships its tokenizer: vocab.json, merges.txt, special_tokens_map.json,
  tokenizer_config.json. tokenizer_pad_bang/ is the same with SD 2.x's pad token "!".
- tokenizer_ids.json: transformers' CLIPTokenizer ids (max_length 77, padding, truncation) for
  prompts with punctuation, digits, unicode, extra spaces and more than 77 tokens.
- tiny_sd/: a StableDiffusionPipeline folder written by save_pretrained(variant="fp16")
  (unet, vae, text_encoder, tokenizer as tokenizer.json, DDIM scheduler, model_index.json).
- tiny_sd.safetensors: the same weights as one original-layout checkpoint
  (model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*), checked here
  to load in diffusers' from_single_file to the folder's weights.
- unet_class/, unet_linear/: two more small UNet2DConditionModels (class labels; linear
  projections with per-block heads).
- reference.safetensors: inputs and diffusers/transformers outputs of each model, the pipeline's
  text embeddings and images for fixed latents (DDIM, DPM-Solver++ 2M, Euler; CFG 7.5).
- schedulers.safetensors + schedulers.json: DDIM, DDPM, Euler, Euler ancestral and DPM-Solver++
  (2M) over fixed model outputs (and the ancestral noise), every intermediate sample.
Generated with diffusers 0.42.1, transformers 5.24, torch 2.15 on CPU in float32.
"""
import json
import math
import os
import re
import shutil
from collections import Counter

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "sd")
torch.manual_seed(0)


# ----------------------------------------------------------------------------- tokenizer
def bytes_to_unicode():
    """GPT-2 / CLIP's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


PATTERN = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+""", re.IGNORECASE)

CORPUS = """
a photo of a mountain at sunrise, snow on the peaks and a lake in the valley. a painting of a
red circle on a dark background; a blue square, a green triangle, a yellow diamond, a purple
circle and an orange square. the quick brown fox jumps over the lazy dog. there is a small house
near the river with trees and flowers. portrait of a woman with long hair, highly detailed,
sharp focus, digital art, trending on artstation, 4k, 8k, photorealistic, cinematic lighting.
a cat sitting on a chair in the kitchen. an astronaut riding a horse on the moon. the city at
night with neon lights and rain. landscape, forest, clouds, sky, sea, beach, sunset, stars.
"""


def learn_merges(words, n_merges):
    vocab = Counter()
    for w, c in words.items():
        symbols = list(w[:-1]) + [w[-1] + "</w>"]
        vocab[tuple(symbols)] += c
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for symbols, c in vocab.items():
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        new = Counter()
        for symbols, c in vocab.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new[tuple(out)] += c
        vocab = new
    return merges


def make_tokenizer():
    b2u = bytes_to_unicode()
    captions = [json.loads(l)["text"] for l in open(os.path.join(ROOT, "datasets/shapes/metadata.jsonl"))]
    words = Counter()
    for text in captions + [CORPUS] * 5:
        for piece in PATTERN.findall(text.lower()):
            words["".join(b2u[b] for b in piece.encode("utf-8"))] += 1
    base = list(b2u.values())
    merges = learn_merges(words, 470)
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) <= 1000, len(vocab)
    for name, pad in [("tokenizer", "<|endoftext|>"), ("tokenizer_pad_bang", "!")]:
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        special = lambda s: {"content": s, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
            json.dump({"bos_token": special("<|startoftext|>"), "eos_token": special("<|endoftext|>"),
                       "pad_token": pad, "unk_token": special("<|endoftext|>")}, f, indent=2)
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump({"add_prefix_space": False, "bos_token": special("<|startoftext|>"), "do_lower_case": True,
                       "eos_token": special("<|endoftext|>"), "errors": "replace", "model_max_length": 77,
                       "pad_token": pad, "tokenizer_class": "CLIPTokenizer",
                       "unk_token": special("<|endoftext|>")}, f, indent=2)
    return len(vocab)


PROMPTS = [
    "a red circle",
    "A Photo of a MOUNTAIN at sunrise",
    "",
    "   leading and trailing spaces   ",
    "many     spaces\tand\ttabs\nand newlines",
    "punctuation: commas, periods. exclamation! question? (parens) [brackets] {braces}",
    "digits 1234567890 and 3.14 and 1e-5 and 2024-11-29",
    "it's the cat's toy, we're here, they've gone, I'm fine, you'll see, he'd know",
    "café naïve résumé Über straße",
    "日本語のテキスト and 中文 mixed",
    "emoji 🎨🖼️ 😀 in a prompt",
    "hyphenated-words and under_scores and slashes/here",
    "masterpiece, best quality, (highly detailed:1.2), [low quality], ((sharp focus))",
    "<|startoftext|>already has special tokens<|endoftext|>",
    "UPPERCASE lowercase MiXeD CaSe",
    "quotes \"double\" and 'single' and `backticks`",
    "a blue square on a dark background",
    "a green triangle, a yellow diamond, a purple circle and an orange square",
    "astronaut riding a horse on the moon, cinematic lighting, 8k",
    "$100 & 50% off #hashtag @mention ~tilde ^caret *star +plus =equals |pipe",
    "x" * 200,
    " ".join(["mountain"] * 90),
    ", ".join(f"word{i}" for i in range(60)),
    "the quick brown fox jumps over the lazy dog " * 8,
    "non-breaking\u00a0space and zero\u200bwidth",
    "combining e\u0301 versus precomposed é",
    "ümlaut Ångström ØRESUND œuvre",
    "a\u3000ideographic space",
    "tab\tonly",
    "single",
    "?!?!...",
    "newline at end\n",
    "a photo of a cat, sitting on a chair in the kitchen, trending on artstation",
]


def tokenizer_ids():
    tok = CLIPTokenizer.from_pretrained(os.path.join(OUT, "tokenizer"))
    bang = CLIPTokenizer.from_pretrained(os.path.join(OUT, "tokenizer_pad_bang"))
    enc = lambda t: t(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    out = {"prompts": PROMPTS, "ids": enc(tok), "ids_pad_bang": enc(bang),
           "unpadded": tok(PROMPTS).input_ids}
    with open(os.path.join(OUT, "tokenizer_ids.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False)
    return tok


# ----------------------------------------------------------------------------- models
def f16_weights(model, scale_norms=True):
    """Perturbs norms (so weight/bias mix-ups show) and rounds every weight to float16."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if scale_norms and ("norm" in name):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            p.copy_(p.half().float())
    return model


def tiny_unet():
    torch.manual_seed(0)
    return f16_weights(UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32))


def tiny_vae():
    torch.manual_seed(0)
    return f16_weights(AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4))


def tiny_text_encoder(vocab_size):
    torch.manual_seed(0)
    cfg = CLIPTextConfig(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                         hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
                         num_hidden_layers=5, vocab_size=1000)
    return f16_weights(CLIPTextModel(cfg))


def save_unet_variant(name, unet):
    d = os.path.join(OUT, name)
    unet.half().save_pretrained(d, variant="fp16")
    return UNet2DConditionModel.from_pretrained(d, variant="fp16", torch_dtype=torch.float32)


# ----------------------------------------------------------------------------- single file
def down_has_attention(types):
    return [t.startswith("CrossAttn") for t in types]


def to_original(unet_cfg, vae_cfg, unet, vae, te):
    """diffusers -> original LDM layout for any number of levels (generalises diffusers'
    scripts/convert_diffusers_to_original_stable_diffusion.py, which hard-codes SD 1.x's four)."""
    L = unet_cfg["layers_per_block"]
    levels = len(unet_cfg["block_out_channels"])
    down_attn = down_has_attention(unet_cfg["down_block_types"])
    up_attn = down_has_attention(unet_cfg["up_block_types"])
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    for i in range(levels):
        for j in range(L):
            n = 1 + i * (L + 1) + j
            pairs.append((f"input_blocks.{n}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn[i]:
                pairs.append((f"input_blocks.{n}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < levels - 1:
            pairs.append((f"input_blocks.{(i + 1) * (L + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        for j in range(L + 1):
            n = i * (L + 1) + j
            pairs.append((f"output_blocks.{n}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn[i]:
                pairs.append((f"output_blocks.{n}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < levels - 1:
            n = i * (L + 1) + L
            pairs.append((f"output_blocks.{n}.{2 if up_attn[i] else 1}.", f"up_blocks.{i}.upsamplers.0."))
    pairs += [("middle_block.0.", "mid_block.resnets.0."), ("middle_block.1.", "mid_block.attentions.0."),
              ("middle_block.2.", "mid_block.resnets.1.")]
    resnet = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
              ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
    out = {}
    for k, v in unet.state_dict().items():
        new = k
        if "resnets" in new:
            for sd, hf in resnet:
                new = new.replace("." + hf + ".", "." + sd + ".")
        for sd, hf in pairs:
            if new.startswith(hf):
                new = sd + new[len(hf):]
                break
        out["model.diffusion_model." + new] = v
    # VAE
    vlevels = len(vae_cfg["block_out_channels"])
    vpairs = [("mid.attn_1.", "mid_block.attentions.0."), ("mid.block_1.", "mid_block.resnets.0."),
              ("mid.block_2.", "mid_block.resnets.1."), ("norm_out.", "conv_norm_out.")]
    for i in range(vlevels):
        vpairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
        vpairs.append((f"decoder.up.{vlevels - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
        vpairs.append((f"encoder.down.{i}.block.", f"encoder.down_blocks.{i}.resnets."))
        vpairs.append((f"decoder.up.{vlevels - 1 - i}.block.", f"decoder.up_blocks.{i}.resnets."))
    vattn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    for k, v in vae.state_dict().items():
        new = k
        for sd, hf in vpairs:
            new = new.replace(hf, sd)
        new = new.replace("conv_shortcut", "nin_shortcut")
        if "mid.attn_1." in new:
            head, tail = new.split("mid.attn_1.")
            for sd, hf in vattn:
                if tail.startswith(hf):
                    tail = sd + tail[len(hf):]
                    break
            new = head + "mid.attn_1." + tail
            if tail.split(".")[0] in ("q", "k", "v", "proj_out") and tail.endswith("weight"):
                v = v.reshape(*v.shape, 1, 1)
        out["first_stage_model." + new] = v
    for k, v in te.state_dict().items():
        # transformers 5 saves CLIPTextModel without the `text_model.` level the original
        # layout (and transformers 4) has.
        k = k if k.startswith("text_model.") else "text_model." + k
        out["cond_stage_model.transformer." + k] = v
    return out


# ----------------------------------------------------------------------------- schedulers
SD_SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def schedulers():
    import diffusers.schedulers.scheduling_ddpm as ddpm
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea

    shape = (1, 4, 4, 4)
    cases = [
        ("ddim_sd", DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1), 10),
        ("ddim_v_trailing", DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                                  prediction_type="v_prediction", timestep_spacing="trailing",
                                                  rescale_betas_zero_snr=False), 8),
        ("ddpm_sd", DDPMScheduler, dict(clip_sample=False, steps_offset=1), 10),
        ("euler_sd", EulerDiscreteScheduler, dict(steps_offset=1), 10),
        ("euler_v_linspace", EulerDiscreteScheduler, dict(steps_offset=1, prediction_type="v_prediction",
                                                          timestep_spacing="linspace"), 7),
        ("euler_a_sd", EulerAncestralDiscreteScheduler, dict(steps_offset=1), 10),
        ("dpmpp_2m_sd", DPMSolverMultistepScheduler, dict(steps_offset=1), 10),
        ("dpmpp_2m_v_trailing", DPMSolverMultistepScheduler, dict(steps_offset=1, prediction_type="v_prediction",
                                                                  timestep_spacing="trailing"), 6),
    ]
    tensors, meta = {}, {}
    for name, cls, kw, steps in cases:
        sched = cls(**SD_SCHED, **kw)
        sched.set_timesteps(steps)
        x = torch.randn(shape) * sched.init_noise_sigma
        tensors[f"{name}.initial"] = x.clone()
        noises = []
        real = ea.randn_tensor

        def recording(*a, **k):
            n = real(*a, **k)
            noises.append(n.clone())
            return n

        # The stochastic schedulers draw their noise through randn_tensor: record it.
        ea.randn_tensor = ddpm.randn_tensor = recording
        scales = []
        gen = torch.Generator().manual_seed(5)
        for i, t in enumerate(sched.timesteps):
            scaled = sched.scale_model_input(x, t)
            scales.append(float((scaled / x).flatten()[0]))
            out = torch.randn(shape)
            tensors[f"{name}.model_output.{i}"] = out
            kwargs = {"generator": gen} if cls in (DDPMScheduler, EulerAncestralDiscreteScheduler) else {}
            x = sched.step(out, t, x, **kwargs).prev_sample
            tensors[f"{name}.sample.{i}"] = x.clone()
        ea.randn_tensor = ddpm.randn_tensor = real
        for i, n in enumerate(noises):
            tensors[f"{name}.noise.{i}"] = n
        # JSON has no infinities (DPM-Solver's lambda_min_clipped is -inf): write them as text.
        config = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in dict(sched.config).items()}
        meta[name] = {"config": config, "timesteps": [float(t) for t in sched.timesteps],
                      "init_noise_sigma": float(sched.init_noise_sigma), "scales": scales,
                      "noises": len(noises)}
    save_file(tensors, os.path.join(OUT, "schedulers.safetensors"))
    with open(os.path.join(OUT, "schedulers.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)


# ----------------------------------------------------------------------------- main
def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    vocab_size = make_tokenizer()
    tok = tokenizer_ids()
    ref = {}

    unet, vae, te = tiny_unet(), tiny_vae(), tiny_text_encoder(vocab_size)
    scheduler = DDIMScheduler(**SD_SCHED, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = os.path.join(OUT, "tiny_sd")
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16", safe_serialization=True)
    pipe = StableDiffusionPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    unet, vae, te = pipe.unet, pipe.vae, pipe.text_encoder

    # The single file, checked against diffusers' own single-file loader.
    single = to_original(unet.config, vae.config, unet, vae, te)
    single_path = os.path.join(OUT, "tiny_sd.safetensors")
    save_file({k: v.half().contiguous() for k, v in single.items()}, single_path)
    loaded = StableDiffusionPipeline.from_single_file(single_path, config=folder, local_files_only=True,
                                                      torch_dtype=torch.float32, safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        b = {k: v for k, v in b.items() if k in a or not k.endswith("position_ids")}
        assert set(a) == set(b), (name, set(a) ^ set(b))
        assert all(torch.equal(a[k].float(), b[k].float()) for k in a), name
    print("single file: diffusers' from_single_file loads the folder's weights exactly")

    with torch.no_grad():
        # UNet
        sample, ehs = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
        t = torch.tensor([10.0, 980.0])
        ref.update({"unet.sample": sample, "unet.timesteps": t, "unet.encoder_hidden_states": ehs,
                    "unet.output": unet(sample, t, ehs).sample})
        torch.manual_seed(3)
        uc = save_unet_variant("unet_class", f16_weights(UNet2DConditionModel(
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=8, in_channels=4,
            out_channels=4, cross_attention_dim=16, attention_head_dim=4, num_class_embeds=10,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))))
        s2, e2, labels = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.tensor([3, 7])
        ref.update({"unet_class.sample": s2, "unet_class.encoder_hidden_states": e2,
                    "unet_class.class_labels": labels.float(), "unet_class.timesteps": torch.tensor([1.0, 500.0]),
                    "unet_class.output": uc(s2, torch.tensor([1.0, 500.0]), e2, class_labels=labels).sample})
        torch.manual_seed(4)
        ul = save_unet_variant("unet_linear", f16_weights(UNet2DConditionModel(
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=8, in_channels=4,
            out_channels=4, cross_attention_dim=24, attention_head_dim=[2, 4], use_linear_projection=True,
            upcast_attention=True, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))))
        s3, e3 = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 24)
        ref.update({"unet_linear.sample": s3, "unet_linear.encoder_hidden_states": e3,
                    "unet_linear.timesteps": torch.tensor([999.0, 0.0]),
                    "unet_linear.output": ul(s3, torch.tensor([999.0, 0.0]), e3).sample})

        # VAE
        img = torch.rand(1, 3, 32, 32) * 2 - 1
        post = vae.encode(img).latent_dist
        z = torch.randn(1, 4, 16, 16)
        ref.update({"vae.image": img, "vae.mean": post.mean, "vae.logvar": post.logvar, "vae.kl": post.kl(),
                    "vae.latents": z, "vae.decoded": vae.decode(z).sample})

        # CLIP
        ids = tok(["a red circle", "a photo of a mountain at sunrise, snow on the peaks"],
                  padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = te(ids, output_hidden_states=True)
        ref.update({"clip.input_ids": ids.float(), "clip.last_hidden_state": out.last_hidden_state,
                    "clip.skip2": te.final_layer_norm(out.hidden_states[-2])})

        # Text to image with CFG from fixed latents.
        latents = torch.randn(1, 4, 16, 16)
        ref["pipeline.latents"] = latents
        prompt, negative = "a red circle", "blurry"
        pe, ne = pipe.encode_prompt(prompt, "cpu", 1, True, negative)
        ref.update({"pipeline.prompt_embeds": pe, "pipeline.negative_prompt_embeds": ne})
        for name, sched in [("ddim", pipe.scheduler),
                            ("dpmpp_2m", DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)),
                            ("euler", EulerDiscreteScheduler.from_config(pipe.scheduler.config))]:
            pipe.scheduler = sched
            image = pipe(prompt, negative_prompt=negative, height=32, width=32, num_inference_steps=5,
                         guidance_scale=7.5, latents=latents.clone(), output_type="np").images
            ref[f"pipeline.{name}"] = torch.from_numpy(image).permute(0, 3, 1, 2).contiguous()
        pipe.scheduler = scheduler
    save_file({k: v.contiguous().float() for k, v in ref.items()}, os.path.join(OUT, "reference.safetensors"))
    schedulers()
    print("wrote", OUT)


if __name__ == "__main__":
    main()
