//! What a hostile probe of the release binaries found (issue "Reliability: what a third hostile
//! probe found"), one test per defect, each written to fail before its fix: chained stages
//! that were never finished, `merge` overwriting its inputs, non-finite values passing
//! silently, seeds shared between `sample` batches, LoRA runs on missing captions, a
//! cross-attention width that does not fit its text encoder, path-like run names, stale latent
//! caches, impossible sizes, late failures, `--set` tables, output folders inside the data,
//! `--set` not reaching stage 1, signals during long phases, launch environments, and the
//! smaller annoyances.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{copy_dir, kill_after_checkpoint, latest_step, tiny_config, write_flat_images};
use difftrain::config::Config;
use difftrain::models::Architecture;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn shapes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/shapes")
}

fn write(c: &Config, path: &Path) -> PathBuf {
    std::fs::write(path, c.to_toml()).unwrap();
    path.to_path_buf()
}

/// Runs a binary: `(success, exit code, stderr)`.
/// A config (written to `<tmp>/c.toml`) of the tiny U-Net on 4 flat 8x8 images, for the
/// tests that only `--check` or fail before training.
fn checked_config(tmp: &Path) -> PathBuf {
    let data = tmp.join("flat");
    write_flat_images(&data, 4, 8, |i| i as u8);
    let c = tiny_config(&data, &tmp.join("out"));
    write(&c, &tmp.join("c.toml"))
}

fn run_bin(bin: &str, args: &[&str]) -> (bool, Option<i32>, String) {
    let path = match bin {
        "train" => env!("CARGO_BIN_EXE_train"),
        "sample" => env!("CARGO_BIN_EXE_sample"),
        _ => env!("CARGO_BIN_EXE_merge"),
    };
    let r = Command::new(path).args(args).output().unwrap();
    (
        r.status.success(),
        r.status.code(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
    )
}

fn train(cfg: &Path, extra: &[&str]) -> (bool, Option<i32>, String) {
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_bin("train", &args)
}

/// Two 32x32 RGB images captioned `caption` (with `key` as the metadata key).
fn captioned(dir: &Path, key: &str, caption: &str) {
    captioned_sized(dir, key, caption, 32)
}

fn captioned_sized(dir: &Path, key: &str, caption: &str, size: u32) {
    std::fs::create_dir_all(dir).unwrap();
    let mut meta = String::new();
    for i in 0..2u32 {
        let img = image::RgbImage::from_fn(size, size, |x, y| {
            image::Rgb([(x * 8) as u8, (y * 8) as u8, (40 * i) as u8])
        });
        img.save(dir.join(format!("{i}.png"))).unwrap();
        meta.push_str(&format!(
            "{{\"file_name\": \"{i}.png\", \"{key}\": \"{caption}\"}}\n"
        ));
    }
    std::fs::write(dir.join("metadata.jsonl"), meta).unwrap();
}

/// A LoRA run on a copy of the tiny SD fixture: `(config, base)`.
fn lora_config(tmp: &Path, data: &Path) -> (Config, PathBuf) {
    let base = tmp.join("base");
    if !base.exists() {
        copy_dir(&fixtures().join("sd/tiny_sd"), &base);
    }
    let mut c = Config::default();
    c.run.name = "hostile_lora".into();
    c.run.output_dir = Some(tmp.join("lora_out"));
    c.data.path = data.to_path_buf();
    c.data.resolution = 32;
    c.data.color = difftrain::data::ColorMode::Rgb;
    c.model.architecture = Architecture::SdLora;
    c.model.pretrained = Some(base.clone());
    c.train.max_steps = 2;
    c.train.batch_size = 2;
    c.checkpoint.every_steps = 0;
    c.logging.log_every = 1;
    c.sample.num_images = 1;
    c.sample.num_inference_steps = 2;
    (c, base)
}

/// A 2-step DDPM run of the tiny U-Net on flat images: its output folder.
fn trained_ddpm(tmp: &Path) -> PathBuf {
    let data = tmp.join("flat");
    write_flat_images(&data, 8, 8, |i| (i * 30) as u8);
    let out = tmp.join("ddpm");
    let mut c = tiny_config(&data, &out);
    c.train.max_steps = 2;
    c.train.batch_size = 4;
    c.checkpoint.every_steps = 0;
    let cfg = write(&c, &tmp.join("ddpm.toml"));
    let (ok, _, err) = train(&cfg, &[]);
    assert!(ok, "{err}");
    out
}

// ------------------------------------------------------------------------- 1. chained stages

/// A VQ-VAE stage 1 on the shipped shapes (16x16) and a PixelCNN stage 2 chained to it.
fn vq_chain(tmp: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let stage1_out = tmp.join("stage1");
    let mut s1 = Config::default();
    s1.run.name = "vq_stage1".into();
    s1.run.output_dir = Some(stage1_out.clone());
    s1.data.path = shapes();
    s1.data.resolution = 16;
    s1.data.color = difftrain::data::ColorMode::Rgb;
    s1.model.architecture = Architecture::Vqvae;
    s1.model.vqvae.in_channels = 3;
    s1.model.vqvae.dim = 16;
    s1.model.vqvae.res_dim = 8;
    s1.model.vqvae.embedding_dim = 8;
    s1.model.vqvae.num_embeddings = 16;
    s1.train.batch_size = 8;
    s1.train.max_steps = 400;
    s1.checkpoint.every_steps = 2;
    s1.logging.log_every = 1000;
    s1.sample.num_images = 2;
    let s1_path = write(&s1, &tmp.join("stage1.toml"));
    let mut s2 = s1.clone();
    s2.run.name = "vq_stage2".into();
    s2.run.output_dir = Some(tmp.join("stage2"));
    s2.model.architecture = Architecture::GatedPixelcnn;
    s2.model.pixelcnn.vqvae = stage1_out.clone();
    s2.model.pixelcnn.vqvae_config = Some(s1_path.clone());
    s2.model.pixelcnn.n_blocks = 2;
    s2.model.pixelcnn.dim = 8;
    s2.model.pixelcnn.linear_dim = 8;
    s2.train.max_steps = 2;
    s2.checkpoint.every_steps = 0;
    let s2_path = write(&s2, &tmp.join("stage2.toml"));
    (s1_path, s2_path, stage1_out)
}

fn export_step(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("export/export.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_u64()
}

#[test]
fn an_interrupted_first_stage_is_finished_before_the_second() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, s2_path, stage1_out) = vq_chain(tmp.path());
    // Killed while stage 1 trains (its checkpoints exist, its export does not).
    let child = common::train_cmd(&s2_path, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let killed_at = kill_after_checkpoint(child, &stage1_out, 2);
    assert!(killed_at < 400, "stage 1 finished before the kill");
    assert!(export_step(&stage1_out).is_none());
    let (ok, _, err) = train(&s2_path, &["--resume", "latest"]);
    assert!(ok, "{err}");
    // Stage 1 was resumed to its own max_steps and exported before stage 2 trained on it.
    assert_eq!(export_step(&stage1_out), Some(400), "{err}");
    assert!(err.contains("stage 1"), "{err}");
    assert_eq!(export_step(&tmp.path().join("stage2")), Some(2), "{err}");
}

#[test]
fn a_half_written_first_stage_export_is_redone() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, s2_path, stage1_out) = vq_chain(tmp.path());
    let s1 = Config::load(&tmp.path().join("stage1.toml"), &[]).unwrap();
    let mut short = s1.clone();
    short.train.max_steps = 4;
    let short_path = write(&short, &tmp.path().join("stage1.toml"));
    let (ok, _, err) = train(&short_path, &[]);
    assert!(ok, "{err}");
    // A kill during the export: export.json (written last) and a weights file are missing.
    std::fs::remove_file(stage1_out.join("export/export.json")).unwrap();
    std::fs::remove_file(stage1_out.join("export/vqvae/model.safetensors")).unwrap();
    let (ok, _, err) = train(&s2_path, &[]);
    assert!(ok, "{err}");
    assert_eq!(export_step(&stage1_out), Some(4), "{err}");
    assert!(stage1_out.join("export/vqvae/model.safetensors").is_file());
}

/// A latent diffusion base made by a chained config: the tiny SD fixture's VAE and CLIP,
/// frozen, under a small U-Net, at 8x8, so its export is a Stable Diffusion folder.
fn ldm_base_config(tmp: &Path, data: &Path) -> PathBuf {
    use difftrain::models::latent_diffusion::ConditioningKind;
    use difftrain::models::unet_2d_condition::{CondDownBlockType, CondUpBlockType, PerBlock};
    let tiny_sd = fixtures().join("sd/tiny_sd");
    let mut c = Config::default();
    c.run.name = "ldm_base".into();
    c.run.output_dir = Some(tmp.join("ldm_base"));
    c.data.path = data.to_path_buf();
    c.data.resolution = 8;
    c.data.color = difftrain::data::ColorMode::Rgb;
    c.model.architecture = Architecture::LatentDiffusion;
    c.model.ldm.first_stage = tiny_sd.clone();
    let u = c.model.ldm.backbone.as_unet_mut().unwrap();
    u.block_out_channels = vec![32, 32];
    u.down_block_types = vec![CondDownBlockType::CrossAttnDownBlock2D; 2];
    u.up_block_types = vec![CondUpBlockType::CrossAttnUpBlock2D; 2];
    u.layers_per_block = 1;
    u.norm_num_groups = 8;
    u.cross_attention_dim = 32;
    u.attention_head_dim = PerBlock::All(4);
    c.model.conditioning.kind = ConditioningKind::Text;
    c.model.conditioning.pretrained_text_encoder = Some(tiny_sd);
    c.train.max_steps = 2;
    c.train.batch_size = 2;
    c.checkpoint.every_steps = 1;
    c.sample.num_images = 1;
    c.sample.num_inference_steps = 2;
    write(&c, &tmp.join("ldm_base.toml"))
}

#[test]
fn a_half_written_lora_base_is_redone() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    captioned_sized(&data, "text", "a test", 8);
    let base_cfg = ldm_base_config(tmp.path(), &data);
    let (mut c, _) = lora_config(tmp.path(), &data);
    let base = tmp.path().join("ldm_base/export");
    c.data.resolution = 8;
    c.model.pretrained = Some(base.clone());
    c.model.pretrained_train_config = Some(base_cfg);
    c.train.max_steps = 1;
    let cfg = write(&c, &tmp.path().join("lora.toml"));
    let (ok, _, err) = train(&cfg, &[]);
    assert!(ok, "{err}");
    // A kill during the base's export: its last files are missing.
    std::fs::remove_file(base.join("export.json")).unwrap();
    std::fs::remove_file(base.join("model_index.json")).unwrap();
    std::fs::remove_dir_all(tmp.path().join("lora_out")).unwrap();
    let (ok, _, err) = train(&cfg, &[]);
    assert!(ok, "{err}");
    assert!(base.join("model_index.json").is_file() && base.join("export.json").is_file());
}

// ------------------------------------------------------------------------- 2. merge

#[test]
fn merge_refuses_to_write_over_its_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    copy_dir(&fixtures().join("sd/tiny_sd"), &base);
    let lora = tmp.path().join("lora.safetensors");
    std::fs::copy(fixtures().join("lora/kohya_lora.safetensors"), &lora).unwrap();
    let before = std::fs::read(base.join("unet/config.json")).unwrap();
    let lora_arg = lora.to_str().unwrap().to_string();
    for out in [
        base.clone(),
        lora.clone(),
        base.join("unet"),
        tmp.path().to_path_buf(),
    ] {
        let (ok, _, err) = run_bin(
            "merge",
            &[
                "--base",
                base.to_str().unwrap(),
                "--lora",
                &lora_arg,
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(!ok && err.contains("--out"), "{}: {err}", out.display());
    }
    assert_eq!(
        std::fs::read(base.join("unet/config.json")).unwrap(),
        before
    );
    assert!(difftrain::io::lora::read(&lora).is_ok());
}

// ------------------------------------------------------------------------- 3. non-finite values

#[test]
fn non_finite_scales_weights_and_settings_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("sd/tiny_sd");
    let lora = fixtures().join("lora/kohya_lora.safetensors");
    for scale in ["nan", "inf", "1e309"] {
        let arg = format!("{}:{scale}", lora.display());
        let (ok, _, err) = run_bin(
            "sample",
            &[
                "--checkpoint",
                base.to_str().unwrap(),
                "--lora",
                &arg,
                "--steps",
                "1",
                "--out",
                tmp.path().join("x.png").to_str().unwrap(),
            ],
        );
        assert!(
            !ok && err.contains(scale) && err.contains("finite"),
            "{scale}: {err}"
        );
    }
    // A LoRA file holding a NaN weight: named with its key.
    let mut tensors = difftrain::io::safetensors::load_safetensors(&lora).unwrap();
    let key = tensors
        .keys()
        .find(|k| k.ends_with(".lora_up.weight"))
        .unwrap()
        .clone();
    tensors.get_mut(&key).unwrap().data[0] = f32::NAN;
    let bad = tmp.path().join("nan_lora.safetensors");
    let data: std::collections::BTreeMap<String, burn::tensor::TensorData> = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                burn::tensor::TensorData::new(t.data.clone(), t.shape.clone()),
            )
        })
        .collect();
    difftrain::io::safetensors::save_tensors(&bad, &data, &Default::default()).unwrap();
    let arg = bad.to_str().unwrap().to_string();
    let (ok, _, err) = run_bin(
        "merge",
        &[
            "--base",
            base.to_str().unwrap(),
            "--lora",
            &arg,
            "--out",
            tmp.path().join("merged").to_str().unwrap(),
        ],
    );
    assert!(
        !ok && err.contains(&key) && err.contains("nan_lora"),
        "{err}"
    );
    // A scale whose merge overflows f32.
    let arg = format!("{}:3e38", lora.display());
    let (ok, _, err) = run_bin(
        "merge",
        &[
            "--base",
            base.to_str().unwrap(),
            "--lora",
            &arg,
            "--out",
            tmp.path().join("merged2").to_str().unwrap(),
        ],
    );
    assert!(!ok && err.contains("not finite"), "{err}");
    assert!(!tmp.path().join("merged2").exists());
    // Config floats.
    let cfg = checked_config(tmp.path());
    for set in [
        "diffusion.noise_offset=nan",
        "train.max_grad_norm=inf",
        "sample.guidance_scale=nan",
    ] {
        let (ok, _, err) = train(&cfg, &["--check", "--set", set]);
        let key = set.split('=').next().unwrap();
        assert!(
            !ok && err.contains(key) && err.contains("finite"),
            "{set}: {err}"
        );
    }
}

// ------------------------------------------------------------------------- 4. seeds

fn pngs(dir: &Path) -> Vec<Vec<u8>> {
    let mut names = common::listing(dir);
    names.retain(|n| n.ends_with(".png"));
    names
        .iter()
        .map(|n| image::open(dir.join(n)).unwrap().to_rgb8().into_raw())
        .collect()
}

#[test]
fn sample_seeds_never_share_images_and_batches_do_not_change_them() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained_ddpm(tmp.path());
    let sample = |seed: &str, batch: &str, name: &str| {
        let out = tmp.path().join(name);
        let (ok, _, err) = run_bin(
            "sample",
            &[
                "--checkpoint",
                run.to_str().unwrap(),
                "--num",
                "8",
                "--steps",
                "3",
                "--seed",
                seed,
                "--batch-size",
                batch,
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(ok, "{err}");
        pngs(&out)
    };
    let a = sample("0", "2", "a");
    let b = sample("1", "2", "b");
    let shared = a.iter().filter(|img| b.contains(img)).count();
    assert_eq!(
        shared, 0,
        "--seed 0 and --seed 1 share {shared} of 8 images"
    );
    // Each image depends on (seed, index) only.
    assert_eq!(sample("0", "8", "c"), a);
}

// ------------------------------------------------------------------------- 5. captions

#[test]
fn lora_data_without_captions_is_an_error_unless_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    captioned(&data, "caption", "a test");
    let (c, _) = lora_config(tmp.path(), &data);
    let cfg = write(&c, &tmp.path().join("lora.toml"));
    let (ok, _, err) = train(&cfg, &[]);
    assert!(
        !ok && err.contains("caption") && err.contains("text") && err.contains("metadata.jsonl"),
        "{err}"
    );
    // No metadata at all: refused, unless the config says empty captions are meant.
    std::fs::remove_file(data.join("metadata.jsonl")).unwrap();
    let (ok, _, err) = train(&cfg, &[]);
    assert!(!ok && err.contains("no caption"), "{err}");
    let (ok, _, err) = train(&cfg, &["--set", "data.allow_empty_captions=true"]);
    assert!(ok, "{err}");
}

// ------------------------------------------------------------------------- 6. cross-attention

#[test]
fn a_cross_attention_width_that_does_not_fit_the_text_encoder_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    copy_dir(&fixtures().join("sd/tiny_sd"), &base);
    let path = base.join("unet/config.json");
    let mut unet: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    unet["cross_attention_dim"] = 48.into();
    std::fs::write(&path, serde_json::to_vec_pretty(&unet).unwrap()).unwrap();
    // Weights that fit the edited config (so loading succeeds and the width is what is wrong).
    let cfg =
        difftrain::models::unet_2d_condition::UNet2DConditionConfig::from_diffusers_json(&unet)
            .unwrap();
    let device = burn::prelude::Device::flex();
    let model = cfg.init(&device);
    std::fs::remove_file(base.join("unet/diffusion_pytorch_model.fp16.safetensors")).unwrap();
    difftrain::io::safetensors::save_module(
        &base.join("unet/diffusion_pytorch_model.safetensors"),
        &model,
        None,
        &Default::default(),
    )
    .unwrap();
    let (ok, _, err) = run_bin(
        "sample",
        &[
            "--checkpoint",
            base.to_str().unwrap(),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--out",
            tmp.path().join("x.png").to_str().unwrap(),
        ],
    );
    assert!(!ok, "{err}");
    assert!(
        err.contains("cross_attention_dim") && err.contains("48") && err.contains("hidden_size"),
        "{err}"
    );
    assert!(!err.contains("internal error"), "{err}");
}

// ------------------------------------------------------------------------- 7. run names

#[test]
fn run_names_that_are_paths_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = checked_config(tmp.path());
    for name in ["../../evil", "a/b", "a\\\\b", "..", "x:y"] {
        let set = format!("run.name=\"{name}\"");
        let (ok, _, err) = train(&cfg, &["--check", "--set", &set]);
        assert!(!ok && err.contains("run.name"), "{name}: {err}");
    }
}

// ------------------------------------------------------------------------- 8. latent cache

#[test]
fn a_latent_cache_of_changed_images_is_rebuilt_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    captioned(&data, "text", "a test");
    let (mut c, _) = lora_config(tmp.path(), &data);
    c.data.cache_latents = true;
    c.train.max_steps = 1;
    let cfg = write(&c, &tmp.path().join("lora.toml"));
    let (ok, _, err) = train(&cfg, &["--set", "checkpoint.every_steps=1"]);
    assert!(ok, "{err}");
    // Same path, same count, other pixels (and another size on disk).
    let img = image::RgbImage::from_pixel(32, 32, image::Rgb([200, 10, 10]));
    img.save(data.join("0.png")).unwrap();
    let (ok, _, err) = train(
        &cfg,
        &[
            "--resume",
            "latest",
            "--set",
            "train.max_steps=2",
            "--set",
            "checkpoint.every_steps=1",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("rebuilt because") && err.contains("0.png"),
        "{err}"
    );
}

// ------------------------------------------------------------------------- 9. impossible sizes

#[test]
fn impossible_sizes_are_refused_with_the_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = checked_config(tmp.path());
    let (ok, code, err) = train(
        &cfg,
        &[
            "--set",
            "model.unet.block_out_channels=[65536, 65536]",
            "--set",
            "model.unet.norm_num_groups=32",
        ],
    );
    assert!(
        !ok && code == Some(1) && err.contains("GB"),
        "{code:?} {err}"
    );
    let (ok, code, err) = run_bin(
        "sample",
        &[
            "--checkpoint",
            fixtures().join("sd/tiny_sd").to_str().unwrap(),
            "--width",
            "100000",
            "--height",
            "100000",
            "--steps",
            "1",
            "--out",
            tmp.path().join("x.png").to_str().unwrap(),
        ],
    );
    assert!(
        !ok && code == Some(1) && err.contains("GB"),
        "{code:?} {err}"
    );
    // An allocation the system refuses all the same ends the process with a message, not an
    // abort (status 134, "memory allocation of ... failed" and a backtrace).
    let r = common::train_cmd(&cfg, &["--check"])
        .env("DIFFTRAIN_TEST_ALLOCATE", (1u64 << 50).to_string())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("out of memory") && err.contains("1125899.9 GB"),
        "{err}"
    );
}

// ------------------------------------------------------------------------- 10. late failures

#[test]
fn failures_are_found_before_the_work() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained_ddpm(tmp.path());
    // An --out that cannot be written fails before anything is generated.
    let blocker = tmp.path().join("a_file");
    std::fs::write(&blocker, b"").unwrap();
    let out = blocker.join("grid.png");
    let (ok, _, err) = run_bin(
        "sample",
        &[
            "--checkpoint",
            run.to_str().unwrap(),
            "--num",
            "2",
            "--steps",
            "2",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(
        !ok && err.contains("a_file") && err.contains("--out"),
        "{err}"
    );
    // Too little disk for a checkpoint or the export: said at the start, before training.
    let data = tmp.path().join("flat");
    let mut c = tiny_config(&data, &tmp.path().join("full"));
    c.train.batch_size = 4;
    c.train.max_steps = 3;
    c.checkpoint.every_steps = 0;
    let cfg = write(&c, &tmp.path().join("full.toml"));
    let r = common::train_cmd(&cfg, &[])
        .env("DIFFTRAIN_TEST_FREE_BYTES", "1000")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("free"), "{err}");
    assert!(!err.contains("step 1/3"), "{err}");
    // Written as they are made: a folder of images.
    let dir = tmp.path().join("many");
    let (ok, _, err) = run_bin(
        "sample",
        &[
            "--checkpoint",
            run.to_str().unwrap(),
            "--num",
            "5",
            "--batch-size",
            "2",
            "--steps",
            "2",
            "--out",
            dir.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(pngs(&dir).len(), 5);
}

// ------------------------------------------------------------------------- 11. --set tables

#[test]
fn an_inline_table_override_merges_key_by_key() {
    let text = "[model.unet]\nblock_out_channels = [16, 32]\nsample_size = 32\n";
    let c = Config::parse(
        Path::new("t.toml"),
        text,
        &["model.unet={sample_size=8}".to_string()],
    )
    .unwrap();
    assert_eq!(c.model.unet.sample_size, 8);
    assert_eq!(c.model.unet.block_out_channels, vec![16, 32]);
}

// ------------------------------------------------------------------------- 12. output in data

#[test]
fn an_output_folder_inside_the_data_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("flat");
    write_flat_images(&data, 4, 8, |i| i as u8);
    for out in [data.clone(), data.join("run")] {
        let c = tiny_config(&data, &out);
        let cfg = write(&c, &tmp.path().join("c.toml"));
        let (ok, _, err) = train(&cfg, &["--check"]);
        assert!(!ok && err.contains("data.path"), "{}: {err}", out.display());
    }
}

// ------------------------------------------------------------------------- 13. --set and stage 1

#[test]
fn set_values_that_do_not_reach_stage_one_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, s2_path, _) = vq_chain(tmp.path());
    let s1 = Config::load(&tmp.path().join("stage1.toml"), &[]).unwrap();
    let mut short = s1;
    short.train.max_steps = 2;
    write(&short, &tmp.path().join("stage1.toml"));
    let other = tmp.path().join("other");
    copy_dir(&shapes(), &other);
    let set = format!("data.path=\"{}\"", other.display());
    let (ok, _, err) = train(&s2_path, &["--set", &set]);
    assert!(ok, "{err}");
    let at = err.find("stage 1:").unwrap_or(err.len());
    let note = &err[..at.min(err.len())];
    assert!(
        err.contains("data.path") && err.contains("stage 1") && note.contains("data.path"),
        "the difference must be said before stage 1 trains: {err}"
    );
}

// ------------------------------------------------------------------------- 14. signals

#[test]
fn a_signal_during_the_final_export_still_ends_the_run_as_interrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("flat");
    write_flat_images(&data, 8, 8, |i| (i * 30) as u8);
    let mut c = tiny_config(&data, &tmp.path().join("out"));
    c.train.max_steps = 2;
    c.train.batch_size = 4;
    c.checkpoint.every_steps = 0;
    let cfg = write(&c, &tmp.path().join("c.toml"));
    let r = common::train_cmd(&cfg, &[])
        .env("DIFFTRAIN_TEST_SIGNAL_AT", "export")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(143), "{err}");
    // The export was finished first.
    assert_eq!(export_step(&tmp.path().join("out")), Some(2), "{err}");
}

#[test]
fn a_signal_during_the_latent_cache_build_stops_between_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    captioned(&data, "text", "a test");
    let (mut c, _) = lora_config(tmp.path(), &data);
    c.data.cache_latents = true;
    let cfg = write(&c, &tmp.path().join("lora.toml"));
    let r = common::train_cmd(&cfg, &[])
        .env("DIFFTRAIN_TEST_SIGNAL_AT", "latent_cache")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(143), "{err}");
    assert!(!err.contains("step 1/"), "{err}");
}

// ------------------------------------------------------------------------- 15. launches

#[test]
fn launch_variables_that_cannot_be_a_launch_are_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = checked_config(tmp.path());
    let r = common::train_cmd(&cfg, &["--check"])
        .env("WORLD_SIZE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("WORLD_SIZE"), "{err}");
    // Two processes claiming RANK=1 of 3: refused when the second joins, not after a timeout.
    let port = common::free_port().to_string();
    let started = Instant::now();
    let children: Vec<_> = [0, 1, 1]
        .iter()
        .map(|rank| {
            common::train_cmd(&cfg, &["--set", "run.sync_timeout_secs=120"])
                .env("WORLD_SIZE", "3")
                .env("RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs = common::finish(children);
    assert!(started.elapsed() < Duration::from_secs(100));
    let rank0 = String::from_utf8_lossy(&outs[0].stderr);
    assert!(
        !outs[0].status.success() && rank0.contains("RANK=1"),
        "{rank0}"
    );
    // A foreign program on MASTER_PORT: said as such.
    let foreign = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = foreign.local_addr().unwrap().port().to_string();
    let held = std::thread::spawn(move || {
        let conn = foreign.accept();
        std::thread::sleep(Duration::from_secs(20));
        drop(conn);
    });
    let r = common::train_cmd(&cfg, &["--set", "run.sync_timeout_secs=5"])
        .env("WORLD_SIZE", "2")
        .env("RANK", "1")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", &port)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("not a difftrain rank 0"),
        "{err}"
    );
    drop(held);
}

// ------------------------------------------------------------------------- 16. smaller

#[test]
fn smaller_annoyances() {
    let tmp = tempfile::tempdir().unwrap();
    // `--check` writes nothing.
    let data = tmp.path().join("flat");
    write_flat_images(&data, 8, 8, |i| (i * 30) as u8);
    let out = tmp.path().join("never");
    let c = tiny_config(&data, &out);
    let cfg = write(&c, &tmp.path().join("c.toml"));
    let (ok, _, err) = train(&cfg, &["--check"]);
    assert!(ok, "{err}");
    assert!(!out.exists(), "--check created {}", out.display());

    // Stale temporaries of a killed writer are cleaned when a run starts.
    let run = trained_ddpm(tmp.path());
    for d in ["export", "samples"] {
        std::fs::write(run.join(d).join(".x.png.tmp-999999"), b"").unwrap();
    }
    let (ok, _, err) = train(
        &tmp.path().join("ddpm.toml"),
        &["--resume", "latest", "--set", "train.max_steps=3"],
    );
    assert!(ok, "{err}");
    for d in ["export", "samples"] {
        assert!(
            !run.join(d).join(".x.png.tmp-999999").exists(),
            "{d} kept a stale temporary"
        );
    }

    // One image is written as that image, not a bordered grid.
    let one = tmp.path().join("one.png");
    let (ok, _, err) = run_bin(
        "sample",
        &[
            "--checkpoint",
            run.to_str().unwrap(),
            "--num",
            "1",
            "--steps",
            "2",
            "--out",
            one.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    let img = image::open(&one).unwrap();
    assert_eq!((img.width(), img.height()), (8, 8));

    // A LyCORIS file is named as what it is.
    let locon = tmp.path().join("loha.safetensors");
    let t = burn::tensor::TensorData::new(vec![0.0f32; 8], vec![2, 4]);
    let tensors = std::collections::BTreeMap::from([
        (
            "lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a".to_string(),
            t.clone(),
        ),
        (
            "lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_b".to_string(),
            t,
        ),
    ]);
    difftrain::io::safetensors::save_tensors(&locon, &tensors, &Default::default()).unwrap();
    let err = difftrain::error::chain(&difftrain::io::lora::read(&locon).unwrap_err());
    assert!(
        err.contains("LoHa") && !err.contains("not a valid safetensors"),
        "{err}"
    );

    // A metadata line that is not UTF-8 is reported with its line.
    let bad = tmp.path().join("bad_meta");
    captioned(&bad, "text", "fine");
    let mut meta = std::fs::read(bad.join("metadata.jsonl")).unwrap();
    meta.extend_from_slice(b"{\"file_name\": \"0.png\", \"text\": \"\xff\xfe\"}\n");
    std::fs::write(bad.join("metadata.jsonl"), meta).unwrap();
    let e = difftrain::data::Dataset::open(
        difftrain::data::DataSource::ImageFolder,
        &bad,
        difftrain::data::OnBadImage::Error,
    )
    .err()
    .expect("invalid UTF-8 in metadata.jsonl is refused");
    let e = difftrain::error::chain(&e);
    assert!(e.contains("line 3") && e.contains("UTF-8"), "{e}");

    // Messages print values as the TOML says them, not Rust's Debug forms.
    // (run.devices in a launch printed `run.devices = List(["cpu:0"])`.)
    let r = common::train_cmd(&cfg, &["--check", "--set", "run.devices=[\"cpu:0\"]"])
        .env("WORLD_SIZE", "2")
        .env("RANK", "1")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "29500")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("run.devices = [\"cpu:0\"]") && !err.contains("List("),
        "{err}"
    );
    let _ = latest_step(&run);
}
