//! Progress display: an indicatif bar on a terminal, plain periodic lines otherwise (CI logs).

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// What one optimizer step reports to the display (and, later, to loggers and checkpointers).
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// 1-based index of the optimizer step just taken.
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub images_per_sec: f64,
    pub skipped: bool,
}

pub struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
    log_every: usize,
    start: Instant,
    first_step: usize,
    quiet: bool,
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

impl Progress {
    pub fn new(total: usize, first_step: usize, log_every: usize, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar.set_position(first_step as u64);
            bar
        });
        Self {
            bar,
            total,
            log_every,
            start: Instant::now(),
            first_step,
            quiet,
        }
    }

    pub fn update(&self, r: &StepReport) {
        let done = (r.step - self.first_step) as f64;
        let elapsed = self.start.elapsed().as_secs_f64();
        let it_s = done / elapsed.max(1e-9);
        let eta = (self.total - r.step) as f64 / it_s.max(1e-9);
        let msg = format!(
            "loss {:.4} lr {:.2e} grad_norm {:.3} {:.2} it/s {:.1} img/s{}",
            r.loss,
            r.lr,
            r.grad_norm,
            it_s,
            r.images_per_sec,
            if r.skipped {
                " (skipped: non-finite)"
            } else {
                ""
            }
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(r.step as u64);
                bar.set_message(msg);
            }
            None if !self.quiet && (r.step % self.log_every == 0 || r.step == self.total) => {
                eprintln!(
                    "step {}/{} {msg} elapsed {} eta {}",
                    r.step,
                    self.total,
                    fmt_secs(elapsed),
                    fmt_secs(eta)
                );
            }
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
