//! What differs between model families, as the loop sees it.
//!
//! An [`Objective`] says how to build a model and what its loss is; the loop, accumulation,
//! clipping, checkpoints, EMA, logging and resume are shared. What a run writes with its weights
//! (sample grids, the export) is [`Outputs`], implemented by `pipelines` next to the code that
//! reads those files back.

use std::path::Path;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use rand_chacha::ChaCha8Rng;

use super::TrainError;
use crate::data::{Batch, Dataset};
use crate::io::image::Grid;

pub trait Objective {
    type Model: Module;

    /// Fresh weights; the init RNG is already seeded from `run.seed`. Fails when something the
    /// model needs (a pretrained folder, a stage-1 run) cannot be read.
    fn build(&self, device: &Device) -> Result<Self::Model, TrainError>;

    /// The loss of one micro-batch.
    fn loss(
        &mut self,
        model: &Self::Model,
        batch: &Batch,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Tensor<1>;

    /// Gradients of `scale * loss(batch)` and the scaled loss value. Families that can compute
    /// a micro-batch in concurrent slices (`train.batch_split`) override this.
    fn grads(
        &mut self,
        model: &Self::Model,
        batch: &Batch,
        scale: f64,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> (GradientsParams, f64) {
        backward_scaled(self.loss(model, batch, rng, device), scale, model)
    }

    /// Runs after every optimizer step (e.g. codebook restarts); may draw from `rng`, which is
    /// checkpointed, so resume stays exact.
    fn after_step(&mut self, model: Self::Model, _rng: &mut ChaCha8Rng) -> Self::Model {
        model
    }

    /// Extra scalars for TensorBoard, from the last step.
    fn metrics(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }

    /// Moves whatever the objective holds on a device (e.g. a frozen stage-1 model) to the
    /// device of the data-parallel rank it now serves.
    fn place(&mut self, _device: &Device) {}

    /// Host statistics of the step so far that data-parallel ranks sum before `after_step`
    /// (they travel in the gradient all-reduce); `main` is true on rank 0.
    fn local_stats(&mut self, _main: bool) -> Vec<f32> {
        Vec::new()
    }

    /// Receives the rank-order sum of every rank's `local_stats`.
    fn set_global_stats(&mut self, _summed: &[f32], _world: usize) {}
}

/// Gradients of `scale * loss` for `model`'s parameters, and that scaled loss's value.
pub fn backward_scaled<M: Module>(
    loss: Tensor<1>,
    scale: f64,
    model: &M,
) -> (GradientsParams, f64) {
    let loss = loss.mul_scalar(scale);
    let value = loss.clone().into_scalar::<f32>() as f64;
    (GradientsParams::from_grads(loss.backward(), model), value)
}

/// What a run writes with its weights: sample grids during and after training, and the export
/// in the layout inference tools load. Only rank 0 holds one.
pub trait Outputs<M> {
    /// Called once with the training data before any step (e.g. to fix a reconstruction batch).
    fn prepare(&mut self, _dataset: &Dataset) -> Result<(), TrainError> {
        Ok(())
    }

    /// The sample grid for `weights` (the EMA weights when EMA is on).
    fn grid(&self, weights: &M, device: &Device) -> Result<Grid, TrainError>;

    /// Writes `weights` (EMA when on) and `raw` (the training weights, with EMA) under `dir`.
    fn export(&self, weights: &M, raw: Option<&M>, dir: &Path) -> Result<(), TrainError>;
}
