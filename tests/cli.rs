//! The binaries as a user runs them: train -> samples + export -> sample, and error output.

mod common;

use std::path::Path;
use std::process::Command;

/// Runs `train --config <config> <extra>...`; returns (success, stdout, stderr).
fn run_train(config: &Path, extra: &[&str]) -> (bool, String, String) {
    let r = Command::new(env!("CARGO_BIN_EXE_train"))
        .arg("--config")
        .arg(config)
        .args(extra)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (r.status.success(), text(&r.stdout), text(&r.stderr))
}

fn write_config(path: &Path, data: &Path, out: &Path, extra: &str) {
    let text = format!(
        r#"[run]
name = "cli"
output_dir = "{out}"

[data]
path = "{data}"
resolution = 8
color = "grayscale"

[model.unet]
sample_size = 8
in_channels = 1
out_channels = 1
block_out_channels = [16, 32]
down_block_types = ["DownBlock2D", "AttnDownBlock2D"]
up_block_types = ["AttnUpBlock2D", "UpBlock2D"]
layers_per_block = 1
norm_num_groups = 8

[train]
max_steps = 3
batch_size = 4

[sample]
num_images = 4
num_inference_steps = 3
{extra}"#,
        out = out.display(),
        data = data.display()
    );
    std::fs::write(path, text).unwrap();
}

#[test]
fn train_then_sample_from_the_export() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, out, cfg) = (
        tmp.path().join("data"),
        tmp.path().join("run"),
        tmp.path().join("c.toml"),
    );
    common::write_flat_images(&data, 8, 8, |i| (i * 30) as u8);
    write_config(&cfg, &data, &out, "");
    let (ok, _, stderr) = run_train(&cfg, &[]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("step 3/3"),
        "plain progress lines when not a terminal: {stderr}"
    );
    for f in [
        "samples/step-3.png",
        "export/model_index.json",
        "export/unet/config.json",
        "export/unet/diffusion_pytorch_model.safetensors",
        "export/scheduler/scheduler_config.json",
        "export/difftrain.toml",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let grid = tmp.path().join("grid.png");
    let r = Command::new(env!("CARGO_BIN_EXE_sample"))
        .args([
            "--checkpoint",
            out.to_str().unwrap(),
            "--num",
            "6",
            "--steps",
            "4",
            "--sampler",
            "ddpm",
        ])
        .args(["--seed", "3", "--out", grid.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let img = image::open(&grid).unwrap();
    // 3 columns x 2 rows of 8px tiles with 2px gaps.
    assert_eq!((img.width(), img.height()), (3 * 10 + 2, 2 * 10 + 2));
}

#[test]
fn check_prints_resolved_config_and_overrides_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.toml");
    // (`--check` also checks that data.path exists; the run may not be inside it.)
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_config(&cfg, &data, &tmp.path().join("run"), "");
    let (ok, stdout, stderr) = run_train(&cfg, &["--check", "--set", "train.max_steps=42"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("max_steps = 42") && stdout.contains("adam_epsilon = 0.00000001"),
        "{stdout}"
    );
}

#[test]
fn bad_configs_fail_with_file_line_and_all_problems() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.toml");
    write_config(
        &cfg,
        Path::new("unused"),
        &tmp.path().join("run"),
        "bogus = 1\n",
    );
    let (ok, _, stderr) = run_train(&cfg, &[]);
    assert!(!ok);
    assert!(
        stderr.contains("c.toml") && stderr.contains("line 27") && stderr.contains("bogus"),
        "{stderr}"
    );

    write_config(&cfg, Path::new("unused"), &tmp.path().join("run"), "");
    let (ok, _, stderr) = run_train(
        &cfg,
        &[
            "--check",
            "--set",
            "data.resolution=12",
            "--set",
            "train.batch_size=0",
            "--set",
            "run.device=tpu",
        ],
    );
    assert!(!ok);
    for needle in [
        "sample_size = 8 but data.resolution = 12",
        "train.batch_size",
        "run.device = \"tpu\"",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in {stderr}");
    }
}

#[test]
fn data_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, cfg) = (tmp.path().join("data"), tmp.path().join("c.toml"));
    std::fs::create_dir_all(&data).unwrap();
    write_config(&cfg, &data, &tmp.path().join("run"), "");
    let run = |extra: &[&str]| {
        let (ok, _, stderr) = run_train(&cfg, extra);
        (ok, stderr)
    };
    let (ok, err) = run(&[]);
    assert!(!ok && err.contains("is empty"), "{err}");

    common::write_flat_images(&data, 4, 8, |_| 100);
    std::fs::write(data.join("broken.png"), b"not a png at all").unwrap();
    let (ok, err) = run(&[
        "--set",
        "train.max_steps=1",
        "--set",
        "export.enabled=false",
        "--set",
        "checkpoint.every_steps=0",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("broken.png") && err.contains("skipped 1 unreadable"),
        "{err}"
    );

    let (ok, err) = run(&["--set", "data.on_bad_image=error"]);
    assert!(
        !ok && err.contains("unreadable image") && err.contains("broken.png"),
        "{err}"
    );

    let (ok, err) = run(&["--set", "train.batch_size=16"]);
    assert!(!ok && err.contains("fewer than one batch of 16"), "{err}");
}

#[test]
fn mnist_idx_files_load_plain_and_gzipped() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = vec![0, 0, 8, 3, 0, 0, 0, 6, 0, 0, 0, 8, 0, 0, 0, 8];
    bytes.extend((0..6 * 64).map(|i| (i % 251) as u8));
    let gz_dir = tmp.path().join("gz");
    std::fs::create_dir_all(&gz_dir).unwrap();
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(gz_dir.join("train-images-idx3-ubyte.gz")).unwrap(),
        flate2::Compression::fast(),
    );
    enc.write_all(&bytes).unwrap();
    enc.finish().unwrap();
    let plain = tmp.path().join("plain-idx3-ubyte");
    std::fs::write(&plain, &bytes).unwrap();
    for path in [gz_dir.as_path(), plain.as_path()] {
        let ds = difftrain::data::Dataset::open(
            difftrain::data::DataSource::MnistIdx,
            path,
            difftrain::data::OnBadImage::Error,
        )
        .unwrap();
        assert_eq!(ds.len(), 6);
        let img = ds.decode(1).unwrap().to_luma8();
        assert_eq!(img.get_pixel(0, 0).0[0], 64);
    }
    bytes[3] = 1;
    std::fs::write(&plain, &bytes).unwrap();
    let err = difftrain::data::Dataset::open(
        difftrain::data::DataSource::MnistIdx,
        &plain,
        difftrain::data::OnBadImage::Error,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("magic number"), "{err}");
}

#[test]
fn bench_prints_one_json_line_per_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.toml");
    write_config(&cfg, &tmp.path().join("data"), &tmp.path().join("run"), "");
    let r = Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("--config")
        .arg(&cfg)
        .args(["--warmup", "1", "--steps", "2"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["impl"], "burn-flex");
    assert_eq!(v["batch"], 4);
    assert!(v["params"].as_u64().unwrap() > 0);
    assert!(v["images_per_sec"].as_f64().unwrap() > 0.0);
    // The replica split (docs/benchmarks.md) runs and reports the same model.
    let r = Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("--config")
        .arg(&cfg)
        .args(["--warmup", "0", "--steps", "1", "--split", "2"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let split: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(split["params"], v["params"]);
    let phases = v["phase_percent"].as_object().unwrap();
    let total: f64 = phases.values().map(|p| p.as_f64().unwrap()).sum();
    assert!((total - 100.0).abs() < 0.5, "{phases:?}");
    // The PyTorch side builds diffusers' UNet2DModel from this file.
    let json = tmp.path().join("unet.json");
    let r = Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("--config")
        .arg(&cfg)
        .arg("--diffusers-config")
        .arg(&json)
        .output()
        .unwrap();
    assert!(r.status.success());
    let unet: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(unet["_class_name"], "UNet2DModel");
}

/// `--check` makes the run's devices: a CUDA device is a clear error here (a CPU build, or no
/// driver in a CUDA build), never a panic at the first tensor.
#[test]
fn check_reports_an_unusable_cuda_device() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.toml");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_config(&cfg, &data, &tmp.path().join("run"), "");
    let (ok, _, stderr) = run_train(&cfg, &["--check", "--set", "run.device=\"cuda:3\""]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("cuda:3")
            && (stderr.contains("--features cuda") || stderr.contains("cannot be loaded")),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
