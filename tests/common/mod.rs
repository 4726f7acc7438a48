//! Helpers shared by the integration tests: tiny datasets and tiny configs.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use difftrain::config::Config;
use difftrain::data::ColorMode;
use difftrain::models::unet_2d::UNet2DConfig;
use difftrain::models::unet_2d_blocks::{DownBlockType, UpBlockType};

/// Writes `n` grayscale `size`x`size` PNGs; image `i` is a flat field at `value(i)`.
#[allow(dead_code)]
pub fn write_flat_images(dir: &Path, n: usize, size: u32, value: impl Fn(usize) -> u8) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let img = image::GrayImage::from_pixel(size, size, image::Luma([value(i)]));
        img.save(dir.join(format!("{i:04}.png"))).unwrap();
    }
}

/// A two-level UNet2DModel small enough to train in seconds at 8x8.
#[allow(dead_code)] // shared by several test crates; not every one uses it
pub fn tiny_config(data: &Path, out: &Path) -> Config {
    let mut c = Config::default();
    c.run.name = "test".into();
    c.run.output_dir = Some(out.to_path_buf());
    c.data.path = data.to_path_buf();
    c.data.resolution = 8;
    c.data.color = ColorMode::Grayscale;
    c.data.num_workers = 2;
    c.model.unet = UNet2DConfig {
        sample_size: 8,
        in_channels: 1,
        out_channels: 1,
        block_out_channels: vec![16, 32],
        down_block_types: vec![DownBlockType::DownBlock2D, DownBlockType::AttnDownBlock2D],
        up_block_types: vec![UpBlockType::AttnUpBlock2D, UpBlockType::UpBlock2D],
        layers_per_block: 1,
        norm_num_groups: 8,
        ..UNet2DConfig::default()
    };
    c.train.learning_rate = 1e-3;
    c.sample.num_images = 4;
    c.sample.num_inference_steps = 5;
    c
}

/// `train --config <config> <extra>`, not yet started.
#[allow(dead_code)]
pub fn train_cmd(config: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_train"));
    cmd.arg("--config").arg(config).args(extra);
    cmd
}

/// Runs `train` to the end: whether it succeeded, and its stderr.
#[allow(dead_code)]
pub fn run(config: &Path, extra: &[&str]) -> (bool, String) {
    let r = train_cmd(config, extra).output().unwrap();
    (
        r.status.success(),
        String::from_utf8_lossy(&r.stderr).to_string(),
    )
}

/// The step of the checkpoint a run's `latest` file names.
#[allow(dead_code)]
pub fn latest_step(out: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(out.join("latest")).ok()?;
    text.trim().strip_prefix("checkpoint-")?.parse().ok()
}

/// A free TCP port on loopback (for a launch's MASTER_PORT).
#[allow(dead_code)]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[allow(dead_code)]
/// Starts `world` processes of `train --config path extra` as torchrun would.
pub fn launch(
    path: &Path,
    world: usize,
    extra: &[&str],
    per_rank: impl Fn(usize) -> Vec<String>,
) -> Vec<Child> {
    let port = free_port().to_string();
    (0..world)
        .map(|rank| {
            let more = per_rank(rank);
            let mut args: Vec<&str> = extra.to_vec();
            args.extend(more.iter().map(String::as_str));
            train_cmd(path, &args)
                .env("WORLD_SIZE", world.to_string())
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

#[allow(dead_code)]
pub fn finish(children: Vec<Child>) -> Vec<Output> {
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

/// Copies the folder `src` to `dst`, recursively.
#[allow(dead_code)]
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// The sorted file names in `dir`.
#[allow(dead_code)]
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

/// Mixed precision against f32: the runs differ (so the half path ran) and each loss of `got`
/// is within `tol` (relative) of the same step's loss in `reference`.
#[allow(dead_code)]
pub fn assert_losses_close(what: &str, got: &[f64], reference: &[f64], tol: f64) {
    eprintln!("{what}: {got:.4?}\n  f32: {reference:.4?}");
    assert_eq!(got.len(), reference.len(), "{what}");
    assert_ne!(got, reference, "{what} computed exactly as f32");
    for (step, (g, r)) in got.iter().zip(reference).enumerate() {
        assert!(
            g.is_finite() && (g - r).abs() <= tol * r.abs(),
            "{what}, step {}: {g} vs f32 {r} (tolerance {tol})",
            step + 1
        );
    }
}

/// Starts a run and SIGKILLs it once `latest` reaches `step` (std's `Child::kill` is SIGKILL
/// on Unix). Returns the step `latest` named at the kill.
#[allow(dead_code)]
pub fn kill_after_checkpoint(mut child: Child, out: &Path, step: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(s) = latest_step(out).filter(|&s| s >= step) {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before it could be killed"
            );
            child.kill().unwrap();
            child.wait().unwrap();
            return s;
        }
        assert!(Instant::now() < deadline, "no checkpoint-{step} appeared");
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("run exited early ({status}):\n{err}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
