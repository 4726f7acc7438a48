//! The latent diffusion family (Rombach et al. 2022, the architecture of Stable Diffusion):
//! the config of its two stages and the trainable part of stage 2.
//!
//! - Stage 1, `architecture = "autoencoder_kl"`: an `AutoencoderKL` trained on images with a
//!   reconstruction loss plus `kl_weight` x KL ([`AutoencoderTrainConfig`]).
//! - Stage 2, `architecture = "latent_diffusion"`: a denoising backbone
//!   ([`super::backbone`], a `UNet2DConditionModel` today) on the frozen first stage's latents,
//!   conditioned on nothing, a class or a caption ([`LatentDiffusionConfig`]); with text, CLIP
//!   text encoders that are either frozen from a pretrained folder or trained jointly from
//!   scratch ([`LatentDiffusionModel`]).

use std::path::PathBuf;

use burn::module::Module;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::autoencoder_kl::AutoencoderKLConfig;
use super::backbone::{Backbone, BackboneConfig};
use super::clip::{CLIPTextConfig, CLIPTextModel, HiddenAct};
use super::unet_2d_condition::{
    CondDownBlockType, CondUpBlockType, PerBlock, UNet2DConditionConfig,
};

/// The reconstruction term of stage 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconLoss {
    /// Mean absolute error (CompVis' autoencoders use L1, plus LPIPS and a GAN we cannot ship).
    L1,
    Mse,
}

/// `[model.autoencoder]`: stage 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoencoderTrainConfig {
    /// The architecture, with diffusers' `AutoencoderKL` names (`[model.autoencoder.vae]`).
    pub vae: AutoencoderKLConfig,
    pub recon_loss: ReconLoss,
    /// Weight of the KL term (CompVis' kl-f8 uses 1e-6).
    pub kl_weight: f64,
}

impl Default for AutoencoderTrainConfig {
    fn default() -> Self {
        Self {
            vae: AutoencoderKLConfig {
                block_out_channels: vec![32, 64, 64],
                layers_per_block: 1,
                norm_num_groups: 16,
                ..AutoencoderKLConfig::default()
            },
            recon_loss: ReconLoss::L1,
            kl_weight: 1e-6,
        }
    }
}

impl AutoencoderTrainConfig {
    pub fn problems(&self, resolution: usize, channels: usize) -> Vec<String> {
        let mut p = self.vae.problems("model.autoencoder.vae");
        if self.vae.in_channels != channels || self.vae.out_channels != channels {
            p.push(format!(
                "model.autoencoder.vae in_channels/out_channels = {}/{} but the data has {channels} \
                 channels",
                self.vae.in_channels, self.vae.out_channels
            ));
        }
        let f = self.vae.downsampling();
        if !resolution.is_multiple_of(f) {
            p.push(format!(
                "data.resolution = {resolution} is not divisible by the VAE's factor {f}"
            ));
        }
        if !(self.kl_weight >= 0.0 && self.kl_weight.is_finite()) {
            p.push(format!(
                "model.autoencoder.kl_weight = {} must be >= 0",
                self.kl_weight
            ));
        }
        p
    }
}

/// What stage 2 is conditioned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConditioningKind {
    /// Unconditional: the cross-attention sees a single zero token.
    None,
    /// A class label per image (`metadata.jsonl`'s `label`, or an IDX label file) through the
    /// U-Net's class embedding; the null class for guidance is index `num_classes`.
    Class,
    /// The caption (`metadata.jsonl`'s `text`) through a CLIP text encoder.
    Text,
}

/// `[model.conditioning]`: what stage 2 of latent diffusion is conditioned on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConditioningConfig {
    pub kind: ConditioningKind,
    /// Classes (labels `0..num_classes`), for `kind = "class"`.
    pub num_classes: usize,
    /// Probability of training a sample unconditioned (empty caption / null class), so that
    /// sampling can use classifier-free guidance.
    pub cond_drop_prob: f64,
    /// Text: a folder with `text_encoder/` and `tokenizer/` (a Stable Diffusion model) to take a
    /// frozen CLIP text encoder from. Unset: a small one is trained with the U-Net, on a BPE
    /// vocabulary built from the captions.
    pub pretrained_text_encoder: Option<PathBuf>,
    /// The text encoder trained from scratch (its `vocab_size` and `max_position_embeddings`
    /// follow the tokenizer).
    pub clip: CLIPTextConfig,
    /// Tokens of the vocabulary built from the captions (bytes, merges and the two specials).
    pub vocab_size: usize,
    /// Tokens per caption, BOS and EOS included (77 for pretrained encoders).
    pub max_length: usize,
}

impl Default for ConditioningConfig {
    fn default() -> Self {
        Self {
            kind: ConditioningKind::Text,
            num_classes: 0,
            cond_drop_prob: 0.1,
            pretrained_text_encoder: None,
            clip: CLIPTextConfig {
                vocab_size: 0,
                hidden_size: 64,
                intermediate_size: 128,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                max_position_embeddings: 0,
                hidden_act: HiddenAct::QuickGelu,
                ..CLIPTextConfig::default()
            },
            vocab_size: 1000,
            max_length: 16,
        }
    }
}

/// A config with both the older `[model.ldm.unet]` and `[model.ldm.backbone]`.
#[derive(Debug, thiserror::Error)]
#[error(
    "model.ldm has both [model.ldm.unet] (the older spelling) and [model.ldm.backbone]; keep only \
     [model.ldm.backbone] with type = \"unet_2d_condition\""
)]
pub struct BothSpellings;

/// `[model.ldm]`: stage 2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LatentDiffusionConfig {
    /// The frozen first stage: an `autoencoder_kl` or `vqvae` run (its output_dir, export or a
    /// checkpoint), or a Stable Diffusion folder / single file (its VAE).
    pub first_stage: PathBuf,
    /// A stage-1 config to train first when `first_stage` holds no weights yet.
    pub first_stage_config: Option<PathBuf>,
    /// For a single-file Stable Diffusion first stage: the folder with its `vae/config.json`.
    pub first_stage_config_from: Option<PathBuf>,
    /// Latents are multiplied by this. Unset: a pretrained VAE's `scaling_factor`, else 1 / std
    /// of the first batch's latents (the LDM paper's `scale_by_std`).
    pub scale_factor: Option<f64>,
    /// The denoising backbone, a tagged section with diffusers' names
    /// (`[model.ldm.backbone] type = "unet_2d_condition"`). Its `sample_size` is set to the
    /// latent size when training starts.
    pub backbone: BackboneConfig,
    /// The older spelling of a U-Net backbone (`[model.ldm.unet]`, configs and checkpoints
    /// before the backbone section): read, moved into `backbone` by [`Self::migrate`], never
    /// written.
    #[serde(rename = "unet", skip_serializing)]
    pub legacy_unet: Option<UNet2DConditionConfig>,
}

impl Default for LatentDiffusionConfig {
    fn default() -> Self {
        Self {
            first_stage: PathBuf::from("checkpoints/vae"),
            first_stage_config: None,
            first_stage_config_from: None,
            scale_factor: None,
            legacy_unet: None,
            backbone: BackboneConfig::Unet2DCondition(UNet2DConditionConfig {
                sample_size: 8,
                block_out_channels: vec![64, 128],
                down_block_types: vec![
                    CondDownBlockType::CrossAttnDownBlock2D,
                    CondDownBlockType::CrossAttnDownBlock2D,
                ],
                up_block_types: vec![
                    CondUpBlockType::CrossAttnUpBlock2D,
                    CondUpBlockType::CrossAttnUpBlock2D,
                ],
                layers_per_block: 1,
                norm_num_groups: 32,
                cross_attention_dim: 64,
                attention_head_dim: PerBlock::All(4),
                ..UNet2DConditionConfig::default()
            }),
        }
    }
}

impl LatentDiffusionConfig {
    /// Moves the older `[model.ldm.unet]` into `backbone` (a U-Net backbone); `backbone_given`
    /// says whether the file also has `[model.ldm.backbone]`, which is then an error naming the
    /// new spelling. Returns a note when the old spelling was read.
    pub fn migrate(&mut self, backbone_given: bool) -> Result<Option<&'static str>, BothSpellings> {
        let Some(unet) = self.legacy_unet.take() else {
            return Ok(None);
        };
        if backbone_given {
            return Err(BothSpellings);
        }
        self.backbone = BackboneConfig::Unet2DCondition(unet);
        Ok(Some(
            "[model.ldm.unet] is now [model.ldm.backbone] with type = \"unet_2d_condition\" \
             (same keys); read as such",
        ))
    }

    /// This config's rules and how it must agree with the conditioning `c`.
    pub fn problems(&self, c: &ConditioningConfig) -> Vec<String> {
        let mut p = self.backbone.problems("model.ldm.backbone");
        if !(0.0..1.0).contains(&c.cond_drop_prob) {
            p.push(format!(
                "model.conditioning.cond_drop_prob = {} must be in [0, 1)",
                c.cond_drop_prob
            ));
        }
        match c.kind {
            ConditioningKind::Class => {
                if c.num_classes == 0 {
                    p.push(
                        "model.conditioning.num_classes must be set for kind = \"class\"".into(),
                    );
                }
                if self.backbone.classes().is_some() {
                    p.push(
                        "model.ldm.backbone.num_class_embeds is set from \
                         model.conditioning.num_classes (plus the null class); leave it out"
                            .into(),
                    );
                }
            }
            ConditioningKind::Text => {
                if c.pretrained_text_encoder.is_none() {
                    match self.backbone.context_width() {
                        Some(width) if width != c.clip.hidden_size => p.push(format!(
                            "model.conditioning.clip.hidden_size = {} must equal \
                             model.ldm.backbone.cross_attention_dim = {width}",
                            c.clip.hidden_size
                        )),
                        Some(_) => {}
                        None => p.push(
                            "model.conditioning.kind = \"text\" needs a backbone with \
                             cross-attention (model.ldm.backbone)"
                                .into(),
                        ),
                    }
                    if c.vocab_size < 520 {
                        p.push(format!(
                            "model.conditioning.vocab_size = {} must be at least 520 (512 \
                             byte tokens, the two specials and some merges)",
                            c.vocab_size
                        ));
                    }
                    if !(3..=1024).contains(&c.max_length) {
                        p.push(format!(
                            "model.conditioning.max_length = {} must be in 3..=1024",
                            c.max_length
                        ));
                    }
                }
            }
            ConditioningKind::None => {}
        }
        if let Some(s) = self.scale_factor
            && !(s > 0.0 && s.is_finite())
        {
            p.push(format!("model.ldm.scale_factor = {s} must be positive"));
        }
        p
    }

    /// The backbone config with the class table the conditioning `c` needs.
    pub fn backbone_config(&self, c: &ConditioningConfig) -> BackboneConfig {
        match c.kind {
            ConditioningKind::Class => self.backbone.with_classes(c.num_classes + 1),
            _ => self.backbone.clone(),
        }
    }
}

/// What stage 2 trains: the backbone and, in the pipeline's order, each text encoder that
/// trains (from scratch, or a pretrained one carrying LoRA adapters); a frozen encoder's slot is
/// `None` (it lives outside the model, and checkpoints do not hold it). Keys: `unet.*`,
/// `text_encoder.*`, `text_encoder_2.*` (see `io::safetensors`).
#[derive(Module, Debug)]
pub struct LatentDiffusionModel {
    pub backbone: Backbone,
    pub text_encoders: Vec<Option<CLIPTextModel>>,
}

/// The frozen first stage of latent diffusion: a KL autoencoder (ours or a Stable Diffusion
/// VAE) or a VQ-VAE of the discrete family (diffusion on its pre-quantisation latents, decoded
/// through the quantiser, as the LDM paper's VQ-regularised models do).
#[derive(Module, Debug)]
pub enum FirstStage {
    Kl(super::autoencoder_kl::AutoencoderKL),
    Vq(super::vqvae::VQVAE),
}

impl FirstStage {
    /// The posterior of the latents of images in [-1, 1]: mean and standard deviation (a VQ-VAE's
    /// encoding is deterministic: no deviation).
    ///
    /// # Shapes
    /// - `x`: `[b, c, h, w]`; returns `[b, lc, h / f, w / f]` each
    pub fn moments(&self, x: Tensor<4>) -> (Tensor<4>, Option<Tensor<4>>) {
        match self {
            Self::Kl(vae) => {
                let post = vae.encode(x);
                let std = post.std();
                (post.mean, Some(std))
            }
            Self::Vq(vq) => (vq.encoder.forward(x), None),
        }
    }

    /// Images (about [-1, 1]) from unscaled latents.
    ///
    /// # Shapes
    /// - `z`: `[b, lc, h, w]`; returns `[b, c, h * f, w * f]`
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        match self {
            Self::Kl(vae) => vae.decode(z),
            Self::Vq(vq) => crate::optim::precision::in_held_dtype(vq, z, |z| {
                vq.decoder.forward(vq.quantize.forward(z).z_q)
            }),
        }
    }
}

/// Latents drawn from posteriors on the host: `(mean + std · eps) · scale` element-wise, or
/// `mean · scale` for a deterministic (VQ) first stage. The one formula stage 2 trains on (cached
/// or not) and `scale_by_std` measures, as diffusers' `DiagonalGaussianDistribution.sample`.
pub fn latent_samples(mean: &[f32], std: Option<&[f32]>, eps: &[f32], scale: f32) -> Vec<f32> {
    match std {
        Some(std) => mean
            .iter()
            .zip(std)
            .zip(eps)
            .map(|((m, s), e)| (m + s * e) * scale)
            .collect(),
        None => mean.iter().map(|m| m * scale).collect(),
    }
}

/// The LDM paper's `scale_by_std`: `1 / z.flatten().std()` (unbiased, as torch's) of the first
/// batch's latents `z`; `None` when they have no spread.
pub fn scale_by_std(z: &[f32]) -> Option<f64> {
    let n = z.len() as f64;
    let mu = z.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = z.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (var > 0.0 && var.is_finite()).then(|| 1.0 / var.sqrt())
}
