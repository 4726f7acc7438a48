//! `train.mixed_precision`: bf16 and fp16 train the quickstart with a loss curve close to f32's,
//! and an fp16 overflow skips exactly one step and halves the loss scale. (The LoRA family's
//! check is in tests/lora.rs, fp16 resume in tests/resume.rs.)

mod common;

use std::path::Path;

use difftrain::config::Config;
use difftrain::optim::precision::MixedPrecision;
use difftrain::pipelines;
use difftrain::train::TrainOptions;

const QUIET: TrainOptions = TrainOptions {
    write_outputs: false,
    quiet: true,
    overflow_at_step: None,
    overrides: Vec::new(),
};

/// The shipped quickstart config, shortened to `steps`, in `precision`.
fn quickstart(steps: usize, precision: MixedPrecision) -> Config {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut c = Config::load(&root.join("configs/quickstart.toml"), &[]).unwrap();
    c.data.path = root.join(&c.data.path);
    c.train.max_steps = steps;
    c.train.lr_warmup_steps = c.train.lr_warmup_steps.min(steps / 10);
    c.train.mixed_precision = precision;
    c
}

/// Means of consecutive windows of `n` losses.
fn windows(losses: &[f64], n: usize) -> Vec<f64> {
    losses
        .chunks(n)
        .map(|w| w.iter().sum::<f64>() / w.len() as f64)
        .collect()
}

/// Tolerance: every 10-step window of the loss within 5% of f32's (the loss falls from ~1 to
/// ~0.1 over these steps, so a broken half path shows as a gap many times larger).
#[test]
fn bf16_and_fp16_train_the_quickstart_like_f32() {
    let steps = 60;
    let run = |p| pipelines::train(&quickstart(steps, p), &QUIET).unwrap();
    let f32_run = run(MixedPrecision::No);
    let reference = windows(&f32_run.losses, 10);
    assert!(
        reference[0] > 2.0 * reference[5],
        "the f32 loss did not fall: {reference:?}"
    );
    for p in [MixedPrecision::Bf16, MixedPrecision::Fp16] {
        let s = run(p);
        assert_eq!(s.losses.len(), steps);
        assert_ne!(s.losses, f32_run.losses, "{p:?} computed exactly as f32");
        let got = windows(&s.losses, 10);
        eprintln!("{p:?}: {got:.4?} vs f32 {reference:.4?}");
        for (g, r) in got.iter().zip(&reference) {
            assert!(
                (g - r).abs() <= 0.05 * r,
                "{p:?}: {got:?} vs f32 {reference:?}"
            );
        }
        assert_eq!(s.skipped_steps, 0, "{p:?}");
        // fp16 keeps torch's initial scale (no overflow, 60 < 2000 clean steps); bf16 has none.
        let scale = (p == MixedPrecision::Fp16).then_some(65536.0);
        assert_eq!(s.loss_scale, scale, "{p:?}");
    }
}

/// An overflow at step 3: the step is skipped (the weights are bitwise those after step 2),
/// the scale halves, and training goes on from there; on two data-parallel ranks too.
#[test]
fn an_fp16_overflow_skips_exactly_one_step_and_halves_the_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_flat_images(&data, 8, 8, |i| (i * 30) as u8);
    let mut c = common::tiny_config(&data, &tmp.path().join("out"));
    c.train.batch_size = 4;
    c.train.mixed_precision = MixedPrecision::Fp16;
    c.train.max_steps = 2;
    let two = pipelines::ddpm::train(&c, &QUIET).unwrap();
    c.train.max_steps = 3;
    let overflow = TrainOptions {
        overflow_at_step: Some(3),
        ..QUIET
    };
    let skipped = pipelines::ddpm::train(&c, &overflow).unwrap();
    assert_eq!(skipped.summary.skipped_steps, 1);
    assert_eq!(skipped.summary.loss_scale, Some(32768.0));
    let bits = |m: &difftrain::models::DenoiserModel| {
        difftrain::io::safetensors::module_bytes(m, &Default::default()).unwrap()
    };
    assert_eq!(
        bits(&two.model),
        bits(&skipped.model),
        "the skipped step moved the weights"
    );
    // Data parallel (two worker threads): every rank sees the same all-reduced gradients, so
    // all skip the same step and keep the same scale and weights.
    let mut dp = c.clone();
    dp.run.devices = Some(difftrain::device::DeviceList::List(vec![
        "cpu:0".into(),
        "cpu:1".into(),
    ]));
    let two_ranks = pipelines::ddpm::train(&dp, &overflow).unwrap();
    assert_eq!(two_ranks.summary.skipped_steps, 1);
    assert_eq!(two_ranks.summary.loss_scale, Some(32768.0));
    assert_eq!(bits(&two_ranks.model), bits(&two_ranks.replicas[0]));
    // The next steps apply (the scale stays halved: 2000 clean steps before it grows).
    c.train.max_steps = 5;
    let after = pipelines::ddpm::train(&c, &overflow).unwrap();
    assert_eq!(after.summary.skipped_steps, 1);
    assert_eq!(after.summary.loss_scale, Some(32768.0));
    assert_ne!(bits(&skipped.model), bits(&after.model));
}
