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
use crate::io::image::Grid;
use crate::io::safetensors::SafetensorsFile;
use crate::tokenizer::TokenizerError;

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

/// The text embeddings of `prompts`, `[n, max_length, hidden]`.
pub fn encode_prompts(
    sd: &StableDiffusion,
    prompts: &[&str],
    clip_skip: usize,
    device: &Device,
) -> Result<Tensor<3>, TokenizerError> {
    let len = sd.tokenizer.max_length;
    let mut ids = Vec::with_capacity(prompts.len() * len);
    for p in prompts {
        ids.extend(sd.tokenizer.encode(p)?.into_iter().map(i64::from));
    }
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [prompts.len(), len]), device);
    Ok(sd.text_encoder.forward(ids, clip_skip))
}

/// The latent shape of `req`, checked against the model.
fn latent_shape(sd: &StableDiffusion, req: &TextToImage) -> Result<[usize; 4], GenerateError> {
    let f = sd.vae_factor();
    if req.width == 0 || req.height == 0 || req.width % f != 0 || req.height % f != 0 {
        return Err(GenerateError::Invalid(format!(
            "width and height ({} x {}) must be positive multiples of {f} (the VAE's factor)",
            req.width, req.height
        )));
    }
    if req.num == 0 || req.steps == 0 {
        return Err(GenerateError::Invalid(
            "the number of images and of steps must be at least 1".into(),
        ));
    }
    Ok([
        req.num,
        sd.vae_config.latent_channels,
        req.height / f,
        req.width / f,
    ])
}

/// Generates `req.num` images; returns them decoded, `[num, 3, height, width]`, about [-1, 1].
pub fn text_to_image(
    sd: &StableDiffusion,
    req: &TextToImage,
    device: &Device,
) -> Result<Tensor<4>, GenerateError> {
    let shape = latent_shape(sd, req)?;
    let n = req.num;
    let cond = encode_prompts(sd, &[&req.prompt], req.clip_skip, device)?;
    let uncond = encode_prompts(sd, &[&req.negative_prompt], req.clip_skip, device)?;
    let [_, len, d] = cond.dims();
    let repeat = |t: Tensor<3>| t.expand([n, len, d]);
    let single = repeat(cond.clone());
    let doubled = Tensor::cat(vec![repeat(uncond), repeat(cond)], 0);
    let unet = &sd.unet;
    let guided = Guided {
        predict: |x: Tensor<4>, t: f64, both: bool| {
            let b = x.dims()[0];
            let timesteps = Tensor::<1>::full([b], t as f32, device);
            let context = if both { &doubled } else { &single };
            unet.forward(x, timesteps, context, None)
        },
        scale: req.guidance_scale,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(req.seed);
    let mut randn = move || {
        let v: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| rng.sample(StandardNormal))
            .collect();
        Tensor::<4>::from_data(TensorData::new(v, shape), device)
    };
    let initial = match &req.latents {
        Some(l) if l.dims() == shape => l.clone(),
        Some(l) => {
            return Err(GenerateError::Invalid(format!(
                "the given latents have shape {:?}; this request needs {shape:?} \
                 ([num, latent channels, height / {f}, width / {f}])",
                l.dims(),
                f = sd.vae_factor()
            )));
        }
        None => randn(),
    };
    let opts = sd.scheduler.sampler_options(req.sampler, req.steps);
    let latents = sampling::sample(
        &guided,
        &sd.scheduler.schedule(),
        &opts,
        initial,
        &mut randn,
    );
    Ok(sd
        .vae
        .decode(latents.div_scalar(sd.vae_config.scaling_factor)))
}

/// `sample` on a pretrained Stable Diffusion folder or single file.
pub fn sample_pretrained(
    path: &std::path::Path,
    req: &super::SampleRequest,
) -> Result<(Grid, std::path::PathBuf), super::PipelineError> {
    let device = parse_device(req.device.as_deref().unwrap_or("cpu"))?;
    let source = Pretrained::detect(path, req.config_from.as_deref())?;
    let sd = stable_diffusion::load(&source, &device)?;
    let num = req.num.unwrap_or(1);
    let size = sd.default_size();
    let latents = match &req.latents {
        Some(file) => Some(read_latents(file, &device)?),
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
    let images = text_to_image(&sd, &request, &device)?.clamp(-1.0, 1.0);
    let shape = images.dims();
    let pixels = images
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 after convert");
    Ok((Grid::square(pixels, shape), path.to_path_buf()))
}

/// `--latents FILE`: one f32 tensor named `latents` (diffusers' `latents=` argument).
fn read_latents(
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
