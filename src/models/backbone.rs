//! The latent denoising backbone of latent diffusion, through one interface: a config enum named
//! in TOML by a tagged section (`[model.ldm.backbone] type = "unet_2d_condition"`), the model
//! enum, and [`LatentBackbone`] (`(latents, timesteps, &Conditioning) -> prediction`).
//!
//! Adding a backbone (a DiT) means a variant in [`BackboneConfig`] and [`Backbone`], its arm in
//! each `match` below (the compiler lists them), its folder name in
//! `io::safetensors::backbone_component` and its LoRA layers in `lora::targets`; the trainer,
//! the pipelines and the exports take it through these types.

use burn::module::Module;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

pub use super::conditioning::{Conditioning, LatentBackbone};
use super::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};

/// `[model.ldm.backbone]`: which backbone, with its own settings (diffusers' config names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum BackboneConfig {
    /// diffusers `UNet2DConditionModel` (Stable Diffusion's U-Net).
    #[serde(rename = "unet_2d_condition")]
    Unet2DCondition(UNet2DConditionConfig),
}

impl BackboneConfig {
    pub fn init(&self, device: &Device) -> Backbone {
        match self {
            Self::Unet2DCondition(c) => Backbone::Unet2DCondition(c.init(device)),
        }
    }

    /// This config's own rules, keys prefixed with `prefix`.
    pub fn problems(&self, prefix: &str) -> Vec<String> {
        match self {
            Self::Unet2DCondition(c) => c.problems(prefix),
        }
    }

    /// `(in_channels, out_channels)`: the latent channels it reads and predicts.
    pub fn channels(&self) -> (usize, usize) {
        match self {
            Self::Unet2DCondition(c) => (c.in_channels, c.out_channels),
        }
    }

    /// The width of the token embeddings its cross-attention reads (`None`: it reads none).
    pub fn context_width(&self) -> Option<usize> {
        match self {
            Self::Unet2DCondition(c) => Some(c.cross_attention_dim),
        }
    }

    /// Classes of its class embedding (the null class for guidance included), if any.
    pub fn classes(&self) -> Option<usize> {
        match self {
            Self::Unet2DCondition(c) => c.num_class_embeds,
        }
    }

    /// This config with a class embedding of `n` classes (the null class included).
    pub fn with_classes(&self, n: usize) -> Self {
        match self {
            Self::Unet2DCondition(c) => Self::Unet2DCondition(UNet2DConditionConfig {
                num_class_embeds: Some(n),
                ..c.clone()
            }),
        }
    }

    /// Sets the latent size it is trained at (diffusers' `sample_size`).
    pub fn set_sample_size(&mut self, latent: usize) {
        match self {
            Self::Unet2DCondition(c) => c.sample_size = latent,
        }
    }

    /// diffusers' `sample_size`.
    pub fn sample_size(&self) -> usize {
        match self {
            Self::Unet2DCondition(c) => c.sample_size,
        }
    }

    /// The pipeline component it is (its export folder and key prefix): `unet`.
    pub fn component(&self) -> &'static str {
        match self {
            Self::Unet2DCondition(_) => "unet",
        }
    }

    /// Its diffusers class (`model_index.json`).
    pub fn diffusers_class(&self) -> &'static str {
        match self {
            Self::Unet2DCondition(_) => "UNet2DConditionModel",
        }
    }

    /// The `config.json` diffusers reads.
    pub fn to_diffusers_json(&self) -> serde_json::Value {
        match self {
            Self::Unet2DCondition(c) => c.to_diffusers_json(),
        }
    }

    /// The U-Net's config, when the backbone is one.
    pub fn as_unet(&self) -> Option<&UNet2DConditionConfig> {
        match self {
            Self::Unet2DCondition(c) => Some(c),
        }
    }

    pub fn as_unet_mut(&mut self) -> Option<&mut UNet2DConditionConfig> {
        match self {
            Self::Unet2DCondition(c) => Some(c),
        }
    }
}

/// A latent denoising backbone. Parameter paths skip the variant name; a `backbone` field
/// holding one is keyed by its component (`unet.*`; see `io::safetensors`).
#[derive(Module, Debug)]
pub enum Backbone {
    Unet2DCondition(UNet2DConditionModel),
}

impl Backbone {
    /// The U-Net, when the backbone is one.
    pub fn as_unet(&self) -> Option<&UNet2DConditionModel> {
        match self {
            Self::Unet2DCondition(u) => Some(u),
        }
    }

    pub fn into_unet(self) -> Option<UNet2DConditionModel> {
        match self {
            Self::Unet2DCondition(u) => Some(u),
        }
    }
}

impl LatentBackbone for Backbone {
    fn predict(&self, latents: Tensor<4>, timesteps: Tensor<1>, cond: &Conditioning) -> Tensor<4> {
        match self {
            Self::Unet2DCondition(u) => u.predict(latents, timesteps, cond),
        }
    }
}

impl LatentBackbone for UNet2DConditionModel {
    /// Cross-attention on `cond.context` (a single zero token of `cross_attention_dim` when
    /// there is none: an unconditional or class-conditional model), the class embedding on
    /// `cond.class_labels`.
    fn predict(&self, latents: Tensor<4>, timesteps: Tensor<1>, cond: &Conditioning) -> Tensor<4> {
        let zeros;
        let context = match &cond.context {
            Some(c) => c,
            None => {
                let b = latents.dims()[0];
                zeros = Tensor::<3>::zeros([b, 1, self.cross_attention_dim], &latents.device());
                &zeros
            }
        };
        self.forward(latents, timesteps, context, cond.class_labels.clone())
    }
}
