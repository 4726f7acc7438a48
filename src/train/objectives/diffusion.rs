//! Pixel-space diffusion: a denoiser (`unet_2d` or `tutorial_unet`) trained with the recipe of
//! `diffusion::training`, optionally computing each micro-batch in concurrent slices
//! (`train.batch_split`).

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::FloatDType;
use rand_chacha::ChaCha8Rng;

use crate::config::{Config, ModelConfig};
use crate::data::Batch;
use crate::diffusion::DiffusionConfig;
use crate::diffusion::schedule::NoiseSchedule;
use crate::diffusion::training::{NoiseDraw, diffusion_loss};
use crate::models::DenoiserModel;
use crate::optim::precision::compute_dtype;
use crate::train::TrainError;
use crate::train::objective::{Objective, backward_scaled, split_grads};

/// The denoiser `cfg.model` describes, with weights drawn from `run.seed`.
pub fn build_model(cfg: &Config, device: &Device) -> Result<DenoiserModel, TrainError> {
    crate::nn::seed_init(cfg.run.seed);
    new_model(&cfg.model, device)
}

fn new_model(model: &ModelConfig, device: &Device) -> Result<DenoiserModel, TrainError> {
    Ok(DenoiserModel::new(
        model.architecture,
        &model.unet,
        &model.tutorial,
        device,
    )?)
}

/// DDPM-style training of a denoiser: noise, timesteps, the (weighted) MSE to the target.
#[derive(Clone)]
pub struct DiffusionObjective {
    model: ModelConfig,
    diffusion: DiffusionConfig,
    schedule: NoiseSchedule,
    dtype: FloatDType,
    batch_split: usize,
}

impl DiffusionObjective {
    pub fn new(cfg: &Config) -> Self {
        Self {
            model: cfg.model.clone(),
            diffusion: cfg.diffusion.clone(),
            schedule: cfg.diffusion.schedule(),
            dtype: compute_dtype(cfg.train.mixed_precision),
            batch_split: cfg.train.batch_split,
        }
    }

    fn draw(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> NoiseDraw {
        NoiseDraw::for_slice(
            &self.diffusion,
            &self.schedule,
            batch.shape,
            batch.offset,
            batch.global_size,
            rng,
        )
    }
}

impl Objective for DiffusionObjective {
    type Model = DenoiserModel;

    fn build(&self, device: &Device) -> Result<DenoiserModel, TrainError> {
        new_model(&self.model, device)
    }

    fn loss(
        &mut self,
        model: &DenoiserModel,
        batch: &Batch,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Tensor<1> {
        let draw = self.draw(batch, rng);
        diffusion_loss(
            &batch.images,
            batch.shape,
            draw,
            self.dtype,
            device,
            |x, t| model.forward(x, t),
        )
    }

    fn grads(
        &mut self,
        model: &DenoiserModel,
        batch: &Batch,
        scale: f64,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> (GradientsParams, f64) {
        if self.batch_split > 1 {
            split_grads(&*self, model, batch, self.batch_split, scale, rng, device)
        } else {
            backward_scaled(self.loss(model, batch, rng, device), scale, model)
        }
    }
}
