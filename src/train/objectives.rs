//! The model families as [`Objective`]s: diffusion denoisers, the VQ-VAE (stage 1) and the
//! Gated PixelCNN prior over its codes (stage 2).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{
    Objective, TrainError, TrainOptions, build_model, diffusion_loss, diffusion_split_grads,
    export, generate, grid_columns, load_run, locate, make_device, noise_schedule,
};
use crate::config::{Config, Resume};
use crate::data::{Batch, Dataset, Transform};
use crate::diffusion::schedule::NoiseSchedule;
use crate::io;
use crate::models::DenoiserModel;
use crate::models::pixelcnn::GatedPixelCNN;
use crate::models::vqvae::VQVAE;

fn host(t: Tensor<4>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 after convert")
}

fn save_weights<M: Module>(model: &M, path: &Path) -> Result<(), TrainError> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    io::save_safetensors(path, &io::named_tensors(model), &meta)?;
    Ok(())
}

/// `<dir>/<name>/model.safetensors`, plus `<dir>/<name>_no_ema/` for the training weights.
fn export_pair<M: Module>(
    name: &str,
    weights: &M,
    raw: Option<&M>,
    dir: &Path,
) -> Result<(), TrainError> {
    save_weights(weights, &dir.join(name).join("model.safetensors"))?;
    if let Some(raw) = raw {
        save_weights(
            raw,
            &dir.join(format!("{name}_no_ema")).join("model.safetensors"),
        )?;
    }
    Ok(())
}

/// DDPM-style training of a denoiser: noise, timesteps, the (weighted) MSE to the target.
#[derive(Clone)]
pub struct DiffusionObjective {
    cfg: Config,
    schedule: NoiseSchedule,
}

impl DiffusionObjective {
    pub fn new(cfg: &Config) -> Self {
        Self {
            cfg: cfg.clone(),
            schedule: noise_schedule(cfg),
        }
    }
}

impl Objective for DiffusionObjective {
    type Model = DenoiserModel;

    fn build(&self, device: &Device) -> DenoiserModel {
        build_model(&self.cfg, device)
    }

    fn loss(
        &mut self,
        model: &DenoiserModel,
        batch: &Batch,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Tensor<1> {
        diffusion_loss(model, &self.cfg, &self.schedule, batch, rng, device)
    }

    fn split_grads(
        &mut self,
        model: &DenoiserModel,
        batch: &Batch,
        parts: usize,
        scale: f64,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Option<(burn::optim::GradientsParams, f64)> {
        Some(diffusion_split_grads(
            model,
            &self.cfg,
            &self.schedule,
            batch,
            parts,
            scale,
            rng,
            device,
        ))
    }

    fn grid(&self, weights: &DenoiserModel, device: &Device) -> (Vec<f32>, [usize; 4], usize) {
        let s = &self.cfg.sample;
        let (images, shape) =
            generate(weights, &self.cfg, device, s.num_images, None, None, s.seed);
        (images, shape, grid_columns(shape[0]))
    }

    fn export(
        &self,
        weights: &DenoiserModel,
        raw: Option<&DenoiserModel>,
        dir: &Path,
    ) -> Result<(), TrainError> {
        export(weights, raw, &self.cfg, dir).map(|_| ())
    }
}

/// Stage 1: reconstruction MSE + `embedding_cost * ||sg(z_e) - z_q||^2`
/// + `commitment_cost * ||z_e - sg(z_q)||^2`, with optional dead-code restarts.
#[derive(Clone)]
pub struct VqvaeObjective {
    cfg: Config,
    /// A fixed batch (the first images, unflipped) for the reconstruction grid.
    fixed: Option<(Vec<f32>, [usize; 4])>,
    /// Code usage over the current optimizer step's micro-batches.
    counts: Vec<u64>,
    /// The last micro-batch's encoder outputs `[n, D]`, where restarted codes are drawn from.
    pool: Option<Tensor<2>>,
    recon_sum: f64,
    micro_batches: usize,
    metrics: Vec<(&'static str, f64)>,
}

impl VqvaeObjective {
    pub fn new(cfg: &Config) -> Self {
        Self {
            cfg: cfg.clone(),
            fixed: None,
            counts: vec![0; cfg.model.vqvae.num_embeddings],
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

    fn prepare(&mut self, dataset: &Dataset) -> Result<(), TrainError> {
        let d = &self.cfg.data;
        let transform = Transform {
            resolution: d.resolution,
            color: d.color,
            crop: d.crop,
            random_flip: false,
        };
        let n = self.cfg.sample.num_images.min(dataset.len()).max(1);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut images = Vec::new();
        for i in 0..n {
            images.extend(transform.apply(dataset.decode(i)?, &mut rng));
        }
        self.fixed = Some((
            images,
            [n, transform.channels(), d.resolution, d.resolution],
        ));
        Ok(())
    }

    fn build(&self, device: &Device) -> VQVAE {
        self.cfg.model.vqvae.init(device)
    }

    fn loss(
        &mut self,
        model: &VQVAE,
        batch: &Batch,
        _rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Tensor<1> {
        let v = &self.cfg.model.vqvae;
        let x = Tensor::<4>::from_data(TensorData::new(batch.images.clone(), batch.shape), device);
        let (recon, q) = model.forward(x.clone());
        let recon_loss = (recon - x).square().mean();
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
        let (model, restarted) = match (self.cfg.model.vqvae.dead_code_restart, self.pool.take()) {
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

    /// Pairs `input | reconstruction`, four pairs to a row.
    fn grid(&self, weights: &VQVAE, device: &Device) -> (Vec<f32>, [usize; 4], usize) {
        let Some((images, shape)) = &self.fixed else {
            return (Vec::new(), [0, 1, 1, 1], 1);
        };
        let [n, c, h, w] = *shape;
        let x = Tensor::<4>::from_data(TensorData::new(images.clone(), *shape), device);
        let (recon, _) = weights.forward(x);
        let recon = host(recon.clamp(-1.0, 1.0));
        let per = c * h * w;
        let mut out = Vec::with_capacity(2 * n * per);
        for i in 0..n {
            out.extend_from_slice(&images[i * per..(i + 1) * per]);
            out.extend_from_slice(&recon[i * per..(i + 1) * per]);
        }
        (out, [2 * n, c, h, w], 2 * n.min(4))
    }

    fn export(&self, weights: &VQVAE, raw: Option<&VQVAE>, dir: &Path) -> Result<(), TrainError> {
        export_pair("vqvae", weights, raw, dir)
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

/// A trained VQ-VAE with the config it was trained with.
#[derive(Clone)]
pub struct Stage1 {
    pub cfg: Config,
    pub model: VQVAE,
    pub weights: PathBuf,
}

/// The file a PixelCNN export stores its VQ-VAE's config in (weights in `vqvae/`).
pub const STAGE1_CONFIG: &str = "vqvae.toml";

/// Loads the VQ-VAE a PixelCNN run builds on: from `dir` when it is a PixelCNN export that
/// carries its own copy, else from `cfg.model.pixelcnn.vqvae`.
pub fn load_stage1(
    cfg: &Config,
    dir: Option<&Path>,
    device: &Device,
) -> Result<Stage1, TrainError> {
    let build = |c: &Config| c.model.vqvae.init(device);
    let (stage_cfg, model, weights) = match dir.filter(|d| d.join(STAGE1_CONFIG).is_file()) {
        Some(d) => {
            let stage_cfg = Config::load(&d.join(STAGE1_CONFIG), &[])?;
            let weights = d.join("vqvae/model.safetensors");
            let tensors = io::load_safetensors(&weights)?;
            let model = io::load_into(build(&stage_cfg), &tensors, &weights)?;
            (stage_cfg, model, weights)
        }
        None => load_run(&cfg.model.pixelcnn.vqvae, &[], build)?,
    };
    if stage_cfg.model.architecture != crate::models::Architecture::Vqvae {
        return Err(TrainError::Stage(format!(
            "model.pixelcnn.vqvae = {}: that run is a {:?}, not a VQ-VAE",
            cfg.model.pixelcnn.vqvae.display(),
            stage_cfg.model.architecture
        )));
    }
    Ok(Stage1 {
        cfg: stage_cfg,
        model,
        weights,
    })
}

/// Stage 2: cross-entropy of the VQ-VAE's code maps under the Gated PixelCNN.
#[derive(Clone)]
pub struct PixelCnnObjective {
    cfg: Config,
    stage1: Stage1,
    device: Device,
}

impl PixelCnnObjective {
    /// Loads stage 1 (training it first when `model.pixelcnn.vqvae_config` is set and its
    /// output holds no weights yet) and checks that the data agree.
    pub fn new(cfg: &Config, opts: &TrainOptions) -> Result<Self, TrainError> {
        let p = &cfg.model.pixelcnn;
        if let (Err(_), Some(stage_path)) = (locate(&p.vqvae), &p.vqvae_config) {
            let mut stage_cfg = Config::load(stage_path, &[])?;
            stage_cfg.checkpoint.resume = Resume::Latest;
            if !opts.quiet {
                eprintln!(
                    "stage 1: {} holds no VQ-VAE yet; training it from {}",
                    p.vqvae.display(),
                    stage_path.display()
                );
            }
            super::train(&stage_cfg, opts)?;
            if !opts.quiet {
                eprintln!("stage 2: training the PixelCNN prior");
            }
        }
        let device = make_device(&cfg.run.device)?;
        let stage1 = load_stage1(cfg, None, &device)?;
        let (a, b) = (&stage1.cfg.data, &cfg.data);
        if (a.resolution, a.color) != (b.resolution, b.color) {
            return Err(TrainError::Stage(format!(
                "the VQ-VAE at {} was trained on {:?} images at {}px, this config has {:?} at {}px; \
                 data.resolution and data.color must match",
                cfg.model.pixelcnn.vqvae.display(),
                a.color,
                a.resolution,
                b.color,
                b.resolution
            )));
        }
        Ok(Self {
            cfg: cfg.clone(),
            stage1,
            device,
        })
    }

    fn code_size(&self) -> usize {
        self.cfg.data.resolution / 4
    }
}

/// Encodes host images to code maps with a frozen VQ-VAE.
fn encode(vqvae: &VQVAE, images: &[f32], shape: [usize; 4], device: &Device) -> Vec<i64> {
    let x = Tensor::<4>::from_data(TensorData::new(images.to_vec(), shape), device);
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
        self.stage1.model = self.stage1.model.clone().to_device(device);
        self.device = device.clone();
    }

    fn build(&self, device: &Device) -> GatedPixelCNN {
        self.cfg
            .model
            .pixelcnn
            .init(self.stage1.cfg.model.vqvae.num_embeddings, device)
    }

    fn loss(
        &mut self,
        model: &GatedPixelCNN,
        batch: &Batch,
        _rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Tensor<1> {
        let codes = encode(&self.stage1.model, &batch.images, batch.shape, &self.device);
        let s = self.code_size();
        let codes =
            Tensor::<3, Int>::from_data(TensorData::new(codes, [batch.shape[0], s, s]), device);
        model.loss(codes)
    }

    fn grid(&self, weights: &GatedPixelCNN, device: &Device) -> (Vec<f32>, [usize; 4], usize) {
        let s = &self.cfg.sample;
        let images = sample_images(
            weights,
            &self.stage1.model,
            self.code_size(),
            s.num_images,
            s.temperature,
            s.seed,
            device,
        );
        let n = s.num_images;
        let res = self.cfg.data.resolution;
        (
            images,
            [n, self.cfg.image_channels(), res, res],
            grid_columns(n),
        )
    }

    /// `pixelcnn/` (and `pixelcnn_no_ema/`) plus a copy of the VQ-VAE (`vqvae/`, `vqvae.toml`),
    /// so the export samples on its own.
    fn export(
        &self,
        weights: &GatedPixelCNN,
        raw: Option<&GatedPixelCNN>,
        dir: &Path,
    ) -> Result<(), TrainError> {
        export_pair("pixelcnn", weights, raw, dir)?;
        save_weights(&self.stage1.model, &dir.join("vqvae/model.safetensors"))?;
        io::write_atomic(
            &dir.join(STAGE1_CONFIG),
            self.stage1.cfg.to_toml().as_bytes(),
        )?;
        Ok(())
    }
}

/// Samples `num` code maps autoregressively with `temperature` and decodes them.
pub fn sample_images(
    prior: &GatedPixelCNN,
    vqvae: &VQVAE,
    code_size: usize,
    num: usize,
    temperature: f64,
    seed: u64,
    device: &Device,
) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let codes = prior.sample(num, code_size, code_size, temperature, &mut rng, device);
    host(vqvae.decode(codes).clamp(-1.0, 1.0))
}
