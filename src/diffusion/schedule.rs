//! Beta schedules, the forward process and training targets/weights.
//!
//! Mirrors diffusers `schedulers/scheduling_ddpm.py` (`betas_for_alpha_bar`, the three beta
//! schedules) and the loss recipe of `examples/text_to_image/train_text_to_image.py`
//! (noise offset, input perturbation, min-SNR-gamma). Everything is computed in f64 on the host;
//! diffusers keeps `alphas_cumprod` in f32, so reference tests compare with a relative tolerance.

use serde::{Deserialize, Serialize};

/// How betas are spaced over the training timesteps (diffusers `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, T)` (Ho et al. 2020).
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), T)^2` (Stable Diffusion).
    ScaledLinear,
    /// Cosine alpha-bar of Nichol & Dhariwal 2021, betas capped at 0.999.
    SquaredcosCapV2,
}

/// What the denoiser predicts (diffusers `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

/// The discrete noise schedule: `alphas_cumprod[t]` for `t` in `0..T`.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    pub fn new(
        schedule: BetaSchedule,
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
    ) -> Self {
        let n = num_train_timesteps;
        let linspace = |a: f64, b: f64| -> Vec<f64> {
            if n == 1 {
                return vec![a];
            }
            // `i as f64 / (n - 1) as f64`: float division (candle's cosine schedule divided
            // integers here and returned zeros).
            (0..n)
                .map(|i| a + (b - a) * (i as f64 / (n - 1) as f64))
                .collect()
        };
        let betas = match schedule {
            BetaSchedule::Linear => linspace(beta_start, beta_end),
            BetaSchedule::ScaledLinear => linspace(beta_start.sqrt(), beta_end.sqrt())
                .into_iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::SquaredcosCapV2 => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let t1 = i as f64 / n as f64;
                        let t2 = (i + 1) as f64 / n as f64;
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                    })
                    .collect()
            }
        };
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Self {
            betas,
            alphas_cumprod,
        }
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Signal-to-noise ratio `abar_t / (1 - abar_t)`; infinite only if `abar_t == 1`.
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        a / (1.0 - a)
    }

    /// Coefficients of the forward process `x_t = c0 * x0 + c1 * eps`.
    pub fn add_noise_coefficients(&self, t: usize) -> (f64, f64) {
        let a = self.alphas_cumprod[t];
        (a.sqrt(), (1.0 - a).sqrt())
    }

    /// The regression target is `cx0 * x0 + ceps * eps`; returns `(cx0, ceps)`.
    /// v-prediction: `v = sqrt(abar) eps - sqrt(1 - abar) x0`.
    pub fn target_coefficients(&self, prediction: PredictionType, t: usize) -> (f64, f64) {
        let (sa, s1a) = self.add_noise_coefficients(t);
        match prediction {
            PredictionType::Epsilon => (0.0, 1.0),
            PredictionType::Sample => (1.0, 0.0),
            PredictionType::VPrediction => (-s1a, sa),
        }
    }

    /// Per-sample loss weight. `None` gives 1. With min-SNR-gamma (Hang et al. 2023):
    /// epsilon `min(SNR, g) / SNR`, v `min(SNR, g) / (SNR + 1)`, sample `min(SNR, g)`.
    /// At SNR = 0 (zero-terminal-SNR schedules) the epsilon weight takes its limit 1 instead
    /// of the 0/0 that diffusers' script turns into NaN.
    pub fn loss_weight(&self, prediction: PredictionType, snr_gamma: Option<f64>, t: usize) -> f64 {
        let Some(gamma) = snr_gamma else { return 1.0 };
        let snr = self.snr(t);
        let clipped = snr.min(gamma);
        match prediction {
            PredictionType::Epsilon if snr == 0.0 => 1.0,
            PredictionType::Epsilon => clipped / snr,
            PredictionType::VPrediction => clipped / (snr + 1.0),
            PredictionType::Sample => clipped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs().max(1e-12)
    }

    #[test]
    fn sd15_scaled_linear_matches_reference_facts() {
        // ../shared/reference/FORMATS.md: values read from diffusers, which works in f32
        // (SNR[0] is 1175.47 in f64, 1175.44 through f32's 1 - 0.99915), hence 1e-4.
        let s = NoiseSchedule::new(BetaSchedule::ScaledLinear, 1000, 0.00085, 0.012);
        assert!(rel(s.alphas_cumprod[0], 0.99915) < 1e-6);
        assert!(rel(s.alphas_cumprod[999], 0.0046601) < 1e-4);
        assert!(rel(s.snr(0), 1175.44) < 1e-4);
        assert!(rel(s.snr(999), 0.0046819) < 1e-4);
    }

    #[test]
    fn cosine_schedule_is_not_all_zero() {
        let s = NoiseSchedule::new(BetaSchedule::SquaredcosCapV2, 1000, 0.0001, 0.02);
        assert!(s.betas[0] > 0.0 && s.betas[0] < 1e-3);
        assert_eq!(s.betas[999], 0.999);
        assert!(s.alphas_cumprod.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn min_snr_weights_guard_zero_snr() {
        let mut s = NoiseSchedule::new(BetaSchedule::Linear, 10, 0.1, 0.2);
        s.alphas_cumprod[9] = 0.0; // zero terminal SNR
        let g = Some(5.0);
        assert_eq!(s.loss_weight(PredictionType::Epsilon, g, 9), 1.0);
        assert_eq!(s.loss_weight(PredictionType::VPrediction, g, 9), 0.0);
        let snr = s.snr(0);
        assert!(snr > 5.0);
        assert!(rel(s.loss_weight(PredictionType::Epsilon, g, 0), 5.0 / snr) < 1e-12);
        assert!(
            rel(
                s.loss_weight(PredictionType::VPrediction, g, 0),
                5.0 / (snr + 1.0)
            ) < 1e-12
        );
        assert_eq!(s.loss_weight(PredictionType::Epsilon, None, 0), 1.0);
    }

    #[test]
    fn v_target_coefficients() {
        let s = NoiseSchedule::new(BetaSchedule::Linear, 1000, 1e-4, 0.02);
        let (cx0, ceps) = s.target_coefficients(PredictionType::VPrediction, 500);
        let a: f64 = s.alphas_cumprod[500];
        assert!(rel(cx0, -(1.0 - a).sqrt()) < 1e-12 && rel(ceps, a.sqrt()) < 1e-12);
    }
}
