//! `bench_sd <unet|txt2img|write|load> [options]`: Stable Diffusion 1.5-architecture
//! measurements with random weights (nothing is downloaded), one JSON line each; the PyTorch
//! side is scripts/bench_sd_torch.py, and scripts/bench_sd.sh runs both.
//!
//! - `unet`: the U-Net's forward + backward (MSE to a random target, gradients of every weight)
//!   at `--latent` x `--latent` latents, batch `--batch`, context [batch, 77, 768];
//! - `txt2img`: text to image at `--size` with `--steps` DDIM steps and guidance 7.5 (U-Net,
//!   VAE decoder and CLIP, tokenizer from `--tokenizer`);
//! - `write`: writes an SD 1.5-architecture diffusers folder of random f32 weights to `--out`
//!   (for `load`);
//! - `load`: loads a Stable Diffusion folder and reports the peak resident memory against the
//!   size of its weights (loading holds about one copy).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::prelude::*;
use clap::{Parser, Subcommand};
use difftrain::diffusion::sampling::SamplerKind;
use difftrain::diffusion::scheduler_config::SchedulerConfig;
use difftrain::io;
use difftrain::models::autoencoder_kl::AutoencoderKLConfig;
use difftrain::models::clip::CLIPTextConfig;
use difftrain::models::unet_2d_condition::UNet2DConditionConfig;
use difftrain::pipelines::stable_diffusion::{
    self, Pretrained, PretrainedTextEncoder, StableDiffusion,
};
use difftrain::pipelines::text_to_image::{TextToImage, text_to_image};
use difftrain::tokenizer::ClipTokenizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Parser)]
#[command(about = "Stable Diffusion 1.5-architecture benchmarks (random weights)")]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    Unet {
        #[arg(long, default_value_t = 32)]
        latent: usize,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 3)]
        steps: usize,
    },
    /// A LoRA training step (rank `--rank`, alpha = rank, on to_q/to_k/to_v/to_out.0; base
    /// frozen; forward, backward, AdamW on the adapters).
    Lora {
        #[arg(long, default_value_t = 64)]
        latent: usize,
        #[arg(long, default_value_t = 8)]
        rank: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// `train.mixed_precision`: no, bf16 or fp16 (the base held in it, adapters f32; fp16
        /// scales the loss by 2^16 and unscales the gradients, as the training loop does).
        #[arg(long, default_value = "no")]
        precision: String,
    },
    Txt2img {
        #[arg(long, default_value_t = 512)]
        size: usize,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value = "tests/fixtures/sd/tokenizer")]
        tokenizer: PathBuf,
    },
    Write {
        #[arg(long)]
        out: PathBuf,
    },
    Load {
        #[arg(long)]
        folder: PathBuf,
        /// `train.mixed_precision`: load as a LoRA run in that precision does (no, bf16, fp16).
        #[arg(long, default_value = "no")]
        precision: String,
    },
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn randn<const D: usize>(shape: [usize; D], rng: &mut ChaCha8Rng, device: &Device) -> Tensor<D> {
    let v: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| rng.sample(rand_distr::StandardNormal))
        .collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn sd15_scheduler() -> SchedulerConfig {
    SchedulerConfig::from_diffusers_json(&serde_json::json!({
        "_class_name": "DDIMScheduler",
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1,
    }))
    .expect("a valid scheduler config")
}

fn run(args: Args) -> anyhow::Result<()> {
    let device = Device::flex();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    match args.what {
        What::Unet {
            latent,
            batch,
            warmup,
            steps,
        } => {
            let cfg = UNet2DConditionConfig::sd15();
            difftrain::nn::seed_init(0);
            let train = device.clone().autodiff();
            let unet = cfg.init(&train);
            let x = randn([batch, 4, latent, latent], &mut rng, &train);
            let target = randn([batch, 4, latent, latent], &mut rng, &train);
            let ctx = randn([batch, 77, 768], &mut rng, &train);
            let t = Tensor::<1>::from_data(TensorData::new(vec![500.0f32; batch], [batch]), &train);
            let mut times = Vec::new();
            let mut phases = [0.0f64; 2];
            for i in 0..warmup + steps {
                let start = Instant::now();
                let out = unet.forward(x.clone(), t.clone(), &ctx, None);
                let loss = (out - target.clone()).square().mean();
                let _ = loss.clone().into_scalar::<f32>();
                let forward = start.elapsed().as_secs_f64();
                let grads = loss.backward();
                drop(grads);
                difftrain::memory::iteration();
                let total = start.elapsed().as_secs_f64();
                if i >= warmup {
                    times.push(total);
                    phases[0] += forward;
                    phases[1] += total - forward;
                }
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{}",
                serde_json::json!({
                    "impl": "burn-flex", "case": "sd15_unet_fwd_bwd", "params": unet.num_params(),
                    "latent": latent, "batch": batch, "steps": steps,
                    "median_s": times[times.len() / 2],
                    "forward_share": phases[0] / (phases[0] + phases[1]),
                    "peak_rss_mib": peak_rss_mib(), "threads": threads(),
                })
            );
        }
        What::Lora {
            latent,
            rank,
            warmup,
            steps,
            precision,
        } => {
            use burn::optim::GradientsParams;
            use difftrain::dtype::to_f32;
            use difftrain::lora::{LoraConfig, attach};
            use difftrain::optim::precision::{MixedPrecision, compute_dtype, hold_frozen};
            let mixed: MixedPrecision = serde_json::from_value(serde_json::json!(precision))
                .context("--precision: no, bf16 or fp16")?;
            let dtype = compute_dtype(mixed);
            let loss_scale = if mixed == MixedPrecision::Fp16 {
                65536.0
            } else {
                1.0
            };
            let cfg = UNet2DConditionConfig::sd15();
            difftrain::nn::seed_init(0);
            let train = device.clone().autodiff();
            let lora = LoraConfig {
                rank,
                alpha: rank as f64,
                ..LoraConfig::default()
            };
            // The base in the compute dtype; the f32 copies it was drawn in go back to the
            // system, and the peak is measured from here (a run loads its base from a file).
            let base = hold_frozen(cfg.init(&train), dtype);
            difftrain::memory::release_cached();
            let setup_peak = peak_rss_mib();
            let _ = std::fs::write("/proc/self/clear_refs", "5");
            let (mut unet, _) = attach(base, &lora, &lora.target_modules, "lora", &train)?;
            let adapters = difftrain::lora::adapter_param_ids(&mut unet);
            let trainable = difftrain::io::safetensors::tensors_of(&unet, &adapters)
                .values()
                .map(|t| t.num_elements())
                .sum::<usize>();
            let mut optim = burn::optim::AdamWConfig::new().init();
            let x = randn([1, 4, latent, latent], &mut rng, &train);
            let target = randn([1, 4, latent, latent], &mut rng, &train);
            let ctx = randn([1, 77, 768], &mut rng, &train);
            let t = Tensor::<1>::from_data(TensorData::new(vec![500.0f32], [1]), &train);
            let mut times = Vec::new();
            for i in 0..warmup + steps {
                let start = Instant::now();
                let out = to_f32(unet.forward(x.clone().cast(dtype), t.clone(), &ctx, None));
                let loss = (out - target.clone())
                    .square()
                    .mean()
                    .mul_scalar(loss_scale);
                let mut grads = GradientsParams::from_grads(loss.backward(), &unet);
                if loss_scale != 1.0 {
                    difftrain::optim::grad::scale_all(&unet, &mut grads, 1.0 / loss_scale);
                }
                unet = optim.step(1e-4, unet, grads);
                let _ = unet.conv_in.weight.val().into_data();
                difftrain::memory::iteration();
                if i >= warmup {
                    times.push(start.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{}",
                serde_json::json!({
                    "impl": "burn-flex", "case": "sd15_lora_step", "trainable": trainable,
                    "latent": latent, "batch": 1, "steps": steps, "precision": precision,
                    "median_s": times[times.len() / 2],
                    "setup_peak_rss_mib": setup_peak, "step_peak_rss_mib": peak_rss_mib(),
                    "threads": threads(),
                })
            );
        }
        What::Txt2img {
            size,
            steps,
            tokenizer,
        } => {
            difftrain::nn::seed_init(0);
            let unet_config = UNet2DConditionConfig::sd15();
            let vae_config = AutoencoderKLConfig::default();
            let text_config = CLIPTextConfig::default();
            let sd = StableDiffusion {
                unet: unet_config.init(&device),
                vae: vae_config.init(&device),
                text_encoders: vec![PretrainedTextEncoder {
                    model: text_config.init(&device),
                    config: text_config,
                    tokenizer: ClipTokenizer::from_dir(&tokenizer)?,
                }],
                unet_config,
                vae_config,
                scheduler: sd15_scheduler(),
                base: difftrain::io::base_model::BaseModel::Sd1,
            };
            let req = TextToImage {
                prompt: "a photo of a mountain at sunrise".into(),
                negative_prompt: String::new(),
                guidance_scale: 7.5,
                steps,
                sampler: Some(SamplerKind::Ddim),
                seed: 0,
                first_index: 0,
                width: size,
                height: size,
                num: 1,
                latents: None,
                clip_skip: 1,
            };
            let start = Instant::now();
            let image = text_to_image(&sd, &req, &device)?;
            let _ = image.into_data();
            println!(
                "{}",
                serde_json::json!({
                    "impl": "burn-flex", "case": "sd15_txt2img", "size": size, "steps": steps,
                    "seconds": start.elapsed().as_secs_f64(),
                    "peak_rss_mib": peak_rss_mib(), "threads": threads(),
                })
            );
        }
        What::Write { out } => {
            difftrain::nn::seed_init(0);
            let meta = Default::default();
            let unet_config = UNet2DConditionConfig::sd15();
            io::safetensors::save_module(
                &out.join("unet/diffusion_pytorch_model.safetensors"),
                &unet_config.init(&device),
                None,
                &meta,
            )?;
            io::write_json(
                &out.join("unet/config.json"),
                &unet_config.to_diffusers_json(),
            )?;
            let vae_config = AutoencoderKLConfig::default();
            io::safetensors::save_module(
                &out.join("vae/diffusion_pytorch_model.safetensors"),
                &vae_config.init(&device),
                None,
                &meta,
            )?;
            io::write_json(
                &out.join("vae/config.json"),
                &vae_config.to_diffusers_json(),
            )?;
            let text_config = CLIPTextConfig::default();
            io::safetensors::save_module(
                &out.join("text_encoder/model.safetensors"),
                &text_config.init(&device),
                None,
                &meta,
            )?;
            io::write_json(
                &out.join("text_encoder/config.json"),
                &text_config.to_transformers_json(),
            )?;
            io::write_json(
                &out.join("scheduler/scheduler_config.json"),
                &sd15_scheduler().to_diffusers_json(),
            )?;
            let tok = PathBuf::from("tests/fixtures/sd/tokenizer");
            std::fs::create_dir_all(out.join("tokenizer"))?;
            for f in [
                "vocab.json",
                "merges.txt",
                "special_tokens_map.json",
                "tokenizer_config.json",
            ] {
                std::fs::copy(tok.join(f), out.join("tokenizer").join(f))
                    .with_context(|| format!("copying the fixture tokenizer's {f}"))?;
            }
            io::write_json(
                &out.join("model_index.json"),
                &serde_json::json!({"_class_name": "StableDiffusionPipeline"}),
            )?;
            println!("{}", serde_json::json!({"wrote": out}));
        }
        What::Load { folder, precision } => {
            use difftrain::optim::precision::{MixedPrecision, compute_dtype};
            let mixed: MixedPrecision = serde_json::from_value(serde_json::json!(precision))
                .context("--precision: no, bf16 or fp16")?;
            let dtype = compute_dtype(mixed);
            let bytes: u64 = ["unet", "vae", "text_encoder"]
                .iter()
                .flat_map(|d| std::fs::read_dir(folder.join(d)).into_iter().flatten())
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .map(|e| e.metadata().map_or(0, |m| m.len()))
                .sum();
            let start = Instant::now();
            let source = Pretrained::Folder(folder.clone());
            let sd = difftrain::nn::loading_in(dtype, || stable_diffusion::load(&source, &device))?
                .held_in(dtype);
            let seconds = start.elapsed().as_secs_f64();
            let params = stable_diffusion::parameter_counts(&sd);
            println!(
                "{}",
                serde_json::json!({
                    "case": "sd15_load", "precision": precision,
                    "weights_mib": bytes as f64 / 1048576.0,
                    "peak_rss_mib": peak_rss_mib(), "seconds": seconds, "params": params,
                })
            );
        }
    }
    Ok(())
}

difftrain::global_allocator!();

fn main() -> std::process::ExitCode {
    tune_allocator();
    let args = Args::parse();
    difftrain::exit_code(difftrain::threads::on_pool(|| run(args)))
}
