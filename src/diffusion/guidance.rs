//! Classifier-free guidance (Ho & Salimans 2022) as a wrapper over [`Denoiser`]: the
//! conditional model runs once on `[uncond; cond]` (diffusers' order) and the prediction is
//! `uncond + scale * (cond - uncond)`. With `scale <= 1` only the conditional half runs, as in
//! diffusers' pipelines (`do_classifier_free_guidance = guidance_scale > 1`).

use burn::prelude::*;

use super::sampling::Denoiser;

/// A model under classifier-free guidance. `predict` runs the conditional model on a batch of
/// `[x; x]` whose first half is paired with the unconditional input and the second with the
/// conditional one (or on `x` alone, conditional, when `scale <= 1`).
pub struct Guided<F: Fn(Tensor<4>, f64, bool) -> Tensor<4>> {
    /// `predict(x, t, doubled)`: `doubled` says the batch is `[uncond; cond]`.
    pub predict: F,
    pub scale: f64,
}

impl<F: Fn(Tensor<4>, f64, bool) -> Tensor<4>> Guided<F> {
    pub fn guides(&self) -> bool {
        self.scale > 1.0
    }
}

impl<F: Fn(Tensor<4>, f64, bool) -> Tensor<4>> Denoiser for Guided<F> {
    fn predict(&self, x: Tensor<4>, t: f64) -> Tensor<4> {
        if !self.guides() {
            return (self.predict)(x, t, false);
        }
        let b = x.dims()[0];
        let out = (self.predict)(Tensor::cat(vec![x.clone(), x], 0), t, true);
        let uncond = out.clone().narrow(0, 0, b);
        let cond = out.narrow(0, b, b);
        uncond.clone() + (cond - uncond).mul_scalar(self.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guidance_extrapolates_from_uncond_to_cond() {
        let device = Device::flex();
        // A "model" that returns 1 for the unconditional half and 3 for the conditional one.
        let guided = Guided {
            predict: |x: Tensor<4>, _t: f64, doubled: bool| {
                let b = x.dims()[0];
                if doubled {
                    let half = b / 2;
                    let dims = [half, 1, 1, 1];
                    Tensor::cat(
                        vec![
                            Tensor::ones(dims, &device),
                            Tensor::full(dims, 3.0, &device),
                        ],
                        0,
                    )
                } else {
                    Tensor::full([b, 1, 1, 1], 3.0, &device)
                }
            },
            scale: 7.5,
        };
        let x = Tensor::<4>::zeros([2, 1, 1, 1], &device);
        let y: Vec<f32> = guided
            .predict(x.clone(), 10.0)
            .into_data()
            .try_into_vec()
            .unwrap();
        assert_eq!(y, vec![1.0 + 7.5 * 2.0; 2]);
        let plain = Guided {
            scale: 1.0,
            ..guided
        };
        let y: Vec<f32> = plain.predict(x, 10.0).into_data().try_into_vec().unwrap();
        assert_eq!(y, vec![3.0; 2]);
    }
}
