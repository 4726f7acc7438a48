//! Noise schedules, the training recipe and samplers (diffusers `schedulers/` and the loss of
//! its training scripts), and the `[diffusion]` config section they share.

pub mod guidance;
pub mod k_samplers;
pub mod sampling;
pub mod schedule;
pub mod scheduler_config;
pub mod training;

use serde::{Deserialize, Serialize};

use schedule::{BetaSchedule, NoiseSchedule, PredictionType};

/// `[diffusion]`: the forward process and the training target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiffusionConfig {
    pub num_train_timesteps: usize,
    pub beta_schedule: BetaSchedule,
    pub beta_start: f64,
    pub beta_end: f64,
    pub prediction_type: PredictionType,
    /// Min-SNR-gamma loss weighting; diffusers' recommended value is 5.0.
    pub snr_gamma: Option<f64>,
    /// `noise += noise_offset * randn(B, C, 1, 1)`; 0 disables.
    pub noise_offset: f64,
    /// Noise the input with `noise + p * randn`, keep `noise` as the target; 0 disables.
    pub input_perturbation: f64,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_schedule: BetaSchedule::Linear,
            beta_start: 0.0001,
            beta_end: 0.02,
            prediction_type: PredictionType::Epsilon,
            snr_gamma: None,
            noise_offset: 0.0,
            input_perturbation: 0.0,
        }
    }
}

impl crate::resume::ResumeRules for DiffusionConfig {
    /// The noise schedule and the prediction target; min-SNR, noise offset and input
    /// perturbation may change.
    fn breaks_resume(&self, old: &Self, prefix: &str) -> Vec<crate::resume::Change> {
        use crate::resume::field;
        let schedule = "changes the noise schedule the model was trained on";
        [
            field(
                prefix,
                "num_train_timesteps",
                &old.num_train_timesteps,
                &self.num_train_timesteps,
                schedule,
            ),
            field(
                prefix,
                "beta_schedule",
                &old.beta_schedule,
                &self.beta_schedule,
                schedule,
            ),
            field(
                prefix,
                "beta_start",
                &old.beta_start,
                &self.beta_start,
                schedule,
            ),
            field(prefix, "beta_end", &old.beta_end, &self.beta_end, schedule),
            field(
                prefix,
                "prediction_type",
                &old.prediction_type,
                &self.prediction_type,
                "changes what the model predicts",
            ),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

impl DiffusionConfig {
    /// The discrete schedule these settings describe.
    pub fn schedule(&self) -> NoiseSchedule {
        NoiseSchedule::new(
            self.beta_schedule,
            self.num_train_timesteps,
            self.beta_start,
            self.beta_end,
        )
    }

    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.num_train_timesteps < 2 {
            p.push("diffusion.num_train_timesteps must be at least 2".into());
        }
        if self.beta_schedule != BetaSchedule::SquaredcosCapV2
            && !(0.0 < self.beta_start && self.beta_start < self.beta_end && self.beta_end < 1.0)
        {
            p.push(format!(
                "diffusion: need 0 < beta_start ({}) < beta_end ({}) < 1",
                self.beta_start, self.beta_end
            ));
        }
        if let Some(g) = self.snr_gamma
            && g <= 0.0
        {
            p.push(format!(
                "diffusion.snr_gamma = {g} must be positive (omit it to disable)"
            ));
        }
        if self.noise_offset < 0.0 || self.input_perturbation < 0.0 {
            p.push("diffusion.noise_offset and diffusion.input_perturbation must be >= 0".into());
        }
        p
    }
}
