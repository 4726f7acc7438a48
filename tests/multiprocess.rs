//! Data parallelism across processes (torchrun-style launch) on the CPU, over loopback: the
//! processes meet at a rendezvous, train to bitwise the weights of as many in-process worker
//! threads, write one set of outputs (rank 0), stop naming a process that died, resume exactly,
//! and refuse a process whose config differs.

mod common;

use common::{copy_dir, finish, free_port, latest_step, launch, listing, train_cmd};

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use difftrain::config::Config;
use difftrain::device::DeviceList;
use difftrain::io::safetensors as io;
use difftrain::optim::lr::LrSchedule;

/// Flips, noise offset, accumulation, EMA, checkpoints, samples and TensorBoard: every piece
/// the processes must agree on, and every output rank 0 alone writes.
fn config(tmp: &Path, name: &str, world: usize) -> Config {
    let data = tmp.join("data");
    if !data.exists() {
        common::write_flat_images(&data, 36, 8, |i| (i * 7) as u8);
    }
    let mut c = common::tiny_config(&data, &tmp.join(name));
    c.data.random_flip = true;
    c.diffusion.noise_offset = 0.1;
    c.train.batch_size = 6;
    c.train.gradient_accumulation_steps = 2;
    c.train.max_steps = 8;
    c.train.lr_scheduler = LrSchedule::ConstantWithWarmup;
    c.train.lr_warmup_steps = 2;
    c.ema.enabled = true;
    c.checkpoint.every_steps = 4;
    c.checkpoint.keep_last = 0;
    c.logging.log_every = 1;
    c.logging.sample_every = 4;
    c.run.sync_timeout_secs = 60.0;
    if world > 1 {
        c.run.devices = Some(DeviceList::List(
            (0..world).map(|i| format!("cpu:{i}")).collect(),
        ));
    }
    c
}

fn write(c: &Config, path: PathBuf) -> PathBuf {
    std::fs::write(&path, c.to_toml()).unwrap();
    path
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The largest difference between two checkpoints' weights (0.0: bitwise equal).
fn diff(a: &Path, b: &Path, file: &str) -> f32 {
    let (a, b) = (
        io::load_safetensors(&a.join(file)).unwrap(),
        io::load_safetensors(&b.join(file)).unwrap(),
    );
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(k, t)| {
            assert_eq!(t.data.len(), b[k].data.len(), "{k}");
            t.data.iter().zip(&b[k].data).map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f32::max)
}

#[test]
fn two_and_three_processes_equal_as_many_worker_threads_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    for world in [2, 3] {
        // The reference: one process, `world` worker threads.
        let threads = config(tmp.path(), &format!("threads{world}"), world);
        let (ok, err) = common::run(
            &write(&threads, tmp.path().join(format!("t{world}.toml"))),
            &[],
        );
        assert!(ok, "{err}");

        let mut procs = config(tmp.path(), &format!("procs{world}"), 1);
        procs.run.device = "cpu".into();
        let path = write(&procs, tmp.path().join(format!("p{world}.toml")));
        let outs = finish(launch(&path, world, &[], |_| Vec::new()));
        for (rank, o) in outs.iter().enumerate() {
            assert!(o.status.success(), "rank {rank}: {}", stderr(o));
        }
        let err0 = stderr(&outs[0]);
        assert!(
            err0.contains(&format!("launch (torchrun): {world} processes met")),
            "{err0}"
        );
        assert!(err0.contains("CPU, gradients over TCP"), "{err0}");
        // Only rank 0 reports samples and an export.
        for o in &outs[1..] {
            assert!(!stderr(o).contains("samples:"), "{}", stderr(o));
        }

        let (t, p) = (threads.output_dir(), procs.output_dir());
        assert_eq!(listing(&p), listing(&t), "one set of outputs");
        assert_eq!(listing(&p.join("samples")), listing(&t.join("samples")));
        assert_eq!(listing(&p.join("logs")).len(), 1);
        for step in [4, 8] {
            let ck = format!("checkpoint-{step}");
            for file in ["model.safetensors", "ema.safetensors"] {
                let d = diff(&t.join(&ck), &p.join(&ck), file);
                assert_eq!(
                    d, 0.0,
                    "{world} processes vs {world} threads, {ck}/{file}: {d:e}"
                );
            }
        }
    }
}

#[test]
fn a_killed_process_stops_the_others_by_rank_and_the_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let world = 3;
    let reference = config(tmp.path(), "reference", world);
    let (ok, err) = common::run(&write(&reference, tmp.path().join("r.toml")), &[]);
    assert!(ok, "{err}");

    let mut c = config(tmp.path(), "killed", 1);
    c.run.device = "cpu".into();
    let path = write(&c, tmp.path().join("k.toml"));
    let out = c.output_dir();
    let mut children = launch(&path, world, &["--set", "train.max_steps=1000"], |_| {
        Vec::new()
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    while latest_step(&out).is_none_or(|s| s < 4) {
        assert!(
            children.iter_mut().all(|c| c.try_wait().unwrap().is_none()),
            "a rank ended early"
        );
        assert!(Instant::now() < deadline, "no checkpoint-4 appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    children[1].kill().unwrap();
    let killed = Instant::now();
    let outs = finish(children);
    // Released by the dead connection, not by the 60 s timeout.
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "{:?}",
        killed.elapsed()
    );
    for rank in [0, 2] {
        let e = stderr(&outs[rank]);
        assert!(!outs[rank].status.success());
        assert!(
            e.contains("data-parallel rank 1 failed: its connection closed"),
            "rank {rank}: {e}"
        );
    }
    let at = latest_step(&out).unwrap();
    assert!(at < 8, "killed too late: {at}");
    // A copy of the killed run, to resume as 2 processes instead of 3.
    let two = tmp.path().join("killed_as_two");
    copy_dir(&out, &two);

    // All restarted with --resume latest: bitwise the uninterrupted run.
    let outs = finish(launch(&path, world, &["--resume", "latest"], |_| {
        Vec::new()
    }));
    for (rank, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {rank}: {}", stderr(o));
    }
    assert!(stderr(&outs[0]).contains(&format!(
        "resuming from {}",
        out.join(format!("checkpoint-{at}")).display()
    )));
    for file in ["model.safetensors", "ema.safetensors"] {
        let d = diff(
            &reference.output_dir().join("checkpoint-8"),
            &out.join("checkpoint-8"),
            file,
        );
        assert_eq!(d, 0.0, "resumed after a kill, {file}: {d:e}");
    }

    // Resumed by 2 processes: the same batches and noise, another summation order.
    let dir = format!("run.output_dir=\"{}\"", two.display());
    let outs = finish(launch(
        &path,
        2,
        &["--resume", "latest", "--set", &dir],
        |_| Vec::new(),
    ));
    for (rank, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {rank}: {}", stderr(o));
    }
    let d = diff(
        &reference.output_dir().join("checkpoint-8"),
        &two.join("checkpoint-8"),
        "model.safetensors",
    );
    assert!(d < 1e-4, "3 processes resumed as 2: {d:e}");
}

#[test]
fn a_process_with_another_config_is_refused_at_the_rendezvous() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path(), "mismatch", 1);
    c.run.device = "cpu".into();
    let path = write(&c, tmp.path().join("m.toml"));
    let outs = finish(launch(&path, 2, &[], |rank| {
        if rank == 1 {
            vec!["--set".into(), "train.learning_rate=0.01".into()]
        } else {
            Vec::new()
        }
    }));
    for (rank, o) in outs.iter().enumerate() {
        let e = stderr(o);
        assert!(!o.status.success());
        assert!(
            e.contains(
                "launch refused at the rendezvous: rank 1's resolved config differs from \
                        rank 0's: \"learning_rate = 0.01\""
            ),
            "rank {rank}: {e}"
        );
    }
    assert!(latest_step(&c.output_dir()).is_none());
}

#[test]
fn an_incomplete_launch_environment_is_a_clear_error_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let c = config(tmp.path(), "incomplete", 1);
    let path = write(&c, tmp.path().join("i.toml"));
    let r = train_cmd(&path, &[])
        .env("WORLD_SIZE", "2")
        .env("RANK", "1")
        .env_remove("MASTER_ADDR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(err.contains("needs MASTER_ADDR"), "{err}");
    assert!(
        !c.output_dir().exists(),
        "it wrote {}",
        c.output_dir().display()
    );
    // Two worker threads per process is not what a launch means.
    let mut c = c;
    c.run.devices = Some(DeviceList::List(vec!["cpu:0".into(), "cpu:1".into()]));
    let path = write(&c, tmp.path().join("j.toml"));
    let r = train_cmd(&path, &[])
        .env("WORLD_SIZE", "2")
        .env("RANK", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(err.contains("each process trains on one device"), "{err}");
}

#[test]
fn sigterm_to_one_process_stops_every_rank_after_the_same_step_and_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let mut reference = config(tmp.path(), "reference", 2);
    reference.train.max_steps = 40;
    let (ok, err) = common::run(&write(&reference, tmp.path().join("r.toml")), &[]);
    assert!(ok, "{err}");

    let mut c = config(tmp.path(), "term", 1);
    c.run.device = "cpu".into();
    c.train.max_steps = 40;
    let path = write(&c, tmp.path().join("t.toml"));
    let out = c.output_dir();
    // No periodic checkpoints: whatever exists after the signal, the signal wrote.
    let mut children = launch(&path, 2, &["--set", "checkpoint.every_steps=0"], |_| {
        Vec::new()
    });
    let mut err0 = children[0].stderr.take().unwrap();
    let (mut seen, mut buf) = (String::new(), [0u8; 256]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !seen.contains("step 3/") {
        use std::io::Read;
        let n = err0.read(&mut buf).unwrap();
        assert!(n > 0 && Instant::now() < deadline, "no progress: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    // Only rank 1 is told to stop; the request travels in the next all-reduce.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(children[1].id() as i32, libc::SIGTERM) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err0, &mut rest).unwrap();
    let outs = finish(children);
    for (rank, o) in outs.iter().enumerate() {
        assert_eq!(
            o.status.code(),
            Some(143),
            "rank {rank}: {rest}{}",
            stderr(o)
        );
    }
    assert!(rest.contains("continue with `--resume latest`"), "{rest}");
    let at = latest_step(&out).unwrap_or_else(|| panic!("no checkpoint written: {rest}"));
    assert!((3..40).contains(&at), "stopped at {at}");

    let outs = finish(launch(&path, 2, &["--resume", "latest"], |_| Vec::new()));
    for (rank, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {rank}: {}", stderr(o));
    }
    for file in ["model.safetensors", "ema.safetensors"] {
        let d = diff(
            &reference.output_dir().join("checkpoint-40"),
            &out.join("checkpoint-40"),
            file,
        );
        assert_eq!(
            d, 0.0,
            "stopped at {at} by SIGTERM to rank 1, resumed, {file}: {d:e}"
        );
    }
}
