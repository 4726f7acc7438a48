//! Text-to-image with a Stable Diffusion model, as diffusers' `StableDiffusionPipeline.__call__`:
//! encode the prompt and the negative prompt, start from seeded (or given) latents, denoise with
//! the chosen sampler under classifier-free guidance, decode `latents / scaling_factor` with the
//! VAE.

use burn::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::stable_diffusion::{self, Pretrained, StableDiffusion};
use crate::device::parse_device;
use crate::diffusion::guidance::Guided;
use crate::diffusion::sampling::{self, SamplerKind};
use crate::diffusion::scheduler_config::SchedulerConfig;
use crate::io::image::Grid;
use crate::io::safetensors::SafetensorsFile;
use crate::models::unet_2d_condition::UNet2DConditionModel;
use crate::tokenizer::{ClipTokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{0}")]
    Invalid(String),
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct TextToImage {
    pub prompt: String,
    /// The unconditional branch of guidance ("" when not given, as in diffusers).
    pub negative_prompt: String,
    pub guidance_scale: f64,
    pub steps: usize,
    /// Default: the model's scheduler.
    pub sampler: Option<SamplerKind>,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub num: usize,
    /// Initial latents `[num, C, height / f, width / f]` (diffusers' `latents=`); seeded noise
    /// when `None`.
    pub latents: Option<Tensor<4>>,
    /// 1 = the text encoder's last layer (see `CLIPTextModel::forward`).
    pub clip_skip: usize,
}

/// Token ids of `prompts` for `tokenizer`, `[n, max_length]`.
pub fn token_ids(
    tokenizer: &ClipTokenizer,
    prompts: &[&str],
    device: &Device,
) -> Result<Tensor<2, Int>, TokenizerError> {
    let len = tokenizer.max_length;
    let mut ids = Vec::with_capacity(prompts.len() * len);
    for p in prompts {
        ids.extend(tokenizer.encode(p)?.into_iter().map(i64::from));
    }
    Ok(Tensor::from_data(
        TensorData::new(ids, [prompts.len(), len]),
        device,
    ))
}

/// The text embeddings of `prompts`, `[n, max_length, hidden]`.
pub fn encode_prompts(
    sd: &StableDiffusion,
    prompts: &[&str],
    clip_skip: usize,
    device: &Device,
) -> Result<Tensor<3>, TokenizerError> {
    Ok(sd
        .text_encoder
        .forward(token_ids(&sd.tokenizer, prompts, device)?, clip_skip))
}

/// What a generation needs of a latent diffusion model, by reference: the U-Net, the decoder of
/// unscaled latents, the latent geometry, the scale and the schedule.
pub struct LatentModel<'a> {
    pub unet: &'a UNet2DConditionModel,
    pub decode: &'a dyn Fn(Tensor<4>) -> Tensor<4>,
    pub scale: f64,
    pub latent_channels: usize,
    /// Image pixels per latent position.
    pub factor: usize,
    pub scheduler: &'a SchedulerConfig,
}

/// What the U-Net is conditioned on, for the conditional and the unconditional branch.
pub enum Condition {
    /// Text embeddings `[1, len, d]` of the prompt and of the negative prompt.
    Text { cond: Tensor<3>, uncond: Tensor<3> },
    /// A class and the null class, with a zero cross-attention token of width `context`.
    Class {
        class: i64,
        null: i64,
        context: usize,
    },
    /// Nothing: a zero cross-attention token of width `context`, no guidance.
    None { context: usize },
}

/// How to generate, whatever the conditioning.
#[derive(Debug, Clone)]
pub struct Generation {
    pub guidance_scale: f64,
    pub steps: usize,
    pub sampler: Option<SamplerKind>,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub num: usize,
    pub latents: Option<Tensor<4>>,
}

/// Generates `g.num` images; returns them decoded, `[num, c, height, width]`, about [-1, 1].
pub fn generate(
    model: &LatentModel,
    cond: &Condition,
    g: &Generation,
    device: &Device,
) -> Result<Tensor<4>, GenerateError> {
    let f = model.factor;
    if g.width == 0 || g.height == 0 || g.width % f != 0 || g.height % f != 0 {
        return Err(GenerateError::Invalid(format!(
            "width and height ({} x {}) must be positive multiples of {f} (the first stage's \
             factor)",
            g.width, g.height
        )));
    }
    if g.num == 0 || g.steps == 0 {
        return Err(GenerateError::Invalid(
            "the number of images and of steps must be at least 1".into(),
        ));
    }
    let n = g.num;
    let shape = [n, model.latent_channels, g.height / f, g.width / f];
    let zeros = |d: usize, b: usize| Tensor::<3>::zeros([b, 1, d], device);
    // (single-branch context, both-branch context, class labels for each)
    let (single, doubled, labels, scale) = match cond {
        Condition::Text { cond, uncond } => {
            let [_, len, d] = cond.dims();
            let repeat = |t: Tensor<3>| t.expand([n, len, d]);
            let doubled = Tensor::cat(vec![repeat(uncond.clone()), repeat(cond.clone())], 0);
            (repeat(cond.clone()), doubled, None, g.guidance_scale)
        }
        Condition::Class {
            class,
            null,
            context,
        } => {
            let ids = |v: Vec<i64>| {
                let n = v.len();
                Tensor::<1, Int>::from_data(TensorData::new(v, [n]), device)
            };
            let mut both = vec![*null; n];
            both.extend(vec![*class; n]);
            (
                zeros(*context, n),
                zeros(*context, 2 * n),
                Some((ids(vec![*class; n]), ids(both))),
                g.guidance_scale,
            )
        }
        Condition::None { context } => (zeros(*context, n), zeros(*context, 2 * n), None, 1.0),
    };
    let unet = model.unet;
    let guided = Guided {
        predict: |x: Tensor<4>, t: f64, both: bool| {
            let b = x.dims()[0];
            let timesteps = Tensor::<1>::full([b], t as f32, device);
            let context = if both { &doubled } else { &single };
            let labels = labels
                .as_ref()
                .map(|(one, two)| if both { two.clone() } else { one.clone() });
            unet.forward(x, timesteps, context, labels)
        },
        scale,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(g.seed);
    let mut randn = move || {
        let v: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| rng.sample(StandardNormal))
            .collect();
        Tensor::<4>::from_data(TensorData::new(v, shape), device)
    };
    let initial = match &g.latents {
        Some(l) if l.dims() == shape => l.clone(),
        Some(l) => {
            return Err(GenerateError::Invalid(format!(
                "the given latents have shape {:?}; this request needs {shape:?} \
                 ([num, latent channels, height / {f}, width / {f}])",
                l.dims()
            )));
        }
        None => randn(),
    };
    let opts = model.scheduler.sampler_options(g.sampler, g.steps);
    let latents = sampling::sample(
        &guided,
        &model.scheduler.schedule(),
        &opts,
        initial,
        &mut randn,
    );
    Ok((model.decode)(latents.div_scalar(model.scale)))
}

/// Text to image with a Stable Diffusion model; returns `[num, 3, height, width]`, about
/// [-1, 1].
pub fn text_to_image(
    sd: &StableDiffusion,
    req: &TextToImage,
    device: &Device,
) -> Result<Tensor<4>, GenerateError> {
    let cond = encode_prompts(sd, &[&req.prompt], req.clip_skip, device)?;
    let uncond = encode_prompts(sd, &[&req.negative_prompt], req.clip_skip, device)?;
    let decode = |z: Tensor<4>| sd.vae.decode(z);
    let model = LatentModel {
        unet: &sd.unet,
        decode: &decode,
        scale: sd.vae_config.scaling_factor,
        latent_channels: sd.vae_config.latent_channels,
        factor: sd.vae_factor(),
        scheduler: &sd.scheduler,
    };
    let g = Generation {
        guidance_scale: req.guidance_scale,
        steps: req.steps,
        sampler: req.sampler,
        seed: req.seed,
        width: req.width,
        height: req.height,
        num: req.num,
        latents: req.latents.clone(),
    };
    generate(&model, &Condition::Text { cond, uncond }, &g, device)
}

/// `sample` on a pretrained Stable Diffusion folder or single file.
pub fn sample_pretrained(
    path: &std::path::Path,
    req: &super::SampleRequest,
) -> Result<(Grid, std::path::PathBuf), super::PipelineError> {
    if req.class.is_some() {
        return Err(super::PipelineError::Invalid(format!(
            "{} is a text-to-image model: --class applies to class-conditioned latent \
             diffusion models; use --prompt",
            path.display()
        )));
    }
    let device = parse_device(req.device.as_deref().unwrap_or("cpu"))?;
    let source = Pretrained::detect(path, req.config_from.as_deref())?;
    let mut sd = stable_diffusion::load(&source, &device)?;
    super::lora::apply_files(&mut sd, &req.loras)?;
    Ok((sample_with(sd, req, &device)?, path.to_path_buf()))
}

/// `sample`'s text-to-image on a loaded model (LoRAs already folded in).
pub fn sample_with(
    sd: StableDiffusion,
    req: &super::SampleRequest,
    device: &Device,
) -> Result<Grid, super::PipelineError> {
    let num = req.num.unwrap_or(1);
    let size = sd.default_size();
    let latents = match &req.latents {
        Some(file) => Some(read_latents(file, device)?),
        None => None,
    };
    let request = TextToImage {
        prompt: req.prompt.clone().unwrap_or_default(),
        negative_prompt: req.negative_prompt.clone().unwrap_or_default(),
        guidance_scale: req.guidance_scale.unwrap_or(7.5),
        steps: req.steps.unwrap_or(50),
        sampler: req.sampler,
        seed: req.seed,
        width: req.width.unwrap_or(size),
        height: req.height.unwrap_or(size),
        num,
        latents,
        clip_skip: req.clip_skip.unwrap_or(1),
    };
    let images = text_to_image(&sd, &request, device)?.clamp(-1.0, 1.0);
    let shape = images.dims();
    let pixels = images
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 after convert");
    Ok(Grid::square(pixels, shape))
}

/// `--latents FILE`: one f32 tensor named `latents` (diffusers' `latents=` argument).
pub(crate) fn read_latents(
    path: &std::path::Path,
    device: &Device,
) -> Result<Tensor<4>, super::PipelineError> {
    let file = SafetensorsFile::open(path)?;
    let data = file.read("latents").map_err(|e| {
        super::PipelineError::Invalid(format!(
            "{}: {e}; expected one float tensor named \"latents\" of shape [num, channels, \
             height / f, width / f]",
            path.display()
        ))
    })?;
    if data.shape().num_dims() != 4 {
        return Err(super::PipelineError::Invalid(format!(
            "{}: \"latents\" has shape {:?}; expected 4 dimensions [num, channels, h, w]",
            path.display(),
            data.shape()
        )));
    }
    Ok(Tensor::from_data(data, (device, burn::tensor::DType::F32)))
}
