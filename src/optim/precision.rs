//! Mixed precision (`train.mixed_precision`, accelerate's names): the one place that says which
//! dtype each part of a run is held and computed in.
//!
//! - Trainable weights, their gradients, the AdamW moments and EMA stay f32 (master weights).
//! - Activations are in the compute dtype: the objective casts the model's input to it, every
//!   layer casts its weights to its input's dtype (`Tensor::cast` is differentiable, so an f32
//!   parameter gets an f32 gradient), and the objective casts the prediction back to f32 for
//!   the loss.
//! - Normalisation statistics, softmax, the loss and every reduction are computed in f32
//!   (`kernels` widens half inputs for those).
//! - Frozen weights (a VAE, a text encoder, a LoRA base) are held in the compute dtype
//!   ([`hold_frozen`]), as diffusers' `weight_dtype` does.
//! - fp16 multiplies the loss by a dynamic scale ([`GradScaler`], torch's semantics); bf16 has
//!   f32's exponent range and needs none.

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};
use serde::{Deserialize, Serialize};

use crate::dtype::as_dtype;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixedPrecision {
    No,
    Fp16,
    Bf16,
}

/// The dtype activations are computed in.
pub fn compute_dtype(precision: MixedPrecision) -> FloatDType {
    match precision {
        MixedPrecision::No => FloatDType::F32,
        MixedPrecision::Fp16 => FloatDType::F16,
        MixedPrecision::Bf16 => FloatDType::BF16,
    }
}

/// Casts every float parameter of `module`, a network that does not train (a frozen first
/// stage, text encoder or LoRA base, before adapters are attached), to `dtype`. Ids are kept.
pub fn hold_frozen<M: Module>(module: M, dtype: FloatDType) -> M {
    struct Cast(DType);
    impl ModuleMapper for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dtype = self.0;
            if param.val().dtype() == dtype {
                return param;
            }
            param.map(move |t| t.detach().cast(dtype))
        }
    }
    if dtype == FloatDType::F32 {
        return module;
    }
    module.map(&mut Cast(dtype.into()))
}

/// The dtype of `module`'s first float parameter (`None` without any): what a frozen network is
/// held in.
pub fn weights_dtype<M: Module>(module: &M) -> Option<DType> {
    struct First(Option<DType>);
    impl burn::module::ModuleVisitor for First {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.0.is_none() {
                self.0 = Some(param.val().dtype());
            }
        }
    }
    let mut first = First(None);
    module.visit(&mut first);
    first.0
}

/// `f(x)` computed in the dtype `module` is held in when that is half (a frozen network under
/// mixed precision), with the result in `x`'s dtype; `f(x)` as it is otherwise (f32 weights
/// follow their input's dtype).
pub fn in_held_dtype<M: Module, const D: usize>(
    module: &M,
    x: Tensor<D>,
    f: impl FnOnce(Tensor<D>) -> Tensor<D>,
) -> Tensor<D> {
    match weights_dtype(module) {
        Some(held) if held != DType::F32 => {
            let dtype = x.dtype();
            as_dtype(f(as_dtype(x, held)), dtype)
        }
        _ => f(x),
    }
}

/// Dynamic loss scaling for fp16, with `torch.amp.GradScaler`'s semantics: the loss is
/// multiplied by `scale` before the backward pass and the gradients divided by it after; a step
/// whose gradients hold an inf or NaN is skipped and the scale halved; after `growth_interval`
/// clean steps in a row the scale doubles. Checkpointed, so a resumed run scales exactly as an
/// uninterrupted one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScaler {
    pub scale: f64,
    /// Clean steps since the scale last changed.
    pub growth_tracker: usize,
    pub growth_interval: usize,
}

/// What the scaler decided for one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalerStep {
    Apply,
    /// Gradients overflowed: skip the optimizer step (the scale was halved).
    Skip,
}

impl GradScaler {
    /// torch's defaults: initial scale 2^16, growth x2 every 2000 clean steps, backoff x0.5.
    pub fn new(initial_scale: f64) -> Self {
        Self {
            scale: initial_scale,
            growth_tracker: 0,
            growth_interval: 2000,
        }
    }

    /// Records whether this step's (unscaled) gradients were all finite and updates the scale.
    pub fn update(&mut self, finite: bool) -> ScalerStep {
        if !finite {
            self.scale *= 0.5;
            self.growth_tracker = 0;
            return ScalerStep::Skip;
        }
        self.growth_tracker += 1;
        if self.growth_tracker == self.growth_interval {
            self.scale *= 2.0;
            self.growth_tracker = 0;
        }
        ScalerStep::Apply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaler_grows_after_the_interval_and_backs_off_on_overflow() {
        let mut s = GradScaler::new(65536.0);
        s.growth_interval = 3;
        assert_eq!(s.update(true), ScalerStep::Apply);
        assert_eq!(s.update(true), ScalerStep::Apply);
        assert_eq!(s.scale, 65536.0);
        assert_eq!(s.update(true), ScalerStep::Apply);
        assert_eq!((s.scale, s.growth_tracker), (131072.0, 0));
        // An overflow halves the scale, skips the step and restarts the count.
        s.update(true);
        assert_eq!(s.update(false), ScalerStep::Skip);
        assert_eq!((s.scale, s.growth_tracker), (65536.0, 0));
        assert_eq!(s.update(false), ScalerStep::Skip);
        assert_eq!(s.scale, 32768.0);
        for _ in 0..2 {
            s.update(true);
        }
        assert_eq!(s.scale, 32768.0);
        s.update(true);
        assert_eq!(s.scale, 65536.0);
        // torch's default interval
        assert_eq!(GradScaler::new(65536.0).growth_interval, 2000);
    }

    #[test]
    fn scaler_state_round_trips_through_json() {
        let mut s = GradScaler::new(1024.0);
        s.update(true);
        s.update(false);
        s.update(true);
        let back: GradScaler = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn frozen_networks_are_held_in_half_with_their_ids() {
        let device = Device::flex();
        let lin = crate::nn::Linear::new(3, 2, true, &device);
        let (wid, bid) = (lin.weight.id, lin.bias.as_ref().unwrap().id);
        let same = hold_frozen(lin.clone(), FloatDType::F32);
        assert_eq!(same.weight.val().dtype(), DType::F32);
        let lin = hold_frozen(lin, FloatDType::BF16);
        assert_eq!(lin.weight.val().dtype(), DType::BF16);
        assert_eq!(lin.bias.as_ref().unwrap().val().dtype(), DType::BF16);
        assert_eq!((lin.weight.id, lin.bias.unwrap().id), (wid, bid));
    }
}
