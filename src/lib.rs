//! difftrain: train diffusion and discrete generative image models on burn.
//!
//! Dependencies point one way, lowest first (docs/architecture.md draws them):
//!
//! 1. the ground floor, importing nothing of the crate: `dtype`, `error`, `memory`, `signals`,
//!    `threads`, `resume`, `tensorboard`;
//! 2. `io` (files; uses `memory`), `tokenizer` (uses `io`), `data`, `device`, `distributed`,
//!    `kernels` (uses `dtype`);
//! 3. `nn` (layers; a `Linear` may hold a `lora::adapter::LoraAdapter`, the one part of `lora`
//!    at this level);
//! 4. `models`, `diffusion`, `optim`, then `lora` (which adapts the models);
//! 5. `config` (assembles the sections), 6. `checkpoint`, `train`, 7. `pipelines`, 8. the binaries
//!    and this file's run wrappers.
//!
//! Models never import the trainer; schedulers never import models (they meet in
//! [`diffusion::sampling::sample`] through the [`diffusion::sampling::Denoiser`] trait);
//! only [`io`] maps parameters to file keys; only [`distributed`] knows ranks; only
//! [`pipelines`] maps a model family to its code.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod diffusion;
pub mod distributed;
pub mod dtype;
pub mod error;
pub mod io;
pub mod kernels;
pub mod lora;
pub mod memory;
pub mod models;
pub mod nn;
pub mod optim;
pub mod pipelines;
pub mod resume;
pub mod seeds;
pub mod signals;
pub mod tensorboard;
pub mod threads;
pub mod tokenizer;
pub mod train;

/// Keeps freed memory in the process instead of handing it back to the kernel and faulting it
/// in again (glibc only; elsewhere a no-op). Every binary calls it first.
///
/// A training step frees and reallocates the same few-MiB activations and gradients hundreds
/// of times. glibc serves blocks above its mmap threshold (128 KiB at first, raised only as
/// blocks are freed) with fresh `mmap`s and trims the heap top past 128 KiB; each reuse is then
/// a page fault per 4 KiB (measured on a tutorial-U-Net run: docs/benchmarks.md, "Kernel
/// thresholds"). The cost is that the process keeps its peak heap until it exits, which a
/// training run reaches every step anyway.
pub fn tune_allocator() {
    tune_glibc();
}

/// The allocator every binary installs: large blocks cached for reuse ([`memory`]).
#[macro_export]
macro_rules! global_allocator {
    () => {
        #[global_allocator]
        static ALLOCATOR: $crate::memory::CachingAllocator =
            $crate::memory::CachingAllocator::new();

        /// Gives the caching allocator its budget, then tunes glibc ([`$crate::tune_allocator`]).
        fn tune_allocator() {
            ALLOCATOR.set_cap($crate::memory::default_cap());
            ALLOCATOR.register();
            $crate::tune_allocator();
        }
    };
}

fn tune_glibc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2); larger blocks
        // still get their own mapping.
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 1 << 30;
        // SAFETY: mallopt only changes allocator parameters; called before any threads exist.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// What every binary's `main` does with its result: print the error chain once, exit 1.
/// Runs a binary's body turning a panic (burn and cubecl panic on device errors such as a GPU
/// running out of memory) into an error that says what happened and what to do, without a stack
/// trace (set `RUST_BACKTRACE=1` to keep Rust's report).
pub fn run_guarded(body: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    static WHERE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    if std::env::var_os("RUST_BACKTRACE").is_none() {
        std::panic::set_hook(Box::new(|info| {
            if let Ok(mut w) = WHERE.lock() {
                *w = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()));
            }
        }));
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(result) => result,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            let at = WHERE
                .lock()
                .ok()
                .and_then(|w| w.clone())
                .unwrap_or_default();
            let lower = msg.to_lowercase();
            if lower.contains("out of memory") || lower.contains("outofmemory") {
                anyhow::bail!(
                    "the device ran out of memory ({msg}). Lower train.batch_size (keeping the \
                     effective batch with train.gradient_accumulation_steps) or data.resolution"
                );
            }
            let at = if at.is_empty() {
                String::new()
            } else {
                format!(" (at {at})")
            };
            anyhow::bail!(
                "internal error: {msg}{at}. Please report it with the command and the config"
            )
        }
    }
}

pub fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // A run stopped by SIGINT/SIGTERM after writing its checkpoint: 128 + the signal,
            // as a shell reports a process the signal ended.
            if let Some(signal) = e
                .chain()
                .find_map(|c| c.downcast_ref::<train::TrainError>())
                .and_then(train::TrainError::stop_signal)
            {
                eprintln!("{e:#}");
                return std::process::ExitCode::from((128 + signal) as u8);
            }
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
