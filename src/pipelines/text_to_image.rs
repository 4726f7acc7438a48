//! Text-to-image with a Stable Diffusion model, as diffusers' `StableDiffusionPipeline.__call__`:
//! encode the prompt and the negative prompt, start from seeded (or given) latents, denoise with
//! the chosen sampler under classifier-free guidance, decode `latents / scaling_factor` with the
//! VAE.

use burn::prelude::*;

use super::stable_diffusion::{self, Pretrained, StableDiffusion};
use crate::device::parse_device;
use crate::diffusion::guidance::Guided;
use crate::diffusion::sampling::{self, SamplerKind};
use crate::diffusion::scheduler_config::SchedulerConfig;
use crate::io::image::Grid;
use crate::io::safetensors::SafetensorsFile;
use crate::models::backbone::{Conditioning, LatentBackbone};
use crate::models::text_encoders::{TextError, encode};
use crate::tokenizer::TokenizerError;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Text(#[from] TextError),
    #[error("{0}")]
    Invalid(String),
}

impl From<TokenizerError> for GenerateError {
    fn from(e: TokenizerError) -> Self {
        Self::Text(TextError::Tokenizer(e))
    }
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
    /// The index of the first image in its request (each image has its own random stream).
    pub first_index: usize,
    pub width: usize,
    pub height: usize,
    pub num: usize,
    /// Initial latents `[num, C, height / f, width / f]` (diffusers' `latents=`); seeded noise
    /// when `None`.
    pub latents: Option<Tensor<4>>,
    /// 1 = the text encoder's last layer (see `CLIPTextModel::forward`).
    pub clip_skip: usize,
}

/// The text embeddings of `prompts` under the model's text encoders (hidden states
/// concatenated along the width), `[n, max_length, hidden]`.
pub fn encode_prompts(
    sd: &StableDiffusion,
    prompts: &[&str],
    clip_skip: usize,
    device: &Device,
) -> Result<Tensor<3>, TextError> {
    encode_conditioning(sd, prompts, clip_skip, device)
        .map(|c| c.context.expect("text conditioning has a context"))
}

/// The conditioning of `prompts` under the model's text encoders.
fn encode_conditioning(
    sd: &StableDiffusion,
    prompts: &[&str],
    clip_skip: usize,
    device: &Device,
) -> Result<Conditioning, TextError> {
    encode(
        &sd.text_slots(clip_skip),
        &sd.text_models(),
        prompts,
        None,
        device,
    )
}

/// What a generation needs of a latent diffusion model, by reference: the backbone, the
/// decoder of unscaled latents, the latent geometry, the scale and the schedule.
pub struct LatentModel<'a> {
    pub backbone: &'a dyn LatentBackbone,
    pub decode: &'a dyn Fn(Tensor<4>) -> Tensor<4>,
    pub scale: f64,
    pub latent_channels: usize,
    /// Image pixels per latent position.
    pub factor: usize,
    pub scheduler: &'a SchedulerConfig,
}

/// What the backbone is conditioned on: the conditional branch (a batch of one) and, for
/// classifier-free guidance, the unconditional one (the negative prompt's embedding, the null
/// class); without it the model runs conditional only, whatever the guidance scale.
pub struct Prompted {
    pub cond: Conditioning,
    pub uncond: Option<Conditioning>,
}

/// How to generate, whatever the conditioning.
#[derive(Debug, Clone)]
pub struct Generation {
    pub guidance_scale: f64,
    pub steps: usize,
    pub sampler: Option<SamplerKind>,
    pub seed: u64,
    /// The index of the first image in its request (each image draws from its own stream:
    /// `seeds`).
    pub first_index: usize,
    pub width: usize,
    pub height: usize,
    pub num: usize,
    pub latents: Option<Tensor<4>>,
}

/// Generates `g.num` images; returns them decoded, `[num, c, height, width]`, about [-1, 1].
pub fn generate(
    model: &LatentModel,
    prompted: &Prompted,
    g: &Generation,
    device: &Device,
) -> Result<Tensor<4>, GenerateError> {
    let f = model.factor;
    if g.width == 0 || g.height == 0 || !g.width.is_multiple_of(f) || !g.height.is_multiple_of(f) {
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
    let single = prompted.cond.repeat(n);
    let (doubled, scale) = match &prompted.uncond {
        Some(uncond) => (
            Some(Conditioning::cat(&uncond.repeat(n), &single)),
            g.guidance_scale,
        ),
        None => (None, 1.0),
    };
    let backbone = model.backbone;
    let guided = Guided {
        predict: |x: Tensor<4>, t: f64, both: bool| {
            let b = x.dims()[0];
            let timesteps = Tensor::<1>::full([b], t as f32, device);
            let cond = match (&doubled, both) {
                (Some(d), true) => d,
                _ => &single,
            };
            backbone.predict(x, timesteps, cond)
        },
        scale,
    };
    let mut rngs = crate::seeds::ImageRngs::new(g.seed, g.first_index, n);
    let per_image = shape[1..].iter().product::<usize>();
    let mut randn =
        move || Tensor::<4>::from_data(TensorData::new(rngs.normals(per_image), shape), device);
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
    let cond = encode_conditioning(sd, &[&req.prompt], req.clip_skip, device)?;
    let uncond = encode_conditioning(sd, &[&req.negative_prompt], req.clip_skip, device)?;
    let decode = |z: Tensor<4>| sd.vae.decode(z);
    let model = LatentModel {
        backbone: &sd.unet,
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
        first_index: req.first_index,
        width: req.width,
        height: req.height,
        num: req.num,
        latents: req.latents.clone(),
    };
    let prompted = Prompted {
        cond,
        uncond: Some(uncond),
    };
    generate(&model, &prompted, &g, device)
}

/// `sample` on a pretrained Stable Diffusion folder or single file, loaded once.
pub fn load_pretrained(
    path: &std::path::Path,
    req: &super::SampleRequest,
) -> Result<super::Loaded, super::PipelineError> {
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
    load_with(sd, req, device, path.to_path_buf())
}

/// The memory the latents and the backbone's first level need for `n` images of `width` x
/// `height` under guidance, in bytes: a lower bound of what generating them takes.
fn generation_lower_bound(sd: &StableDiffusion, n: usize, width: usize, height: usize) -> u64 {
    let f = sd.vae_factor().max(1);
    let latent_pixels = ((width / f) * (height / f)) as u64;
    let first_level = sd
        .unet_config
        .block_out_channels
        .first()
        .copied()
        .unwrap_or(1) as u64;
    // Both guidance branches, f32; the decoded image at full size.
    2 * n as u64 * latent_pixels * first_level * 4 + n as u64 * (width * height * 3) as u64 * 4
}

/// `sample`'s text-to-image on a loaded model (LoRAs already folded in); `weights` names
/// where its weights came from.
pub fn load_with(
    sd: StableDiffusion,
    req: &super::SampleRequest,
    device: Device,
    weights: std::path::PathBuf,
) -> Result<super::Loaded, super::PipelineError> {
    let size = sd.default_size();
    let latents = match &req.latents {
        Some(file) => Some(read_latents(file, &device)?),
        None => None,
    };
    let (width, height) = (req.width.unwrap_or(size), req.height.unwrap_or(size));
    let num = match &latents {
        Some(l) => req.num.unwrap_or(l.dims()[0]),
        None => req.num.unwrap_or(1),
    };
    let batch = req
        .batch_size
        .unwrap_or(super::DEFAULT_SAMPLE_BATCH)
        .min(num)
        .max(1);
    crate::memory::check_fits(
        generation_lower_bound(&sd, batch, width, height),
        &format!("generating {batch} image(s) of {width} x {height}"),
    )?;
    let request = TextToImage {
        prompt: req.prompt.clone().unwrap_or_default(),
        negative_prompt: req.negative_prompt.clone().unwrap_or_default(),
        guidance_scale: req.guidance_scale.unwrap_or(7.5),
        steps: req.steps.unwrap_or(50),
        sampler: req.sampler,
        seed: req.seed,
        first_index: 0,
        width,
        height,
        num,
        latents,
        clip_skip: req.clip_skip.unwrap_or(1),
    };
    let fixed = request.latents.is_some();
    Ok(super::Loaded::new(
        weights,
        [3, height, width],
        num,
        fixed,
        move |first, n| {
            let batch = TextToImage {
                first_index: first,
                num: n,
                ..request.clone()
            };
            let images = text_to_image(&sd, &batch, &device)?.clamp(-1.0, 1.0);
            let shape = images.dims();
            Ok(Grid::square(crate::nn::to_host(images), shape))
        },
    ))
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
