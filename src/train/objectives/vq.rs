//! The discrete family as [`Objective`]s: the VQ-VAE (stage 1: reconstruction + codebook
//! losses, dead-code restarts) and the Gated PixelCNN prior over its codes (stage 2:
//! cross-entropy of the frozen VQ-VAE's code maps).

use burn::prelude::*;
use burn::tensor::DType;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::data::Batch;
use crate::dtype::{as_dtype, to_f32};
use crate::models::pixelcnn::{GatedPixelCNN, GatedPixelCNNConfig};
use crate::models::vqvae::{VQVAE, VQVAEConfig};
use crate::optim::precision::{MixedPrecision, compute_dtype, hold_frozen};
use crate::train::TrainError;
use crate::train::objective::Objective;

/// Stage 1: reconstruction MSE + `embedding_cost * ||sg(z_e) - z_q||^2`
/// + `commitment_cost * ||z_e - sg(z_q)||^2`, with optional dead-code restarts.
#[derive(Clone)]
pub struct VqvaeObjective {
    cfg: VQVAEConfig,
    /// Code usage over the current optimizer step's micro-batches.
    counts: Vec<u64>,
    /// The last micro-batch's encoder outputs `[n, D]`, where restarted codes are drawn from.
    pool: Option<Tensor<2>>,
    recon_sum: f64,
    micro_batches: usize,
    metrics: Vec<(&'static str, f64)>,
    /// The compute dtype (`train.mixed_precision`).
    dtype: DType,
}

impl VqvaeObjective {
    pub fn new(cfg: &VQVAEConfig, precision: MixedPrecision) -> Self {
        Self {
            dtype: compute_dtype(precision).into(),
            cfg: cfg.clone(),
            counts: vec![0; cfg.num_embeddings],
            pool: None,
            recon_sum: 0.0,
            micro_batches: 0,
            metrics: Vec::new(),
        }
    }
}

/// `exp(entropy)` of the code histogram (K when all codes are used equally, 1 when one code is
/// used), and the share of codes used at least once.
pub fn perplexity_and_usage(counts: &[u64]) -> (f64, f64) {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return (0.0, 0.0);
    }
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum();
    let used = counts.iter().filter(|&&c| c > 0).count();
    (entropy.exp(), used as f64 / counts.len() as f64)
}

/// Replaces the codebook rows of unused codes with rows of `pool` drawn by `rng`.
fn restart_dead_codes(
    model: VQVAE,
    counts: &[u64],
    pool: Tensor<2>,
    rng: &mut ChaCha8Rng,
) -> (VQVAE, usize) {
    let dead: Vec<usize> = (0..counts.len()).filter(|&k| counts[k] == 0).collect();
    if dead.is_empty() {
        return (model, 0);
    }
    let [n, d] = pool.dims();
    let pool: Vec<f32> = pool.into_data().convert::<f32>().try_to_vec().expect("f32");
    let mut model = model;
    let weight = model.quantize.embedding.weight;
    let mut table: Vec<f32> = weight
        .val()
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .expect("f32");
    for &k in &dead {
        let r = rng.random_range(0..n);
        table[k * d..(k + 1) * d].copy_from_slice(&pool[r * d..(r + 1) * d]);
    }
    let k = counts.len();
    model.quantize.embedding.weight = weight.map(|old| {
        let fresh = Tensor::<2>::from_data(TensorData::new(table, [k, d]), &old.device());
        if old.is_require_grad() {
            fresh.require_grad()
        } else {
            fresh
        }
    });
    (model, dead.len())
}

impl Objective for VqvaeObjective {
    type Model = VQVAE;

    fn build(&self, device: &Device) -> Result<VQVAE, TrainError> {
        Ok(self.cfg.init(device))
    }

    fn loss(
        &mut self,
        model: &VQVAE,
        batch: &Batch,
        _rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Tensor<1> {
        let v = &self.cfg;
        let x = Tensor::<4>::from_data(TensorData::new(batch.images.clone(), batch.shape), device);
        let (recon, q) = model.forward(as_dtype(x.clone(), self.dtype));
        let recon_loss = (to_f32(recon) - x).square().mean();
        self.recon_sum += recon_loss.clone().into_scalar::<f32>() as f64;
        self.micro_batches += 1;
        let indices: Vec<i64> = q
            .indices
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .expect("i64");
        for i in indices {
            self.counts[i as usize] += 1;
        }
        self.pool = Some(q.z_e_flat);
        recon_loss
            + q.embedding_loss.mul_scalar(v.embedding_cost)
            + q.commitment_loss.mul_scalar(v.commitment_cost)
    }

    fn after_step(&mut self, model: VQVAE, rng: &mut ChaCha8Rng) -> VQVAE {
        let (perplexity, usage) = perplexity_and_usage(&self.counts);
        let (model, restarted) = match (self.cfg.dead_code_restart, self.pool.take()) {
            (true, Some(pool)) => restart_dead_codes(model, &self.counts, pool, rng),
            _ => (model, 0),
        };
        self.metrics = vec![
            ("vq/perplexity", perplexity),
            ("vq/codes_in_use", usage),
            ("vq/restarted_codes", restarted as f64),
            (
                "vq/recon_mse",
                self.recon_sum / self.micro_batches.max(1) as f64,
            ),
        ];
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.recon_sum = 0.0;
        self.micro_batches = 0;
        model
    }

    fn metrics(&self) -> Vec<(&'static str, f64)> {
        self.metrics.clone()
    }

    /// Code counts, the reconstruction error and the restart pool. Counts and errors are summed
    /// over the ranks; the pool is rank 0's (zeros elsewhere), so every rank restarts the same
    /// codes with the same vectors and the replicas stay identical.
    fn local_stats(&mut self, main: bool) -> Vec<f32> {
        let mut stats: Vec<f32> = self.counts.iter().map(|&c| c as f32).collect();
        stats.push(self.recon_sum as f32);
        if let Some(pool) = &self.pool {
            let n = pool.dims().iter().product::<usize>();
            if main {
                let values = pool.clone().into_data().convert::<f32>();
                stats.extend(values.try_to_vec::<f32>().expect("f32 after convert"));
            } else {
                stats.extend(std::iter::repeat_n(0.0, n));
            }
        }
        stats
    }

    fn set_global_stats(&mut self, summed: &[f32], world: usize) {
        let k = self.counts.len();
        for (c, &v) in self.counts.iter_mut().zip(summed) {
            *c = v.round() as u64;
        }
        self.recon_sum = summed[k] as f64 / world as f64;
        if let Some(pool) = &self.pool {
            let dims = pool.dims();
            let values = summed[k + 1..].to_vec();
            self.pool = Some(Tensor::from_data(
                TensorData::new(values, dims),
                &pool.device(),
            ));
        }
    }
}

/// Mean squared reconstruction error of `images` (`[n, c, h, w]` host pixels).
pub fn reconstruction_mse(
    model: &VQVAE,
    images: &[f32],
    shape: [usize; 4],
    device: &Device,
) -> f64 {
    let x = Tensor::<4>::from_data(TensorData::new(images.to_vec(), shape), device);
    let (recon, _) = model.forward(x.clone());
    (recon - x).square().mean().into_scalar::<f32>() as f64
}

/// Stage 2: cross-entropy of the VQ-VAE's code maps under the Gated PixelCNN.
#[derive(Clone)]
pub struct PixelCnnObjective {
    cfg: GatedPixelCNNConfig,
    /// The frozen stage 1 and its codebook size.
    vqvae: VQVAE,
    num_codes: usize,
    /// The side of a code map.
    code_size: usize,
    device: Device,
    dtype: DType,
}

impl PixelCnnObjective {
    /// A prior over the codes `vqvae` (with `num_codes` entries) gives images of `resolution`
    /// pixels; the VQ-VAE stays frozen on `device` (in the compute dtype of `precision`).
    pub fn new(
        cfg: &GatedPixelCNNConfig,
        vqvae: VQVAE,
        num_codes: usize,
        resolution: usize,
        precision: MixedPrecision,
        device: &Device,
    ) -> Self {
        let dtype = compute_dtype(precision);
        Self {
            cfg: cfg.clone(),
            vqvae: hold_frozen(vqvae, dtype),
            dtype: dtype.into(),
            num_codes,
            code_size: VQVAEConfig::code_size(resolution),
            device: device.clone(),
        }
    }
}

/// Encodes host images to code maps with a frozen VQ-VAE.
fn encode(
    vqvae: &VQVAE,
    images: &[f32],
    shape: [usize; 4],
    dtype: DType,
    device: &Device,
) -> Vec<i64> {
    let x = Tensor::<4>::from_data(TensorData::new(images.to_vec(), shape), device).cast(dtype);
    vqvae
        .encode(x)
        .into_data()
        .convert::<i64>()
        .try_to_vec()
        .expect("i64")
}

impl Objective for PixelCnnObjective {
    type Model = GatedPixelCNN;

    fn place(&mut self, device: &Device) {
        self.vqvae = self.vqvae.clone().to_device(device);
        self.device = device.clone();
    }

    fn build(&self, device: &Device) -> Result<GatedPixelCNN, TrainError> {
        Ok(self.cfg.init(self.num_codes, device))
    }

    fn loss(
        &mut self,
        model: &GatedPixelCNN,
        batch: &Batch,
        _rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Tensor<1> {
        let codes = encode(
            &self.vqvae,
            &batch.images,
            batch.shape,
            self.dtype,
            &self.device,
        );
        let s = self.code_size;
        let codes =
            Tensor::<3, Int>::from_data(TensorData::new(codes, [batch.shape[0], s, s]), device);
        model.loss(codes, self.dtype)
    }
}
