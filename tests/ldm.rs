//! Latent diffusion end to end: the stage-1 loss, posterior sample and latent scale against
//! CompVis/diffusers on fixtures (scripts/gen_ldm_reference.py); both stages chained on a tiny
//! dataset where the caption (or class) decides the colour, with guided samples that follow it
//! (and fail to without conditioning); cached = uncached latents; bitwise resume of each stage;
//! stage 2 refusing a first stage that changed; the export and `sample` on it; both stages
//! data-parallel on worker threads and on processes.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use burn::prelude::*;
use difftrain::config::{Config, Resume};
use difftrain::data::ColorMode;
use difftrain::io::safetensors::{self as io, HostTensor};
use difftrain::models::Architecture;
use difftrain::models::autoencoder_kl::{AutoencoderKLConfig, VaeDownBlockType, VaeUpBlockType};
use difftrain::models::latent_diffusion::{
    ConditioningKind, FirstStage, ReconLoss, latent_samples, scale_by_std,
};
use difftrain::models::unet_2d_condition::{CondDownBlockType, CondUpBlockType, PerBlock};
use difftrain::optim::precision::MixedPrecision;
use difftrain::pipelines::{self, SampleRequest};
use difftrain::train::TrainOptions;
use difftrain::train::objectives::autoencoder::autoencoder_loss;

const QUIET: TrainOptions = TrainOptions {
    write_outputs: true,
    quiet: true,
    overflow_at_step: None,
    overrides: Vec::new(),
};

fn reference() -> BTreeMap<String, HostTensor> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ldm/reference.safetensors");
    io::load_safetensors(&path).unwrap()
}

fn tensor<const D: usize>(t: &HostTensor, device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), device)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    difftrain::nn::to_host(t)
}

fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

#[test]
fn stage1_loss_posterior_sample_and_latent_scale_match_compvis() {
    let device = Device::flex();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd/tiny_sd/vae");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = AutoencoderKLConfig::from_diffusers_json(&json).unwrap();
    let vae = io::load_file(
        cfg.init(&device),
        &dir.join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    let r = reference();
    let x: Tensor<4> = tensor(&r["x"], &device);
    let eps = &r["eps"];

    // The posterior sample stage 2 trains on, through the first stage's moments.
    let first = FirstStage::Kl(vae.clone());
    let (mean, std) = first.moments(x.clone());
    let z = latent_samples(&host(mean), std.map(host).as_deref(), &eps.data, 1.0);
    assert!(
        rel_diff(&z, &r["z"].data) < 1e-4,
        "{}",
        rel_diff(&z, &r["z"].data)
    );
    // ... and scale_by_std of it.
    let scale = scale_by_std(&z).unwrap();
    let want = r["scale"].data[0] as f64;
    assert!((scale - want).abs() < 1e-5 * want, "{scale} vs {want}");

    // The stage-1 loss: reconstruction (L1 and squared) summed per image, KL, their sum.
    for (loss, key) in [(ReconLoss::L1, "rec_l1"), (ReconLoss::Mse, "rec_mse")] {
        let noise = |shape: [usize; 4]| {
            assert_eq!(shape.to_vec(), eps.shape);
            tensor(eps, &device)
        };
        let (rec, kl) = autoencoder_loss(&vae, x.clone(), noise, loss, burn::tensor::DType::F32);
        let (rec, kl) = (rec.into_scalar::<f32>(), kl.into_scalar::<f32>());
        let (want_rec, want_kl) = (r[key].data[0], r["kl_loss"].data[0]);
        assert!(
            (rec - want_rec).abs() < 1e-4 * want_rec,
            "{key}: {rec} vs {want_rec}"
        );
        assert!(
            (kl - want_kl).abs() < 1e-4 * want_kl,
            "kl: {kl} vs {want_kl}"
        );
        if loss == ReconLoss::L1 {
            let total = rec as f64 + 1e-6 * kl as f64;
            let want = r["loss_l1"].data[0] as f64;
            assert!((total - want).abs() < 1e-4 * want, "{total} vs {want}");
        }
    }
}

// ------------------------------------------------------------------------------- tiny runs

const COLOURS: [(&str, [u8; 3]); 3] = [
    ("red", [210, 40, 40]),
    ("green", [40, 200, 50]),
    ("blue", [40, 60, 220]),
];

/// 8x8 RGB images of one colour each (with some jitter) and a caption naming it
/// (`metadata.jsonl`: "a red square", label = colour index).
fn colour_dataset(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut meta = String::new();
    for i in 0..n {
        let k = i % COLOURS.len();
        let (name, rgb) = COLOURS[k];
        let img = image::RgbImage::from_fn(8, 8, |x, y| {
            let j = ((i * 7 + x as usize * 3 + y as usize * 5) % 11) as i32 - 5;
            image::Rgb(rgb.map(|v| (v as i32 + 3 * j).clamp(0, 255) as u8))
        });
        let file = format!("{i:03}.png");
        img.save(dir.join(&file)).unwrap();
        meta.push_str(&format!(
            "{{\"file_name\": \"{file}\", \"text\": \"a {name} square\", \"label\": {k}}}\n"
        ));
    }
    std::fs::write(dir.join("metadata.jsonl"), meta).unwrap();
}

/// Stage 1 at 8x8: a two-level AutoencoderKL (factor 2, 4x4x4 latents).
fn vae_config(data: &Path, out: &Path) -> Config {
    let mut c = Config::default();
    c.run.name = "vae_test".into();
    c.run.output_dir = Some(out.to_path_buf());
    c.data.path = data.to_path_buf();
    c.data.resolution = 8;
    c.data.color = ColorMode::Rgb;
    c.data.random_flip = true;
    c.model.architecture = Architecture::AutoencoderKl;
    c.model.autoencoder.vae = AutoencoderKLConfig {
        block_out_channels: vec![16, 16],
        down_block_types: vec![VaeDownBlockType::DownEncoderBlock2D; 2],
        up_block_types: vec![VaeUpBlockType::UpDecoderBlock2D; 2],
        layers_per_block: 1,
        latent_channels: 4,
        norm_num_groups: 8,
        sample_size: 8,
        mid_block_add_attention: false,
        ..AutoencoderKLConfig::default()
    };
    c.train.max_steps = 60;
    c.train.batch_size = 12;
    c.train.learning_rate = 3e-3;
    c.sample.num_images = 4;
    c.checkpoint.every_steps = 0;
    c.logging.log_every = 1000;
    c
}

/// Stage 2 on `stage1`'s latents (trained first from `stage1_config` when missing).
fn ldm_config(
    data: &Path,
    out: &Path,
    stage1: &Path,
    stage1_config: &Path,
    kind: ConditioningKind,
) -> Config {
    let mut c = vae_config(data, out);
    c.run.name = "ldm_test".into();
    c.model.architecture = Architecture::LatentDiffusion;
    c.model.ldm.first_stage = stage1.to_path_buf();
    c.model.ldm.first_stage_config = Some(stage1_config.to_path_buf());
    let u = c.model.ldm.backbone.as_unet_mut().unwrap();
    u.in_channels = 4;
    u.out_channels = 4;
    u.block_out_channels = vec![32, 32];
    u.down_block_types = vec![CondDownBlockType::CrossAttnDownBlock2D; 2];
    u.up_block_types = vec![CondUpBlockType::CrossAttnUpBlock2D; 2];
    u.layers_per_block = 1;
    u.norm_num_groups = 8;
    u.cross_attention_dim = 32;
    u.attention_head_dim = PerBlock::All(4);
    let cond = &mut c.model.conditioning;
    cond.kind = kind;
    cond.num_classes = COLOURS.len();
    cond.vocab_size = 540;
    cond.max_length = 6;
    cond.clip.hidden_size = 32;
    cond.clip.intermediate_size = 64;
    cond.clip.num_hidden_layers = 1;
    cond.clip.num_attention_heads = 2;
    // The quickstart's recipe (see configs/ldm_quickstart.toml).
    c.diffusion.beta_schedule = difftrain::diffusion::schedule::BetaSchedule::SquaredcosCapV2;
    c.diffusion.prediction_type = difftrain::diffusion::schedule::PredictionType::VPrediction;
    c.train.max_steps = 150;
    c.train.batch_size = 12;
    c.train.learning_rate = 2e-3;
    c.sample.num_inference_steps = 10;
    c.sample.guidance_scale = 3.0;
    c.sample.prompts = vec!["a red square".into(), "a blue square".into()];
    c
}

fn write(c: &Config, path: &Path) -> PathBuf {
    std::fs::write(path, c.to_toml()).unwrap();
    path.to_path_buf()
}

/// The mean colour of each image of a grid, `[r, g, b]` in [-1, 1].
fn mean_colours(grid: &difftrain::io::image::Grid) -> Vec<[f32; 3]> {
    let [n, c, h, w] = grid.shape;
    assert_eq!(c, 3);
    (0..n)
        .map(|i| {
            let img = &grid.images[i * c * h * w..(i + 1) * c * h * w];
            let mut m = [0.0f32; 3];
            for (ch, v) in m.iter_mut().enumerate() {
                *v = img[ch * h * w..(ch + 1) * h * w].iter().sum::<f32>() / (h * w) as f32;
            }
            m
        })
        .collect()
}

/// The fraction of images, generated for each colour by `generate(colour index)`, whose
/// strongest channel is that colour's.
fn colour_accuracy(
    mut generate: impl FnMut(usize) -> difftrain::io::image::Grid,
) -> (f64, Vec<String>) {
    let (mut hits, mut total, mut report) = (0, 0, Vec::new());
    for (k, (name, _)) in COLOURS.iter().enumerate() {
        let means = mean_colours(&generate(k));
        let ok = means
            .iter()
            .filter(|m| (0..3).all(|o| o == k || m[k] > m[o]))
            .count();
        report.push(format!("{name}: {ok}/{} {:?}", means.len(), means.first()));
        hits += ok;
        total += means.len();
    }
    (hits as f64 / total as f64, report)
}

fn text_request(prompt: &str) -> SampleRequest {
    SampleRequest {
        num: Some(8),
        prompt: Some(prompt.into()),
        seed: 3,
        ..SampleRequest::default()
    }
}

fn bin(name: &str) -> Command {
    Command::new(match name {
        "train" => env!("CARGO_BIN_EXE_train"),
        _ => env!("CARGO_BIN_EXE_sample"),
    })
}

fn output(cmd: &mut Command) -> (bool, String) {
    let r = cmd.output().unwrap();
    (
        r.status.success(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
    )
}

#[test]
fn text_conditioning_follows_the_prompt_and_exports_a_diffusers_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    colour_dataset(&data, 48);
    let stage1 = tmp.path().join("vae");
    let s1 = write(&vae_config(&data, &stage1), &tmp.path().join("vae.toml"));
    let out = tmp.path().join("ldm");
    let mut c = ldm_config(&data, &out, &stage1, &s1, ConditioningKind::Text);
    c.data.cache_latents = true;
    c.ema.enabled = true;
    c.checkpoint.every_steps = 75;
    let cfg_path = write(&c, &tmp.path().join("ldm.toml"));
    // One command trains stage 1 (missing), then stage 2.
    let (ok, err) = output(bin("train").arg("--config").arg(&cfg_path));
    assert!(ok, "{err}");
    assert!(
        err.contains("stage 1:") && err.contains("latent cache built"),
        "{err}"
    );
    assert!(
        stage1
            .join("export/vae/diffusion_pytorch_model.safetensors")
            .is_file()
    );

    // The export is a StableDiffusionPipeline folder.
    let export = out.join("export");
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet_no_ema/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
    ] {
        assert!(export.join(f).is_file(), "missing {f}");
    }
    let vae_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("vae/config.json")).unwrap())
            .unwrap();
    let saved = Config::load(&export.join("difftrain.toml"), &[]).unwrap();
    let scale = saved
        .model
        .ldm
        .scale_factor
        .expect("the resolved scale is saved");
    assert_eq!(vae_json["scaling_factor"].as_f64(), Some(scale));

    // Guided samples have the prompted colour (>= 90%), through the export (the Stable
    // Diffusion path) ...
    let (acc, report) = colour_accuracy(|k| {
        pipelines::sample(
            &export,
            &text_request(&format!("a {} square", COLOURS[k].0)),
        )
        .unwrap()
        .0
    });
    eprintln!("text conditioning, export: colour accuracy {acc} {report:?}");
    assert!(acc >= 0.9, "accuracy {acc}: {report:?}");
    // ... and through a checkpoint (U-Net and text encoder from the checkpoint, the first stage
    // from the config, the run's tokenizer).
    let (acc, report) = colour_accuracy(|k| {
        pipelines::sample(
            &out.join("checkpoint-150"),
            &text_request(&format!("a {} square", COLOURS[k].0)),
        )
        .unwrap()
        .0
    });
    assert!(acc >= 0.9, "checkpoint: accuracy {acc}: {report:?}");

    // The sample binary, and clear refusals.
    let grid = tmp.path().join("blue.png");
    let (ok, err) = output(
        bin("sample")
            .arg("--checkpoint")
            .arg(&out)
            .args(["--prompt", "a blue square", "--num", "4", "--out"])
            .arg(&grid),
    );
    assert!(ok, "{err}");
    assert!(grid.is_file());
    let (ok, err) = output(
        bin("sample")
            .arg("--checkpoint")
            .arg(&out)
            .args(["--class", "1"]),
    );
    assert!(!ok && err.contains("--class"), "{err}");
    let (ok, err) = output(bin("sample").arg("--checkpoint").arg(&stage1));
    assert!(!ok && err.contains("is an autoencoder"), "{err}");
}

#[test]
fn without_conditioning_the_same_check_fails() {
    // The control of the test above: with `kind = "none"` the samples cannot follow a
    // prompt, and the colour check falls to about chance (1/3).
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    colour_dataset(&data, 48);
    let stage1 = tmp.path().join("vae");
    let s1 = write(&vae_config(&data, &stage1), &tmp.path().join("vae.toml"));
    let out = tmp.path().join("ldm");
    let c = ldm_config(&data, &out, &stage1, &s1, ConditioningKind::None);
    pipelines::train(&c, &QUIET).unwrap();
    let (acc, report) = colour_accuracy(|k| {
        let req = SampleRequest {
            num: Some(8),
            seed: 3 + k as u64,
            ..SampleRequest::default()
        };
        pipelines::sample(&out, &req).unwrap().0
    });
    eprintln!("no conditioning: colour accuracy {acc} {report:?}");
    assert!(
        acc < 0.9,
        "unconditioned samples matched the colour: {acc} {report:?}"
    );
    // A prompt is refused by name on an unconditioned model.
    let err = pipelines::sample(&out, &text_request("a red square")).unwrap_err();
    assert!(err.to_string().contains("conditioned on nothing"), "{err}");
}

#[test]
fn class_conditioning_follows_the_class() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    colour_dataset(&data, 48);
    let stage1 = tmp.path().join("vae");
    let s1 = write(&vae_config(&data, &stage1), &tmp.path().join("vae.toml"));
    let out = tmp.path().join("ldm");
    let c = ldm_config(&data, &out, &stage1, &s1, ConditioningKind::Class);
    pipelines::train(&c, &QUIET).unwrap();
    // The export: unet (with the class table) + vae + scheduler, no text parts.
    let export = out.join("export");
    assert!(export.join("unet/config.json").is_file());
    assert!(!export.join("model_index.json").exists());
    let unet_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("unet/config.json")).unwrap())
            .unwrap();
    assert_eq!(unet_json["num_class_embeds"].as_u64(), Some(4));
    let (acc, report) = colour_accuracy(|k| {
        let req = SampleRequest {
            num: Some(8),
            class: Some(k),
            seed: 3,
            ..SampleRequest::default()
        };
        pipelines::sample(&out, &req).unwrap().0
    });
    eprintln!("class conditioning: colour accuracy {acc} {report:?}");
    assert!(acc >= 0.9, "accuracy {acc}: {report:?}");
    let err = pipelines::sample(&out, &SampleRequest::default()).unwrap_err();
    assert!(err.to_string().contains("--class N"), "{err}");
    let req = SampleRequest {
        class: Some(3),
        ..SampleRequest::default()
    };
    let err = pipelines::sample(&out, &req).unwrap_err();
    assert!(
        err.to_string().contains("--class 3 must be in 0..3"),
        "{err}"
    );
}

/// Final weights of a run (the last checkpoint's model file).
fn final_weights(out: &Path, step: usize) -> BTreeMap<String, HostTensor> {
    io::load_safetensors(&out.join(format!("checkpoint-{step}/model.safetensors"))).unwrap()
}

fn max_abs_diff(a: &BTreeMap<String, HostTensor>, b: &BTreeMap<String, HostTensor>) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(k, t)| t.data.iter().zip(&b[k].data).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn cached_latents_train_the_same_weights_as_encoding_each_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    colour_dataset(&data, 24);
    let stage1 = tmp.path().join("vae");
    let mut s1c = vae_config(&data, &stage1);
    s1c.train.max_steps = 5;
    let s1 = write(&s1c, &tmp.path().join("vae.toml"));
    let mut weights = Vec::new();
    for cached in [false, true] {
        let out = tmp.path().join(format!("ldm_{cached}"));
        let mut c = ldm_config(&data, &out, &stage1, &s1, ConditioningKind::Text);
        c.data.cache_latents = cached;
        c.train.max_steps = 6;
        c.checkpoint.every_steps = 6;
        c.sample.num_images = 1;
        c.logging.sample_every = 0;
        pipelines::train(&c, &QUIET).unwrap();
        weights.push(final_weights(&out, 6));
    }
    let d = max_abs_diff(&weights[0], &weights[1]);
    assert!(d == 0.0, "cached and uncached weights differ by {d}");
}

/// Runs `cfg` to `steps` with a checkpoint every `steps / 2`, rewinds `latest` to the middle
/// checkpoint, resumes, and checks the end is bitwise the same.
fn check_resume(cfg: &Config, path: &Path, steps: usize) {
    let out = cfg.output_dir();
    let (ok, err) = output(bin("train").arg("--config").arg(path));
    assert!(ok, "{err}");
    let straight = final_weights(&out, steps);
    std::fs::remove_dir_all(out.join(format!("checkpoint-{steps}"))).unwrap();
    let _ = std::fs::remove_dir_all(out.join("export"));
    std::fs::write(out.join("latest"), format!("checkpoint-{}\n", steps / 2)).unwrap();
    let (ok, err) = output(
        bin("train")
            .arg("--config")
            .arg(path)
            .args(["--resume", "latest"]),
    );
    assert!(ok && err.contains("resuming from"), "{err}");
    let resumed = final_weights(&out, steps);
    assert_eq!(
        max_abs_diff(&straight, &resumed),
        0.0,
        "{:?} resumed differently",
        cfg.model.architecture
    );
}

#[test]
fn each_stage_resumes_bitwise_and_stage2_refuses_a_changed_first_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    colour_dataset(&data, 24);
    let stage1 = tmp.path().join("vae");
    let mut s1c = vae_config(&data, &stage1);
    s1c.train.max_steps = 8;
    s1c.train.gradient_accumulation_steps = 2;
    s1c.train.batch_size = 6;
    s1c.ema.enabled = true;
    s1c.checkpoint.every_steps = 4;
    s1c.checkpoint.keep_last = 0;
    let s1 = write(&s1c, &tmp.path().join("vae.toml"));
    check_resume(&s1c, &s1, 8);

    let out = tmp.path().join("ldm");
    let mut c = ldm_config(&data, &out, &stage1, &s1, ConditioningKind::Text);
    c.train.max_steps = 8;
    c.train.gradient_accumulation_steps = 2;
    c.train.batch_size = 6;
    c.ema.enabled = true;
    c.checkpoint.every_steps = 4;
    c.checkpoint.keep_last = 0;
    c.checkpoint.resume = Resume::None;
    let path = write(&c, &tmp.path().join("ldm.toml"));
    check_resume(&c, &path, 8);

    // A different first stage (one more step of stage 1) is refused by name on resume.
    let (ok, err) = output(bin("train").arg("--config").arg(&s1).args([
        "--resume",
        "latest",
        "--set",
        "train.max_steps=9",
    ]));
    assert!(ok, "{err}");
    std::fs::write(out.join("latest"), "checkpoint-4\n").unwrap();
    let (ok, err) = output(
        bin("train")
            .arg("--config")
            .arg(&path)
            .args(["--resume", "latest"]),
    );
    assert!(
        !ok && err.contains("first stage has changed"),
        "stage 2 resumed on another first stage: {err}"
    );
}

/// The text path of stage 2 end to end, gradients included: `L = sum(unet(x_t, t,
/// text_encoder(ids)) · w)` on the tiny Stable Diffusion fixture against torch autograd (the
/// input, the text embeddings, cross-attention and text encoder parameters).
#[test]
fn text_path_gradients_match_torch() {
    use burn::optim::GradientsParams;
    use difftrain::pipelines::stable_diffusion::{self, Pretrained};
    let device = Device::flex().autodiff();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd/tiny_sd");
    let sd = stable_diffusion::load(&Pretrained::Folder(dir), &device).unwrap();
    let r = reference();
    let ids: Vec<i64> = r["grad.ids"].data.iter().map(|&v| v as i64).collect();
    let ids =
        Tensor::<2, Int>::from_data(TensorData::new(ids, r["grad.ids"].shape.clone()), &device);
    let model = difftrain::models::latent_diffusion::LatentDiffusionModel {
        backbone: difftrain::models::backbone::Backbone::Unet2DCondition(sd.unet.clone()),
        text_encoders: vec![Some(sd.text_encoders[0].model.clone())],
    };
    let unet = model.backbone.as_unet().unwrap();
    let x_t = tensor::<4>(&r["grad.x_t"], &device).require_grad();
    let t = tensor::<1>(&r["grad.t"], &device);
    let w = tensor::<4>(&r["grad.w"], &device);
    // Once through the whole chain (parameter gradients), once from a leaf context (its own).
    let context = model.text_encoders[0].as_ref().unwrap().forward(ids, 1);
    let out = unet.forward(x_t.clone(), t.clone(), &context, None);
    let check = |name: &str, ours: Vec<f32>, key: &str| {
        let d = rel_diff(&ours, &r[key].data);
        assert!(d < 2e-4, "{name}: relative difference {d}");
    };
    check("output", host(out.clone()), "grad.out");
    let grads = (out * w.clone()).sum().backward();
    check("d x_t", host(x_t.grad(&grads).unwrap()), "grad.d_x_t");
    let params = GradientsParams::from_grads(grads, &model);
    let ids = difftrain::io::safetensors::named_param_ids(&model);
    for (key, tensor) in r.iter().filter(|(k, _)| k.starts_with("grad.param.")) {
        let name = &key["grad.param.".len()..];
        let id = ids[name];
        let ours = match tensor.shape.len() {
            1 => params.get::<1>(id).map(host),
            2 => params.get::<2>(id).map(host),
            4 => params.get::<4>(id).map(host),
            n => panic!("{name}: {n} dimensions"),
        };
        check(
            name,
            ours.unwrap_or_else(|| panic!("no gradient for {name}")),
            key,
        );
    }
    let leaf = context.detach().require_grad();
    let out = unet.forward(x_t.detach(), t, &leaf, None);
    let grads = (out * w).sum().backward();
    check(
        "d context",
        host(leaf.grad(&grads).unwrap()),
        "grad.d_context",
    );
}

/// The two other first stages, each a few steps end to end: a Stable Diffusion folder's VAE
/// (frozen, its `scaling_factor` used and exported) with that folder's CLIP as a frozen text
/// encoder, and a VQ-VAE run of the discrete family (`vqvae/` in the export).
#[test]
fn stable_diffusion_and_vq_first_stages_train_export_and_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    colour_dataset(&data, 24);
    let tiny_sd = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd/tiny_sd");

    // A Stable Diffusion folder: VAE and text encoder frozen (cross_attention_dim 32 = its CLIP).
    let out = tmp.path().join("on_sd");
    let mut c = ldm_config(&data, &out, &tiny_sd, &tiny_sd, ConditioningKind::Text);
    c.model.ldm.first_stage_config = None;
    c.model.conditioning.pretrained_text_encoder = Some(tiny_sd.clone());
    c.train.max_steps = 4;
    let cfg_path = write(&c, &tmp.path().join("on_sd.toml"));
    let (ok, err) = output(bin("train").arg("--config").arg(&cfg_path));
    assert!(ok, "{err}");
    let export = out.join("export");
    let run = Config::load(&export.join("difftrain.toml"), &[]).unwrap();
    assert_eq!(run.model.ldm.scale_factor, Some(0.18215));
    let vae: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("vae/config.json")).unwrap())
            .unwrap();
    assert!((vae["scaling_factor"].as_f64().unwrap() - 0.18215).abs() < 1e-9);
    // The frozen text encoder is exported unchanged (the fixture is float16, the export f32).
    let ours = io::load_safetensors(&export.join("text_encoder/model.safetensors")).unwrap();
    let theirs =
        io::load_safetensors(&tiny_sd.join("text_encoder/model.fp16.safetensors")).unwrap();
    let strip = |m: BTreeMap<String, HostTensor>| -> BTreeMap<String, HostTensor> {
        m.into_iter()
            .map(|(k, v)| (k.trim_start_matches("text_model.").to_string(), v))
            .collect()
    };
    assert_eq!(max_abs_diff(&strip(ours), &strip(theirs)), 0.0);
    let grid = pipelines::sample(&export, &text_request("a red square")).unwrap();
    assert_eq!(grid.0.shape, [8, 3, 8, 8]);

    // A VQ-VAE run: diffusion on its pre-quantisation latents (factor 4: 16x16 -> 4x4x16).
    let vq_out = tmp.path().join("vq");
    let mut v = vae_config(&data, &vq_out);
    v.data.resolution = 16;
    v.model.architecture = Architecture::Vqvae;
    v.model.vqvae.in_channels = 3;
    v.model.vqvae.dim = 16;
    v.model.vqvae.res_dim = 8;
    v.model.vqvae.embedding_dim = 4;
    v.model.vqvae.num_embeddings = 16;
    v.train.max_steps = 6;
    let vq_cfg = write(&v, &tmp.path().join("vq.toml"));
    let out = tmp.path().join("on_vq");
    let mut c = ldm_config(&data, &out, &vq_out, &vq_cfg, ConditioningKind::Class);
    c.data.resolution = 16;
    c.train.max_steps = 4;
    let cfg_path = write(&c, &tmp.path().join("on_vq.toml"));
    let (ok, err) = output(bin("train").arg("--config").arg(&cfg_path));
    assert!(ok, "{err}");
    let export = out.join("export");
    for f in ["unet/config.json", "vqvae/model.safetensors", "vqvae.toml"] {
        assert!(
            export.join(f).is_file(),
            "missing {f}: {:?}",
            std::fs::read_dir(&export)
        );
    }
    let run = Config::load(&export.join("difftrain.toml"), &[]).unwrap();
    let scale = run.model.ldm.scale_factor.unwrap();
    assert!(scale.is_finite() && scale > 0.0, "{scale}");
    let req = SampleRequest {
        num: Some(4),
        class: Some(1),
        seed: 1,
        ..SampleRequest::default()
    };
    let grid = pipelines::sample(&export, &req).unwrap();
    assert_eq!(grid.0.shape, [4, 3, 16, 16]);
}

/// The shared machinery's data parallelism on both stages: 2 worker threads against 1 device,
/// and 2 processes (a torchrun-style launch, rank 0 building the latent cache first) against
/// 2 worker threads, bitwise.
#[test]
fn both_stages_train_data_parallel_on_threads_and_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    colour_dataset(&data, 24);
    let threads = || {
        Some(difftrain::device::DeviceList::List(vec![
            "cpu:0".into(),
            "cpu:1".into(),
        ]))
    };
    let run = |c: &Config, name: &str, world: usize| -> PathBuf {
        let path = write(c, &tmp.path().join(format!("{name}.toml")));
        let outs = if world == 1 {
            vec![bin("train").arg("--config").arg(&path).output().unwrap()]
        } else {
            common::finish(common::launch(&path, world, &[], |_| Vec::new()))
        };
        for (rank, o) in outs.iter().enumerate() {
            assert!(
                o.status.success(),
                "{name} rank {rank}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        c.output_dir()
    };
    // Stage 1 (AutoencoderKL): threads vs processes.
    let stage1 = |name: &str| {
        let mut c = vae_config(&data, &tmp.path().join(name));
        c.train.max_steps = 4;
        c.checkpoint.every_steps = 4;
        c.sample.num_images = 1;
        c
    };
    let mut s1_threads = stage1("s1_threads");
    s1_threads.run.devices = threads();
    let a = run(&s1_threads, "s1_threads", 1);
    let b = run(&stage1("s1_procs"), "s1_procs", 2);
    let d = max_abs_diff(&final_weights(&a, 4), &final_weights(&b, 4));
    assert_eq!(d, 0.0, "stage 1: 2 processes vs 2 threads differ by {d:e}");

    // Stage 2 (text-conditioned latent U-Net on that VAE, latents cached): 1 device, threads,
    // processes.
    let s1_cfg = write(&s1_threads, &tmp.path().join("s1.toml"));
    let stage2 = |name: &str| {
        let mut c = ldm_config(
            &data,
            &tmp.path().join(name),
            &a,
            &s1_cfg,
            ConditioningKind::Text,
        );
        c.data.cache_latents = true;
        c.train.max_steps = 4;
        c.checkpoint.every_steps = 4;
        c.sample.num_images = 1;
        c
    };
    let one = run(&stage2("s2_one"), "s2_one", 1);
    let mut s2_threads = stage2("s2_threads");
    s2_threads.run.devices = threads();
    let t = run(&s2_threads, "s2_threads", 1);
    let p = run(&stage2("s2_procs"), "s2_procs", 2);
    let d = max_abs_diff(&final_weights(&t, 4), &final_weights(&one, 4));
    assert!(d < 1e-4, "stage 2: 2 threads vs 1 device differ by {d:e}");
    let d = max_abs_diff(&final_weights(&p, 4), &final_weights(&t, 4));
    assert_eq!(d, 0.0, "stage 2: 2 processes vs 2 threads differ by {d:e}");
    // One cache, built by rank 0.
    let caches = std::fs::read_dir(p.join("latent_cache")).unwrap().count();
    assert_eq!(caches, 1);
}

/// The latent families in bf16 and fp16: the KL autoencoder stage (posterior and loss in f32),
/// and stage 2 with a text encoder trained alongside (computing in half from f32 weights) and
/// with class labels, on a frozen first stage held in half. Each step's loss within 5% of f32's.
#[test]
fn latent_families_train_in_bf16_and_fp16_like_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    colour_dataset(&data, 24);
    let opts = |write_outputs| TrainOptions {
        write_outputs,
        quiet: true,
        overflow_at_step: None,
        overrides: Vec::new(),
    };
    let stage1 = tmp.path().join("vae");
    let mut s1 = vae_config(&data, &stage1);
    s1.train.max_steps = 20;
    let s1_path = write(&s1, &tmp.path().join("vae.toml"));
    pipelines::train(&s1, &opts(true)).unwrap();
    let ldm = |kind| ldm_config(&data, &tmp.path().join("ldm"), &stage1, &s1_path, kind);
    // The autoencoder's loss is a sum over pixels (~120 here): at torch's initial scale of 2^16
    // its fp16 gradients overflow and the scaler skips the first steps, halving the scale each
    // time (what torch does too); a run of such a model starts lower.
    let mut ae = s1.clone();
    ae.train.fp16_init_scale = 1024.0;
    let runs = [
        ("autoencoder_kl", ae),
        ("ldm text", ldm(ConditioningKind::Text)),
        ("ldm class", ldm(ConditioningKind::Class)),
    ];
    for (what, base) in runs {
        let run = |p: MixedPrecision| {
            let mut c = base.clone();
            c.run.output_dir = Some(tmp.path().join(format!("{what}-{p:?}")));
            c.train.max_steps = 8;
            c.train.mixed_precision = p;
            // With the outputs: sample grids and exports from the frozen half networks.
            let s = pipelines::train(&c, &opts(true)).unwrap();
            assert_eq!(s.skipped_steps, 0, "{what} {p:?}");
            assert!(s.sample_grid.is_some_and(|g| g.is_file()), "{what} {p:?}");
            assert!(s.export_dir.is_some_and(|d| d.is_dir()), "{what} {p:?}");
            s.losses
        };
        let reference = run(MixedPrecision::No);
        for p in [MixedPrecision::Bf16, MixedPrecision::Fp16] {
            common::assert_losses_close(&format!("{what} {p:?}"), &run(p), &reference, 0.05);
        }
    }
    // At 2^16 the first fp16 steps overflow and are skipped, as described above.
    let mut c = s1.clone();
    c.run.output_dir = Some(tmp.path().join("ae-2^16"));
    c.train.max_steps = 8;
    c.train.mixed_precision = MixedPrecision::Fp16;
    let s = pipelines::train(&c, &opts(false)).unwrap();
    assert!(s.skipped_steps > 0, "{:?}", s.losses);
    assert_eq!(
        s.loss_scale,
        Some(65536.0 / 2f64.powi(s.skipped_steps as i32))
    );
}
