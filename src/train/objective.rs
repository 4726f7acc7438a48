//! What differs between model families, as the loop sees it: an [`Objective`] says how to
//! build a model and what its loss is; the loop, accumulation, clipping, checkpoints, EMA,
//! logging and resume are shared. (What a run writes with its weights is
//! [`Outputs`](super::outputs::Outputs).)

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use rand_chacha::ChaCha8Rng;

use super::TrainError;
use crate::data::Batch;
use crate::optim::groups::ParamGroups;

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

    /// Hashes of what the model depends on but the checkpoint does not hold (a frozen first
    /// stage, a pretrained base), by name. Checkpoints store them and resume refuses a
    /// different one, naming both.
    fn fingerprints(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// What trains: parameter groups with their learning-rate factor and whether checkpoints
    /// hold them. The default is the whole model; a LoRA run names its adapters (the frozen
    /// base, in no group, is neither stepped nor checkpointed: `build` brings it back from
    /// where it came from).
    fn param_groups(&self, _model: &Self::Model) -> ParamGroups {
        ParamGroups::whole_model()
    }
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

/// Gradients of `scale * loss(batch)` computed as `parts` equal slices of the micro-batch on as
/// many threads (`train.batch_split`), each on a replica of the weights
/// ([`grad::replicate`](crate::optim::grad::replicate)) with its own clone of the objective and
/// of the random stream, summed by parameter id. Returns the scaled loss too.
///
/// Exact for objectives whose `loss` draws every random number for the global batch in sample
/// order and keeps its slice (`Batch::offset`/`global_size`, the contract data parallelism
/// relies on): each slice then uses the numbers of the unsplit loss, and every clone of the
/// stream ends where the unsplit one would; only the float summation order differs. Statistics
/// an objective accumulates in `loss` stay in the clones, so families with step statistics do
/// not split.
pub fn split_grads<O>(
    objective: &O,
    model: &O::Model,
    batch: &Batch,
    parts: usize,
    scale: f64,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> (GradientsParams, f64)
where
    O: Objective + Clone + Send,
{
    let b = batch.shape[0];
    let per = b / parts;
    let part = |k: usize| {
        let replica = crate::optim::grad::replicate(model);
        let slice = batch.slice(k * per..(k + 1) * per);
        let mut objective = objective.clone();
        let mut rng = rng.clone();
        move || {
            let loss = objective.loss(&replica, &slice, &mut rng, device);
            // mean over the batch = sum over parts of (per / b) * mean over the part
            let (grads, value) = backward_scaled(loss, scale * per as f64 / b as f64, &replica);
            (grads, value, rng)
        }
    };
    // Part 0 on this thread, which is one of the thread pool's in the binaries
    // ([`crate::threads::on_pool`]): waiting in a join instead, it would leave the other parts' parallel
    // kernels one thread fewer.
    let results: Vec<(GradientsParams, f64, ChaCha8Rng)> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..parts).map(|k| s.spawn(part(k))).collect();
        let first = part(0)();
        std::iter::once(first)
            .chain(
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a batch-split worker panicked")),
            )
            .collect()
    });
    let mut accumulator = burn::optim::GradientsAccumulator::new();
    let mut total = 0.0;
    for (k, (grads, value, part_rng)) in results.into_iter().enumerate() {
        accumulator.accumulate(model, grads);
        total += value;
        if k == 0 {
            *rng = part_rng;
        }
    }
    (accumulator.grads(), total)
}
