//! difftrain: train diffusion and discrete generative image models on burn.
//!
//! Dependencies point one way: `config -> data, models, diffusion -> train -> bin`.
//! Models never import the trainer; schedulers never import models (they meet in
//! [`diffusion::sampling::sample`] through the [`diffusion::sampling::Denoiser`] trait);
//! only [`io`] maps parameters to file keys.

pub mod config;
pub mod data;
pub mod diffusion;
pub mod io;
pub mod models;
pub mod nn;
pub mod tensorboard;
pub mod train;
