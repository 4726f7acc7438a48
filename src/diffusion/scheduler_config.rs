//! A diffusers `scheduler/scheduler_config.json` read into the settings our samplers take.
//!
//! The schedule (betas, prediction type, spacing, `steps_offset`, `set_alpha_to_one`,
//! `clip_sample`) comes from the file; the sampler may be another than the file's class, as
//! `SomeScheduler.from_config(pipe.scheduler.config)` does in diffusers: the settings carry over,
//! with the file's class's defaults filled in for keys it omits (SD 1.5's PNDM config has no
//! `timestep_spacing`: PNDM's default, `leading`, applies to whatever sampler is chosen).
//! Options that change the computation and are not built are refused by name.

use super::sampling::{SamplerKind, SamplerOptions, TimestepSpacing};
use super::schedule::{BetaSchedule, NoiseSchedule, PredictionType};
use crate::io::config_json::ConfigJson;

/// The settings of a `scheduler_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// The sampler the file's `_class_name` stands for.
    pub kind: SamplerKind,
    pub num_train_timesteps: usize,
    pub beta_schedule: BetaSchedule,
    pub beta_start: f64,
    pub beta_end: f64,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    pub clip_sample: Option<f64>,
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json` (its `_class_name` decides the defaults).
    pub fn from_diffusers_json(
        value: &serde_json::Value,
    ) -> Result<Self, crate::io::config_json::ConfigJsonError> {
        let class = value
            .get("_class_name")
            .and_then(|v| v.as_str())
            .unwrap_or("DDIMScheduler");
        let kind = SamplerKind::from_diffusers_class(class).ok_or_else(|| {
            crate::io::config_json::ConfigJsonError::UnsupportedClass {
                what: format!("_class_name = {class:?}"),
                supported: "a scheduler difftrain implements (DDPMScheduler, DDIMScheduler, \
                            PNDMScheduler, EulerDiscreteScheduler, \
                            EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler)"
                    .into(),
            }
        })?;
        let json = ConfigJson::new(value, class)?;
        json.expect("trained_betas", &[])?;
        json.expect("rescale_betas_zero_snr", &[false.into()])?;
        json.expect("thresholding", &[false.into()])?;
        json.expect("use_karras_sigmas", &[false.into()])?;
        json.expect("use_exponential_sigmas", &[false.into()])?;
        json.expect("use_beta_sigmas", &[false.into()])?;
        json.expect("use_lu_lambdas", &[false.into()])?;
        json.expect("use_flow_sigmas", &[false.into()])?;
        json.expect("timestep_type", &["discrete".into()])?;
        json.expect("interpolation_type", &["linear".into()])?;
        if kind == SamplerKind::DpmSolverPP2M {
            json.expect("algorithm_type", &["dpmsolver++".into()])?;
            json.expect("solver_order", &[2.into()])?;
            json.expect("solver_type", &["midpoint".into()])?;
            json.expect("final_sigmas_type", &["zero".into()])?;
        }
        if kind == SamplerKind::Ddpm {
            json.expect("variance_type", &["fixed_small".into()])?;
        }
        // Each class's own defaults (diffusers 0.42 signatures).
        let (spacing, clip, alpha_to_one) = match class {
            "DDPMScheduler" => (TimestepSpacing::Leading, true, true),
            "DDIMScheduler" => (TimestepSpacing::Leading, true, true),
            "PNDMScheduler" => (TimestepSpacing::Leading, false, false),
            _ => (TimestepSpacing::Linspace, false, true),
        };
        let mut c = Self {
            kind,
            num_train_timesteps: 1000,
            beta_schedule: BetaSchedule::Linear,
            beta_start: 0.0001,
            beta_end: 0.02,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: spacing,
            steps_offset: 0,
            set_alpha_to_one: alpha_to_one,
            clip_sample: clip.then_some(1.0),
        };
        json.take("num_train_timesteps", &mut c.num_train_timesteps)?;
        json.take("beta_schedule", &mut c.beta_schedule)?;
        json.take("beta_start", &mut c.beta_start)?;
        json.take("beta_end", &mut c.beta_end)?;
        json.take("prediction_type", &mut c.prediction_type)?;
        json.take("timestep_spacing", &mut c.timestep_spacing)?;
        json.take("steps_offset", &mut c.steps_offset)?;
        json.take("set_alpha_to_one", &mut c.set_alpha_to_one)?;
        let clip = json.get::<bool>("clip_sample")?.unwrap_or(clip);
        let range = json.get::<f64>("clip_sample_range")?.unwrap_or(1.0);
        c.clip_sample = clip.then_some(range);
        Ok(c)
    }

    pub fn schedule(&self) -> NoiseSchedule {
        NoiseSchedule::new(
            self.beta_schedule,
            self.num_train_timesteps,
            self.beta_start,
            self.beta_end,
        )
    }

    /// Options for `steps` steps of `kind` (default: the file's sampler). DDIM's `eta` is 0
    /// as in diffusers' pipelines; `clip_sample` applies to DDPM/DDIM only.
    pub fn sampler_options(&self, kind: Option<SamplerKind>, steps: usize) -> SamplerOptions {
        SamplerOptions {
            kind: kind.unwrap_or(self.kind),
            num_inference_steps: steps,
            prediction: self.prediction_type,
            spacing: self.timestep_spacing,
            eta: 0.0,
            clip_sample: self.clip_sample,
            set_alpha_to_one: self.set_alpha_to_one,
            steps_offset: self.steps_offset,
        }
    }

    /// The `scheduler_config.json` of this schedule for `kind` (what an export writes).
    pub fn to_diffusers_json(&self) -> serde_json::Value {
        let class = match self.kind {
            SamplerKind::Ddpm => "DDPMScheduler",
            SamplerKind::Ddim => "DDIMScheduler",
            SamplerKind::Euler => "EulerDiscreteScheduler",
            SamplerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SamplerKind::DpmSolverPP2M => "DPMSolverMultistepScheduler",
        };
        serde_json::json!({
            "_class_name": class,
            "_diffusers_version": crate::io::layout::DIFFUSERS_VERSION,
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": self.prediction_type,
            "timestep_spacing": self.timestep_spacing,
            "steps_offset": self.steps_offset,
            "set_alpha_to_one": self.set_alpha_to_one,
            "clip_sample": self.clip_sample.is_some(),
            "clip_sample_range": self.clip_sample.unwrap_or(1.0),
            "trained_betas": null,
        })
    }
}
