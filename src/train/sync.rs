//! The loop's one collective per optimizer step: the gradients, the loss, the stop request and
//! the objective's statistics packed into one flat buffer, summed over the ranks, unpacked.

use burn::optim::GradientsParams;
use burn::prelude::*;

use super::{Objective, TrainError};
use crate::distributed;
use crate::optim::grad;

/// The one all-reduce of optimizer step `step`: the gradients (averaged), the loss (averaged)
/// and the objective's statistics (summed) travel in a single buffer.
pub(super) fn all_reduce_step<O: Objective>(
    replica: &mut distributed::Replica,
    objective: &mut O,
    model: &O::Model,
    grads: GradientsParams,
    loss: f64,
    step: usize,
    device: &Device,
) -> Result<(GradientsParams, f64, Option<i32>), TrainError> {
    let world = replica.world_size();
    let (flat, present) = grad::flatten(model, &grads, device);
    let n_grads = flat.dims()[0];
    // A stop request (SIGINT/SIGTERM) seen by any rank: the largest signal number wins.
    let signal = crate::signals::requested().unwrap_or(0) as f32;
    let mut extra = vec![signal, loss as f32];
    extra.extend(&present);
    extra.extend(objective.local_stats(replica.is_main()));
    let n_extra = extra.len();
    let packed = Tensor::cat(
        vec![
            flat,
            Tensor::from_data(TensorData::new(extra, [n_extra]), device),
        ],
        0,
    );
    let summed = replica.all_reduce_sum(packed, &format!("the all-reduce of step {step}"))?;
    let extra = summed
        .clone()
        .slice(n_grads..n_grads + n_extra)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 after convert");
    let (signal_sum, extra) = extra.split_first().expect("the stop flag is packed first");
    let (loss_sum, rest) = extra.split_first().expect("the loss is packed next");
    let (present, stats) = rest.split_at(present.len());
    let present: Vec<bool> = present.iter().map(|&p| p > 0.0).collect();
    objective.set_global_stats(stats, world);
    let mean = summed.slice(0..n_grads).mul_scalar(1.0 / world as f64);
    let stop = (*signal_sum > 0.0).then(|| crate::signals::requested().unwrap_or(15));
    Ok((
        grad::unflatten(model, mean, &present),
        *loss_sum as f64 / world as f64,
        stop,
    ))
}
