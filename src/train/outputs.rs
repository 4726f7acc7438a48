//! What a run writes with its weights (sample grids, the export), implemented by `pipelines`
//! next to the code that reads those files back.

use std::path::{Path, PathBuf};

use burn::prelude::*;

use super::TrainError;
use crate::data::Dataset;
use crate::io;
use crate::io::image::Grid;
use crate::tensorboard::EventWriter;

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

    /// The export at the end of a run after optimizer step `step`: [`Outputs::export`], plus
    /// whatever else the pipelines write beside it (`pipelines::Exporting` adds the run's
    /// config and the step).
    fn export_at(
        &self,
        weights: &M,
        raw: Option<&M>,
        dir: &Path,
        _step: usize,
    ) -> Result<(), TrainError> {
        self.export(weights, raw, dir)
    }
}

/// Samples with `weights` (the EMA weights when EMA is on) after optimizer step `step`, writes
/// `samples/step-<N>.png` and, when logging, a TensorBoard image.
pub(super) fn write_samples<M>(
    outputs: &impl Outputs<M>,
    weights: &M,
    step: usize,
    device: &Device,
    out: &Path,
    events: Option<&mut EventWriter>,
) -> Result<PathBuf, TrainError> {
    // Sampling asks for other sizes than training: the cached training blocks go back first
    // rather than stay resident beside them (the next steps cache theirs again).
    crate::memory::release_cached();
    let grid = outputs.grid(weights, device)?;
    let path = out.join("samples").join(format!("step-{step}.png"));
    let png = io::image::save_grid(&grid, &path)?;
    if let Some(ev) = events {
        ev.image("samples", &png.png, png.height, png.width, step as u64)?;
    }
    Ok(path)
}
