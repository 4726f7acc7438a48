//! diffusers `AutoencoderKL` (`models/autoencoders/autoencoder_kl.py`), Stable Diffusion's
//! first stage: its config (read and written as diffusers' `config.json`) and the model.

use burn::module::Module;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::vae::{Decoder, DiagonalGaussian, Encoder, VaeShape};
use crate::io::config_json::ConfigJson;
use crate::nn::Conv2d;
use crate::optim::precision::in_held_dtype;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VaeDownBlockType {
    DownEncoderBlock2D,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VaeUpBlockType {
    UpDecoderBlock2D,
}

/// The `AutoencoderKL` config: diffusers' names; defaults are SD 1.x's VAE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoencoderKLConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<VaeDownBlockType>,
    pub up_block_types: Vec<VaeUpBlockType>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    /// Latents are multiplied by this before the U-Net sees them (0.18215 for SD 1.x/2.x).
    pub scaling_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec![VaeDownBlockType::DownEncoderBlock2D; 4],
            up_block_types: vec![VaeUpBlockType::UpDecoderBlock2D; 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 512,
            scaling_factor: 0.18215,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// Image pixels per latent position along each axis: `2^(levels - 1)`.
    pub fn downsampling(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    fn shape(&self) -> VaeShape {
        VaeShape {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            norm_num_groups: self.norm_num_groups,
            mid_block_add_attention: self.mid_block_add_attention,
        }
    }

    pub fn problems(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        let levels = self.block_out_channels.len();
        if levels == 0 {
            out.push(format!("{prefix}.block_out_channels must not be empty"));
            return out;
        }
        if self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            out.push(format!(
                "{prefix}: down_block_types and up_block_types need one entry per \
                 block_out_channels entry ({levels})"
            ));
        }
        for &c in &self.block_out_channels {
            if self.norm_num_groups == 0 || c % self.norm_num_groups != 0 {
                out.push(format!(
                    "{prefix}: block_out_channels entry {c} is not divisible by norm_num_groups = {}",
                    self.norm_num_groups
                ));
            }
        }
        if self.layers_per_block == 0 || self.latent_channels == 0 {
            out.push(format!(
                "{prefix}: layers_per_block and latent_channels must be at least 1"
            ));
        }
        if !(self.scaling_factor > 0.0 && self.scaling_factor.is_finite()) {
            out.push(format!(
                "{prefix}.scaling_factor = {} must be positive",
                self.scaling_factor
            ));
        }
        out
    }

    pub fn init(&self, device: &Device) -> AutoencoderKL {
        AutoencoderKL::new(self, device)
    }

    /// The `vae/config.json` diffusers reads.
    pub fn to_diffusers_json(&self) -> serde_json::Value {
        serde_json::json!({
            "_class_name": "AutoencoderKL",
            "_diffusers_version": crate::io::layout::DIFFUSERS_VERSION,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": self.down_block_types,
            "up_block_types": self.up_block_types,
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "force_upcast": true,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
        })
    }

    /// Reads a diffusers `vae/config.json`, refusing options this implementation lacks.
    pub fn from_diffusers_json(
        value: &serde_json::Value,
    ) -> Result<Self, crate::io::config_json::ConfigJsonError> {
        let json = ConfigJson::new(value, "AutoencoderKL")?;
        json.expect("act_fn", &["silu".into()])?;
        json.expect("shift_factor", &[0.into(), 0.0.into()])?;
        json.expect("latents_mean", &[])?;
        json.expect("latents_std", &[])?;
        let mut c = Self::default();
        json.take("in_channels", &mut c.in_channels)?;
        json.take("out_channels", &mut c.out_channels)?;
        json.take("down_block_types", &mut c.down_block_types)?;
        json.take("up_block_types", &mut c.up_block_types)?;
        json.take("block_out_channels", &mut c.block_out_channels)?;
        json.take("layers_per_block", &mut c.layers_per_block)?;
        json.take("latent_channels", &mut c.latent_channels)?;
        json.take("norm_num_groups", &mut c.norm_num_groups)?;
        json.take("sample_size", &mut c.sample_size)?;
        json.take("scaling_factor", &mut c.scaling_factor)?;
        json.take("use_quant_conv", &mut c.use_quant_conv)?;
        json.take("use_post_quant_conv", &mut c.use_post_quant_conv)?;
        json.take("mid_block_add_attention", &mut c.mid_block_add_attention)?;
        Ok(c)
    }
}

#[derive(Module, Debug)]
pub struct AutoencoderKL {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    pub fn new(cfg: &AutoencoderKLConfig, device: &Device) -> Self {
        let shape = cfg.shape();
        let latent = cfg.latent_channels;
        Self {
            encoder: Encoder::new(&shape, cfg.in_channels, latent, device),
            decoder: Decoder::new(&shape, latent, cfg.out_channels, device),
            quant_conv: cfg
                .use_quant_conv
                .then(|| Conv2d::new(2 * latent, 2 * latent, 1, 1, 0, device)),
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| Conv2d::new(latent, latent, 1, 1, 0, device)),
        }
    }

    /// The posterior of the latents of `x` (images in [-1, 1]).
    ///
    /// # Shapes
    /// - `x`: `[b, in_channels, h, w]`; the posterior's tensors are `[b, latent, h/f, w/f]`
    pub fn encode(&self, x: Tensor<4>) -> DiagonalGaussian {
        let moments = self.encoder.forward(x);
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(moments),
            None => moments,
        };
        DiagonalGaussian::new(moments)
    }

    /// Images (in about [-1, 1]) from unscaled latents.
    ///
    /// # Shapes
    /// - `z`: `[b, latent, h, w]`; returns `[b, out_channels, h * f, w * f]`
    ///
    /// A VAE held in half (a frozen one under mixed precision) decodes in half, as diffusers'
    /// pipelines run the VAE in `weight_dtype` (at 512x512 its f32 activations would be the
    /// largest of a sample); the images come back in `z`'s dtype.
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        in_held_dtype(self, z, |z| {
            let z = match &self.post_quant_conv {
                Some(conv) => conv.forward(z),
                None => z,
            };
            self.decoder.forward(z)
        })
    }
}
