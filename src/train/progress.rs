//! What a run shows and logs of each step: the progress display (an indicatif bar on a
//! terminal, plain periodic lines otherwise: CI logs) and the TensorBoard scalars, means over
//! the steps since the last write ([`StepLog`]).

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::tensorboard::{EventError, EventWriter};

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
            None if !self.quiet
                && (r.step.is_multiple_of(self.log_every) || r.step == self.total) =>
            {
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

/// What a step logs to TensorBoard besides its [`StepReport`].
pub struct StepScalars {
    pub seconds: f64,
    /// Images of the global batch this step consumed.
    pub images: f64,
    pub skipped_total: usize,
    /// fp16's loss scale.
    pub loss_scale: Option<f64>,
    /// EMA's last decay, when EMA is on.
    pub ema_decay: Option<f64>,
    /// The objective's own statistics.
    pub metrics: Vec<(&'static str, f64)>,
}

/// Running means between two TensorBoard scalar writes.
#[derive(Default)]
struct Window {
    steps: usize,
    loss: f64,
    seconds: f64,
    images: f64,
}

/// The progress display and the TensorBoard scalars of a run, written every `log_every`
/// steps (and at the last) as means over the window since the previous write.
pub struct StepLog {
    progress: Progress,
    events: Option<EventWriter>,
    window: Window,
    log_every: usize,
    total: usize,
}

impl StepLog {
    pub fn new(
        progress: Progress,
        events: Option<EventWriter>,
        log_every: usize,
        total: usize,
    ) -> Self {
        Self {
            progress,
            events,
            window: Window::default(),
            log_every,
            total,
        }
    }

    /// Shows step `r` and adds it to the window; writes the scalars when due.
    pub fn step(&mut self, r: &StepReport, s: StepScalars) -> Result<(), EventError> {
        self.progress.update(r);
        let w = &mut self.window;
        w.steps += 1;
        w.loss += r.loss;
        w.seconds += s.seconds;
        w.images += s.images;
        let due = r.step.is_multiple_of(self.log_every) || r.step == self.total;
        let Some(ev) = self.events.as_mut().filter(|_| due) else {
            return Ok(());
        };
        let at = r.step as u64;
        ev.scalar("train/loss", w.loss / w.steps as f64, at)?;
        ev.scalar("train/lr", r.lr, at)?;
        ev.scalar("train/grad_norm", r.grad_norm, at)?;
        ev.scalar("train/skipped_steps", s.skipped_total as f64, at)?;
        if let Some(scale) = s.loss_scale {
            ev.scalar("train/loss_scale", scale, at)?;
        }
        ev.scalar("train/images_per_sec", w.images / w.seconds.max(1e-9), at)?;
        if let Some(decay) = s.ema_decay {
            ev.scalar("train/ema_decay", decay, at)?;
        }
        for (tag, value) in s.metrics {
            ev.scalar(tag, value, at)?;
        }
        self.window = Window::default();
        Ok(())
    }

    /// The TensorBoard writer (sample grids go there too).
    pub fn events(&mut self) -> Option<&mut EventWriter> {
        self.events.as_mut()
    }

    pub fn finish(&self) {
        self.progress.finish();
    }
}
