//! The discrete family end to end: a VQ-VAE learns the shipped shapes, a Gated PixelCNN prior
//! learns its codes, both stages chain from one config, and `sample` decodes sampled codes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::prelude::*;
use difftrain::config::Config;
use difftrain::data::{ColorMode, Dataset, Transform};
use difftrain::models::Architecture;
use difftrain::optim::precision::MixedPrecision;
use difftrain::pipelines::load_run;
use difftrain::pipelines::vq::{load_stage1, train_vqvae};
use difftrain::train::TrainOptions;
use difftrain::train::objectives::vq::reconstruction_mse;

fn shapes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/shapes")
}

/// Stage 1 on the shipped shapes at 16x16 (4x4 code maps), small enough for seconds.
fn vqvae_config(out: &Path) -> Config {
    let mut c = Config::default();
    c.run.name = "vqvae_test".into();
    c.run.output_dir = Some(out.to_path_buf());
    c.data.path = shapes();
    c.data.resolution = 16;
    c.data.color = ColorMode::Rgb;
    c.model.architecture = Architecture::Vqvae;
    c.model.vqvae.in_channels = 3;
    c.model.vqvae.dim = 32;
    c.model.vqvae.res_dim = 16;
    c.model.vqvae.embedding_dim = 16;
    c.model.vqvae.num_embeddings = 16;
    c.train.batch_size = 32;
    c.train.learning_rate = 2e-3;
    c.train.adam_weight_decay = 0.0;
    c.train.max_grad_norm = 0.0;
    c.sample.num_images = 8;
    c.checkpoint.every_steps = 0;
    c.logging.log_every = 1000;
    c
}

fn first_images(c: &Config, n: usize) -> (Vec<f32>, [usize; 4]) {
    let ds = Dataset::open(c.data.source, &c.data.path, c.data.on_bad_image).unwrap();
    let t = Transform {
        resolution: c.data.resolution,
        color: c.data.color,
        crop: c.data.crop,
        random_flip: false,
    };
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let mut v = Vec::new();
    for i in 0..n {
        v.extend(t.apply(ds.decode(i).unwrap(), &mut rng));
    }
    (v, [n, 3, c.data.resolution, c.data.resolution])
}

#[test]
fn short_vqvae_run_reconstructs_the_shipped_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = vqvae_config(&tmp.path().join("run"));
    c.train.max_steps = 500;
    let opts = TrainOptions {
        write_outputs: false,
        quiet: true,
        overflow_at_step: None,
        overrides: Vec::new(),
    };
    let device = Device::flex();
    let (images, shape) = first_images(&c, 64);
    let untrained = {
        difftrain::nn::seed_init(c.run.seed);
        c.model.vqvae.init(&device)
    };
    let before = reconstruction_mse(&untrained, &images, shape, &device);
    let out = train_vqvae(&c, &opts).unwrap();
    let after = reconstruction_mse(&out.model, &images, shape, &device);
    // Pixels are in [-1, 1]. Measured on the development machine: untrained 0.467, after 500
    // steps 0.024; the bound leaves room for other CPUs' float rounding.
    assert!(
        after < 0.04,
        "reconstruction MSE {after} (untrained {before})"
    );
    assert!(before > 0.1, "untrained MSE {before}");
    eprintln!("reconstruction MSE: untrained {before:.4}, after 500 steps {after:.4}");
}

fn bin(name: &str) -> Command {
    Command::new(match name {
        "train" => env!("CARGO_BIN_EXE_train"),
        _ => env!("CARGO_BIN_EXE_sample"),
    })
}

fn ok(cmd: &mut Command) -> String {
    let r = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr).to_string();
    assert!(r.status.success(), "{err}");
    err
}

#[test]
fn chained_stages_train_export_and_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let stage1_out = tmp.path().join("stage1");
    let mut s1 = vqvae_config(&stage1_out);
    s1.train.max_steps = 60;
    s1.checkpoint.every_steps = 30;
    let s1_path = tmp.path().join("vqvae.toml");
    std::fs::write(&s1_path, s1.to_toml()).unwrap();

    // One config chains both stages: stage 1 is trained because its output is empty.
    let mut s2 = s1.clone();
    s2.run.name = "pixelcnn_test".into();
    s2.run.output_dir = Some(tmp.path().join("stage2"));
    s2.model.architecture = Architecture::GatedPixelcnn;
    s2.model.pixelcnn.vqvae = stage1_out.clone();
    s2.model.pixelcnn.vqvae_config = Some(s1_path.clone());
    s2.model.pixelcnn.n_blocks = 3;
    s2.model.pixelcnn.dim = 16;
    s2.model.pixelcnn.linear_dim = 16;
    s2.train.max_steps = 20;
    s2.ema.enabled = true;
    s2.checkpoint.every_steps = 10;
    let s2_path = tmp.path().join("pixelcnn.toml");
    std::fs::write(&s2_path, s2.to_toml()).unwrap();
    let err = ok(bin("train").arg("--config").arg(&s2_path));
    assert!(
        err.contains("stage 1:") && err.contains("stage 2:"),
        "{err}"
    );

    // Stage 1 wrote a reconstruction grid (input | reconstruction pairs) and its export.
    let recon = image::open(stage1_out.join("samples/step-60.png")).unwrap();
    assert_eq!((recon.width(), recon.height()), (8 * 18 + 2, 2 * 18 + 2));
    assert!(stage1_out.join("export/vqvae/model.safetensors").is_file());
    // Stage 2: its export carries the VQ-VAE too, so it samples on its own.
    let export = tmp.path().join("stage2/export");
    for f in [
        "pixelcnn/model.safetensors",
        "pixelcnn_no_ema/model.safetensors",
        "vqvae/model.safetensors",
        "vqvae.toml",
        "difftrain.toml",
    ] {
        assert!(export.join(f).is_file(), "missing {f}");
    }

    // Sampled codes are in range and decode to the data's value range.
    let device = Device::flex();
    let cfg = Config::load(&export.join("difftrain.toml"), &[]).unwrap();
    let stage1 = load_stage1(&cfg, Some(&export), &device).unwrap();
    let k = stage1.cfg.model.vqvae.num_embeddings;
    let (_, prior, _) = load_run(&export, &[], |c| Ok(c.model.pixelcnn.init(k, &device))).unwrap();
    let mut rngs = difftrain::seeds::ImageRngs::new(1, 0, 6);
    let codes = prior.sample(6, 4, 4, 1.0, &mut rngs, &device);
    let values: Vec<i64> = codes
        .clone()
        .into_data()
        .convert::<i64>()
        .try_to_vec()
        .unwrap();
    assert_eq!(values.len(), 6 * 16);
    assert!(
        values.iter().all(|&v| (0..k as i64).contains(&v)),
        "{values:?}"
    );
    let distinct: std::collections::BTreeSet<i64> = values.iter().cloned().collect();
    assert!(distinct.len() > 1, "all sampled codes equal: {distinct:?}");
    let pixels: Vec<f32> = stage1
        .model
        .decode(codes)
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .unwrap();
    assert!(
        pixels.iter().all(|v| (-1.0..=1.0).contains(v)),
        "decoded range"
    );

    // The `sample` binary: from the stage-2 run (its export), and a clear refusal for stage 1.
    let grid = tmp.path().join("grid.png");
    ok(bin("sample")
        .args(["--num", "4", "--temperature", "0.8", "--out"])
        .arg(&grid)
        .arg("--checkpoint")
        .arg(tmp.path().join("stage2")));
    let img = image::open(&grid).unwrap();
    assert_eq!((img.width(), img.height()), (2 * 18 + 2, 2 * 18 + 2));
    // ...and from a stage-2 checkpoint (EMA weights, VQ-VAE found through the config).
    ok(bin("sample")
        .args(["--num", "2", "--out"])
        .arg(&grid)
        .arg("--checkpoint")
        .arg(tmp.path().join("stage2/checkpoint-10")));
    let r = bin("sample")
        .arg("--checkpoint")
        .arg(&stage1_out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("is a VQ-VAE"), "{err}");

    // Resuming stage 2 works like every family: exact continuation from its checkpoint.
    let err = ok(bin("train").arg("--config").arg(&s2_path).args([
        "--resume",
        "latest",
        "--set",
        "train.max_steps=30",
    ]));
    assert!(
        err.contains("resuming from") && err.contains("checkpoint-20"),
        "{err}"
    );
}

#[test]
fn pixelcnn_refuses_a_missing_or_mismatched_stage1() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = vqvae_config(&tmp.path().join("s2"));
    c.model.architecture = Architecture::GatedPixelcnn;
    c.model.pixelcnn.vqvae = tmp.path().join("nothing-here");
    let path = tmp.path().join("c.toml");
    std::fs::write(&path, c.to_toml()).unwrap();
    let r = bin("train").arg("--config").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("nothing-here") && err.contains("neither a checkpoint"),
        "{err}"
    );
}

/// Both stages in bf16 and fp16 (the VQ search and losses in f32, the PixelCNN's log-softmax in
/// f32, the frozen stage-1 VQ-VAE held in half): each step's loss within 5% of f32's.
#[test]
fn both_stages_train_in_bf16_and_fp16_like_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = |write_outputs| TrainOptions {
        write_outputs,
        quiet: true,
        overflow_at_step: None,
        overrides: Vec::new(),
    };
    let stage1_out = tmp.path().join("stage1");
    let mut s1 = vqvae_config(&stage1_out);
    s1.train.max_steps = 30;
    train_vqvae(&s1, &opts(true)).unwrap();
    let mut s2 = s1.clone();
    s2.model.architecture = Architecture::GatedPixelcnn;
    s2.model.pixelcnn.vqvae = stage1_out;
    s2.model.pixelcnn.n_blocks = 3;
    s2.model.pixelcnn.dim = 16;
    s2.model.pixelcnn.linear_dim = 16;
    for (stage, base) in [("vqvae", s1), ("pixelcnn", s2)] {
        let run = |p: MixedPrecision| {
            let mut c = base.clone();
            c.run.output_dir = Some(tmp.path().join(format!("{stage}-{p:?}")));
            c.train.max_steps = 10;
            c.train.mixed_precision = p;
            difftrain::pipelines::train(&c, &opts(false))
                .unwrap()
                .losses
        };
        let reference = run(MixedPrecision::No);
        for p in [MixedPrecision::Bf16, MixedPrecision::Fp16] {
            common::assert_losses_close(&format!("{stage} {p:?}"), &run(p), &reference, 0.05);
        }
    }
}
