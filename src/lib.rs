//! difftrain: train diffusion and discrete generative image models on burn.
//!
//! Dependencies point one way: `config -> data, models, diffusion -> train -> bin`.
//! Models never import the trainer; schedulers never import models (they meet in
//! [`diffusion::sampling::sample`] through the [`diffusion::sampling::Denoiser`] trait);
//! only [`io`] maps parameters to file keys.

pub mod config;
pub mod data;
pub mod diffusion;
pub mod distributed;
pub mod io;
pub mod kernels;
pub mod models;
pub mod nn;
pub mod tensorboard;
pub mod train;

/// What every binary's `main` does with its result: print the error chain once, exit 1.
pub fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
