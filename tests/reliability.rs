//! What a hostile probe of the binaries found (issue 18), one test per finding: each failed
//! before its fix.

mod common;

use common::{latest_step, run, train_cmd};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use difftrain::config::Config;
use difftrain::config::OnNonFinite;

fn config(tmp: &Path, name: &str) -> (Config, PathBuf) {
    let data = tmp.join("data");
    if !data.exists() {
        common::write_flat_images(&data, 16, 8, |i| (i * 13) as u8);
    }
    let mut c = common::tiny_config(&data, &tmp.join(name));
    c.train.batch_size = 4;
    c.train.max_steps = 12;
    c.ema.enabled = true;
    c.checkpoint.every_steps = 4;
    c.checkpoint.keep_last = 0;
    c.logging.log_every = 1;
    let path = tmp.join(format!("{name}.toml"));
    std::fs::write(&path, c.to_toml()).unwrap();
    (c, path)
}

fn write(c: &Config, path: &Path) {
    std::fs::write(path, c.to_toml()).unwrap();
}

/// 1. `sample.num_images = 0` crashed (exit 139) in end-of-run sampling: now refused up front.
#[test]
fn zero_sample_images_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, path) = config(tmp.path(), "a");
    let (ok, err) = run(&path, &["--set", "sample.num_images=0", "--check"]);
    assert!(
        !ok && err.contains("sample.num_images must be at least 1"),
        "{err}"
    );
}

/// 2. Two runs on one output folder: the second is refused naming the first; a lock left by a
///    dead process is taken over.
#[test]
fn a_second_run_on_the_same_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, path) = config(tmp.path(), "a");
    let out = c.output_dir();
    let mut first = train_cmd(
        &path,
        &[
            "--set",
            "train.max_steps=100000",
            "--set",
            "checkpoint.every_steps=0",
        ],
    )
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(out.join(".lock")).is_ok_and(|t| t.contains("pid")) {
        assert!(
            Instant::now() < deadline,
            "the first run never took the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, err) = run(&path, &[]);
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        !ok && err.contains("in use by another training run")
            && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );
    // The killed run's lock file stays; the kernel released its lock: taken over.
    let (ok, err) = run(&path, &["--set", "train.max_steps=2", "--resume", "none"]);
    assert!(ok && err.contains("no longer running"), "{err}");
}

/// 4. `on_nonfinite = "skip"` stops after `train.max_consecutive_skips` skipped steps.
#[test]
fn endless_skipping_stops_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, path) = config(tmp.path(), "a");
    c.train.on_nonfinite = OnNonFinite::Skip;
    c.train.max_consecutive_skips = 3;
    c.train.learning_rate = 1e30;
    c.train.max_grad_norm = 0.0;
    c.train.max_steps = 50;
    write(&c, &path);
    let (ok, err) = run(&path, &[]);
    assert!(
        !ok && err.contains("consecutive steps") && err.contains("max_consecutive_skips = 3"),
        "{err}"
    );
    assert!(
        !c.output_dir().join("export").exists(),
        "a diverged run exported"
    );
}

/// 5. An unwritable output folder (and a missing data folder) is found before any compute,
///    by `--check` too.
#[test]
fn unwritable_output_and_missing_data_are_found_first() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, path) = config(tmp.path(), "a");
    let blocker = tmp.path().join("a_file");
    std::fs::write(&blocker, b"").unwrap();
    c.run.output_dir = Some(blocker.join("out"));
    write(&c, &path);
    for extra in [&["--check"][..], &[][..]] {
        let (ok, err) = run(&path, extra);
        assert!(
            !ok && err.contains("run.output_dir") && err.contains("a_file/out"),
            "{err}"
        );
        assert!(!err.contains("step 1/"), "it trained first: {err}");
    }
    let (_, path) = config(tmp.path(), "b");
    let (ok, err) = run(
        &path,
        &["--set", "data.path=\"/nonexistent/data\"", "--check"],
    );
    assert!(
        !ok && err.contains("/nonexistent/data") && err.contains("does not exist"),
        "{err}"
    );
}

/// 6. SIGTERM (and SIGINT) finish the current step, write a checkpoint there and exit 143
///    (130); `--resume latest` then ends bitwise where an uninterrupted run does.
#[test]
fn sigterm_writes_a_checkpoint_and_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, a_path) = config(tmp.path(), "a");
    let (ok, err) = run(&a_path, &[]);
    assert!(ok, "{err}");
    for (signal, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let name = format!("b{signal}");
        let (b, b_path) = config(tmp.path(), &name);
        let out = b.output_dir();
        // No periodic checkpoints: whatever exists after the signal, the signal wrote.
        let mut child = train_cmd(
            &b_path,
            &[
                "--set",
                "checkpoint.every_steps=0",
                "--set",
                "train.max_steps=100000",
            ],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        // Wait for the progress line of step 3, then signal.
        let mut stderr = child.stderr.take().unwrap();
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut buf = [0u8; 256];
        while !seen.contains("step 3/") {
            use std::io::Read;
            let n = stderr.read(&mut buf).unwrap();
            assert!(n > 0 && Instant::now() < deadline, "no progress: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let mut rest = String::new();
        use std::io::Read;
        stderr.read_to_string(&mut rest).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "{rest}");
        let step = latest_step(&out).unwrap_or_else(|| panic!("no checkpoint written: {rest}"));
        assert!((3..12).contains(&step), "checkpoint at {step}: {rest}");
        assert!(rest.contains("continue with `--resume latest`"), "{rest}");
        // Resume to 12 with every_steps as in the uninterrupted run.
        let (ok, err) = run(&b_path, &["--resume", "latest"]);
        assert!(ok, "{err}");
        for f in ["model.safetensors", "ema.safetensors"] {
            let same = std::fs::read(a.output_dir().join("checkpoint-12").join(f)).unwrap()
                == std::fs::read(out.join("checkpoint-12").join(f)).unwrap();
            assert!(same, "{f} differs after {signal} at step {step} + resume");
        }
    }
}

/// 7. `sample --checkpoint <run>` used a stale `export/` when a newer checkpoint existed.
#[test]
fn sample_uses_the_newest_weights_of_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, path) = config(tmp.path(), "a");
    let (ok, err) = run(&path, &["--set", "train.max_steps=4"]);
    assert!(ok, "{err}");
    // Continued to 8 with the export step still 4 (export off for the continuation).
    let (ok, err) = run(
        &path,
        &[
            "--set",
            "train.max_steps=8",
            "--set",
            "export.enabled=false",
            "--resume",
            "latest",
        ],
    );
    assert!(ok, "{err}");
    let r = Command::new(env!("CARGO_BIN_EXE_sample"))
        .arg("--checkpoint")
        .arg(c.output_dir())
        .args(["--num", "2", "--steps", "2", "--out"])
        .arg(tmp.path().join("s.png"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(
        err.contains("checkpoint-8") && err.contains("(step 4)"),
        "{err}"
    );
}

/// 10. A warmup longer than a shortened run is clamped with a note, not refused; "positive"
///     errors say "finite" for inf.
#[test]
fn small_config_annoyances() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, path) = config(tmp.path(), "a");
    let (ok, err) = run(
        &path,
        &[
            "--set",
            "train.lr_warmup_steps=40",
            "--set",
            "train.max_steps=3",
        ],
    );
    assert!(ok && err.contains("warming up over all 3 steps"), "{err}");
    let (ok, err) = run(&path, &["--set", "train.learning_rate=inf", "--check"]);
    assert!(!ok && err.contains("positive finite"), "{err}");
}

/// 3. A symlink loop multiplied the dataset (41x for `ln -s . loop`), two links to each other
///    hung start-up, and a FIFO named `x.png` blocked it: each real directory is read once and
///    only regular files are images.
#[test]
fn symlink_loops_and_fifos_in_the_data_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_flat_images(&data, 4, 8, |i| (i * 50) as u8);
    std::os::unix::fs::symlink(".", data.join("loop")).unwrap();
    std::os::unix::fs::symlink("b", data.join("a")).unwrap();
    std::os::unix::fs::symlink("a", data.join("b")).unwrap();
    std::fs::create_dir(data.join("sub")).unwrap();
    std::os::unix::fs::symlink("..", data.join("sub/up")).unwrap();
    let fifo = std::ffi::CString::new(data.join("x.png").to_str().unwrap()).unwrap();
    // SAFETY: creating a FIFO at a path we own.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let ds = difftrain::data::Dataset::open(
        difftrain::data::DataSource::ImageFolder,
        &data,
        difftrain::data::OnBadImage::Warn,
    )
    .unwrap();
    assert_eq!(ds.len(), 4);
    // And through the binary, which warns about what it skipped.
    let (mut c, path) = config(tmp.path(), "a");
    c.train.max_steps = 1;
    write(&c, &path);
    let (ok, err) = run(&path, &[]);
    assert!(
        ok && err.contains("not a regular file") && err.contains("already read"),
        "{err}"
    );
}

/// 9. A checkpoint whose files pass their checksums but do not decode stopped `--resume latest`
///    with a debug-format error; a corrupt `export/` failed `sample`. Both fall back now.
#[test]
fn undecodable_checkpoints_and_exports_fall_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, path) = config(tmp.path(), "a");
    let (ok, err) = run(&path, &[]);
    assert!(ok, "{err}");
    let out = c.output_dir();
    // checkpoint-12's optimizer state replaced by garbage with a matching checksum.
    let ck = out.join("checkpoint-12");
    let garbage = vec![0x42u8; 100];
    std::fs::write(ck.join("optimizer.bpk"), &garbage).unwrap();
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join("state.json")).unwrap()).unwrap();
    state["files"]["optimizer.bpk"] =
        serde_json::json!({"bytes": 100, "crc32c": crc32c::crc32c(&garbage)});
    std::fs::write(ck.join("state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
    let (ok, err) = run(
        &path,
        &["--resume", "latest", "--set", "train.max_steps=14"],
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("does not decode")
            && err.contains("resuming from the older")
            && err.contains("checkpoint-8"),
        "{err}"
    );
    // A truncated export: sample uses the newest checkpoint instead.
    let weights = out.join("export/unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let r = Command::new(env!("CARGO_BIN_EXE_sample"))
        .arg("--checkpoint")
        .arg(&out)
        .args(["--num", "2", "--steps", "2", "--out"])
        .arg(tmp.path().join("s.png"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        r.status.success() && err.contains("using") && err.contains("checkpoint-14"),
        "{err}"
    );
}

/// 8. Impossible sizes aborted inside an allocation: a resolution that cannot fit is refused
///    by `--check`; `sample` generates in batches and refuses an output that cannot fit.
///    Also 10: `--out x.jpg` wrote PNG bytes under a .jpg name.
#[test]
fn impossible_sizes_are_refused_and_sample_runs_in_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, path) = config(tmp.path(), "a");
    let (ok, err) = run(
        &path,
        &[
            "--set",
            "data.resolution=100000",
            "--set",
            "model.unet.sample_size=100000",
            "--check",
        ],
    );
    assert!(
        !ok && err.contains("needs at least") && err.contains("GB of memory"),
        "{err}"
    );
    let (ok, err) = run(&path, &["--set", "train.max_steps=2"]);
    assert!(ok, "{err}");
    let sample = |args: &[&str]| {
        let r = Command::new(env!("CARGO_BIN_EXE_sample"))
            .arg("--checkpoint")
            .arg(c.output_dir())
            .args(["--steps", "2"])
            .args(args)
            .output()
            .unwrap();
        (
            r.status.success(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        )
    };
    let (ok, err) = sample(&[
        "--num",
        "100000000000",
        "--out",
        tmp.path().join("g.png").to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("needs at least") && err.contains("--num 100000000000"),
        "{err}"
    );
    // 5 images in batches of 2: image k's noise is its own stream of the seed, so image 2 is
    // image 2 of the same seed in one batch (issue 32: batch i no longer uses seed + i).
    let dir = tmp.path().join("batched");
    let (ok, err) = sample(&[
        "--num",
        "5",
        "--batch-size",
        "2",
        "--seed",
        "0",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 5);
    let one = tmp.path().join("one");
    let (ok, err) = sample(&["--num", "3", "--seed", "0", "--out", one.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(dir.join("0002.png")).unwrap(),
        std::fs::read(one.join("0002.png")).unwrap()
    );
    let (ok, err) = sample(&[
        "--num",
        "1",
        "--out",
        tmp.path().join("x.jpg").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("PNG only"), "{err}");
}

/// 10. `--set` values: an unclosed quote is an error, not a literal; problems caused by a
///     `--set` say so instead of blaming only the file; a killed `latest` pointer's temporary
///     file is cleaned up.
#[test]
fn set_values_and_leftover_temporaries() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, path) = config(tmp.path(), "a");
    let (ok, err) = run(&path, &["--set", "run.name=\"abc", "--check"]);
    assert!(!ok && err.contains("not a valid TOML value"), "{err}");
    let (ok, err) = run(&path, &["--set", "train.batch_size=0", "--check"]);
    assert!(!ok && err.contains("--set train.batch_size=0"), "{err}");
    std::fs::create_dir_all(c.output_dir()).unwrap();
    let leftover = c.output_dir().join(".latest.tmp-99999");
    std::fs::write(&leftover, b"checkpoint-4").unwrap();
    let (ok, err) = run(&path, &["--set", "train.max_steps=1"]);
    assert!(ok, "{err}");
    assert!(!leftover.exists());
}

/// 10. A corrupt image was reported again every epoch: now once (and counted at the end).
#[test]
fn a_corrupt_image_is_reported_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, path) = config(tmp.path(), "a");
    // Header intact (it passes the start-up check), pixel data cut off.
    let img = c.data.path.join("00003.png");
    let files: Vec<_> = std::fs::read_dir(&c.data.path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let victim = if img.exists() { img } else { files[3].clone() };
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() - 20]).unwrap();
    let (ok, err) = run(&path, &["--set", "train.max_steps=12"]);
    assert!(ok, "{err}");
    let name = victim.file_name().unwrap().to_str().unwrap();
    let reports = err
        .lines()
        .filter(|l| l.contains(name) && l.contains("warning"))
        .count();
    assert_eq!(reports, 1, "{err}");
    assert!(
        err.contains("image decode(s) failed during training"),
        "{err}"
    );
}
