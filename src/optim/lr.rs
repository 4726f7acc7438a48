//! Learning-rate schedules as diffusers' `get_scheduler` (transformers `optimization.py`)
//! defines them: a multiplier of the base rate as a function of the optimizer step.
//!
//! `lr_at(step)` is the rate used by the optimizer step with 0-based index `step`, like
//! PyTorch's `LambdaLR` before its first `scheduler.step()`: with warmup the first step runs
//! at rate 0, exactly as in the diffusers training scripts.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy)]
pub struct LrScheduler {
    pub schedule: LrSchedule,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrScheduler {
    /// The multiplier `lr_lambda(step)`.
    pub fn factor(&self, step: usize) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        let warmup = || s / w.max(1.0);
        match self.schedule {
            LrSchedule::Constant => 1.0,
            LrSchedule::ConstantWithWarmup if s < w => warmup(),
            LrSchedule::ConstantWithWarmup => 1.0,
            LrSchedule::Linear if s < w => warmup(),
            LrSchedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            LrSchedule::Cosine if s < w => warmup(),
            LrSchedule::Cosine => {
                // num_cycles = 0.5: half a cosine from 1 to 0.
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    pub fn lr_at(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(schedule: LrSchedule) -> LrScheduler {
        LrScheduler {
            schedule,
            base_lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
        }
    }

    #[test]
    fn warmup_then_decay() {
        // Values of transformers' lr_lambda for warmup 10, total 110.
        let c = sched(LrSchedule::ConstantWithWarmup);
        assert_eq!(
            (c.factor(0), c.factor(5), c.factor(10), c.factor(100)),
            (0.0, 0.5, 1.0, 1.0)
        );
        let l = sched(LrSchedule::Linear);
        assert_eq!(
            (l.factor(5), l.factor(10), l.factor(60), l.factor(110)),
            (0.5, 1.0, 0.5, 0.0)
        );
        let k = sched(LrSchedule::Cosine);
        assert!((k.factor(60) - 0.5).abs() < 1e-12);
        assert!((k.factor(35) - 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos())).abs() < 1e-12);
        assert!(k.factor(110).abs() < 1e-12);
        assert_eq!(sched(LrSchedule::Constant).factor(0), 1.0);
    }
}
