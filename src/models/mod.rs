//! Model architectures (denoisers, VQ-VAE, PixelCNN prior) and the one place that picks the
//! float dtype models compute in.

pub mod pixelcnn;
pub mod tutorial_unet;
pub mod unet_2d;
pub mod vqvae;

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

use crate::diffusion::sampling::Denoiser;
use tutorial_unet::{TutorialUNet, TutorialUNetConfig};
use unet_2d::{UNet2DConfig, UNet2DModel};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// diffusers `UNet2DModel`; exports as a diffusers `unet/` folder.
    #[serde(rename = "unet_2d")]
    Unet2d,
    /// The DDPM-on-MNIST tutorial's residual U-Net (for comparison with PyTorch).
    TutorialUnet,
    /// Stage 1 of the discrete family: a VQ-VAE trained on images.
    Vqvae,
    /// Stage 2: a Gated PixelCNN prior over a trained VQ-VAE's code maps.
    GatedPixelcnn,
}

impl Architecture {
    /// Denoisers trained with the diffusion loss.
    pub fn is_diffusion(self) -> bool {
        matches!(self, Self::Unet2d | Self::TutorialUnet)
    }
}

/// `train.mixed_precision`, with accelerate's names. Only `no` is built so far; the model
/// code reads its compute dtype from [`compute_dtype`] so adding the others casts in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixedPrecision {
    No,
    Fp16,
    Bf16,
}

/// The dtype activations are computed in.
pub fn compute_dtype(precision: MixedPrecision) -> FloatDType {
    match precision {
        MixedPrecision::No => FloatDType::F32,
        MixedPrecision::Fp16 => FloatDType::F16,
        MixedPrecision::Bf16 => FloatDType::BF16,
    }
}

/// One of the denoiser architectures. Parameter paths skip the variant name (see `io`).
#[derive(Module, Debug)]
pub enum DenoiserModel {
    Unet2d(UNet2DModel),
    TutorialUnet(TutorialUNet),
}

impl DenoiserModel {
    pub fn new(
        architecture: Architecture,
        unet: &UNet2DConfig,
        tutorial: &TutorialUNetConfig,
        device: &Device,
    ) -> Self {
        match architecture {
            Architecture::TutorialUnet => Self::TutorialUnet(tutorial.init(device)),
            // Callers dispatch on `is_diffusion` first; the U-Net is the diffusion default.
            _ => Self::Unet2d(unet.init(device)),
        }
    }

    /// # Shapes
    /// - `x`: `[b, c, h, w]`, `timesteps`: `[b]` (float); returns `[b, c, h, w]`
    pub fn forward(&self, x: Tensor<4>, timesteps: Tensor<1>) -> Tensor<4> {
        match self {
            Self::Unet2d(m) => m.forward(x, timesteps),
            Self::TutorialUnet(m) => m.forward(x, timesteps),
        }
    }
}

impl Denoiser for DenoiserModel {
    fn predict(&self, x: Tensor<4>, t: usize) -> Tensor<4> {
        let [b, ..] = x.dims();
        let timesteps = Tensor::full([b], t as f32, &x.device());
        self.forward(x, timesteps)
    }
}
