//! diffusers `UNet2DConditionModel` (`models/unets/unet_2d_condition.py`), the Stable Diffusion
//! U-Net: its config (read and written as diffusers' `config.json`) and the model.
//!
//! Covered: SD 1.x and 2.x (`CrossAttnDownBlock2D`/`DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `CrossAttnUpBlock2D`/`UpBlock2D`, conv or linear projections, per-block heads), class
//! conditioning (`num_class_embeds` with `class_embed_type` null or `"timestep"`), any number of
//! levels and layers. Options that change the computation in ways not built here are refused by
//! name when a `config.json` is read.

use burn::module::Module;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::embeddings::{TimestepEmbedding, timestep_embedding};
use super::transformer_2d::{Transformer2DModel, Transformer2DSpec};
use super::unet_2d_blocks::{
    AttentionLayer, DownBlock, MidBlock, ResnetSpec, UNetBlocksSpec, UpBlock, unet_blocks,
};
use crate::dtype::as_dtype;
use crate::io::config_json::ConfigJson;
use crate::kernels::silu;
use crate::nn::{Conv2d, Embedding, GroupNorm};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CondDownBlockType {
    CrossAttnDownBlock2D,
    DownBlock2D,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CondUpBlockType {
    CrossAttnUpBlock2D,
    UpBlock2D,
}

/// A setting diffusers accepts as one value for every block or as a list, one per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    All(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn at(&self, level: usize) -> usize {
        match self {
            Self::All(v) => *v,
            Self::Each(v) => v.get(level).copied().unwrap_or(0),
        }
    }

    fn len_ok(&self, levels: usize) -> bool {
        match self {
            Self::All(_) => true,
            Self::Each(v) => v.len() == levels,
        }
    }
}

/// How class labels enter the time embedding (`class_embed_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassEmbedType {
    /// `nn.Embedding(num_class_embeds, time_embed_dim)` (diffusers' `class_embed_type = None`).
    Table,
    /// The label goes through the sinusoidal projection and a `TimestepEmbedding`.
    Timestep,
}

/// The `UNet2DConditionModel` config: diffusers' names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UNet2DConditionConfig {
    pub sample_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<CondDownBlockType>,
    pub up_block_types: Vec<CondUpBlockType>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub downsample_padding: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub transformer_layers_per_block: PerBlock,
    /// In SD 1.x/2.x configs this is the number of heads, not their width; see
    /// [`UNet2DConditionConfig::heads`].
    pub attention_head_dim: PerBlock,
    pub num_attention_heads: Option<PerBlock>,
    pub use_linear_projection: bool,
    /// Attention in f32 under half precision; a no-op in f32.
    pub upcast_attention: bool,
    pub num_class_embeds: Option<usize>,
    pub class_embed_type: ClassEmbedType,
}

impl Default for UNet2DConditionConfig {
    /// diffusers' defaults, except `cross_attention_dim` 768 (SD 1.x) instead of 1280.
    fn default() -> Self {
        Self {
            sample_size: 64,
            in_channels: 4,
            out_channels: 4,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                CondDownBlockType::CrossAttnDownBlock2D,
                CondDownBlockType::CrossAttnDownBlock2D,
                CondDownBlockType::CrossAttnDownBlock2D,
                CondDownBlockType::DownBlock2D,
            ],
            up_block_types: vec![
                CondUpBlockType::UpBlock2D,
                CondUpBlockType::CrossAttnUpBlock2D,
                CondUpBlockType::CrossAttnUpBlock2D,
                CondUpBlockType::CrossAttnUpBlock2D,
            ],
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            downsample_padding: 1,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: 768,
            transformer_layers_per_block: PerBlock::All(1),
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            use_linear_projection: false,
            upcast_attention: false,
            num_class_embeds: None,
            class_embed_type: ClassEmbedType::Table,
        }
    }
}

impl UNet2DConditionConfig {
    /// The SD 1.x U-Net (`runwayml/stable-diffusion-v1-5`'s `unet/config.json`).
    pub fn sd15() -> Self {
        Self::default()
    }

    /// The SD 2.x U-Net (`stabilityai/stable-diffusion-2-1`'s `unet/config.json`).
    pub fn sd21() -> Self {
        Self {
            sample_size: 96,
            cross_attention_dim: 1024,
            attention_head_dim: PerBlock::Each(vec![5, 10, 20, 20]),
            use_linear_projection: true,
            upcast_attention: true,
            ..Self::default()
        }
    }

    /// Attention heads at `level`. diffusers' `attention_head_dim` is a misnomer here: when
    /// `num_attention_heads` is unset (every SD 1.x/2.x config) it *is* the number of heads
    /// (`num_attention_heads = num_attention_heads or attention_head_dim`,
    /// unet_2d_condition.py, `UNet2DConditionModel.__init__`); each head is then
    /// `channels / heads` wide.
    pub fn heads(&self, level: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .at(level)
    }

    /// The VAE-independent downsampling factor of the U-Net itself.
    pub fn downsampling(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Problems with this config, each as one sentence, keys prefixed with `prefix`.
    pub fn problems(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        let levels = self.block_out_channels.len();
        if levels == 0 {
            out.push(format!("{prefix}.block_out_channels must not be empty"));
            return out;
        }
        if self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            out.push(format!(
                "{prefix}: down_block_types ({}) and up_block_types ({}) must each have one entry \
                 per block_out_channels entry ({levels})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for (name, v) in [
            ("attention_head_dim", Some(&self.attention_head_dim)),
            ("num_attention_heads", self.num_attention_heads.as_ref()),
            (
                "transformer_layers_per_block",
                Some(&self.transformer_layers_per_block),
            ),
        ] {
            if let Some(v) = v
                && !v.len_ok(levels)
            {
                out.push(format!(
                    "{prefix}.{name} lists {v:?}; give one value or one per level ({levels})"
                ));
            }
        }
        for (level, &c) in self.block_out_channels.iter().enumerate() {
            if self.norm_num_groups == 0 || c % self.norm_num_groups != 0 {
                out.push(format!(
                    "{prefix}: block_out_channels entry {c} is not divisible by norm_num_groups = {}",
                    self.norm_num_groups
                ));
            }
            let heads = self.heads(level);
            if heads == 0 || c % heads != 0 {
                out.push(format!(
                    "{prefix}: block_out_channels entry {c} is not divisible by its {heads} \
                     attention heads (attention_head_dim / num_attention_heads)"
                ));
            }
        }
        if self.layers_per_block == 0 {
            out.push(format!("{prefix}.layers_per_block must be at least 1"));
        }
        out
    }

    pub fn init(&self, device: &Device) -> UNet2DConditionModel {
        UNet2DConditionModel::new(self, device)
    }

    /// The `unet/config.json` diffusers reads.
    pub fn to_diffusers_json(&self) -> serde_json::Value {
        let per_block = |p: &PerBlock| serde_json::to_value(p).expect("numbers serialise");
        serde_json::json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": crate::io::layout::DIFFUSERS_VERSION,
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "center_input_sample": false,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "down_block_types": self.down_block_types,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": self.up_block_types,
            "only_cross_attention": false,
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "downsample_padding": self.downsample_padding,
            "mid_block_scale_factor": 1,
            "dropout": 0.0,
            "act_fn": "silu",
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "cross_attention_dim": self.cross_attention_dim,
            "transformer_layers_per_block": per_block(&self.transformer_layers_per_block),
            "attention_head_dim": per_block(&self.attention_head_dim),
            "num_attention_heads": self.num_attention_heads.as_ref().map(per_block),
            "dual_cross_attention": false,
            "use_linear_projection": self.use_linear_projection,
            "class_embed_type": match self.class_embed_type {
                ClassEmbedType::Table => serde_json::Value::Null,
                ClassEmbedType::Timestep => "timestep".into(),
            },
            "num_class_embeds": self.num_class_embeds,
            "upcast_attention": self.upcast_attention,
            "resnet_time_scale_shift": "default",
            "time_embedding_type": "positional",
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
        })
    }

    /// Reads a diffusers `unet/config.json`, refusing options this implementation lacks.
    pub fn from_diffusers_json(
        value: &serde_json::Value,
    ) -> Result<Self, crate::io::config_json::ConfigJsonError> {
        let json = ConfigJson::new(value, "UNet2DConditionModel")?;
        json.expect("center_input_sample", &[false.into()])?;
        json.expect("mid_block_type", &["UNetMidBlock2DCrossAttn".into()])?;
        json.expect("only_cross_attention", &[false.into()])?;
        json.expect("mid_block_scale_factor", &[1.into(), 1.0.into()])?;
        json.expect("act_fn", &["silu".into()])?;
        json.expect("encoder_hid_dim", &[])?;
        json.expect("encoder_hid_dim_type", &[])?;
        json.expect("dual_cross_attention", &[false.into()])?;
        json.expect("class_embed_type", &["timestep".into()])?;
        json.expect("addition_embed_type", &[])?;
        json.expect("resnet_time_scale_shift", &["default".into()])?;
        json.expect("resnet_skip_time_act", &[false.into()])?;
        json.expect("resnet_out_scale_factor", &[1.into(), 1.0.into()])?;
        json.expect("time_embedding_type", &["positional".into()])?;
        json.expect("time_embedding_dim", &[])?;
        json.expect("time_embedding_act_fn", &[])?;
        json.expect("timestep_post_act", &[])?;
        json.expect("time_cond_proj_dim", &[])?;
        json.expect("conv_in_kernel", &[3.into()])?;
        json.expect("conv_out_kernel", &[3.into()])?;
        json.expect("projection_class_embeddings_input_dim", &[])?;
        json.expect("class_embeddings_concat", &[false.into()])?;
        json.expect("mid_block_only_cross_attention", &[false.into()])?;
        json.expect("cross_attention_norm", &[])?;
        json.expect("attention_type", &["default".into()])?;
        json.expect("reverse_transformer_layers_per_block", &[])?;
        let mut c = Self::default();
        json.take("sample_size", &mut c.sample_size)?;
        json.take("in_channels", &mut c.in_channels)?;
        json.take("out_channels", &mut c.out_channels)?;
        json.take("flip_sin_to_cos", &mut c.flip_sin_to_cos)?;
        json.take("freq_shift", &mut c.freq_shift)?;
        json.take("down_block_types", &mut c.down_block_types)?;
        json.take("up_block_types", &mut c.up_block_types)?;
        json.take("block_out_channels", &mut c.block_out_channels)?;
        json.take("layers_per_block", &mut c.layers_per_block)?;
        json.take("downsample_padding", &mut c.downsample_padding)?;
        json.take("norm_num_groups", &mut c.norm_num_groups)?;
        json.take("norm_eps", &mut c.norm_eps)?;
        json.take("cross_attention_dim", &mut c.cross_attention_dim)?;
        json.take(
            "transformer_layers_per_block",
            &mut c.transformer_layers_per_block,
        )?;
        json.take("attention_head_dim", &mut c.attention_head_dim)?;
        c.num_attention_heads = json.get("num_attention_heads")?;
        json.take("use_linear_projection", &mut c.use_linear_projection)?;
        json.take("upcast_attention", &mut c.upcast_attention)?;
        c.num_class_embeds = json.get("num_class_embeds")?;
        if json.get::<String>("class_embed_type")?.as_deref() == Some("timestep") {
            c.class_embed_type = ClassEmbedType::Timestep;
        }
        Ok(c)
    }
}

/// `class_embedding`: a table of label vectors, or a `TimestepEmbedding` of the label.
// burn's Module derive holds each variant's layers by value (it has no `Box` impl); one such
// value exists per model, so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum ClassEmbedding {
    Table(Embedding),
    Timestep(TimestepEmbedding),
}

#[derive(Module, Debug)]
pub struct UNet2DConditionModel {
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    pub class_embedding: Option<ClassEmbedding>,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub time_proj_dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    /// The width of the token embeddings the cross-attention reads.
    pub cross_attention_dim: usize,
}

impl UNet2DConditionModel {
    pub fn new(cfg: &UNet2DConditionConfig, device: &Device) -> Self {
        let ch = &cfg.block_out_channels;
        let temb = ch[0] * 4;
        let (groups, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let resnet = ResnetSpec {
            temb: Some(temb),
            groups,
            eps,
        };
        let transformer = |level: usize, c: usize| {
            let heads = cfg.heads(level);
            AttentionLayer::Transformer(Transformer2DModel::new(
                c,
                Transformer2DSpec {
                    heads,
                    head_dim: c / heads.max(1),
                    layers: cfg.transformer_layers_per_block.at(level),
                    cross_attention_dim: cfg.cross_attention_dim,
                    norm_num_groups: groups,
                    use_linear_projection: cfg.use_linear_projection,
                },
                device,
            ))
        };
        let conv_in = Conv2d::new(cfg.in_channels, ch[0], 3, 1, 1, device);
        let time_embedding = TimestepEmbedding::new(ch[0], temb, device);
        let class_embedding = match (cfg.class_embed_type, cfg.num_class_embeds) {
            (ClassEmbedType::Table, Some(n)) => {
                Some(ClassEmbedding::Table(Embedding::normal(n, temb, device)))
            }
            (ClassEmbedType::Table, None) => None,
            (ClassEmbedType::Timestep, _) => Some(ClassEmbedding::Timestep(
                TimestepEmbedding::new(ch[0], temb, device),
            )),
        };

        let down: Vec<bool> = cfg
            .down_block_types
            .iter()
            .map(|k| *k == CondDownBlockType::CrossAttnDownBlock2D)
            .collect();
        let up: Vec<bool> = cfg
            .up_block_types
            .iter()
            .map(|k| *k == CondUpBlockType::CrossAttnUpBlock2D)
            .collect();
        let spec = UNetBlocksSpec {
            channels: ch,
            layers_per_block: cfg.layers_per_block,
            downsample_padding: cfg.downsample_padding,
            resnet,
            down_attention: &down,
            mid_attention: true,
            up_attention: &up,
        };
        let (down_blocks, mid_block, up_blocks) = unet_blocks(&spec, &transformer, device);

        Self {
            conv_in,
            time_embedding,
            class_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(groups, ch[0], eps, device),
            conv_out: Conv2d::new(ch[0], cfg.out_channels, 3, 1, 1, device),
            time_proj_dim: ch[0],
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
            cross_attention_dim: cfg.cross_attention_dim,
        }
    }

    /// # Shapes
    /// - `x`: `[b, in_channels, h, w]`, `timesteps`: `[b]`, `context`: `[b, m,
    ///   cross_attention_dim]`, `class_labels`: `[b]` (with a class embedding); returns
    ///   `[b, out_channels, h, w]`
    pub fn forward(
        &self,
        x: Tensor<4>,
        timesteps: Tensor<1>,
        context: &Tensor<3>,
        class_labels: Option<Tensor<1, Int>>,
    ) -> Tensor<4> {
        // Embeddings are computed in f32 and used in the input's dtype (mixed precision), as
        // diffusers casts them to the sample's dtype; so is the text context.
        let dtype = x.dtype();
        let proj = |t: Tensor<1>| {
            timestep_embedding(t, self.time_proj_dim, self.flip_sin_to_cos, self.freq_shift)
                .cast(dtype)
        };
        let mut temb = self.time_embedding.forward(proj(timesteps));
        if let (Some(embedding), Some(labels)) = (&self.class_embedding, class_labels) {
            temb = temb
                + match embedding {
                    ClassEmbedding::Table(table) => as_dtype(table.forward(labels), dtype),
                    ClassEmbedding::Timestep(mlp) => mlp.forward(proj(labels.float())),
                };
        }
        let context = as_dtype(context.clone(), dtype);
        let context = Some(&context);
        let mut x = self.conv_in.forward(x);
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(x, Some(&temb), context, &mut skips);
        }
        x = self.mid_block.forward(x, Some(&temb), context);
        for block in &self.up_blocks {
            x = block.forward(x, Some(&temb), context, Some(&mut skips));
        }
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}
