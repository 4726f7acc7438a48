//! Stage 1 of latent diffusion: an `AutoencoderKL` trained as CompVis' `AutoencoderKL` with
//! `LPIPSWithDiscriminator` minus the perceptual and adversarial terms (they need pretrained
//! networks that cannot be shipped):
//! `loss = mean_b(Σ_chw rec(x, x̂)) + kl_weight · mean_b(KL(q(z|x) || N(0, I)))`, with `rec` the
//! absolute or squared error, `x̂` decoded from a posterior sample, and the posterior's log
//! variance clamped as diffusers does. The sample's noise comes from the run's stream, drawn
//! for the global batch in sample order (so data parallelism and resume replay it exactly).

use burn::prelude::*;
use burn::tensor::DType;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::data::Batch;
use crate::dtype::{as_dtype, to_f32};
use crate::models::autoencoder_kl::AutoencoderKL;
use crate::models::latent_diffusion::{AutoencoderTrainConfig, ReconLoss};
use crate::optim::precision::{MixedPrecision, compute_dtype};
use crate::train::TrainError;
use crate::train::objective::Objective;

/// Standard normal noise for the samples `offset..offset + n` of a global batch of
/// `global` samples of `per` numbers each, drawn for the whole global batch in order.
pub fn global_normals(
    rng: &mut ChaCha8Rng,
    global: usize,
    per: usize,
    offset: usize,
    n: usize,
) -> Vec<f32> {
    let all: Vec<f32> = (0..global * per)
        .map(|_| rng.sample(StandardNormal))
        .collect();
    all[offset * per..(offset + n) * per].to_vec()
}

/// The two terms of the stage-1 loss for images `x` and posterior noise `eps(latent shape)`:
/// `(mean_b Σ_chw rec(x, decode(mean + std · eps)), mean_b KL)`; the loss is
/// `rec + kl_weight · kl` (CompVis' `LPIPSWithDiscriminator` with `logvar = 0` and no perceptual
/// or adversarial term).
///
/// # Shapes
/// - `x`: `[b, c, h, w]`; `eps` returns the latent shape `[b, lc, h / f, w / f]` it is given
pub fn autoencoder_loss(
    model: &AutoencoderKL,
    x: Tensor<4>,
    eps: impl FnOnce([usize; 4]) -> Tensor<4>,
    recon_loss: ReconLoss,
    dtype: DType,
) -> (Tensor<1>, Tensor<1>) {
    let b = x.dims()[0];
    let posterior = model.encode(as_dtype(x.clone(), dtype));
    let noise = eps(posterior.mean.dims());
    let recon = model.decode(as_dtype(posterior.sample(noise), dtype));
    let diff = to_f32(recon) - x;
    let per_pixel = match recon_loss {
        ReconLoss::L1 => diff.abs(),
        ReconLoss::Mse => diff.square(),
    };
    (per_pixel.sum().div_scalar(b as f64), posterior.kl().mean())
}

#[derive(Clone)]
pub struct AutoencoderObjective {
    cfg: AutoencoderTrainConfig,
    /// Sums over the step's micro-batches, for the logged metrics.
    rec_sum: f64,
    kl_sum: f64,
    micro_batches: usize,
    metrics: Vec<(&'static str, f64)>,
    /// The compute dtype (`train.mixed_precision`).
    dtype: DType,
}

impl AutoencoderObjective {
    pub fn new(cfg: &AutoencoderTrainConfig, precision: MixedPrecision) -> Self {
        Self {
            dtype: compute_dtype(precision).into(),
            cfg: cfg.clone(),
            rec_sum: 0.0,
            kl_sum: 0.0,
            micro_batches: 0,
            metrics: Vec::new(),
        }
    }
}

impl Objective for AutoencoderObjective {
    type Model = AutoencoderKL;

    fn build(&self, device: &Device) -> Result<AutoencoderKL, TrainError> {
        Ok(self.cfg.vae.init(device))
    }

    fn loss(
        &mut self,
        model: &AutoencoderKL,
        batch: &Batch,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Tensor<1> {
        let [b, ..] = batch.shape;
        let x = Tensor::<4>::from_data(TensorData::new(batch.images.clone(), batch.shape), device);
        let noise = |[_, c, h, w]: [usize; 4]| {
            let eps = global_normals(rng, batch.global_size, c * h * w, batch.offset, b);
            Tensor::<4>::from_data(TensorData::new(eps, [b, c, h, w]), device)
        };
        let (rec, kl) = autoencoder_loss(model, x, noise, self.cfg.recon_loss, self.dtype);
        self.rec_sum += rec.clone().into_scalar::<f32>() as f64;
        self.kl_sum += kl.clone().into_scalar::<f32>() as f64;
        self.micro_batches += 1;
        rec + kl.mul_scalar(self.cfg.kl_weight)
    }

    fn after_step(&mut self, model: AutoencoderKL, _rng: &mut ChaCha8Rng) -> AutoencoderKL {
        let n = self.micro_batches.max(1) as f64;
        self.metrics = vec![
            ("ae/reconstruction", self.rec_sum / n),
            ("ae/kl", self.kl_sum / n),
        ];
        (self.rec_sum, self.kl_sum, self.micro_batches) = (0.0, 0.0, 0);
        model
    }

    fn metrics(&self) -> Vec<(&'static str, f64)> {
        self.metrics.clone()
    }

    /// The step's reconstruction and KL sums, averaged over the ranks for the metrics.
    fn local_stats(&mut self, _main: bool) -> Vec<f32> {
        vec![self.rec_sum as f32, self.kl_sum as f32]
    }

    fn set_global_stats(&mut self, summed: &[f32], world: usize) {
        self.rec_sum = summed[0] as f64 / world as f64;
        self.kl_sum = summed[1] as f64 / world as f64;
    }
}
