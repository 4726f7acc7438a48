//! Data parallelism on CPU worker threads: replicas stay identical and equal one worker on the
//! same global batches; one all-reduce per optimizer step; rank 0 alone writes; a failing rank
//! stops the others with its error; kill-and-resume is exact, also under another world size.

mod common;

use common::{copy_dir, latest_step, listing, run, train_cmd};

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use difftrain::config::Config;
use difftrain::device::DeviceList;
use difftrain::io::safetensors as io;
use difftrain::models::Architecture;
use difftrain::optim::lr::LrSchedule;
use difftrain::pipelines::ddpm::train as train_diffusion;
use difftrain::pipelines::vq::train_vqvae;
use difftrain::train::TrainOptions;

const QUIET: TrainOptions = TrainOptions {
    write_outputs: false,
    quiet: true,
    overflow_at_step: None,
    overrides: Vec::new(),
};

fn cpu_workers(n: usize) -> Option<DeviceList> {
    Some(DeviceList::List(
        (0..n).map(|i| format!("cpu:{i}")).collect(),
    ))
}

/// Largest absolute difference between two sets of named tensors with the same keys.
fn max_diff(
    a: &std::collections::BTreeMap<String, io::HostTensor>,
    b: &std::collections::BTreeMap<String, io::HostTensor>,
) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(k, t)| t.data.iter().zip(&b[k].data).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

/// Flips, noise offset, accumulation over 3 micro-batches, EMA: every piece a rank must agree on.
fn dp_config(tmp: &Path) -> Config {
    let data = tmp.join("data");
    if !data.exists() {
        common::write_flat_images(&data, 40, 8, |i| (i * 6) as u8);
    }
    let mut c = common::tiny_config(&data, &tmp.join("out"));
    c.data.random_flip = true;
    c.diffusion.noise_offset = 0.1;
    c.train.batch_size = 8;
    c.train.gradient_accumulation_steps = 3;
    c.train.max_steps = 3;
    c.ema.enabled = true;
    c
}

#[test]
fn two_and_four_workers_equal_one_worker_with_one_all_reduce_per_step() {
    let tmp = tempfile::tempdir().unwrap();
    let base = dp_config(tmp.path());
    let one = train_diffusion(&base, &QUIET).unwrap();
    assert_eq!(one.summary.world_size, 1);
    assert_eq!(one.summary.all_reduces, 0);
    let one_weights = io::named_tensors(&one.model);
    let init = io::named_tensors(
        &difftrain::train::objectives::diffusion::build_model(
            &base,
            &burn::prelude::Device::flex(),
        )
        .unwrap(),
    );
    assert!(
        max_diff(&one_weights, &init) > 1e-4,
        "training moved nothing"
    );

    // 2 workers (each also splitting its 4 images over 2 threads) and 4 workers.
    for (world, split) in [(2, 1), (2, 2), (4, 1)] {
        let mut c = base.clone();
        c.run.devices = cpu_workers(world);
        c.train.batch_split = split;
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        let dp = train_diffusion(&c, &QUIET).unwrap();
        let s = &dp.summary;
        assert_eq!(s.world_size, world);
        // 3 optimizer steps x 3 micro-batches: one all-reduce per optimizer step, not per
        // micro-batch.
        assert_eq!(s.all_reduces, 3, "world {world}");
        let rank0 = io::named_tensors(&dp.model);
        assert_eq!(dp.replicas.len(), world - 1);
        for (r, replica) in dp.replicas.iter().enumerate() {
            let d = max_diff(&rank0, &io::named_tensors(replica));
            assert_eq!(d, 0.0, "rank {} differs from rank 0 by {d}", r + 1);
        }
        // The gradients are the same sums in another order (each rank's rows, then the
        // all-reduce), and Adam divides every step by the gradient's own scale: rounding comes
        // out at up to ~2% of one lr-sized step, most in `to_k.bias`, whose exact gradient is zero
        // (softmax ignores a shift shared by a query's scores), so its steps are pure rounding
        // noise. A lost or doubled sample changes every gradient by about 1/8 (8 images per
        // micro-batch).
        let d = max_diff(&rank0, &one_weights);
        assert!(
            d < 5e-5,
            "world {world} split {split}: {d:e} from one worker"
        );
        let ema = max_diff(
            &io::named_tensors(dp.ema.as_ref().unwrap()),
            &io::named_tensors(one.ema.as_ref().unwrap()),
        );
        assert!(ema < 5e-5, "EMA differs by {ema:e}");
        assert!((s.last_loss - one.summary.last_loss).abs() < 1e-5);
    }
}

#[test]
fn vqvae_replicas_stay_identical_through_code_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Config::default();
    c.run.output_dir = Some(tmp.path().join("out"));
    c.data.path = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/shapes");
    c.data.resolution = 16;
    c.model.architecture = Architecture::Vqvae;
    c.model.vqvae.in_channels = 3;
    c.model.vqvae.dim = 16;
    c.model.vqvae.res_dim = 8;
    c.model.vqvae.embedding_dim = 8;
    c.model.vqvae.num_embeddings = 32;
    c.train.batch_size = 8;
    c.train.gradient_accumulation_steps = 2;
    c.train.max_steps = 4;
    c.run.devices = cpu_workers(2);
    assert!(c.problems().is_empty(), "{:?}", c.problems());
    let out = train_vqvae(&c, &QUIET).unwrap();
    // 32 codes, 16 positions per image: the first steps leave codes unused, so restarts ran.
    let d = max_diff(
        &io::named_tensors(&out.model),
        &io::named_tensors(&out.replicas[0]),
    );
    assert_eq!(d, 0.0, "the replicas' VQ-VAEs differ by {d}");
    assert_eq!(out.summary.all_reduces, 4);
}

fn write_config(c: &Config, path: &Path) -> PathBuf {
    std::fs::write(path, c.to_toml()).unwrap();
    path.to_path_buf()
}

/// A 12-step CLI run on 2 CPU workers with checkpoints, logs, samples and export.
fn cli_config(tmp: &Path, name: &str, world: usize) -> (Config, PathBuf) {
    let mut c = dp_config(tmp);
    c.run.output_dir = Some(tmp.join(name));
    c.run.devices = cpu_workers(world);
    c.train.gradient_accumulation_steps = 2;
    c.train.max_steps = 12;
    c.train.lr_scheduler = LrSchedule::ConstantWithWarmup;
    c.train.lr_warmup_steps = 3;
    c.checkpoint.every_steps = 4;
    c.checkpoint.keep_last = 0;
    c.logging.log_every = 1;
    c.logging.sample_every = 4;
    let path = write_config(&c, &tmp.join(format!("{name}.toml")));
    (c, path)
}

#[test]
fn rank_zero_writes_and_kill_resume_is_exact_under_any_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let (single, single_cfg) = cli_config(tmp.path(), "single", 1);
    let (ok, err) = run(&single_cfg, &[]);
    assert!(ok, "{err}");
    let (a, a_cfg) = cli_config(tmp.path(), "a", 2);
    let (ok, err) = run(&a_cfg, &[]);
    assert!(ok, "{err}");
    assert!(
        err.contains("data parallel: 2 replicas (CPU worker threads)"),
        "{err}"
    );

    // Rank 0 alone wrote: the same files as the single-device run, one event file with one
    // record per step and tag.
    let (out_a, out_single) = (a.output_dir(), single.output_dir());
    assert_eq!(listing(&out_a), listing(&out_single));
    assert_eq!(
        listing(&out_a.join("samples")),
        listing(&out_single.join("samples"))
    );
    let events = listing(&out_a.join("logs"));
    assert_eq!(events.len(), 1, "{events:?}");
    let bytes = std::fs::read(out_a.join("logs").join(&events[0])).unwrap();
    let losses = bytes.windows(10).filter(|w| w == b"train/loss").count();
    assert_eq!(losses, 12);
    let weights = |dir: &Path, step: usize| {
        io::load_safetensors(&dir.join(format!("checkpoint-{step}/model.safetensors"))).unwrap()
    };
    let d = max_diff(&weights(&out_a, 12), &weights(&out_single, 12));
    // Summation order differs (rank sums, then the mean), and Adam carries the rounding over 12
    // steps: ~1e-5 here against weight changes of ~1e-2.
    assert!(d < 1e-4, "2 workers vs 1 after 12 steps: {d:e}");

    // Killed (SIGKILL) right after checkpoint-4 and resumed on 2 workers: bitwise identical.
    let (b, b_cfg) = cli_config(tmp.path(), "b", 2);
    let out_b = b.output_dir();
    let mut child = train_cmd(&b_cfg, &["--set", "train.max_steps=1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while latest_step(&out_b).is_none_or(|s| s < 4) {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(Instant::now() < deadline, "no checkpoint-4 appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = latest_step(&out_b).unwrap();
    assert!(killed_at < 12, "killed too late: {killed_at}");
    // Resume the copy of the killed run on 1 and on 4 workers too.
    let copy = |name: &str| {
        let dst = tmp.path().join(name);
        copy_dir(&out_b, &dst);
        dst
    };
    let (out_c, out_d) = (copy("c"), copy("d"));
    let (ok, err) = run(&b_cfg, &["--resume", "latest"]);
    assert!(ok, "{err}");
    let file = |dir: &Path| std::fs::read(dir.join("checkpoint-12/model.safetensors")).unwrap();
    assert_eq!(
        file(&out_a),
        file(&out_b),
        "resumed on 2 workers: not bitwise equal"
    );
    let ema = |dir: &Path| std::fs::read(dir.join("checkpoint-12/ema.safetensors")).unwrap();
    assert_eq!(ema(&out_a), ema(&out_b));

    for (dir, devices) in [
        (&out_c, "[\"cpu:0\"]"),
        (&out_d, "[\"cpu:0\",\"cpu:1\",\"cpu:2\",\"cpu:3\"]"),
    ] {
        let dir_set = format!("run.output_dir=\"{}\"", dir.display());
        let dev_set = format!("run.devices={devices}");
        let (ok, err) = run(
            &b_cfg,
            &["--resume", "latest", "--set", &dir_set, "--set", &dev_set],
        );
        assert!(ok, "{err}");
        assert!(
            err.contains("note: changed since the checkpoint: run.devices"),
            "{err}"
        );
        let d = max_diff(&weights(dir, 12), &weights(&out_a, 12));
        assert!(d < 1e-4, "resumed with run.devices = {devices}: {d:e}");
    }
}

#[test]
fn a_failing_rank_stops_the_others_with_its_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = dp_config(tmp.path());
    // A file that is not an image, found only by the rank whose shard holds it.
    std::fs::write(tmp.path().join("data/0003.png"), b"not a png").unwrap();
    c.data.on_bad_image = difftrain::data::OnBadImage::Error;
    c.run.devices = cpu_workers(2);
    // Far longer than the run: the others must be released by the failure, not the timeout.
    c.run.sync_timeout_secs = 600.0;
    c.train.max_steps = 40;
    let path = write_config(&c, &tmp.path().join("bad.toml"));
    let (ok, err) = run(&path, &[]);
    assert!(!ok);
    assert!(err.contains("0003.png"), "{err}");
    assert!(!err.contains("waited"), "{err}");
}
