//! Pipelines in diffusers' sense: each family's whole path from a config or a saved run to
//! images and files — train it, locate and load a run or an export, generate, export.
//!
//! This is the one place that maps a model [`Family`] to its code (exhaustive matches: a new
//! family is a compile error until it is wired here) and that knows where an export keeps its
//! weights. The binaries only parse arguments and call into here.

pub mod autoencoder;
pub mod chain;
pub mod ddpm;
pub mod latent_cache;
pub mod ldm;
pub mod lora;
pub mod stable_diffusion;
pub mod text_to_image;
pub mod vq;

use std::path::{Path, PathBuf};

use burn::module::Module;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::checkpoint;
use crate::config::Config;
use crate::data::Dataset;
use crate::device::parse_device;
use crate::diffusion::sampling::SamplerKind;
use crate::io;
use crate::io::image::Grid;
use crate::models::{Architecture, Family};
use crate::train::objectives::diffusion::build_model;
use crate::train::{Outputs, RunSummary, TrainError, TrainOptions, TrainOutcome, train_with};

/// What can go wrong in a pipeline beyond training itself.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Pretrained(#[from] stable_diffusion::PretrainedError),
    #[error(transparent)]
    Generate(#[from] text_to_image::GenerateError),
    #[error(transparent)]
    Io(#[from] crate::io::IoError),
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error(transparent)]
    Text(#[from] crate::models::text_encoders::TextError),
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    #[error(transparent)]
    Memory(#[from] crate::memory::DoesNotFit),
    #[error("{0}")]
    Invalid(String),
}

/// Writes `model`'s weights (PyTorch's names) to `path` with the metadata diffusers expects.
pub(crate) fn save_weights<M: Module>(model: &M, path: &Path) -> Result<(), TrainError> {
    io::safetensors::save_module(path, model, None, &io::layout::pt_metadata())?;
    Ok(())
}

/// A fixed batch for reconstruction grids: the dataset's first `sample.num_images` images,
/// transformed without flips.
pub(crate) fn fixed_batch(
    cfg: &Config,
    dataset: &Dataset,
) -> Result<(Vec<f32>, [usize; 4]), TrainError> {
    let n = cfg.sample.num_images.min(dataset.len()).max(1);
    let indices: Vec<usize> = (0..n).collect();
    let transform = cfg.data.transform().without_flip();
    Ok(transform.batch(dataset, &indices, &mut ChaCha8Rng::seed_from_u64(0))?)
}

/// `input | reconstruction` pairs, four pairs to a row.
pub(crate) fn pairs_grid(images: &[f32], shape: [usize; 4], recon: &[f32]) -> Grid {
    let [n, c, h, w] = shape;
    let per = c * h * w;
    let mut out = Vec::with_capacity(2 * n * per);
    for i in 0..n {
        out.extend_from_slice(&images[i * per..(i + 1) * per]);
        out.extend_from_slice(&recon[i * per..(i + 1) * per]);
    }
    Grid {
        images: out,
        shape: [2 * n, c, h, w],
        columns: 2 * n.min(4),
    }
}

/// A family's [`Outputs`] with the bookkeeping every export has: the resolved run config
/// (`difftrain.toml`, what `sample` reads) and `export.json` (the step, so `sample` can tell the
/// export from newer checkpoints).
pub(crate) struct Exporting<P> {
    cfg: Config,
    outputs: P,
}

impl<M, P: Outputs<M>> Outputs<M> for Exporting<P> {
    fn prepare(&mut self, dataset: &Dataset) -> Result<(), TrainError> {
        self.outputs.prepare(dataset)
    }

    fn grid(&self, weights: &M, device: &burn::prelude::Device) -> Result<Grid, TrainError> {
        self.outputs.grid(weights, device)
    }

    fn export(&self, weights: &M, raw: Option<&M>, dir: &Path) -> Result<(), TrainError> {
        self.outputs.export(weights, raw, dir)
    }

    fn export_at(
        &self,
        weights: &M,
        raw: Option<&M>,
        dir: &Path,
        step: usize,
    ) -> Result<(), TrainError> {
        self.outputs.export(weights, raw, dir)?;
        io::write_atomic(
            &dir.join(checkpoint::CONFIG_FILE),
            self.cfg.to_toml().as_bytes(),
        )?;
        io::write_json(
            &dir.join(crate::train::EXPORT_STEP_FILE),
            &serde_json::json!({ "step": step }),
        )?;
        Ok(())
    }
}

/// [`train_with`] for a family's pipeline: `outputs` export with the run's bookkeeping.
pub(crate) fn train_run<O, P>(
    cfg: &Config,
    opts: &TrainOptions,
    objective: O,
    outputs: P,
) -> Result<TrainOutcome<O::Model>, TrainError>
where
    O: crate::train::Objective + Clone + Send,
    O::Model: Send,
    P: Outputs<O::Model> + Send,
{
    let outputs = Exporting {
        cfg: cfg.clone(),
        outputs,
    };
    train_with(cfg, opts, objective, outputs)
}

/// Trains the model family `cfg.model.architecture` names.
pub fn train(cfg: &Config, opts: &TrainOptions) -> Result<RunSummary, TrainError> {
    // In a multi-process launch: this process's device, and the others learn of a failure
    // here (e.g. while rank 0 builds a cache they wait for) instead of timing out.
    let cfg = &for_this_process(cfg)?;
    let result = train_family(cfg, opts);
    if let (Err(e), Some(p)) = (&result, crate::distributed::launch::current())
        && e.stop_signal().is_none()
        && !matches!(e, TrainError::Sync(s) if s.is_secondary())
    {
        p.fail(&crate::error::chain(e));
    }
    result
}

/// `cfg` for this process: in a multi-process launch that has met, `run.device` becomes this
/// process's device (every training stage of a chained config goes through here).
fn for_this_process(cfg: &Config) -> Result<Config, TrainError> {
    let mut cfg = cfg.clone();
    if let Some(env) = crate::distributed::launch::joined() {
        cfg.run.device = env
            .device_for(&cfg.run.device, cfg.run.devices.as_ref())
            .map_err(TrainError::Launch)?;
        cfg.run.devices = None;
    }
    Ok(cfg)
}

fn train_family(cfg: &Config, opts: &TrainOptions) -> Result<RunSummary, TrainError> {
    Ok(match cfg.model.architecture.family() {
        Family::Diffusion => ddpm::train(cfg, opts)?.summary,
        Family::Vqvae => vq::train_vqvae(cfg, opts)?.summary,
        Family::PixelCnn => vq::train_pixelcnn(cfg, opts)?.summary,
        Family::Autoencoder => autoencoder::train_autoencoder(cfg, opts)?.summary,
        Family::LatentDiffusion => ldm::train_ldm(cfg, opts)?.summary,
        Family::Lora => lora::train_lora(cfg, opts)?.summary,
    })
}

/// Where an export keeps the weights of the run `model` describes:
/// `<dir>/<folder><suffix>/<file>`, with `suffix` "" (the EMA weights when EMA was on) or
/// "_no_ema" (the training weights). Latent diffusion keeps them in its backbone's folder.
pub fn weights_file(model: &crate::config::ModelConfig, dir: &Path, suffix: &str) -> PathBuf {
    match model.architecture {
        Architecture::LatentDiffusion => io::layout::weights_path(
            dir,
            &format!("{}{suffix}", model.ldm.backbone.component()),
            io::layout::DIFFUSERS_WEIGHTS,
        ),
        a => stage_weights_file(a, dir, suffix),
    }
}

/// [`weights_file`] for an architecture whose layout is fixed: every one but latent diffusion
/// (asked for that, it answers for a U-Net backbone).
pub fn stage_weights_file(architecture: Architecture, dir: &Path, suffix: &str) -> PathBuf {
    use io::layout::{DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS};
    let (folder, file) = match architecture {
        Architecture::Unet2d => ("unet", DIFFUSERS_WEIGHTS),
        Architecture::TutorialUnet => ("tutorial_unet", TRANSFORMERS_WEIGHTS),
        Architecture::Vqvae => ("vqvae", TRANSFORMERS_WEIGHTS),
        Architecture::GatedPixelcnn => ("pixelcnn", TRANSFORMERS_WEIGHTS),
        Architecture::AutoencoderKl => ("vae", DIFFUSERS_WEIGHTS),
        Architecture::LatentDiffusion => ("unet", DIFFUSERS_WEIGHTS),
        Architecture::SdLora => return dir.join(lora::DIFFUSERS_FILE),
    };
    io::layout::weights_path(dir, &format!("{folder}{suffix}"), file)
}

/// The folder holding a run's `difftrain.toml`, and the weights file when it is a checkpoint:
/// `dir` may be a `checkpoint-<N>` directory (its EMA weights when it has them), an export
/// folder, or a run's output_dir (its `export/`, else the checkpoint `latest` names).
pub fn locate(dir: &Path) -> Result<(PathBuf, Option<PathBuf>), TrainError> {
    let from_checkpoint = |ck: &Path| -> Result<(PathBuf, Option<PathBuf>), TrainError> {
        // Sizes and checksums are verified before the files are trusted.
        checkpoint::read_verified(ck)?;
        let ema = ck.join(checkpoint::EMA_FILE);
        let weights = if ema.is_file() {
            ema
        } else {
            ck.join(checkpoint::MODEL_FILE)
        };
        Ok((ck.to_path_buf(), Some(weights)))
    };
    if dir.join(checkpoint::STATE_FILE).is_file() {
        return from_checkpoint(dir);
    }
    if dir.join(checkpoint::CONFIG_FILE).is_file() {
        return Ok((dir.to_path_buf(), None));
    }
    let export = dir.join("export");
    if export.join(checkpoint::CONFIG_FILE).is_file() {
        // A run's newest weights: its export, unless a later checkpoint exists (a run continued
        // past its export and stopped) or the export cannot be read.
        if let Some((step, ck)) = checkpoint::read_latest(dir) {
            let export_step = std::fs::read_to_string(export.join(crate::train::EXPORT_STEP_FILE))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["step"].as_u64());
            let newer = match export_step {
                Some(e) => step as u64 > e,
                // An export from before export.json: compare modification times.
                None => {
                    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
                    mtime(&ck.join(checkpoint::STATE_FILE))
                        > mtime(&export.join(checkpoint::CONFIG_FILE))
                }
            };
            if newer {
                eprintln!(
                    "note: {} is newer than {}{}; using it",
                    ck.display(),
                    export.display(),
                    export_step
                        .map(|e| format!(" (step {e})"))
                        .unwrap_or_default()
                );
                return from_checkpoint(&ck);
            }
        }
        return Ok((export, None));
    }
    if let Some((_, ck)) = checkpoint::read_latest(dir) {
        return from_checkpoint(&ck);
    }
    Err(TrainError::NotARun(dir.to_path_buf()))
}

/// Loads a run's config and weights from anything [`locate`] accepts.
pub fn load_run<M: Module>(
    dir: &Path,
    overrides: &[String],
    build: impl FnOnce(&Config) -> Result<M, TrainError>,
) -> Result<(Config, M, PathBuf), TrainError> {
    let (root, weights) = locate(dir)?;
    let cfg = Config::load(&root.join(checkpoint::CONFIG_FILE), overrides)?;
    let (model, weights) = load_weights(&cfg, &root, weights, build)?;
    Ok((cfg, model, weights))
}

/// The weights [`locate`] found under `root` (`weights`, or the export layout of `cfg`), loaded
/// strictly into the model `build` makes. Returns the file read.
pub fn load_weights<M: Module>(
    cfg: &Config,
    root: &Path,
    weights: Option<PathBuf>,
    build: impl FnOnce(&Config) -> Result<M, TrainError>,
) -> Result<(M, PathBuf), TrainError> {
    let weights = weights.unwrap_or_else(|| weights_file(&cfg.model, root, ""));
    let model = io::safetensors::load_file(build(cfg)?, &weights)?;
    Ok((model, weights))
}

/// What `sample` asks of a trained run or a pretrained model.
#[derive(Debug, Clone, Default)]
pub struct SampleRequest {
    /// Images (default 16 for runs, 1 for text-to-image).
    pub num: Option<usize>,
    /// Inference steps (default: the run's `sample.num_inference_steps`; 50 for pretrained).
    pub steps: Option<usize>,
    pub sampler: Option<SamplerKind>,
    pub seed: u64,
    /// PixelCNN priors: divide logits by this (default: the run's `sample.temperature`).
    pub temperature: Option<f64>,
    /// Overrides the device the run used (pretrained models: default `cpu`).
    pub device: Option<String>,
    /// Text-to-image: the prompt, negative prompt, guidance, clip skip, size, initial latents
    /// (a safetensors file with one f32 tensor `latents`), and the folder a single-file
    /// checkpoint takes its tokenizer and configs from.
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub guidance_scale: Option<f64>,
    pub clip_skip: Option<usize>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub latents: Option<PathBuf>,
    pub config_from: Option<PathBuf>,
    /// Class-conditioned latent diffusion: the class to generate.
    pub class: Option<usize>,
    /// Text-to-image: LoRA files folded in at these scales (`--lora FILE[:SCALE]`).
    pub loras: Vec<(PathBuf, f64)>,
    /// Images generated at once (default [`DEFAULT_SAMPLE_BATCH`]); more are made in batches.
    pub batch_size: Option<usize>,
}

/// A model loaded for `sample`: the images it generates and where its weights came from.
pub struct Loaded {
    pub weights: PathBuf,
    /// `[c, h, w]` of one image.
    pub image: [usize; 3],
    /// Images the request asks for (its `--num`, else the model's default).
    pub num: usize,
    /// Whether the request fixes its initial noise (`--latents`): then one batch.
    pub fixed_latents: bool,
    /// Images `first..first + n` of the request (each from its own random stream: `seeds`).
    generate: Box<dyn FnMut(usize, usize) -> Result<Grid, PipelineError>>,
}

impl Loaded {
    pub(crate) fn new(
        weights: PathBuf,
        image: [usize; 3],
        num: usize,
        fixed_latents: bool,
        generate: impl FnMut(usize, usize) -> Result<Grid, PipelineError> + 'static,
    ) -> Self {
        Self {
            weights,
            image,
            num,
            fixed_latents,
            generate: Box::new(generate),
        }
    }
}

/// Generates images from a run, an export, a checkpoint, or a pretrained Stable Diffusion model
/// (folder or single file); returns them as one grid and the weights used. The images are
/// held in memory: refused up front when they cannot fit.
pub fn sample(dir: &Path, req: &SampleRequest) -> Result<(Grid, PathBuf), PipelineError> {
    let mut images = Vec::new();
    let mut shape = [0usize; 4];
    let weights = sample_batches(dir, req, true, |grid, _| {
        shape = [
            shape[0] + grid.shape[0],
            grid.shape[1],
            grid.shape[2],
            grid.shape[3],
        ];
        images.extend(grid.images);
        Ok(())
    })?;
    Ok((Grid::square(images, shape), weights))
}

/// Generates the request's images in batches of `--batch-size` (one batch with `--latents`),
/// handing each to `each` with the index of its first image; the model is loaded once.
/// `in_memory` says the caller keeps every image (a grid): refused before generating when they
/// cannot fit. Returns the weights used. A run whose `export/` cannot be read falls back to its
/// newest checkpoint, with a warning.
pub fn sample_batches(
    dir: &Path,
    req: &SampleRequest,
    in_memory: bool,
    mut each: impl FnMut(Grid, usize) -> Result<(), PipelineError>,
) -> Result<PathBuf, PipelineError> {
    let mut loaded = load_for_sampling(dir, req)?;
    let (num, [c, h, w]) = (loaded.num, loaded.image);
    if num == 0 {
        return Err(PipelineError::Invalid("--num must be at least 1".into()));
    }
    if in_memory {
        let bytes = (num as u64) * (c * h * w) as u64 * 4;
        crate::memory::check_fits(bytes, &format!("--num {num} images of [{c}, {h}, {w}]"))?;
    }
    let batch = match loaded.fixed_latents {
        true => num,
        false => req.batch_size.unwrap_or(DEFAULT_SAMPLE_BATCH).max(1),
    };
    let mut first = 0;
    while first < num {
        let n = batch.min(num - first);
        let grid = (loaded.generate)(first, n)?;
        each(grid, first)?;
        first += n;
    }
    Ok(loaded.weights)
}

/// `sample`'s default `--batch-size`.
pub const DEFAULT_SAMPLE_BATCH: usize = 64;

fn load_for_sampling(dir: &Path, req: &SampleRequest) -> Result<Loaded, PipelineError> {
    let result = load_sampler(dir, req);
    let unreadable = matches!(
        &result,
        Err(PipelineError::Io(_))
            | Err(PipelineError::Train(
                TrainError::Io(_) | TrainError::Config(_)
            ))
            | Err(PipelineError::Pretrained(_))
    );
    if unreadable
        && dir.join("export").is_dir()
        && let Some((_, ck)) = checkpoint::read_latest(dir)
        && checkpoint::read_verified(&ck).is_ok()
    {
        if let Err(e) = &result {
            eprintln!(
                "warning: {}: {}; using {} instead",
                dir.join("export").display(),
                crate::error::chain(e),
                ck.display()
            );
        }
        return load_sampler(&ck, req);
    }
    result
}

fn load_sampler(dir: &Path, req: &SampleRequest) -> Result<Loaded, PipelineError> {
    if stable_diffusion::Pretrained::looks_like(dir) {
        return text_to_image::load_pretrained(dir, req);
    }
    let bad = |msg: String| Err(PipelineError::Invalid(msg));
    let num = req.num.unwrap_or(16);
    let overrides: Vec<String> = req
        .device
        .iter()
        .map(|d| format!("run.device={d}"))
        .collect();
    // Located (and a checkpoint verified) once; the config decides how to load the weights.
    let (root, weights) = locate(dir)?;
    let cfg =
        Config::load(&root.join(checkpoint::CONFIG_FILE), &overrides).map_err(TrainError::from)?;
    let device = parse_device(&cfg.run.device)?;
    let res = cfg.data.resolution;
    let family = cfg.model.architecture.family();
    if !req.loras.is_empty() && family != Family::Lora && family != Family::LatentDiffusion {
        return bad(format!(
            "--lora applies to Stable Diffusion models, LoRA runs and text-conditioned latent \
             diffusion exports, not {}",
            dir.display()
        ));
    }
    if !matches!(family, Family::LatentDiffusion | Family::Lora) {
        if req.prompt.is_some() || req.negative_prompt.is_some() {
            return bad(format!(
                "{} is not a text-conditioned model: --prompt applies to Stable Diffusion and \
                 text-conditioned latent diffusion models",
                dir.display()
            ));
        }
        if req.class.is_some() {
            return bad(format!(
                "{} is not a class-conditioned model: --class applies to class-conditioned \
                 latent diffusion models",
                dir.display()
            ));
        }
    }
    let image = [cfg.image_channels(), res, res];
    match family {
        Family::Diffusion => {
            let (model, weights) = load_weights(&cfg, &root, weights, |c| build_model(c, &device))?;
            if let Some(steps) = req.steps
                && (steps == 0 || steps > cfg.diffusion.num_train_timesteps)
            {
                return bad(format!(
                    "--steps {steps} must be in 1..={}",
                    cfg.diffusion.num_train_timesteps
                ));
            }
            let (steps, sampler, seed) = (req.steps, req.sampler, req.seed);
            Ok(Loaded::new(weights, image, num, false, move |first, n| {
                let (images, shape) =
                    ddpm::generate(&model, &cfg, &device, n, steps, sampler, (seed, first));
                Ok(Grid::square(images, shape))
            }))
        }
        Family::PixelCnn => {
            let stage1 = vq::load_stage1(&cfg, Some(&root), &device)?;
            let k = stage1.cfg.model.vqvae.num_embeddings;
            let (prior, weights) = load_weights(&cfg, &root, weights, |c| {
                Ok(c.model.pixelcnn.init(k, &device))
            })?;
            let temperature = req.temperature.unwrap_or(cfg.sample.temperature);
            if !(temperature.is_finite() && temperature > 0.0) {
                return bad(format!("--temperature {temperature} must be positive"));
            }
            let seed = req.seed;
            Ok(Loaded::new(weights, image, num, false, move |first, n| {
                let images = vq::sample_images(
                    &prior,
                    &stage1.model,
                    res,
                    n,
                    temperature,
                    (seed, first),
                    &device,
                );
                Ok(Grid::square(images, [n, image[0], res, res]))
            }))
        }
        Family::LatentDiffusion => {
            if weights.is_none() && root.join(io::layout::MODEL_INDEX).is_file() {
                // A text-conditioned KL export is a Stable Diffusion folder.
                let mut req = req.clone();
                req.num.get_or_insert(num);
                req.steps.get_or_insert(cfg.sample.num_inference_steps);
                req.guidance_scale.get_or_insert(cfg.sample.guidance_scale);
                req.device.get_or_insert(cfg.run.device.clone());
                return text_to_image::load_pretrained(&root, &req);
            }
            let weights_path = weights
                .clone()
                .unwrap_or_else(|| weights_file(&cfg.model, &root, ""));
            ldm::load_sampler(cfg, &root, weights.as_deref(), req, device, weights_path)
        }
        Family::Lora => {
            if req.class.is_some() {
                return bad(format!(
                    "{} is a text-to-image LoRA run: --class does not apply",
                    dir.display()
                ));
            }
            let sd = lora::load_adapted(&cfg, &root, weights.as_deref(), &device)?;
            let mut req = req.clone();
            req.num.get_or_insert(num);
            req.steps.get_or_insert(cfg.sample.num_inference_steps);
            req.guidance_scale.get_or_insert(cfg.sample.guidance_scale);
            req.width.get_or_insert(res);
            req.height.get_or_insert(res);
            let weights = weights.unwrap_or_else(|| root.join(lora::DIFFUSERS_FILE));
            text_to_image::load_with(sd, &req, device, weights)
        }
        Family::Autoencoder => bad(format!(
            "{} is an autoencoder (latent diffusion stage 1): it reconstructs but does not \
             sample on its own. Train a latent diffusion U-Net on it (configs/ldm_quickstart.toml) \
             and sample from that run",
            dir.display()
        )),
        Family::Vqvae => bad(format!(
            "{} is a VQ-VAE (stage 1): it reconstructs but does not sample on its own. Train a \
             PixelCNN prior on it (configs/pixelcnn_quickstart.toml) and sample from that run",
            dir.display()
        )),
    }
}
