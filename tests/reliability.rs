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
    assert!(!ok && err.contains("sample.num_images must be at least 1"), "{err}");
}

/// 2. Two runs on one output folder: the second is refused naming the first; a lock left by a
///    dead process is taken over.
#[test]
fn a_second_run_on_the_same_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, path) = config(tmp.path(), "a");
    let out = c.output_dir();
    let mut first = train_cmd(&path, &["--set", "train.max_steps=100000", "--set", "checkpoint.every_steps=0"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(out.join(".lock")).is_ok_and(|t| t.contains("pid")) {
        assert!(Instant::now() < deadline, "the first run never took the lock");
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
    assert!(!ok && err.contains("consecutive steps") && err.contains("max_consecutive_skips = 3"), "{err}");
    assert!(!c.output_dir().join("export").exists(), "a diverged run exported");
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
        assert!(!ok && err.contains("run.output_dir") && err.contains("a_file/out"), "{err}");
        assert!(!err.contains("step 1/"), "it trained first: {err}");
    }
    let (_, path) = config(tmp.path(), "b");
    let (ok, err) = run(&path, &["--set", "data.path=\"/nonexistent/data\"", "--check"]);
    assert!(!ok && err.contains("/nonexistent/data") && err.contains("does not exist"), "{err}");
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
        let mut child = train_cmd(&b_path, &["--set", "checkpoint.every_steps=0", "--set", "train.max_steps=100000"])
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
        assert!(step >= 3 && step < 12, "checkpoint at {step}: {rest}");
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
    let (ok, err) = run(&path, &["--set", "train.max_steps=8", "--set", "export.enabled=false", "--resume", "latest"]);
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
    assert!(err.contains("checkpoint-8") && err.contains("(step 4)"), "{err}");
}

/// 10. A warmup longer than a shortened run is clamped with a note, not refused; "positive"
///     errors say "finite" for inf.
#[test]
fn small_config_annoyances() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, path) = config(tmp.path(), "a");
    let (ok, err) = run(&path, &["--set", "train.lr_warmup_steps=40", "--set", "train.max_steps=3"]);
    assert!(ok && err.contains("warming up over all 3 steps"), "{err}");
    let (ok, err) = run(&path, &["--set", "train.learning_rate=inf", "--check"]);
    assert!(!ok && err.contains("positive finite"), "{err}");
}
