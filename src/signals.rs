//! SIGINT / SIGTERM during training: the first one asks the loop to finish the current optimizer
//! step, write a checkpoint, flush its logs and exit with 128 + the signal (130 / 143); a second
//! one exits at once. Clusters preempt jobs with SIGTERM; without this a run would lose up to
//! `checkpoint.every_steps - 1` steps. Only the `train` binary installs the handler.

use std::sync::atomic::{AtomicI32, Ordering};

static REQUESTED: AtomicI32 = AtomicI32::new(0);

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    if REQUESTED.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: `_exit` is async-signal-safe; the second signal means "stop now".
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Installs the handler for SIGINT and SIGTERM.
pub fn install() {
    #[cfg(unix)]
    // SAFETY: the handler only touches an atomic and calls `_exit`, both async-signal-safe.
    unsafe {
        let handler: extern "C" fn(libc::c_int) = on_signal;
        for sig in [libc::SIGINT, libc::SIGTERM] {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// The signal that asked the run to stop, if any.
pub fn requested() -> Option<i32> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Tests only: `DIFFTRAIN_TEST_SIGNAL_AT=<phase>` requests a stop as a SIGTERM would, when the
/// run reaches `phase` (`latent_cache`, `export`), so a test can stop a run inside a phase
/// without racing it.
pub fn test_phase(phase: &str) {
    if std::env::var("DIFFTRAIN_TEST_SIGNAL_AT").is_ok_and(|p| p == phase) {
        #[cfg(unix)]
        let _ = REQUESTED.compare_exchange(0, libc::SIGTERM, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// The name of a signal number, for messages.
pub fn name(sig: i32) -> &'static str {
    #[cfg(unix)]
    {
        if sig == libc::SIGINT {
            return "SIGINT";
        }
        if sig == libc::SIGTERM {
            return "SIGTERM";
        }
    }
    "a signal"
}
