//! Single-file Stable Diffusion checkpoints in the original (CompVis/LDM) layout, as A1111 and
//! ComfyUI users hold them (`v1-5-pruned-emaonly.safetensors`): `model.diffusion_model.*` (the
//! U-Net), `first_stage_model.*` (the VAE), `cond_stage_model.transformer.*` (SD 1.x's CLIP) or
//! `cond_stage_model.model.*` (SD 2.x's OpenCLIP), mapped onto diffusers' names by one table per
//! component.
//!
//! The U-Net table is generated from the model's shape (levels, layers per block, which levels
//! have attention), mirroring diffusers' `convert_diffusers_to_original_stable_diffusion.py` for
//! any number of levels rather than SD 1.x's four.

use std::collections::BTreeMap;

use super::keys::Entry;
use super::safetensors::TensorSource;

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";

/// Which text encoder a single file carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderLayout {
    /// OpenAI CLIP in transformers' names (SD 1.x).
    Clip,
    /// OpenCLIP with fused q/k/v (SD 2.x).
    OpenClip,
}

/// What a file holds, by its keys.
pub fn text_encoder_layout(keys: &[String]) -> Option<TextEncoderLayout> {
    if keys.iter().any(|k| k.starts_with(CLIP_PREFIX)) {
        Some(TextEncoderLayout::Clip)
    } else if keys.iter().any(|k| k.starts_with(OPEN_CLIP_PREFIX)) {
        Some(TextEncoderLayout::OpenClip)
    } else {
        None
    }
}

/// The U-Net's shape as the original layout numbers it.
#[derive(Debug, Clone)]
pub struct UNetLayout {
    pub layers_per_block: usize,
    /// Whether down level `i` has attention (`CrossAttnDownBlock2D`).
    pub down_attention: Vec<bool>,
    /// Whether up level `i` (diffusers' order) has attention.
    pub up_attention: Vec<bool>,
    pub class_embedding: bool,
}

/// `(original prefix, diffusers prefix)` pairs for the U-Net.
fn unet_prefixes(l: &UNetLayout) -> Vec<(String, String)> {
    let n_layers = l.layers_per_block;
    let levels = l.down_attention.len();
    let mut p: Vec<(String, String)> = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("middle_block.0.", "mid_block.resnets.0."),
        ("middle_block.1.", "mid_block.attentions.0."),
        ("middle_block.2.", "mid_block.resnets.1."),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    if l.class_embedding {
        p.push(("label_emb.0.".into(), "class_embedding.".into()));
    }
    for i in 0..levels {
        for j in 0..n_layers {
            let n = 1 + i * (n_layers + 1) + j;
            p.push((
                format!("input_blocks.{n}.0."),
                format!("down_blocks.{i}.resnets.{j}."),
            ));
            if l.down_attention[i] {
                p.push((
                    format!("input_blocks.{n}.1."),
                    format!("down_blocks.{i}.attentions.{j}."),
                ));
            }
        }
        if i + 1 < levels {
            p.push((
                format!("input_blocks.{}.0.op.", (i + 1) * (n_layers + 1)),
                format!("down_blocks.{i}.downsamplers.0.conv."),
            ));
        }
        let up_attn = l.up_attention.get(i).copied().unwrap_or(false);
        for j in 0..=n_layers {
            let n = i * (n_layers + 1) + j;
            p.push((
                format!("output_blocks.{n}.0."),
                format!("up_blocks.{i}.resnets.{j}."),
            ));
            if up_attn {
                p.push((
                    format!("output_blocks.{n}.1."),
                    format!("up_blocks.{i}.attentions.{j}."),
                ));
            }
        }
        if i + 1 < levels {
            let n = i * (n_layers + 1) + n_layers;
            p.push((
                format!("output_blocks.{n}.{}.", if up_attn { 2 } else { 1 }),
                format!("up_blocks.{i}.upsamplers.0."),
            ));
        }
    }
    p
}

/// Resnet parameter names inside a resnet prefix: `(original, diffusers)`.
const RESNET: [(&str, &str); 6] = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
];

/// Longest-prefix lookup of `key` in `(from, to)` pairs.
fn replace_prefix<'p>(key: &str, pairs: &'p [(String, String)]) -> Option<(&'p str, String)> {
    matching_pair(key, pairs).map(|(from, to)| (to.as_str(), key[from.len()..].to_string()))
}

/// Model keys of the U-Net -> single-file entries.
pub fn unet_entries(keys: &[String], layout: &UNetLayout) -> BTreeMap<String, Entry> {
    let prefixes = unet_prefixes(layout);
    let mut out = BTreeMap::new();
    for key in keys {
        let Some(rest) = key.strip_prefix(UNET_PREFIX) else {
            continue;
        };
        let Some((to, tail)) = replace_prefix(rest, &prefixes) else {
            // Unknown keys keep their names so strict loading reports them.
            out.insert(rest.to_string(), Entry::plain(key.clone()));
            continue;
        };
        let tail = if to.contains("resnets.") {
            RESNET
                .iter()
                .find_map(|(o, d)| tail.strip_prefix(o).map(|t| format!("{d}{t}")))
                .unwrap_or(tail)
        } else {
            tail
        };
        out.insert(format!("{to}{tail}"), Entry::plain(key.clone()));
    }
    out
}

/// `(original prefix, diffusers prefix)` pairs for a VAE with `levels` levels.
fn vae_prefixes(levels: usize) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = vec![
        (
            "encoder.mid.block_1.".into(),
            "encoder.mid_block.resnets.0.".into(),
        ),
        (
            "encoder.mid.block_2.".into(),
            "encoder.mid_block.resnets.1.".into(),
        ),
        (
            "encoder.mid.attn_1.".into(),
            "encoder.mid_block.attentions.0.".into(),
        ),
        (
            "decoder.mid.block_1.".into(),
            "decoder.mid_block.resnets.0.".into(),
        ),
        (
            "decoder.mid.block_2.".into(),
            "decoder.mid_block.resnets.1.".into(),
        ),
        (
            "decoder.mid.attn_1.".into(),
            "decoder.mid_block.attentions.0.".into(),
        ),
        ("encoder.norm_out.".into(), "encoder.conv_norm_out.".into()),
        ("decoder.norm_out.".into(), "decoder.conv_norm_out.".into()),
    ];
    for i in 0..levels {
        let up = levels - 1 - i;
        pairs.push((
            format!("encoder.down.{i}.block."),
            format!("encoder.down_blocks.{i}.resnets."),
        ));
        pairs.push((
            format!("encoder.down.{i}.downsample."),
            format!("encoder.down_blocks.{i}.downsamplers.0."),
        ));
        pairs.push((
            format!("decoder.up.{up}.block."),
            format!("decoder.up_blocks.{i}.resnets."),
        ));
        pairs.push((
            format!("decoder.up.{up}.upsample."),
            format!("decoder.up_blocks.{i}.upsamplers.0."),
        ));
    }
    pairs
}

/// The mid-block attention's parameter names inside its prefix: `(original, diffusers)`.
const VAE_ATTENTION: [(&str, &str); 5] = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
];

/// Model keys of the VAE -> single-file entries (`levels` = len(block_out_channels)). The
/// mid-block attention's q/k/v/proj_out are 1x1 convolutions in the original layout and are
/// reshaped to linear weights.
pub fn vae_entries(
    keys: &[String],
    levels: usize,
    source: &dyn TensorSource,
) -> BTreeMap<String, Entry> {
    let pairs = vae_prefixes(levels);
    let mut out = BTreeMap::new();
    for key in keys {
        let Some(rest) = key.strip_prefix(VAE_PREFIX) else {
            continue;
        };
        let (name, mut entry) = match replace_prefix(rest, &pairs) {
            Some((to, tail)) if to.contains("attentions.") => {
                let (tail, conv) = VAE_ATTENTION
                    .iter()
                    .find_map(|(o, d)| {
                        tail.strip_prefix(o)
                            .map(|t| (format!("{d}{t}"), *o != "norm."))
                    })
                    .unwrap_or((tail.clone(), false));
                let mut entry = Entry::plain(key.clone());
                if conv && tail.ends_with("weight") {
                    // [out, in, 1, 1] -> [out, in]
                    entry.shape = source
                        .shape(key)
                        .filter(|s| s.len() == 4)
                        .map(|s| s[..2].to_vec());
                }
                (format!("{to}{tail}"), entry)
            }
            Some((to, tail)) => (format!("{to}{tail}"), Entry::plain(key.clone())),
            None => (rest.to_string(), Entry::plain(key.clone())),
        };
        let name = name.replace("nin_shortcut.", "conv_shortcut.");
        entry.key = key.clone();
        out.insert(name, entry);
    }
    out
}

// ------------------------------------------------------------------------------- writing

/// The longest `(from, to)` pair whose `from` starts `key`.
fn matching_pair<'p>(key: &str, pairs: &'p [(String, String)]) -> Option<&'p (String, String)> {
    pairs
        .iter()
        .filter(|(from, _)| key.starts_with(from.as_str()))
        .max_by_key(|(from, _)| from.len())
}

/// The single-file name of the diffusers U-Net parameter `name` (the inverse of
/// [`unet_entries`]).
pub fn unet_original_name(name: &str, layout: &UNetLayout) -> String {
    let inverse: Vec<(String, String)> = unet_prefixes(layout)
        .into_iter()
        .map(|(o, d)| (d, o))
        .collect();
    let body = match matching_pair(name, &inverse) {
        Some((from, to)) => {
            let tail = &name[from.len()..];
            let tail = if from.contains("resnets.") {
                RESNET
                    .iter()
                    .find_map(|(o, d)| tail.strip_prefix(d).map(|t| format!("{o}{t}")))
                    .unwrap_or_else(|| tail.to_string())
            } else {
                tail.to_string()
            };
            format!("{to}{tail}")
        }
        None => name.to_string(),
    };
    format!("{UNET_PREFIX}{body}")
}

/// The single-file name of the diffusers VAE parameter `name` (the inverse of
/// [`vae_entries`]), and whether it is one of the mid-block attention's linear weights that the
/// original layout keeps as 1x1 convolutions (`[out, in]` -> `[out, in, 1, 1]`).
pub fn vae_original_name(name: &str, levels: usize) -> (String, bool) {
    let inverse: Vec<(String, String)> = vae_prefixes(levels)
        .into_iter()
        .map(|(o, d)| (d, o))
        .collect();
    let (body, conv) = match matching_pair(name, &inverse) {
        Some((from, to)) => {
            let tail = &name[from.len()..];
            if from.contains("attentions.") {
                let (tail, conv) = VAE_ATTENTION
                    .iter()
                    .find_map(|(o, d)| {
                        tail.strip_prefix(d)
                            .map(|t| (format!("{o}{t}"), *d != "group_norm."))
                    })
                    .unwrap_or((tail.to_string(), false));
                let conv = conv && tail.ends_with("weight");
                (format!("{to}{tail}"), conv)
            } else {
                (format!("{to}{tail}"), false)
            }
        }
        None => (name.to_string(), false),
    };
    (
        format!(
            "{VAE_PREFIX}{}",
            body.replace("conv_shortcut.", "nin_shortcut.")
        ),
        conv,
    )
}

/// The single-file name of the diffusers/transformers CLIP parameter `name` (SD 1.x's text
/// encoder; the inverse of [`text_encoder_entries`] for [`TextEncoderLayout::Clip`]).
pub fn clip_original_name(name: &str) -> String {
    if name.starts_with("text_model.") {
        format!("{CLIP_PREFIX}{name}")
    } else {
        format!("{CLIP_PREFIX}text_model.{name}")
    }
}

/// Model keys of the text encoder -> single-file entries. OpenCLIP's fused `in_proj` is split
/// into q/k/v; layers beyond `num_layers` (SD 2.x drops OpenCLIP's last one) and the
/// projection/logit scale are left out.
pub fn text_encoder_entries(
    keys: &[String],
    layout: TextEncoderLayout,
    num_layers: usize,
    source: &dyn TensorSource,
) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    match layout {
        TextEncoderLayout::Clip => {
            for key in keys {
                if let Some(rest) = key.strip_prefix(CLIP_PREFIX)
                    && !rest.ends_with("position_ids")
                {
                    let name = if rest.starts_with("text_model.") {
                        rest.to_string()
                    } else {
                        format!("text_model.{rest}")
                    };
                    out.insert(name, Entry::plain(key.clone()));
                }
            }
        }
        TextEncoderLayout::OpenClip => {
            for key in keys {
                let Some(rest) = key.strip_prefix(OPEN_CLIP_PREFIX) else {
                    continue;
                };
                let tm = "text_model.";
                let simple = match rest {
                    "token_embedding.weight" => {
                        Some(format!("{tm}embeddings.token_embedding.weight"))
                    }
                    "positional_embedding" => {
                        Some(format!("{tm}embeddings.position_embedding.weight"))
                    }
                    "ln_final.weight" => Some(format!("{tm}final_layer_norm.weight")),
                    "ln_final.bias" => Some(format!("{tm}final_layer_norm.bias")),
                    _ => None,
                };
                if let Some(name) = simple {
                    out.insert(name, Entry::plain(key.clone()));
                    continue;
                }
                let Some(block) = rest.strip_prefix("transformer.resblocks.") else {
                    continue; // text_projection, logit_scale, attn_mask
                };
                let Some((layer, tail)) = block.split_once('.') else {
                    continue;
                };
                let Ok(layer) = layer.parse::<usize>() else {
                    continue;
                };
                if layer >= num_layers {
                    continue;
                }
                let base = format!("{tm}encoder.layers.{layer}.");
                if let Some(kind) = tail.strip_prefix("attn.in_proj_") {
                    let d = source.shape(key).map_or(0, |s| s[0] / 3);
                    for (i, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                        out.insert(
                            format!("{base}self_attn.{proj}.{kind}"),
                            Entry {
                                key: key.clone(),
                                rows: Some(i * d..(i + 1) * d),
                                shape: None,
                            },
                        );
                    }
                    continue;
                }
                let renamed = [
                    ("ln_1.", "layer_norm1."),
                    ("ln_2.", "layer_norm2."),
                    ("mlp.c_fc.", "mlp.fc1."),
                    ("mlp.c_proj.", "mlp.fc2."),
                    ("attn.out_proj.", "self_attn.out_proj."),
                ]
                .iter()
                .find_map(|(o, d)| tail.strip_prefix(o).map(|t| format!("{d}{t}")))
                .unwrap_or_else(|| tail.to_string());
                out.insert(format!("{base}{renamed}"), Entry::plain(key.clone()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::safetensors::HostTensor;

    fn keys(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sd15_unet_names_map_like_diffusers_script() {
        let layout = UNetLayout {
            layers_per_block: 2,
            down_attention: vec![true, true, true, false],
            up_attention: vec![false, true, true, true],
            class_embedding: false,
        };
        let k = keys(&[
            "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
            "model.diffusion_model.input_blocks.1.1.proj_in.weight",
            "model.diffusion_model.input_blocks.3.0.op.weight",
            "model.diffusion_model.input_blocks.11.0.skip_connection.bias",
            "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight",
            "model.diffusion_model.output_blocks.2.1.conv.weight",
            "model.diffusion_model.output_blocks.5.2.conv.bias",
            "model.diffusion_model.output_blocks.8.1.norm.weight",
            "model.diffusion_model.time_embed.2.bias",
        ]);
        let got: Vec<String> = unet_entries(&k, &layout).into_keys().collect();
        let mut want = keys(&[
            "down_blocks.0.resnets.0.norm1.weight",
            "down_blocks.0.attentions.0.proj_in.weight",
            "down_blocks.0.downsamplers.0.conv.weight",
            "down_blocks.3.resnets.1.conv_shortcut.bias",
            "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "up_blocks.0.upsamplers.0.conv.weight",
            "up_blocks.1.upsamplers.0.conv.bias",
            "up_blocks.2.attentions.2.norm.weight",
            "time_embedding.linear_2.bias",
        ]);
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn open_clip_in_proj_splits_into_q_k_v() {
        let source = BTreeMap::from([(
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight".to_string(),
            HostTensor {
                shape: vec![6, 2],
                data: vec![0.0; 12],
            },
        )]);
        let k: Vec<String> = source.keys().cloned().collect();
        let e = text_encoder_entries(&k, TextEncoderLayout::OpenClip, 1, &source);
        let v = &e["text_model.encoder.layers.0.self_attn.v_proj.weight"];
        assert_eq!(v.rows, Some(4..6));
        assert!(text_encoder_entries(&k, TextEncoderLayout::OpenClip, 0, &source).is_empty());
    }
}
