//! diffusers `UNet2DModel` (`models/unets/unet_2d.py`): its config (read and written as
//! diffusers' `config.json`) and the model, built from the blocks in `unet_2d_blocks`.
//!
//! Field names are the diffusers attribute names, so each parameter path is its key in
//! `unet/diffusion_pytorch_model.safetensors` and an export loads with
//! `UNet2DModel.from_pretrained`. Supported: `time_embedding_type = "positional"`,
//! `resnet_time_scale_shift = "default"`, conv down/upsampling, no class embedding, dropout 0.

use burn::module::Module;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::attention::SpatialAttention;
use super::embeddings::{TimestepEmbedding, timestep_embedding};
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use super::unet_2d_blocks::{DownBlock, DownBlockType, UNetMidBlock2D, UpBlock, UpBlockType};
use crate::kernels::silu;
use crate::nn::{Conv2d, GroupNorm};

/// The subset of diffusers' `UNet2DModel` config this implementation covers; field names and
/// defaults are diffusers'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UNet2DConfig {
    pub sample_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<DownBlockType>,
    pub up_block_types: Vec<UpBlockType>,
    pub layers_per_block: usize,
    /// Channels per attention head (diffusers `attention_head_dim`; in `UNet2DModel` this
    /// really is the head dimension, unlike SD 1.x's `UNet2DConditionModel`).
    pub attention_head_dim: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub add_attention: bool,
}

impl Default for UNet2DConfig {
    fn default() -> Self {
        Self {
            sample_size: 32,
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![64, 128, 128],
            down_block_types: vec![
                DownBlockType::DownBlock2D,
                DownBlockType::DownBlock2D,
                DownBlockType::AttnDownBlock2D,
            ],
            up_block_types: vec![
                UpBlockType::AttnUpBlock2D,
                UpBlockType::UpBlock2D,
                UpBlockType::UpBlock2D,
            ],
            layers_per_block: 2,
            attention_head_dim: 8,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            add_attention: true,
        }
    }
}

impl UNet2DConfig {
    /// Problems with this config, each as one sentence (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let levels = self.block_out_channels.len();
        if levels == 0 {
            out.push("model.unet.block_out_channels must not be empty".into());
            return out;
        }
        if self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            out.push(format!(
                "model.unet: down_block_types ({}) and up_block_types ({}) must each have one entry per block_out_channels entry ({levels})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for &c in &self.block_out_channels {
            if self.norm_num_groups == 0 || c % self.norm_num_groups != 0 {
                out.push(format!(
                    "model.unet: block_out_channels entry {c} is not divisible by norm_num_groups = {}",
                    self.norm_num_groups
                ));
            }
            if self.attention_head_dim == 0 || c % self.attention_head_dim != 0 {
                out.push(format!(
                    "model.unet: block_out_channels entry {c} is not divisible by attention_head_dim = {}",
                    self.attention_head_dim
                ));
            }
        }
        let factor = 1usize << (levels - 1);
        if self.sample_size % factor != 0 {
            out.push(format!(
                "model.unet.sample_size = {} is not divisible by 2^{} = {factor} ({} levels downsample {} times)",
                self.sample_size,
                levels - 1,
                levels,
                levels - 1
            ));
        }
        if self.layers_per_block == 0 {
            out.push("model.unet.layers_per_block must be at least 1".into());
        }
        out
    }

    pub fn init(&self, device: &Device) -> UNet2DModel {
        UNet2DModel::new(self, device)
    }

    /// The `unet/config.json` diffusers reads.
    pub fn to_diffusers_json(&self) -> serde_json::Value {
        serde_json::json!({
            "_class_name": "UNet2DModel",
            "_diffusers_version": "0.32.0",
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "center_input_sample": false,
            "time_embedding_type": "positional",
            "freq_shift": self.freq_shift,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "down_block_types": self.down_block_types,
            "up_block_types": self.up_block_types,
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": 1,
            "downsample_padding": 1,
            "downsample_type": "conv",
            "upsample_type": "conv",
            "dropout": 0.0,
            "act_fn": "silu",
            "attention_head_dim": self.attention_head_dim,
            "norm_num_groups": self.norm_num_groups,
            "attn_norm_num_groups": null,
            "norm_eps": self.norm_eps,
            "resnet_time_scale_shift": "default",
            "add_attention": self.add_attention,
            "class_embed_type": null,
            "num_class_embeds": null,
        })
    }

    /// Reads a diffusers `unet/config.json`, refusing options this implementation lacks.
    pub fn from_diffusers_json(value: &serde_json::Value) -> Result<Self, String> {
        let obj = value
            .as_object()
            .ok_or("config.json is not a JSON object")?;
        let expect = |key: &str, want: serde_json::Value| -> Result<(), String> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(()),
                Some(v) if *v == want => Ok(()),
                Some(v) => Err(format!("{key} = {v} is not supported (only {want})")),
            }
        };
        if let Some(class) = obj.get("_class_name").and_then(|v| v.as_str())
            && class != "UNet2DModel"
        {
            return Err(format!(
                "_class_name is {class:?}, expected \"UNet2DModel\""
            ));
        }
        expect("time_embedding_type", "positional".into())?;
        expect("resnet_time_scale_shift", "default".into())?;
        expect("downsample_type", "conv".into())?;
        expect("upsample_type", "conv".into())?;
        expect("center_input_sample", false.into())?;
        expect("act_fn", "silu".into())?;
        expect("class_embed_type", serde_json::Value::Null)?;
        expect("mid_block_type", "UNetMidBlock2D".into())?;
        expect("time_embedding_dim", serde_json::Value::Null)?;
        let mut c = Self::default();
        // Each present, non-null key is parsed through serde so errors name the key.
        macro_rules! take {
            ($key:literal, $field:ident) => {
                if let Some(v) = obj.get($key).filter(|v| !v.is_null()) {
                    c.$field =
                        serde_json::from_value(v.clone()).map_err(|e| format!("{}: {e}", $key))?;
                }
            };
        }
        take!("sample_size", sample_size);
        take!("in_channels", in_channels);
        take!("out_channels", out_channels);
        take!("block_out_channels", block_out_channels);
        take!("down_block_types", down_block_types);
        take!("up_block_types", up_block_types);
        take!("layers_per_block", layers_per_block);
        take!("attention_head_dim", attention_head_dim);
        take!("norm_num_groups", norm_num_groups);
        take!("norm_eps", norm_eps);
        take!("flip_sin_to_cos", flip_sin_to_cos);
        take!("freq_shift", freq_shift);
        take!("add_attention", add_attention);
        Ok(c)
    }
}

#[derive(Module, Debug)]
pub struct UNet2DModel {
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: UNetMidBlock2D,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub time_proj_dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl UNet2DModel {
    pub fn new(cfg: &UNet2DConfig, device: &Device) -> Self {
        let ch = &cfg.block_out_channels;
        let temb = ch[0] * 4;
        let (groups, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let attn = |c: usize| SpatialAttention::new(c, cfg.attention_head_dim, groups, eps, device);
        let levels = ch.len();

        let mut down_blocks = Vec::with_capacity(levels);
        let mut cout = ch[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let cin = cout;
            cout = ch[i];
            let resnets: Vec<_> = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(
                        if j == 0 { cin } else { cout },
                        cout,
                        temb,
                        groups,
                        eps,
                        device,
                    )
                })
                .collect();
            let attentions = match kind {
                DownBlockType::AttnDownBlock2D => {
                    (0..cfg.layers_per_block).map(|_| attn(cout)).collect()
                }
                DownBlockType::DownBlock2D => vec![],
            };
            let downsamplers = if i + 1 < levels {
                vec![Downsample2D {
                    conv: Conv2d::new(cout, cout, 3, 2, 1, device),
                }]
            } else {
                vec![]
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsamplers,
            });
        }

        let c = ch[levels - 1];
        let mid_block = UNetMidBlock2D {
            resnets: vec![
                ResnetBlock2D::new(c, c, temb, groups, eps, device),
                ResnetBlock2D::new(c, c, temb, groups, eps, device),
            ],
            attentions: if cfg.add_attention {
                vec![attn(c)]
            } else {
                vec![]
            },
        };

        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(levels);
        let mut out_c = rev[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let prev_out = out_c;
            out_c = rev[i];
            let in_c = rev[(i + 1).min(levels - 1)];
            let n = cfg.layers_per_block + 1;
            let resnets: Vec<_> = (0..n)
                .map(|j| {
                    let skip = if j == n - 1 { in_c } else { out_c };
                    let res_in = if j == 0 { prev_out } else { out_c };
                    ResnetBlock2D::new(res_in + skip, out_c, temb, groups, eps, device)
                })
                .collect();
            let attentions = match kind {
                UpBlockType::AttnUpBlock2D => (0..n).map(|_| attn(out_c)).collect(),
                UpBlockType::UpBlock2D => vec![],
            };
            let upsamplers = if i + 1 < levels {
                vec![Upsample2D {
                    conv: Conv2d::new(out_c, out_c, 3, 1, 1, device),
                }]
            } else {
                vec![]
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsamplers,
            });
        }

        Self {
            conv_in: Conv2d::new(cfg.in_channels, ch[0], 3, 1, 1, device),
            time_embedding: TimestepEmbedding::new(ch[0], temb, device),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(groups, ch[0], eps, device),
            conv_out: Conv2d::new(ch[0], cfg.out_channels, 3, 1, 1, device),
            time_proj_dim: ch[0],
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
        }
    }

    /// # Shapes
    /// - `x`: `[b, in_channels, s, s]`, `timesteps`: `[b]`; returns `[b, out_channels, s, s]`
    pub fn forward(&self, x: Tensor<4>, timesteps: Tensor<1>) -> Tensor<4> {
        let t = timestep_embedding(
            timesteps,
            self.time_proj_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
        );
        let temb = self.time_embedding.forward(t);
        let mut x = self.conv_in.forward(x);
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(x, temb.clone(), &mut skips);
        }
        x = self.mid_block.resnets[0].forward(x, temb.clone());
        for (attn, resnet) in self
            .mid_block
            .attentions
            .iter()
            .zip(&self.mid_block.resnets[1..])
        {
            x = resnet.forward(attn.forward(x), temb.clone());
        }
        if self.mid_block.attentions.is_empty() {
            x = self.mid_block.resnets[1].forward(x, temb.clone());
        }
        for block in &self.up_blocks {
            x = block.forward(x, temb.clone(), &mut skips);
        }
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}
