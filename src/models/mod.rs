//! Model architectures, one file per diffusers file (`embeddings`, `resnet`, `attention`,
//! `unet_2d_blocks`, `unet_2d`) plus the tutorial U-Net, the VQ-VAE and the PixelCNN prior, and
//! the one place that maps an [`Architecture`] to its [`Family`].

pub mod attention;
pub mod autoencoder_kl;
pub mod backbone;
pub mod clip;
pub mod conditioning;
pub mod embeddings;
pub mod latent_diffusion;
pub mod pixelcnn;
pub mod resnet;
pub mod text_encoders;
pub mod transformer_2d;
pub mod tutorial_unet;
pub mod unet_2d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
pub mod vae;
pub mod vqvae;

use burn::module::Module;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::diffusion::sampling::Denoiser;
use tutorial_unet::{TutorialUNet, TutorialUNetConfig};
use unet_2d::{UNet2DConfig, UNet2DModel};

/// `model.architecture`.
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
    /// Stage 1 of latent diffusion: a KL-regularised autoencoder (diffusers `AutoencoderKL`).
    AutoencoderKl,
    /// Stage 2: a conditional U-Net (`UNet2DConditionModel`) on a frozen first stage's latents.
    LatentDiffusion,
    /// LoRA fine-tuning of a pretrained Stable Diffusion model's U-Net (and text encoder).
    SdLora,
}

/// How a model is trained, sampled and exported. Each family has one objective
/// (`train::objectives`) and one pipeline (`pipelines`); adding an architecture means adding
/// it here, and the compiler then lists every place that must learn about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Denoisers trained with the diffusion loss, sampled with DDPM/DDIM.
    Diffusion,
    /// A VQ-VAE: reconstruction + codebook losses; it does not sample on its own.
    Vqvae,
    /// A Gated PixelCNN prior over a VQ-VAE's codes.
    PixelCnn,
    /// An `AutoencoderKL`: reconstruction + KL; it does not sample on its own.
    Autoencoder,
    /// A conditional U-Net on latents, sampled with guidance and decoded by its first stage.
    LatentDiffusion,
    /// Low-rank adapters on a frozen Stable Diffusion model; exports LoRA files.
    Lora,
}

impl Architecture {
    pub fn family(self) -> Family {
        match self {
            Self::Unet2d | Self::TutorialUnet => Family::Diffusion,
            Self::Vqvae => Family::Vqvae,
            Self::GatedPixelcnn => Family::PixelCnn,
            Self::AutoencoderKl => Family::Autoencoder,
            Self::LatentDiffusion => Family::LatentDiffusion,
            Self::SdLora => Family::Lora,
        }
    }

    /// Denoisers trained with the diffusion loss.
    pub fn is_diffusion(self) -> bool {
        self.family() == Family::Diffusion
    }
}

/// An architecture asked for as a diffusion denoiser that is not one.
#[derive(Debug, thiserror::Error)]
#[error("model.architecture = {0:?} is not a diffusion denoiser")]
pub struct NotADenoiser(pub Architecture);

/// One of the denoiser architectures. Parameter paths skip the variant name (see `io`).
// burn's Module derive holds each variant's layers by value (it has no `Box` impl); one such
// value exists per model, so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum DenoiserModel {
    Unet2d(UNet2DModel),
    TutorialUnet(TutorialUNet),
}

impl DenoiserModel {
    /// The denoiser `architecture` names; an error for the architectures that are not one.
    pub fn new(
        architecture: Architecture,
        unet: &UNet2DConfig,
        tutorial: &TutorialUNetConfig,
        device: &Device,
    ) -> Result<Self, NotADenoiser> {
        match architecture {
            Architecture::Unet2d => Ok(Self::Unet2d(unet.init(device))),
            Architecture::TutorialUnet => Ok(Self::TutorialUnet(tutorial.init(device))),
            Architecture::Vqvae
            | Architecture::GatedPixelcnn
            | Architecture::AutoencoderKl
            | Architecture::LatentDiffusion
            | Architecture::SdLora => Err(NotADenoiser(architecture)),
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
    fn predict(&self, x: Tensor<4>, t: f64) -> Tensor<4> {
        let [b, ..] = x.dims();
        let timesteps = Tensor::full([b], t as f32, &x.device());
        self.forward(x, timesteps)
    }
}
