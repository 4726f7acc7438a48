//! The sampling loop over a [`Denoiser`], and DDPM (ancestral) and DDIM steps as plain
//! functions; the sigma-space samplers (Euler, Euler ancestral, DPM-Solver++ 2M) are in
//! [`super::k_samplers`].
//!
//! `ddpm_step` mirrors `DDPMScheduler.step` (variance_type `fixed_small`) and `ddim_step`
//! mirrors `DDIMScheduler.step` (Song et al. 2021, eq. 12) of diffusers 0.42, including
//! `clip_sample`, `set_alpha_to_one`, `steps_offset` and the three `timestep_spacing` modes.
//! Per-step scalars are computed in f64 on the host; the tensors stay on the device. Schedulers
//! never see a model: they meet it in [`sample`] through the `Denoiser` trait.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::k_samplers::{self, KSampler, SigmaSchedule};
use super::schedule::{NoiseSchedule, PredictionType};

/// The model as the sampling loop sees it: the raw prediction at timestep `t` (an integer
/// except for Euler's `linspace` spacing, which feeds fractional timesteps as diffusers does).
pub trait Denoiser {
    /// # Shapes
    /// - `x`: `[batch, channels, height, width]`; returns the same shape.
    fn predict(&self, x: Tensor<4>, t: f64) -> Tensor<4>;
}

/// How inference timesteps are picked from the training ones (diffusers `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// The samplers, named as diffusers' schedulers: `DDPMScheduler`, `DDIMScheduler`,
/// `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `DPMSolverMultistepScheduler`
/// (DPM-Solver++ 2M, A1111's "DPM++ 2M").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    Ddpm,
    Ddim,
    Euler,
    EulerAncestral,
    #[serde(rename = "dpmpp_2m")]
    DpmSolverPP2M,
}

impl SamplerKind {
    /// The sampler a diffusers scheduler class stands for (`scheduler_config.json`'s
    /// `_class_name`; PNDM, SD 1.x's default, samples well with DDIM's update).
    pub fn from_diffusers_class(class: &str) -> Option<Self> {
        Some(match class {
            "DDPMScheduler" => Self::Ddpm,
            "DDIMScheduler" | "PNDMScheduler" => Self::Ddim,
            "EulerDiscreteScheduler" => Self::Euler,
            "EulerAncestralDiscreteScheduler" => Self::EulerAncestral,
            "DPMSolverMultistepScheduler" => Self::DpmSolverPP2M,
            _ => return None,
        })
    }

    fn k_sampler(self) -> Option<KSampler> {
        match self {
            Self::Ddpm | Self::Ddim => None,
            Self::Euler => Some(KSampler::Euler),
            Self::EulerAncestral => Some(KSampler::EulerAncestral),
            Self::DpmSolverPP2M => Some(KSampler::DpmSolverPP2M),
        }
    }
}

/// Everything a sampler needs besides the model and the schedule.
#[derive(Debug, Clone)]
pub struct SamplerOptions {
    pub kind: SamplerKind,
    pub num_inference_steps: usize,
    pub prediction: PredictionType,
    pub spacing: TimestepSpacing,
    /// DDIM noise scale: 0 deterministic, 1 DDPM-like.
    pub eta: f64,
    /// Clamp the predicted x0 to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: Option<f64>,
    /// DDIM `set_alpha_to_one`: use alpha_cumprod = 1 for the step past t = 0.
    pub set_alpha_to_one: bool,
    /// Added to `leading` timesteps (SD's schedulers use 1).
    pub steps_offset: usize,
}

/// Descending inference timesteps of DDPM/DDIM, as `set_timesteps` computes them.
pub fn inference_timesteps(
    num_train: usize,
    steps: usize,
    spacing: TimestepSpacing,
    steps_offset: usize,
) -> Vec<usize> {
    let steps = steps.clamp(1, num_train);
    match spacing {
        TimestepSpacing::Leading => {
            let ratio = num_train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + steps_offset).min(num_train - 1))
                .collect()
        }
        TimestepSpacing::Trailing => {
            // np.round(np.arange(T, 0, -T / n)) - 1
            let ratio = num_train as f64 / steps as f64;
            (0..steps)
                .map(|i| round_half_even(num_train as f64 - i as f64 * ratio) as usize - 1)
                .collect()
        }
        TimestepSpacing::Linspace => {
            // np.linspace(0, T - 1, n).round()[::-1]
            let last = (num_train - 1) as f64;
            let denom = (steps.max(2) - 1) as f64;
            (0..steps)
                .rev()
                .map(|i| {
                    round_half_even(if steps == 1 {
                        0.0
                    } else {
                        last * i as f64 / denom
                    }) as usize
                })
                .collect()
        }
    }
}

/// NumPy rounds half to even.
pub(crate) fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// `x0` and `eps` as implied by a model output of the given kind.
fn split_prediction(
    prediction: PredictionType,
    model_output: Tensor<4>,
    sample: Tensor<4>,
    alpha_prod_t: f64,
) -> (Tensor<4>, Tensor<4>) {
    let (sa, sb) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());
    match prediction {
        PredictionType::Epsilon => {
            let x0 = (sample - model_output.clone().mul_scalar(sb)).div_scalar(sa);
            (x0, model_output)
        }
        PredictionType::Sample => {
            let eps = (sample - model_output.clone().mul_scalar(sa)).div_scalar(sb);
            (model_output, eps)
        }
        PredictionType::VPrediction => {
            let x0 = sample.clone().mul_scalar(sa) - model_output.clone().mul_scalar(sb);
            let eps = model_output.mul_scalar(sa) + sample.mul_scalar(sb);
            (x0, eps)
        }
    }
}

fn clip(x0: Tensor<4>, range: Option<f64>) -> Tensor<4> {
    match range {
        Some(r) => x0.clamp(-r, r),
        None => x0,
    }
}

/// The timestep this step goes to: `t - T / n` (diffusers `previous_timestep`); `None` past 0.
fn previous_timestep(t: usize, num_train: usize, steps: usize) -> Option<usize> {
    t.checked_sub(num_train / steps)
}

/// DDPM posterior variance at `t` for `fixed_small` (`DDPMScheduler._get_variance`).
pub fn ddpm_variance(schedule: &NoiseSchedule, t: usize, steps: usize) -> f64 {
    let ac = &schedule.alphas_cumprod;
    let prev = previous_timestep(t, ac.len(), steps).map_or(1.0, |p| ac[p]);
    let current_beta = 1.0 - ac[t] / prev;
    ((1.0 - prev) / (1.0 - ac[t]) * current_beta).max(1e-20)
}

/// One ancestral DDPM step from `t` to the previous inference timestep.
/// `noise` is used only for `t > 0`, as in diffusers.
pub fn ddpm_step(
    schedule: &NoiseSchedule,
    opts: &SamplerOptions,
    model_output: Tensor<4>,
    t: usize,
    sample: Tensor<4>,
    noise: Option<Tensor<4>>,
) -> Tensor<4> {
    let ac = &schedule.alphas_cumprod;
    let steps = opts.num_inference_steps;
    let alpha_prod_t = ac[t];
    let alpha_prod_prev = previous_timestep(t, ac.len(), steps).map_or(1.0, |p| ac[p]);
    let beta_prod_t = 1.0 - alpha_prod_t;
    let beta_prod_prev = 1.0 - alpha_prod_prev;
    let current_alpha = alpha_prod_t / alpha_prod_prev;
    let current_beta = 1.0 - current_alpha;

    let (x0, _) = split_prediction(opts.prediction, model_output, sample.clone(), alpha_prod_t);
    let x0 = clip(x0, opts.clip_sample);
    // Eq. (7) of Ho et al.: the posterior mean.
    let c_x0 = alpha_prod_prev.sqrt() * current_beta / beta_prod_t;
    let c_xt = current_alpha.sqrt() * beta_prod_prev / beta_prod_t;
    let mean = x0.mul_scalar(c_x0) + sample.mul_scalar(c_xt);
    match noise {
        Some(z) if t > 0 => mean + z.mul_scalar(ddpm_variance(schedule, t, steps).sqrt()),
        _ => mean,
    }
}

/// One DDIM step (eq. 12 of Song et al.); `noise` is used when `eta > 0`.
pub fn ddim_step(
    schedule: &NoiseSchedule,
    opts: &SamplerOptions,
    model_output: Tensor<4>,
    t: usize,
    sample: Tensor<4>,
    noise: Option<Tensor<4>>,
) -> Tensor<4> {
    let ac = &schedule.alphas_cumprod;
    let final_alpha = if opts.set_alpha_to_one { 1.0 } else { ac[0] };
    let alpha_prod_t = ac[t];
    let alpha_prod_prev =
        previous_timestep(t, ac.len(), opts.num_inference_steps).map_or(final_alpha, |p| ac[p]);
    let beta_prod_t = 1.0 - alpha_prod_t;
    let beta_prod_prev = 1.0 - alpha_prod_prev;

    let (x0, eps) = split_prediction(opts.prediction, model_output, sample, alpha_prod_t);
    let x0 = clip(x0, opts.clip_sample);
    let variance = beta_prod_prev / beta_prod_t * (1.0 - alpha_prod_t / alpha_prod_prev);
    let std_dev = opts.eta * variance.sqrt();
    let direction = eps.mul_scalar((1.0 - alpha_prod_prev - std_dev * std_dev).max(0.0).sqrt());
    let prev = x0.mul_scalar(alpha_prod_prev.sqrt()) + direction;
    match noise {
        Some(z) if opts.eta > 0.0 => prev + z.mul_scalar(std_dev),
        _ => prev,
    }
}

/// Runs the full reverse process from unit-variance noise `initial` (scaled by the sampler's
/// initial sigma here, as diffusers' pipelines do). `randn` draws a standard normal tensor of
/// the sample's shape for each stochastic step.
pub fn sample(
    denoiser: &impl Denoiser,
    schedule: &NoiseSchedule,
    opts: &SamplerOptions,
    initial: Tensor<4>,
    randn: &mut dyn FnMut() -> Tensor<4>,
) -> Tensor<4> {
    match opts.kind.k_sampler() {
        None => sample_ddpm_ddim(denoiser, schedule, opts, initial, randn),
        Some(k) => sample_sigmas(denoiser, schedule, opts, k, initial, randn),
    }
}

fn sample_ddpm_ddim(
    denoiser: &impl Denoiser,
    schedule: &NoiseSchedule,
    opts: &SamplerOptions,
    initial: Tensor<4>,
    randn: &mut dyn FnMut() -> Tensor<4>,
) -> Tensor<4> {
    let timesteps = inference_timesteps(
        schedule.num_train_timesteps(),
        opts.num_inference_steps,
        opts.spacing,
        opts.steps_offset,
    );
    let opts = SamplerOptions {
        num_inference_steps: timesteps.len(),
        ..opts.clone()
    };
    let mut x = initial;
    for &t in &timesteps {
        let out = denoiser.predict(x.clone(), t as f64);
        x = match opts.kind {
            SamplerKind::Ddpm => {
                let z = (t > 0).then(&mut *randn);
                ddpm_step(schedule, &opts, out, t, x, z)
            }
            _ => {
                let z = (opts.eta > 0.0).then(&mut *randn);
                ddim_step(schedule, &opts, out, t, x, z)
            }
        };
    }
    x
}

/// Euler, Euler ancestral and DPM-Solver++(2M) over their sigma schedule.
fn sample_sigmas(
    denoiser: &impl Denoiser,
    schedule: &NoiseSchedule,
    opts: &SamplerOptions,
    kind: KSampler,
    initial: Tensor<4>,
    randn: &mut dyn FnMut() -> Tensor<4>,
) -> Tensor<4> {
    let s = SigmaSchedule::new(
        schedule,
        kind,
        opts.num_inference_steps,
        opts.spacing,
        opts.steps_offset,
    );
    let n = s.timesteps.len();
    let mut x = initial.mul_scalar(s.init_noise_sigma);
    let mut prev: Option<(Tensor<4>, f64)> = None;
    for (i, &t) in s.timesteps.iter().enumerate() {
        let (sigma, sigma_next) = (s.sigmas[i], s.sigmas[i + 1]);
        x = match kind {
            KSampler::Euler => {
                let out = denoiser.predict(x.clone().mul_scalar(k_samplers::input_scale(sigma)), t);
                k_samplers::euler_step(x, out, sigma, sigma_next, opts.prediction)
            }
            KSampler::EulerAncestral => {
                let out = denoiser.predict(x.clone().mul_scalar(k_samplers::input_scale(sigma)), t);
                k_samplers::euler_ancestral_step(
                    x,
                    out,
                    sigma,
                    sigma_next,
                    opts.prediction,
                    randn(),
                )
            }
            KSampler::DpmSolverPP2M => {
                let out = denoiser.predict(x.clone(), t);
                let x0 = k_samplers::dpm_x0(out, x.clone(), sigma, opts.prediction);
                // First order at the first step and (final sigma 0) at the last.
                let history = prev.take().filter(|_| i + 1 < n);
                let next = k_samplers::dpmpp_2m_step(x, x0.clone(), history, sigma, sigma_next);
                prev = Some((x0, sigma));
                next
            }
        };
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedule::BetaSchedule;

    #[test]
    fn spacings_match_numpy() {
        assert_eq!(
            inference_timesteps(1000, 4, TimestepSpacing::Leading, 0),
            vec![750, 500, 250, 0]
        );
        assert_eq!(
            inference_timesteps(1000, 4, TimestepSpacing::Leading, 1),
            vec![751, 501, 251, 1]
        );
        assert_eq!(
            inference_timesteps(1000, 4, TimestepSpacing::Trailing, 1),
            vec![999, 749, 499, 249]
        );
        assert_eq!(
            inference_timesteps(1000, 4, TimestepSpacing::Linspace, 1),
            vec![999, 666, 333, 0]
        );
        assert_eq!(
            inference_timesteps(10, 3, TimestepSpacing::Trailing, 0),
            vec![9, 6, 2]
        );
    }

    #[test]
    fn ddpm_variance_matches_diffusers_test() {
        // diffusers tests/schedulers/test_scheduler_ddpm.py::test_variance (linear 1e-4..0.02).
        let s = NoiseSchedule::new(BetaSchedule::Linear, 1000, 0.0001, 0.02);
        assert!((ddpm_variance(&s, 0, 1000) - 0.0).abs() < 1e-5);
        assert!((ddpm_variance(&s, 487, 1000) - 0.00979).abs() < 1e-5);
        assert!((ddpm_variance(&s, 999, 1000) - 0.02).abs() < 1e-5);
    }
}
