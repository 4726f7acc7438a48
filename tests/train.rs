//! End-to-end training behaviour on tiny models and datasets the tests make themselves.

mod common;

use difftrain::config::Config;
use difftrain::diffusion::sampling::SamplerKind;
use difftrain::io::safetensors as io;
use difftrain::pipelines::ddpm::{generate, train};
use difftrain::train::TrainOptions;
use difftrain::train::objectives::diffusion::build_model;

const QUIET: TrainOptions = TrainOptions {
    write_outputs: false,
    quiet: true,
    overflow_at_step: None,
    overrides: Vec::new(),
};

#[test]
fn four_micro_batches_of_8_equal_one_batch_of_32() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_flat_images(&data, 64, 8, |i| (i * 4) as u8);
    let run = |batch: usize, accum: usize| {
        let mut c = common::tiny_config(&data, &tmp.path().join("out"));
        c.train.batch_size = batch;
        c.train.gradient_accumulation_steps = accum;
        c.train.max_steps = 2;
        c.data.random_flip = true;
        c.diffusion.noise_offset = 0.1;
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        io::named_tensors(&train(&c, &QUIET).unwrap().model)
    };
    let whole = run(32, 1);
    let micro = run(8, 4);
    let init = {
        let c = common::tiny_config(&data, &tmp.path().join("out"));
        io::named_tensors(&build_model(&c, &burn::prelude::Device::flex()).unwrap())
    };
    assert_eq!(whole.len(), micro.len());
    let (mut max_diff, mut max_change) = (0f32, 0f32);
    for (k, a) in &whole {
        let b = &micro[k];
        for ((x, y), z) in a.data.iter().zip(&b.data).zip(&init[k].data) {
            max_diff = max_diff.max((x - y).abs());
            max_change = max_change.max((x - z).abs());
        }
    }
    // The steps moved the weights by ~lr per step, and the two ways agree far closer than that:
    // the same gradient sums in another order, and Adam's first steps are about lr·sign(g), so
    // elements whose gradient is near zero carry the rounding (measured 1.5e-5, 1.5% of a step).
    assert!(
        max_change > 1e-4,
        "training did not change the weights ({max_change:e})"
    );
    assert!(
        max_diff < 5e-5,
        "accumulated and whole-batch weights differ by {max_diff:e}"
    );
}

/// Mode `m` of the test distribution: a 8x8 image split in two halves at -0.8 / +0.8,
/// left|right for `m = 0`, top/bottom for `m = 1`.
fn split_template(m: usize) -> Vec<f32> {
    (0..64)
        .map(|i| {
            if (if m == 0 { i % 8 } else { i / 8 }) < 4 {
                -0.8
            } else {
                0.8
            }
        })
        .collect()
}

#[test]
fn learns_a_two_mode_pattern_distribution() {
    // Training images are one of two split patterns. Pure noise, or a model that has not
    // learned, correlates ~0 with both; a model that learned produces samples that correlate
    // strongly with one of them, and both modes appear.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..64 {
        let t = split_template(i % 2);
        let px: Vec<u8> = t
            .iter()
            .map(|v| ((v + 1.0) * 127.5).round() as u8)
            .collect();
        image::GrayImage::from_raw(8, 8, px)
            .unwrap()
            .save(data.join(format!("{i:03}.png")))
            .unwrap();
    }
    let mut c = common::tiny_config(&data, &tmp.path().join("out"));
    c.train.max_steps = 300;
    c.train.batch_size = 32;
    c.train.learning_rate = 2e-3;
    let out = train(&c, &QUIET).unwrap();
    let n = 64;
    let device = burn::prelude::Device::flex();
    let (pixels, _) = generate(
        &out.model,
        &c,
        &device,
        n,
        Some(20),
        Some(SamplerKind::Ddim),
        (1, 0),
    );
    let corr = |a: &[f32], b: &[f32]| {
        let (ma, mb) = (a.iter().sum::<f32>() / 64.0, b.iter().sum::<f32>() / 64.0);
        let cov: f32 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let va: f32 = a.iter().map(|x| (x - ma).powi(2)).sum();
        let vb: f32 = b.iter().map(|y| (y - mb).powi(2)).sum();
        cov / (va * vb).sqrt().max(1e-6)
    };
    let (t0, t1) = (split_template(0), split_template(1));
    let mut counts = [0usize; 2];
    for img in pixels.chunks(64) {
        let (c0, c1) = (corr(img, &t0), corr(img, &t1));
        if c0.max(c1) > 0.9 {
            counts[usize::from(c1 > c0)] += 1;
        }
    }
    eprintln!(
        "modes {counts:?} of {n}; final loss {:.4}",
        out.summary.last_loss
    );
    assert!(
        counts[0] + counts[1] >= n * 8 / 10,
        "only {counts:?} of {n} samples match a mode"
    );
    assert!(
        counts[0] >= n / 8 && counts[1] >= n / 8,
        "a mode is missing: {counts:?}"
    );
}

#[test]
fn default_config_is_valid_and_every_shipped_config_parses() {
    assert!(
        Config::default().problems().is_empty(),
        "{:?}",
        Config::default().problems()
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 2, "expected the shipped configs in {}", dir.display());
}

#[test]
fn tutorial_unet_preset_trains_at_28_and_odd_sizes() {
    use difftrain::models::Architecture;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_flat_images(&data, 8, 28, |i| (i * 20) as u8);
    // 28 -> 14 -> 7 -> 3 exercises both the even (4x4) and odd (3x3) resampling paths.
    for res in [28usize, 16] {
        let mut c = common::tiny_config(&data, &tmp.path().join("out"));
        c.model.architecture = Architecture::TutorialUnet;
        c.model.tutorial.image_size = res;
        c.data.resolution = res;
        c.train.max_steps = 2;
        c.train.batch_size = 4;
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        let out = train(&c, &QUIET).unwrap();
        assert!(out.summary.last_loss.is_finite());
        let (pixels, shape) = generate(
            &out.model,
            &c,
            &burn::prelude::Device::flex(),
            2,
            Some(2),
            None,
            (0, 0),
        );
        assert_eq!(shape, [2, 1, res, res]);
        assert_eq!(pixels.len(), 2 * res * res);
    }
}

#[test]
fn tutorial_preset_has_the_pytorch_twins_parameter_count() {
    // scripts/torch_models.py::TutorialUNet reports 483,360 parameters (torch 2.15,
    // `sum(p.numel() for p in model.parameters())`); scripts/bench.sh prints both counts.
    use burn::module::Module;
    use difftrain::models::tutorial_unet::TutorialUNetConfig;
    let model = TutorialUNetConfig::default().init(&burn::prelude::Device::flex());
    assert_eq!(model.num_params(), 483_360);
}

#[test]
fn batch_split_over_replica_threads_matches_the_unsplit_step() {
    // The same 3 steps (accumulation 2, random flips, noise offset) computed with each
    // micro-batch in one piece and in 4 slices on replica threads: the noise is drawn in the
    // same order, so only float summation order differs.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_flat_images(&data, 64, 8, |i| (i * 4) as u8);
    let run = |split: usize| {
        let mut c = common::tiny_config(&data, &tmp.path().join("out"));
        c.train.batch_size = 8;
        c.train.gradient_accumulation_steps = 2;
        c.train.max_steps = 3;
        c.train.batch_split = split;
        c.data.random_flip = true;
        c.diffusion.noise_offset = 0.1;
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        let out = train(&c, &QUIET).unwrap();
        (io::named_tensors(&out.model), out.summary.last_loss)
    };
    let (whole, loss_whole) = run(1);
    let (split, loss_split) = run(4);
    let init = {
        let c = common::tiny_config(&data, &tmp.path().join("out"));
        io::named_tensors(&build_model(&c, &burn::prelude::Device::flex()).unwrap())
    };
    let (mut max_diff, mut max_change) = (0f32, 0f32);
    for (k, a) in &whole {
        for ((x, y), z) in a.data.iter().zip(&split[k].data).zip(&init[k].data) {
            max_diff = max_diff.max((x - y).abs());
            max_change = max_change.max((x - z).abs());
        }
    }
    // Rounding carried through Adam, as in `four_micro_batches_of_8_equal_one_batch_of_32`
    // (measured 3.1e-5).
    assert!(max_change > 1e-4, "weights did not move: {max_change}");
    assert!(max_diff < 5e-5, "split differs by {max_diff}");
    assert!(
        (loss_whole - loss_split).abs() < 1e-5,
        "{loss_whole} vs {loss_split}"
    );
}
