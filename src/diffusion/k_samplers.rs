//! Samplers on the noise level sigma = sqrt((1 - abar) / abar), as diffusers 0.42 implements
//! them (k-diffusion's names): Euler (`EulerDiscreteScheduler`; Karras et al. 2022, alg. 2 with
//! no churn), Euler ancestral (`EulerAncestralDiscreteScheduler`) and DPM-Solver++(2M)
//! (`DPMSolverMultistepScheduler` with its defaults: `dpmsolver++`, order 2, midpoint, lower
//! order at the last step; Lu et al. 2022, alg. 2).
//!
//! Each step is a plain function of host scalars and device tensors. The schedule of sigmas is
//! computed on the host in f64 and rounded to f32 where diffusers stores f32 (`sigmas`,
//! fractional timesteps), so the noise levels are diffusers' own.

use burn::prelude::*;

use super::sampling::TimestepSpacing;
use super::schedule::{NoiseSchedule, PredictionType};

/// Which sigma-space sampler a schedule is for (they space their timesteps differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KSampler {
    Euler,
    EulerAncestral,
    DpmSolverPP2M,
}

/// The timesteps the model sees and the noise level of each, plus a final level (0).
#[derive(Debug, Clone, PartialEq)]
pub struct SigmaSchedule {
    /// Model timesteps, descending (fractional for Euler's `linspace` spacing).
    pub timesteps: Vec<f64>,
    /// `sigmas[i]` at `timesteps[i]`; one more entry, the final 0.
    pub sigmas: Vec<f64>,
    /// How the initial unit-variance noise is scaled (diffusers' `init_noise_sigma`).
    pub init_noise_sigma: f64,
}

/// `np.interp(t, arange(len(ys)), ys)` for `t` in `[0, len - 1]`.
fn interp(ys: &[f64], t: f64) -> f64 {
    let last = ys.len() - 1;
    let t = t.clamp(0.0, last as f64);
    let i = (t.floor() as usize).min(last);
    let frac = t - i as f64;
    if i == last {
        ys[last]
    } else {
        ys[i] + (ys[i + 1] - ys[i]) * frac
    }
}

fn f32r(x: f64) -> f64 {
    x as f32 as f64
}

impl SigmaSchedule {
    /// diffusers' `set_timesteps` of each scheduler for `n` steps.
    pub fn new(
        schedule: &NoiseSchedule,
        sampler: KSampler,
        n: usize,
        spacing: TimestepSpacing,
        steps_offset: usize,
    ) -> Self {
        let train = schedule.num_train_timesteps();
        let big_t = train as f64;
        let n = n.clamp(1, train);
        let round = super::sampling::round_half_even;
        let timesteps: Vec<f64> = match (sampler, spacing) {
            // DPM-Solver spaces n + 1 points and drops the last (sampling ends at sigma 0).
            (KSampler::DpmSolverPP2M, TimestepSpacing::Linspace) => (0..=n)
                .rev()
                .take(n)
                .map(|i| round((big_t - 1.0) * i as f64 / n as f64))
                .collect(),
            (KSampler::DpmSolverPP2M, TimestepSpacing::Leading) => {
                let ratio = (train / (n + 1)) as f64;
                (0..=n)
                    .rev()
                    .take(n)
                    .map(|i| i as f64 * ratio + steps_offset as f64)
                    .collect()
            }
            (_, TimestepSpacing::Linspace) => (0..n)
                .rev()
                .map(|i| {
                    let denom = (n.max(2) - 1) as f64;
                    if n == 1 {
                        0.0
                    } else {
                        f32r((big_t - 1.0) * i as f64 / denom)
                    }
                })
                .collect(),
            (_, TimestepSpacing::Leading) => {
                let ratio = (train / n) as f64;
                (0..n)
                    .rev()
                    .map(|i| i as f64 * ratio + steps_offset as f64)
                    .collect()
            }
            (_, TimestepSpacing::Trailing) => {
                let ratio = big_t / n as f64;
                (0..n)
                    .map(|i| round(big_t - i as f64 * ratio) - 1.0)
                    .collect()
            }
        };
        let all: Vec<f64> = schedule
            .alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| f32r(interp(&all, t))).collect();
        sigmas.push(0.0);
        let max = sigmas.iter().copied().fold(0.0, f64::max);
        let init_noise_sigma = match sampler {
            KSampler::DpmSolverPP2M => 1.0,
            _ if matches!(
                spacing,
                TimestepSpacing::Linspace | TimestepSpacing::Trailing
            ) =>
            {
                max
            }
            _ => (max * max + 1.0).sqrt(),
        };
        Self {
            timesteps,
            sigmas,
            init_noise_sigma,
        }
    }
}

/// The denoised estimate in sigma space (`x = x0 + sigma * eps`) from a model output.
fn k_x0(
    model_output: Tensor<4>,
    x: Tensor<4>,
    sigma: f64,
    prediction: PredictionType,
) -> Tensor<4> {
    match prediction {
        PredictionType::Epsilon => x - model_output.mul_scalar(sigma),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            model_output.mul_scalar(-sigma / s2.sqrt()) + x.div_scalar(s2)
        }
        PredictionType::Sample => model_output,
    }
}

/// The Euler and Euler-ancestral samplers feed the model `x / sqrt(sigma^2 + 1)`
/// (`scale_model_input`).
pub fn input_scale(sigma: f64) -> f64 {
    1.0 / (sigma * sigma + 1.0).sqrt()
}

/// One Euler step from `sigma` to `sigma_next` (`EulerDiscreteScheduler.step`, s_churn 0).
pub fn euler_step(
    x: Tensor<4>,
    model_output: Tensor<4>,
    sigma: f64,
    sigma_next: f64,
    prediction: PredictionType,
) -> Tensor<4> {
    let x0 = k_x0(model_output, x.clone(), sigma, prediction);
    let derivative = (x.clone() - x0).div_scalar(sigma);
    x + derivative.mul_scalar(sigma_next - sigma)
}

/// One Euler-ancestral step: to `sigma_down` deterministically, then `noise * sigma_up`
/// (`EulerAncestralDiscreteScheduler.step`, eta 1).
pub fn euler_ancestral_step(
    x: Tensor<4>,
    model_output: Tensor<4>,
    sigma: f64,
    sigma_next: f64,
    prediction: PredictionType,
    noise: Tensor<4>,
) -> Tensor<4> {
    let x0 = k_x0(model_output, x.clone(), sigma, prediction);
    let sigma_up = (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next)
        / (sigma * sigma))
        .max(0.0)
        .sqrt();
    let sigma_down = (sigma_next * sigma_next - sigma_up * sigma_up)
        .max(0.0)
        .sqrt();
    let derivative = (x.clone() - x0).div_scalar(sigma);
    x + derivative.mul_scalar(sigma_down - sigma) + noise.mul_scalar(sigma_up)
}

/// `(alpha_t, sigma_t)` of the variance-preserving process at noise level `sigma`.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// The data prediction DPM-Solver++ works with, from a model output at `sigma`
/// (`convert_model_output`); `x` is the variance-preserving sample.
pub fn dpm_x0(
    model_output: Tensor<4>,
    x: Tensor<4>,
    sigma: f64,
    prediction: PredictionType,
) -> Tensor<4> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    match prediction {
        PredictionType::Epsilon => (x - model_output.mul_scalar(sigma_t)).div_scalar(alpha_t),
        PredictionType::VPrediction => x.mul_scalar(alpha_t) - model_output.mul_scalar(sigma_t),
        PredictionType::Sample => model_output,
    }
}

/// One DPM-Solver++ step from `sigmas[1]` to `sigmas[2]`: first order (DDIM in data
/// prediction form) without a previous data prediction, else the second-order multistep
/// update with the midpoint rule, `prev = (x0 at sigmas[0])`.
pub fn dpmpp_2m_step(
    x: Tensor<4>,
    x0: Tensor<4>,
    prev: Option<(Tensor<4>, f64)>,
    sigma: f64,
    sigma_next: f64,
) -> Tensor<4> {
    let lambda = |s: f64| {
        let (a, st) = alpha_sigma(s);
        a.ln() - st.ln()
    };
    let (alpha_t, sigma_t) = alpha_sigma(sigma_next);
    let (_, sigma_s0) = alpha_sigma(sigma);
    let h = lambda(sigma_next) - lambda(sigma);
    // exp(-h) - 1, with h = +inf at the final sigma 0 giving -1.
    let em1 = (-h).exp() - 1.0;
    let base = x.mul_scalar(sigma_t / sigma_s0) - x0.clone().mul_scalar(alpha_t * em1);
    match prev {
        None => base,
        Some((x0_prev, sigma_prev)) => {
            let r0 = (lambda(sigma) - lambda(sigma_prev)) / h;
            let d1 = (x0 - x0_prev).div_scalar(r0);
            base - d1.mul_scalar(0.5 * alpha_t * em1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedule::BetaSchedule;

    #[test]
    fn interp_matches_numpy() {
        let ys = [0.0, 10.0, 20.0];
        assert_eq!(interp(&ys, 0.5), 5.0);
        assert_eq!(interp(&ys, 2.0), 20.0);
        assert_eq!(interp(&ys, 1.25), 12.5);
    }

    #[test]
    fn sd_schedules_match_diffusers_timesteps() {
        let s = NoiseSchedule::new(BetaSchedule::ScaledLinear, 1000, 0.00085, 0.012);
        let dpm = SigmaSchedule::new(&s, KSampler::DpmSolverPP2M, 5, TimestepSpacing::Leading, 1);
        assert_eq!(dpm.timesteps, vec![831.0, 665.0, 499.0, 333.0, 167.0]);
        let e = SigmaSchedule::new(&s, KSampler::Euler, 10, TimestepSpacing::Linspace, 1);
        assert_eq!(e.timesteps[..2], [999.0, 888.0]);
        assert_eq!(e.sigmas.len(), 11);
        assert_eq!(e.sigmas[10], 0.0);
        // diffusers computes alphas_cumprod in f32, we in f64: equal to ~1e-6 relative.
        assert!((e.init_noise_sigma - 14.614_646_911_621_094).abs() < 1e-4);
    }
}
