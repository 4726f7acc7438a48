//! The diffusion training recipe of diffusers' `train_text_to_image.py` /
//! `train_unconditional.py`: timesteps and noise (with noise offset and input perturbation),
//! the forward process, the epsilon / v / sample target and the min-SNR-gamma weighted MSE.
//!
//! All randomness of a micro-batch is drawn on the host from the run's seeded ChaCha stream,
//! sample by sample ([`NoiseDraw`]), so a batch of 32 and four micro-batches of 8 draw the same
//! numbers, and data-parallel ranks each take their slice of the global batch's draw. The loss
//! runs over a `predict` closure, so every denoiser (pixel or latent, conditioned or not) shares
//! it.

use burn::prelude::*;
use burn::tensor::FloatDType;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::DiffusionConfig;
use super::schedule::NoiseSchedule;
use crate::dtype::to_f32;

/// Host-side randomness and coefficients for one micro-batch of the diffusion loss.
pub struct NoiseDraw {
    pub noise: Vec<f32>,
    /// The noise added to the input (differs from `noise` only with input perturbation).
    pub input_noise: Vec<f32>,
    pub timesteps: Vec<f32>,
    /// Per sample: sqrt(abar), sqrt(1 - abar), target coefficients (x0, eps), loss weight.
    pub coef: [Vec<f32>; 5],
}

impl NoiseDraw {
    /// Draws timesteps and noise for `shape = [b, c, h, w]`, one sample after the other.
    pub fn draw(
        cfg: &DiffusionConfig,
        schedule: &NoiseSchedule,
        shape: [usize; 4],
        rng: &mut ChaCha8Rng,
    ) -> Self {
        let [b, c, h, w] = shape;
        let per = c * h * w;
        let mut noise = Vec::with_capacity(b * per);
        let mut input_noise = Vec::with_capacity(b * per);
        let mut timesteps = Vec::with_capacity(b);
        let mut coef: [Vec<f32>; 5] = Default::default();
        let normal = |rng: &mut ChaCha8Rng| rng.sample::<f32, _>(StandardNormal);
        for _ in 0..b {
            let t = rng.random_range(0..schedule.num_train_timesteps());
            let mut eps: Vec<f32> = (0..per).map(|_| normal(rng)).collect();
            if cfg.noise_offset > 0.0 {
                // noise += offset * randn(B, C, 1, 1): one shift per channel.
                for ch in 0..c {
                    let shift = cfg.noise_offset as f32 * normal(rng);
                    eps[ch * h * w..(ch + 1) * h * w]
                        .iter_mut()
                        .for_each(|v| *v += shift);
                }
            }
            let perturbed: Vec<f32> = if cfg.input_perturbation > 0.0 {
                eps.iter()
                    .map(|&e| e + cfg.input_perturbation as f32 * normal(rng))
                    .collect()
            } else {
                eps.clone()
            };
            let (sa, s1a) = schedule.add_noise_coefficients(t);
            let (tx0, teps) = schedule.target_coefficients(cfg.prediction_type, t);
            let wgt = schedule.loss_weight(cfg.prediction_type, cfg.snr_gamma, t);
            for (v, x) in coef.iter_mut().zip([sa, s1a, tx0, teps, wgt]) {
                v.push(x as f32);
            }
            timesteps.push(t as f32);
            noise.extend(eps);
            input_noise.extend(perturbed);
        }
        Self {
            noise,
            input_noise,
            timesteps,
            coef,
        }
    }

    /// The draw of a micro-batch of shape `[b, c, h, w]` that is the slice starting at `offset`
    /// of a global batch of `global_size`: drawn for the whole global batch, in sample order, and
    /// cut, so every data-parallel rank advances the stream alike and each sample gets the
    /// numbers it would get on one device.
    pub fn for_slice(
        cfg: &DiffusionConfig,
        schedule: &NoiseSchedule,
        shape: [usize; 4],
        offset: usize,
        global_size: usize,
        rng: &mut ChaCha8Rng,
    ) -> Self {
        let [b, c, h, w] = shape;
        let draw = Self::draw(cfg, schedule, [global_size, c, h, w], rng);
        if global_size == b {
            draw
        } else {
            draw.slice(offset..offset + b, c * h * w)
        }
    }

    /// Samples `range` of the draw (each sample's numbers are contiguous).
    pub fn slice(&self, range: std::ops::Range<usize>, per_sample: usize) -> Self {
        let pixels = range.start * per_sample..range.end * per_sample;
        Self {
            noise: self.noise[pixels.clone()].to_vec(),
            input_noise: self.input_noise[pixels].to_vec(),
            timesteps: self.timesteps[range.clone()].to_vec(),
            coef: std::array::from_fn(|i| self.coef[i][range.clone()].to_vec()),
        }
    }
}

/// The diffusion loss of one micro-batch: `mean_b(w_b * mean_chw (pred - target)^2)`, where
/// `pred = predict(x_t, t)` and `x0` (host values, `shape`) is noised as `draw` says. `x_t` is
/// cast to `dtype` before the model sees them (mixed precision); the target, the prediction's
/// difference to it and the mean are computed in f32.
pub fn diffusion_loss(
    x0: &[f32],
    shape: [usize; 4],
    draw: NoiseDraw,
    dtype: FloatDType,
    device: &Device,
    predict: impl FnOnce(Tensor<4>, Tensor<1>) -> Tensor<4>,
) -> Tensor<1> {
    let b = shape[0];
    let image = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, shape), device);
    let per_sample =
        |v: &Vec<f32>| Tensor::<4>::from_data(TensorData::new(v.clone(), [b, 1, 1, 1]), device);
    let x0 = image(x0.to_vec());
    let noise = image(draw.noise);
    let input_noise = image(draw.input_noise);
    let [sa, s1a, tx0, teps, w] = &draw.coef;
    let noisy = x0.clone() * per_sample(sa) + input_noise * per_sample(s1a);
    let target = x0 * per_sample(tx0) + noise * per_sample(teps);
    let timesteps = Tensor::<1>::from_data(TensorData::new(draw.timesteps, [b]), device);
    let pred = to_f32(predict(noisy.cast(dtype), timesteps));
    let per_item: Tensor<1> = (pred - target).square().mean_dims(&[1, 2, 3]).reshape([b]);
    let weights = Tensor::<1>::from_data(TensorData::new(w.clone(), [b]), device);
    (per_item * weights).mean()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn std(v: &[f64]) -> f64 {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    }

    #[test]
    fn noise_offset_and_input_perturbation_statistics() {
        // noise = randn + 0.2 * randn(B, C, 1, 1): a channel's spatial mean has variance
        // 1/(h*w) + 0.2^2 (std 0.2095 at 16x16, vs 0.0625 without the offset).
        // input noise = noise + 0.1 * randn: the difference has std 0.1; the target stays `noise`.
        let cfg = DiffusionConfig {
            noise_offset: 0.2,
            input_perturbation: 0.1,
            ..DiffusionConfig::default()
        };
        let schedule = cfg.schedule();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let d = NoiseDraw::draw(&cfg, &schedule, [128, 3, 16, 16], &mut rng);
        let channel_means: Vec<f64> = d
            .noise
            .chunks(256)
            .map(|c| c.iter().map(|&v| v as f64).sum::<f64>() / 256.0)
            .collect();
        let s = std(&channel_means);
        assert!((0.18..0.24).contains(&s), "channel-mean std {s}");
        let diff: Vec<f64> = d
            .input_noise
            .iter()
            .zip(&d.noise)
            .map(|(a, b)| (a - b) as f64)
            .collect();
        let s = std(&diff);
        assert!((0.095..0.105).contains(&s), "perturbation std {s}");
        assert!(d.timesteps.iter().all(|&t| (0.0..1000.0).contains(&t)));
    }
}
