//! The model families as [`Objective`](super::Objective)s: pixel-space diffusion denoisers
//! ([`diffusion`]), latent diffusion's autoencoder and latent U-Net ([`autoencoder`],
//! [`ldm`]), and the discrete family's VQ-VAE and Gated PixelCNN prior ([`vq`]).

pub mod autoencoder;
pub mod diffusion;
pub mod ldm;
pub mod vq;
