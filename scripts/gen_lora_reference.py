"""LoRA reference fixtures for tests/ (run once, after gen_sd_reference.py; commit the outputs).

    .venv/bin/pip install torch diffusers transformers peft safetensors numpy
    .venv/bin/python scripts/gen_lora_reference.py

Everything is made offline from tests/fixtures/sd/tiny_sd (loaded in float32) and random LoRA
weights, with diffusers' and PEFT's own code, as diffusers' training scripts
(examples/dreambooth/train_dreambooth_lora.py) build and save a LoRA:

- U-Net: peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
  target_modules=["to_q", "to_k", "to_v", "to_out.0"]) through unet.add_adapter, so the LoRA
  scale is alpha / r = 2.
- Text encoder: r=4, lora_alpha=4 (scale 1) on q_proj, k_proj, v_proj, out_proj.
- Every lora_A and lora_B is then redrawn (seed 0; A ~ N(0, 0.2), B ~ N(0, 0.05)) so that the
  LoRA is not a no-op (PEFT initialises B to zero).

Writes tests/fixtures/lora/:
- diffusers_lora.safetensors: StableDiffusionPipeline.save_lora_weights of
  convert_state_dict_to_diffusers(get_peft_model_state_dict(...)) with the adapters' LoraConfig
  as unet_lora_adapter_metadata / text_encoder_lora_adapter_metadata (header key
  "lora_adapter_metadata": JSON with "unet.r", "unet.lora_alpha", "text_encoder.r", ...). Keys
  look like unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight and
  text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight (transformers 5's
  CLIPTextModel has no `text_model.` level, so neither has the saved key). The metadata is the
  LoraConfig's to_dict() with target_modules sorted and base_model_name_or_path cleared (it would
  hold a local path). The order of the two header metadata entries ("format",
  "lora_adapter_metadata") changes from run to run (safetensors writes an unordered map), so
  this file's bytes can differ between runs; its tensors and metadata do not.
- kohya_lora.safetensors: diffusers.utils.convert_state_dict_to_kohya of the PEFT state dicts,
  prefixed "unet." and "text_encoder.text_model." (so the names are sd-scripts' SD 1.x names),
  with two fixes made here: the text encoder prefix diffusers writes, "lora_te1_" (SDXL style),
  is renamed to SD 1.x's "lora_te_", and every ".alpha" is set to the adapter's lora_alpha
  (convert_state_dict_to_kohya writes alpha = rank, which would lose the U-Net's alpha 8).
  Keys look like lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
  and lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight, alphas are float32
  scalars (shape []).
- reference.safetensors (float32): x (2, 4, 32, 32), t = [10, 500], ids (2, 77; token ids as
  floats) of ["a photo of a mountain", ""]; context_base / context_lora (2, 77, 32): text encoder
  last_hidden_state without / with its LoRA; out_base = unet(x, t, context_base) without LoRA;
  out_lora = unet(x, t, context_lora) with LoRA at scale 1; out_lora_half_unet =
  unet(x, t, context_base) with the U-Net LoRA at scale 0.5, applied the way diffusers 0.42's
  pipelines do it: cross_attention_kwargs={"scale": 0.5} (UNet2DConditionModel.forward is wrapped
  by apply_lora_scale, which scales every LoRA layer by 0.5 for that call, i.e. the U-Net's
  delta W = 0.5 * (alpha / r) * B A); checked here to equal unet.set_adapters("default", 0.5).

Both LoRA files are then loaded into fresh pipelines with pipe.load_lora_weights and their U-Net
outputs compared with out_lora and out_lora_half_unet (must agree to 1e-5).
Generated with diffusers 0.42.1, transformers 5.24, peft 0.21.2, torch 2.15 on CPU in float32
(transformers 5.24 asks for peft >= 0.22 in its adapter methods; the script lifts that check).
"""
import json
import os
import shutil

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

# transformers 5.24's PEFT integration (CLIPTextModel.add_adapter / load_adapter, which
# load_lora_weights uses for the text encoder) refuses peft < 0.22, yet 0.21.2 is the newest
# release and does what is used here; lift that check for this script only.
import transformers.integrations.peft as _tpeft  # noqa: E402

_tpeft.check_peft_version = lambda min_version: None

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BASE = os.path.join(ROOT, "tests", "fixtures", "sd", "tiny_sd")
OUT = os.path.join(ROOT, "tests", "fixtures", "lora")
PROMPTS = ["a photo of a mountain", ""]
UNET_R, UNET_ALPHA = 4, 8
TE_R, TE_ALPHA = 4, 4
TOL = 1e-5


def load_pipe():
    return StableDiffusionPipeline.from_pretrained(BASE, variant="fp16", torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)


def randomize_lora(model, gen):
    """Redraws every lora_A / lora_B (in named_parameters order) so the LoRA does something."""
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                n += 1
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
                n += 1
    return n


def adapter_metadata(model):
    """The adapter's LoraConfig as training scripts pass it (diffusers.training_utils.
    _collate_lora_metadata: peft_config["default"].to_dict()), made reproducible: target_modules
    (a set) sorted, and the local path transformers' add_adapter records as
    base_model_name_or_path dropped."""
    meta = model.peft_config["default"].to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    meta["base_model_name_or_path"] = None
    return meta


def examples(keys, prefixes, n):
    keys = sorted(keys)
    return [k for p in prefixes for k in [k for k in keys if k.startswith(p)][:n]]


def header(path):
    with safe_open(path, "pt") as f:
        return f.metadata() or {}, list(f.keys())


def to_kohya(unet_peft, te_peft):
    sd = {f"unet.{k}": v for k, v in unet_peft.items()}
    # sd-scripts names SD 1.x's text encoder modules from CLIPTextModel with its `text_model.`
    # level (lora_te_text_model_encoder_layers_0_self_attn_q_proj); transformers 5 dropped it.
    sd.update({f"text_encoder.text_model.{k}": v for k, v in te_peft.items()})
    kohya = convert_state_dict_to_kohya(sd)
    out = {}
    for k, v in kohya.items():
        if k.startswith("lora_te1_"):
            k = "lora_te_" + k[len("lora_te1_"):]
        if k.endswith(".alpha"):
            alpha = UNET_ALPHA if k.startswith("lora_unet_") else TE_ALPHA
            v = torch.tensor(float(alpha), dtype=torch.float32)
        out[k] = v.contiguous()
    return out


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)

    pipe = load_pipe()
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    torch.manual_seed(1)
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    t = torch.tensor([10.0, 500.0])
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    ref = {"x": x, "t": t, "ids": ids.float()}
    with torch.no_grad():
        ref["context_base"] = te(ids).last_hidden_state
        ref["out_base"] = unet(x, t, ref["context_base"]).sample

    # ---------------------------------------------------------------- the LoRA, as training scripts add it
    unet.add_adapter(LoraConfig(r=UNET_R, lora_alpha=UNET_ALPHA, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    te.add_adapter(LoraConfig(r=TE_R, lora_alpha=TE_ALPHA, init_lora_weights="gaussian",
                              target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    gen = torch.Generator().manual_seed(0)
    print("randomized LoRA tensors: unet", randomize_lora(unet, gen), "text encoder", randomize_lora(te, gen))

    with torch.no_grad():
        # Disabling the adapters gives back the base model.
        unet.disable_adapters()
        te.disable_adapters()
        d_te = (te(ids).last_hidden_state - ref["context_base"]).abs().max().item()
        d_unet = (unet(x, t, ref["context_base"]).sample - ref["out_base"]).abs().max().item()
        print(f"adapters disabled vs base: text encoder {d_te:.2e}, unet {d_unet:.2e}")
        assert d_te == 0 and d_unet == 0
        unet.enable_adapters()
        te.enable_adapters()

        ref["context_lora"] = te(ids).last_hidden_state
        ref["out_lora"] = unet(x, t, ref["context_lora"]).sample
        ref["out_lora_half_unet"] = unet(x, t, ref["context_base"], cross_attention_kwargs={"scale": 0.5}).sample
        # The same through set_adapters (the adapter add_adapter made is called "default").
        unet.set_adapters("default", 0.5)
        d = (unet(x, t, ref["context_base"]).sample - ref["out_lora_half_unet"]).abs().max().item()
        print(f"scale 0.5: cross_attention_kwargs vs set_adapters: {d:.2e}")
        assert d < TOL
        unet.set_adapters("default", 1.0)
        assert (unet(x, t, ref["context_lora"]).sample - ref["out_lora"]).abs().max().item() < TOL
    print("LoRA effect: |context_lora - context_base| max",
          f"{(ref['context_lora'] - ref['context_base']).abs().max().item():.3e},",
          f"|out_lora - out_base| max {(ref['out_lora'] - ref['out_base']).abs().max().item():.3e},",
          f"|out_lora_half_unet - out_base| max {(ref['out_lora_half_unet'] - ref['out_base']).abs().max().item():.3e}")

    # ---------------------------------------------------------------- diffusers format
    unet_peft = get_peft_model_state_dict(unet)
    te_peft = get_peft_model_state_dict(te)
    StableDiffusionPipeline.save_lora_weights(
        OUT,
        unet_lora_layers=convert_state_dict_to_diffusers(unet_peft),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(te_peft),
        unet_lora_adapter_metadata=adapter_metadata(unet),
        text_encoder_lora_adapter_metadata=adapter_metadata(te),
    )
    diffusers_path = os.path.join(OUT, "diffusers_lora.safetensors")
    os.rename(os.path.join(OUT, "pytorch_lora_weights.safetensors"), diffusers_path)
    meta, keys = header(diffusers_path)
    print(f"\n{diffusers_path}: {len(keys)} tensors")
    for k in examples(keys, ("unet.", "text_encoder."), 4):
        print("  ", k)
    print("  header metadata:")
    for k, v in meta.items():
        if k == "lora_adapter_metadata":
            v = json.loads(v)
            print("    lora_adapter_metadata:", json.dumps({kk: v[kk] for kk in sorted(v)
                                                             if kk.split(".", 1)[1] in ("r", "lora_alpha", "target_modules", "peft_type")}))
            print("      (all keys:", ", ".join(sorted(v)) + ")")
        else:
            print(f"    {k}: {v}")

    # ---------------------------------------------------------------- kohya format
    kohya_path = os.path.join(OUT, "kohya_lora.safetensors")
    kohya = to_kohya(unet_peft, te_peft)
    save_file(kohya, kohya_path, metadata={"format": "pt"})
    print(f"\n{kohya_path}: {len(kohya)} tensors")
    for k in examples(kohya, ("lora_unet_", "lora_te_"), 3):
        print("  ", k, tuple(kohya[k].shape), kohya[k].item() if k.endswith(".alpha") else "")

    save_file({k: v.contiguous().float() for k, v in ref.items()}, os.path.join(OUT, "reference.safetensors"))
    print("\nreference.safetensors:")
    for k, v in ref.items():
        print(f"   {k}: {tuple(v.shape)}")

    # ---------------------------------------------------------------- what diffusers loads
    print()
    worst = 0.0
    for name in ("diffusers_lora.safetensors", "kohya_lora.safetensors"):
        fresh = load_pipe()
        fresh.load_lora_weights(OUT, weight_name=name)
        with torch.no_grad():
            ctx = fresh.text_encoder(ids).last_hidden_state
            base_ctx = ref["context_base"]
            d_ctx = (ctx - ref["context_lora"]).abs().max().item()
            d_out = (fresh.unet(x, t, ctx).sample - ref["out_lora"]).abs().max().item()
            d_half = (fresh.unet(x, t, base_ctx, cross_attention_kwargs={"scale": 0.5}).sample
                      - ref["out_lora_half_unet"]).abs().max().item()
        print(f"load_lora_weights({name}): max |diff| context_lora {d_ctx:.2e}, out_lora {d_out:.2e}, "
              f"out_lora_half_unet {d_half:.2e}")
        worst = max(worst, d_ctx, d_out, d_half)
    assert worst < TOL, worst
    print("wrote", OUT, sorted(os.listdir(OUT)),
          {f: os.path.getsize(os.path.join(OUT, f)) for f in sorted(os.listdir(OUT))})


if __name__ == "__main__":
    main()
