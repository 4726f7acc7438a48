//! Long runs: a run killed with SIGKILL and resumed ends with the same weights as an
//! uninterrupted one; corrupted checkpoints and changed configs are handled; TensorBoard files
//! are well-framed. `random_kill_trials` is the reliability experiment reported in
//! docs/long-runs.md.

mod common;

use common::{kill_after_checkpoint, latest_step, run, train_cmd};

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use difftrain::config::Config;
use difftrain::optim::lr::LrSchedule;
use difftrain::optim::precision::MixedPrecision;

/// A tiny run that exercises every piece of resumable state: random flips (augmentation RNG),
/// noise offset, accumulation, batch split over threads, a warmup LR schedule, EMA with warmup,
/// and several epochs.
fn resumable_config(tmp: &Path, name: &str) -> (Config, PathBuf) {
    let data = tmp.join("data");
    if !data.exists() {
        common::write_flat_images(&data, 24, 8, |i| (i * 10) as u8);
    }
    let out = tmp.join(name);
    let mut c = common::tiny_config(&data, &out);
    c.data.random_flip = true;
    c.diffusion.noise_offset = 0.1;
    c.train.batch_size = 4;
    c.train.gradient_accumulation_steps = 2;
    // Each micro-batch on 2 replica threads: resume must stay exact on that path too.
    c.train.batch_split = 2;
    c.train.lr_scheduler = LrSchedule::ConstantWithWarmup;
    c.train.lr_warmup_steps = 3;
    c.train.max_steps = 16;
    c.ema.enabled = true;
    c.checkpoint.every_steps = 4;
    c.checkpoint.keep_last = 0;
    c.logging.log_every = 1;
    c.export.enabled = false;
    let path = tmp.join(format!("{name}.toml"));
    std::fs::write(&path, c.to_toml()).unwrap();
    (c, path)
}

/// SIGKILL and resume under fp16: the loss scaler's state (which doubles every 3 clean steps
/// here, so the scale at the kill differs from the initial one) is restored with the rest, and
/// the weights match the uninterrupted run bit for bit.
#[test]
fn fp16_sigkill_and_resume_gives_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let fp16 = |name: &str| {
        let (mut c, path) = resumable_config(tmp.path(), name);
        c.train.mixed_precision = MixedPrecision::Fp16;
        c.train.fp16_growth_interval = 3;
        c.train.max_steps = 8;
        c.checkpoint.every_steps = 2;
        std::fs::write(&path, c.to_toml()).unwrap();
        (c, path)
    };
    let (a, a_cfg) = fp16("a");
    let (ok, err) = run(&a_cfg, &[]);
    assert!(ok, "{err}");
    let (b, b_cfg) = fp16("b");
    let child = train_cmd(&b_cfg, &["--set", "train.max_steps=1000"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let killed_at = kill_after_checkpoint(child, &b.output_dir(), 4);
    assert!(killed_at < 8, "killed too late: {killed_at}");
    let (ok, err) = run(&b_cfg, &["--resume", "latest"]);
    assert!(ok, "{err}");
    let state = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&read(&dir.join("state.json"))).unwrap()
    };
    let (ca, cb) = (
        a.output_dir().join("checkpoint-8"),
        b.output_dir().join("checkpoint-8"),
    );
    for file in ["model.safetensors", "ema.safetensors"] {
        assert!(
            read(&ca.join(file)) == read(&cb.join(file)),
            "{file} differs"
        );
    }
    // 8 clean steps, doubling every 3: 2^16 -> 2^18, 2 steps since.
    let scaler = &state(&ca)["grad_scaler"];
    assert_eq!(scaler["scale"], 262144.0, "{scaler}");
    assert_eq!(scaler["growth_tracker"], 2, "{scaler}");
    assert_eq!(scaler, &state(&cb)["grad_scaler"]);
    let at_kill = &state(&b.output_dir().join(format!("checkpoint-{killed_at}")))["grad_scaler"];
    assert_ne!(
        at_kill, scaler,
        "the scale at the kill is the final one: nothing to restore"
    );
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Largest absolute difference between two safetensors files with the same keys.
fn max_abs_diff(a: &Path, b: &Path) -> f32 {
    let (ta, tb) = (
        difftrain::io::safetensors::load_safetensors(a).unwrap(),
        difftrain::io::safetensors::load_safetensors(b).unwrap(),
    );
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    ta.iter()
        .flat_map(|(k, t)| t.data.iter().zip(&tb[k].data).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn sigkill_and_resume_gives_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    // Uninterrupted: 16 steps.
    let (a, a_cfg) = resumable_config(tmp.path(), "a");
    let (ok, err) = run(&a_cfg, &[]);
    assert!(ok, "{err}");

    // Interrupted: the same run with max_steps 1000 (the schedule does not depend on it), killed
    // right after checkpoint-8, then resumed with max_steps 16 (an allowed change).
    let (b, b_cfg) = resumable_config(tmp.path(), "b");
    let out_b = b.output_dir();
    let child = train_cmd(&b_cfg, &["--set", "train.max_steps=1000"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let killed_at = kill_after_checkpoint(child, &out_b, 8);
    assert!(killed_at < 16, "killed too late: {killed_at}");
    let (ok, err) = run(&b_cfg, &["--resume", "latest"]);
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!(
            "resuming from {}",
            out_b.join(format!("checkpoint-{killed_at}")).display()
        )),
        "{err}"
    );
    assert!(err.contains("train.max_steps: 1000 -> 16"), "{err}");

    // Bitwise identical training and EMA weights, and the same counters and RNG position.
    let (ca, cb) = (
        a.output_dir().join("checkpoint-16"),
        out_b.join("checkpoint-16"),
    );
    for file in ["model.safetensors", "ema.safetensors"] {
        let d = max_abs_diff(&ca.join(file), &cb.join(file));
        assert_eq!(d, 0.0, "{file} differs by up to {d}");
        assert_eq!(read(&ca.join(file)), read(&cb.join(file)), "{file} bytes");
    }
    let state = |dir: &Path| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&read(&dir.join("state.json"))).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("saved_unix_time");
        o.remove("files");
        v
    };
    assert_eq!(state(&ca), state(&cb));
    // 16 steps x 2 micro-batches x 4 images over 24 images: 5 full epochs and 1 batch in.
    assert_eq!(state(&ca)["epoch"], 5);
    assert_eq!(state(&ca)["batch_in_epoch"], 2);

    // A change that breaks resume is refused with the key named...
    let (ok, err) = run(
        &b_cfg,
        &[
            "--resume",
            "latest",
            "--set",
            "model.unet.block_out_channels=[16, 16]",
            "--set",
            "train.max_steps=20",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("model.unet.block_out_channels: [16, 32] -> [16, 16]"),
        "{err}"
    );
    // ...and a fresh start over existing checkpoints too.
    let (ok, err) = run(&b_cfg, &[]);
    assert!(!ok && err.contains("already holds checkpoints"), "{err}");

    // A corrupted newest checkpoint: resume falls back to the previous one and says which.
    let model = cb.join("model.safetensors");
    let mut bytes = read(&model);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&model, bytes).unwrap();
    let (ok, err) = run(&b_cfg, &["--resume", "latest"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("checkpoint-16 is unusable: model.safetensors fails its checksum")
            && err.contains("resuming from the previous complete checkpoint")
            && err.contains("checkpoint-12"),
        "{err}"
    );
    // It redid steps 13..16 and wrote checkpoint-16 again, identical to the uninterrupted one.
    assert_eq!(latest_step(&out_b), Some(16));
    assert_eq!(
        read(&ca.join("model.safetensors")),
        read(&cb.join("model.safetensors"))
    );

    // An explicit path to a corrupt checkpoint is refused, not second-guessed.
    std::fs::write(cb.join("state.json"), "{").unwrap();
    let (ok, err) = run(&b_cfg, &["--resume", cb.to_str().unwrap()]);
    assert!(!ok && err.contains("state.json is not valid"), "{err}");
}

/// Reads every TFRecord of an event file, checking both CRCs; returns the payloads.
fn read_records(path: &Path) -> Vec<Vec<u8>> {
    let bytes = read(path);
    let (mut at, mut out) = (0, Vec::new());
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(
            len_crc,
            difftrain::tensorboard::masked_crc32c(&bytes[at..at + 8])
        );
        let data = bytes[at + 12..at + 12 + len].to_vec();
        let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert_eq!(crc, difftrain::tensorboard::masked_crc32c(&data));
        out.push(data);
        at += 16 + len;
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn logs_samples_rotation_and_ema_export() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, _) = resumable_config(tmp.path(), "run");
    c.train.max_steps = 6;
    c.checkpoint.every_steps = 2;
    c.checkpoint.keep_last = 2;
    c.logging.log_every = 2;
    c.logging.sample_every = 3;
    c.export.enabled = true;
    let cfg_path = tmp.path().join("run.toml");
    std::fs::write(&cfg_path, c.to_toml()).unwrap();
    let (ok, err) = run(&cfg_path, &[]);
    assert!(ok, "{err}");
    let out = c.output_dir();

    // Rotation kept the newest two; no temporary directories remain.
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "checkpoint-4",
            "checkpoint-6",
            "export",
            "latest",
            "logs",
            "samples"
        ]
    );
    assert!(out.join("samples/step-3.png").is_file() && out.join("samples/step-6.png").is_file());

    // Export: EMA weights in unet/, training weights in unet_no_ema/, and they differ.
    let (ema, raw) = (
        out.join("export/unet/diffusion_pytorch_model.safetensors"),
        out.join("export/unet_no_ema/diffusion_pytorch_model.safetensors"),
    );
    assert!(max_abs_diff(&ema, &raw) > 0.0);
    assert_eq!(
        max_abs_diff(&ema, &out.join("checkpoint-6/ema.safetensors")),
        0.0
    );
    assert_eq!(
        max_abs_diff(&raw, &out.join("checkpoint-6/model.safetensors")),
        0.0
    );

    // TensorBoard: one event file, every record's CRCs valid, scalars every 2 steps, images
    // at steps 3 and 6.
    let files: Vec<PathBuf> = std::fs::read_dir(out.join("logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    assert!(
        files[0]
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("events.out.tfevents.")
    );
    let records = read_records(&files[0]);
    assert!(contains(&records[0], b"brain.Event:2"));
    let count = |tag: &[u8]| records.iter().filter(|r| contains(r, tag)).count();
    assert_eq!(count(b"train/loss"), 3);
    assert_eq!(count(b"train/lr"), 3);
    assert_eq!(count(b"train/grad_norm"), 3);
    assert_eq!(count(b"train/images_per_sec"), 3);
    assert_eq!(count(b"train/ema_decay"), 3);
    assert_eq!(count(b"\x89PNG"), 2);
}

/// The reliability experiment: one run killed at random moments (including during checkpoint
/// writes) and resumed each time, then finished and compared with an uninterrupted run.
/// Table: `cargo test --release --test resume random_kill_trials -- --nocapture`
/// (`KILL_TRIALS=N` for more kills).
#[test]
fn random_kill_trials() {
    use rand::{Rng, SeedableRng};
    let trials: usize = std::env::var("KILL_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let tmp = tempfile::tempdir().unwrap();
    let steps = 100;
    let setup = |name: &str| {
        let (mut c, _) = resumable_config(tmp.path(), name);
        c.train.max_steps = steps;
        c.checkpoint.every_steps = 1; // writes are a large share of each step: kills land in them
        c.checkpoint.keep_last = 2;
        let path = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&path, c.to_toml()).unwrap();
        (c.output_dir(), path)
    };
    let (ref_out, ref_cfg) = setup("reference");
    let t0 = Instant::now();
    let (ok, err) = run(&ref_cfg, &[]);
    assert!(ok, "{err}");
    let run_ms = t0.elapsed().as_millis() as u64;
    let (out, cfg) = setup("killed");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (mut identical_resumes, mut lost_beyond, mut corrupted, mut during_write) = (0, 0, 0, 0);
    let (mut before_first, mut kills) = (0, 0);
    println!("uninterrupted run: {steps} steps in {run_ms} ms");
    println!("trial | killed after (ms) | latest at kill | temp dir left | resumed from");
    for trial in 0..trials {
        let mut child = train_cmd(&cfg, &["--resume", "latest"])
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // Each attempt pays the start-up again, then progresses a little: the kills spread
        // over start-up, steps and checkpoint writes, and the run is not done too early.
        let share = run_ms / trials as u64;
        let wait = rng.random_range(share / 3..share * 3 / 2);
        std::thread::sleep(Duration::from_millis(wait));
        if child.try_wait().unwrap().is_some() {
            println!("{trial:5} | {wait:17} | the run had already finished: no more kills");
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        let latest = latest_step(&out);
        let temp_left = std::fs::read_dir(&out)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(".checkpoint-"))
            })
            .unwrap_or(false);
        during_write += temp_left as usize;
        // Which checkpoint would resume use? Ask the library, as the next run will.
        let start = difftrain::checkpoint::resolve(&out, &difftrain::config::Resume::Latest);
        let resumed = match start {
            Ok(s) => s.checkpoint.map(|c| c.state.step),
            Err(e) => {
                corrupted += 1;
                println!("  resume refused: {e}");
                None
            }
        };
        match (latest, resumed) {
            (None, None) => before_first += 1,
            (Some(l), Some(r)) if r >= l => identical_resumes += 1,
            _ => lost_beyond += 1,
        }
        println!(
            "{trial:5} | {wait:17} | {:>14} | {:>13} | {}",
            latest.map_or("-".into(), |s| s.to_string()),
            temp_left,
            resumed.map_or("fresh".into(), |s| format!("checkpoint-{s}")),
        );
    }
    let (ok, err) = run(&cfg, &["--resume", "latest"]);
    assert!(ok, "{err}");
    let d = max_abs_diff(
        &ref_out.join(format!("checkpoint-{steps}/model.safetensors")),
        &out.join(format!("checkpoint-{steps}/model.safetensors")),
    );
    let e = max_abs_diff(
        &ref_out.join(format!("checkpoint-{steps}/ema.safetensors")),
        &out.join(format!("checkpoint-{steps}/ema.safetensors")),
    );
    println!(
        "kills: {kills}; before the first checkpoint (restarted fresh): {before_first}; \
         resumed from the checkpoint `latest` named at the kill: {identical_resumes}; \
         lost work beyond the last checkpoint: {lost_beyond}; corrupted state: {corrupted}; \
         kills during a checkpoint write (temporary directory left): {during_write}"
    );
    println!("final weights vs uninterrupted run: max |diff| model {d}, EMA {e}");
    assert!(
        kills >= 3,
        "only {kills} kills landed before the run finished"
    );
    assert_eq!(corrupted, 0);
    assert_eq!(lost_beyond, 0);
    assert_eq!(d, 0.0);
    assert_eq!(e, 0.0);
}
