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

use super::attention::Attention;
use super::embeddings::{TimestepEmbedding, timestep_embedding};
use super::unet_2d_blocks::{
    AttentionLayer, DownBlock, DownBlockType, MidBlock, ResnetSpec, UNetBlocksSpec, UpBlock,
    UpBlockType, unet_blocks,
};
use crate::io::config_json::ConfigJson;
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
        if !self.sample_size.is_multiple_of(factor) {
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
            "_diffusers_version": crate::io::layout::DIFFUSERS_VERSION,
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
    pub fn from_diffusers_json(
        value: &serde_json::Value,
    ) -> Result<Self, crate::io::config_json::ConfigJsonError> {
        let json = ConfigJson::new(value, "UNet2DModel")?;
        json.expect("time_embedding_type", &["positional".into()])?;
        json.expect("resnet_time_scale_shift", &["default".into()])?;
        json.expect("downsample_type", &["conv".into()])?;
        json.expect("upsample_type", &["conv".into()])?;
        json.expect("center_input_sample", &[false.into()])?;
        json.expect("act_fn", &["silu".into()])?;
        json.expect("class_embed_type", &[])?;
        json.expect("mid_block_type", &["UNetMidBlock2D".into()])?;
        json.expect("time_embedding_dim", &[])?;
        let mut c = Self::default();
        json.take("sample_size", &mut c.sample_size)?;
        json.take("in_channels", &mut c.in_channels)?;
        json.take("out_channels", &mut c.out_channels)?;
        json.take("block_out_channels", &mut c.block_out_channels)?;
        json.take("down_block_types", &mut c.down_block_types)?;
        json.take("up_block_types", &mut c.up_block_types)?;
        json.take("layers_per_block", &mut c.layers_per_block)?;
        json.take("attention_head_dim", &mut c.attention_head_dim)?;
        json.take("norm_num_groups", &mut c.norm_num_groups)?;
        json.take("norm_eps", &mut c.norm_eps)?;
        json.take("flip_sin_to_cos", &mut c.flip_sin_to_cos)?;
        json.take("freq_shift", &mut c.freq_shift)?;
        json.take("add_attention", &mut c.add_attention)?;
        Ok(c)
    }
}

#[derive(Module, Debug)]
pub struct UNet2DModel {
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
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
        let resnet = ResnetSpec {
            temb: Some(temb),
            groups,
            eps,
        };
        let attn = |c: usize| {
            AttentionLayer::Spatial(Attention::spatial(
                c,
                cfg.attention_head_dim,
                groups,
                eps,
                device,
            ))
        };
        // Built in diffusers' order: down, mid, up, then the stem and head (the init RNG is
        // drawn in this order, so a seed gives the same weights as before).
        let down: Vec<bool> = cfg
            .down_block_types
            .iter()
            .map(|k| *k == DownBlockType::AttnDownBlock2D)
            .collect();
        let up: Vec<bool> = cfg
            .up_block_types
            .iter()
            .map(|k| *k == UpBlockType::AttnUpBlock2D)
            .collect();
        let spec = UNetBlocksSpec {
            channels: ch,
            layers_per_block: cfg.layers_per_block,
            downsample_padding: 1,
            resnet,
            down_attention: &down,
            mid_attention: cfg.add_attention,
            up_attention: &up,
        };
        let (down_blocks, mid_block, up_blocks) = unet_blocks(&spec, &|_, c| attn(c), device);

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
        // In f32, then in the input's dtype (mixed precision), as diffusers does.
        let t = timestep_embedding(
            timesteps,
            self.time_proj_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
        )
        .cast(x.dtype());
        let temb = self.time_embedding.forward(t);
        let mut x = self.conv_in.forward(x);
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(x, Some(&temb), None, &mut skips);
        }
        x = self.mid_block.forward(x, Some(&temb), None);
        for block in &self.up_blocks {
            x = block.forward(x, Some(&temb), None, Some(&mut skips));
        }
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}
