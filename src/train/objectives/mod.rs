//! The model families as [`Objective`](super::Objective)s: diffusion denoisers
//! ([`diffusion`]), and the discrete family's VQ-VAE and Gated PixelCNN prior ([`vq`]).

pub mod diffusion;
pub mod vq;
