//! Exponential moving average of the weights, as diffusers' `EMAModel`
//! (`diffusers/training_utils.py`: `get_decay` and `step`).
//!
//! The shadow is a second, non-autodiff copy of the model. It is stepped once per optimizer
//! step (never per micro-batch), and the training weights are never swapped out for it: sampling
//! and export read the shadow directly, so there is no `store`/`restore` pair to forget (the
//! diffusers bug where validation leaves EMA weights in the trained model cannot happen).

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// `[ema]`: diffusers `EMAModel` settings (defaults of `train_unconditional.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmaConfig {
    pub enabled: bool,
    pub max_decay: f64,
    pub min_decay: f64,
    /// Decay is 0 (the shadow copies the weights) until this many optimizer steps have passed.
    pub update_after_step: u64,
    /// `1 - (1 + s / inv_gamma)^-power` when true, `(1 + s) / (10 + s)` when false.
    pub warmup: bool,
    pub inv_gamma: f64,
    pub power: f64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_decay: 0.9999,
            min_decay: 0.0,
            update_after_step: 0,
            warmup: true,
            inv_gamma: 1.0,
            power: 0.75,
        }
    }
}

impl crate::resume::ResumeRules for EmaConfig {
    /// EMA settings may change on resume (turning EMA on starts its shadow from the resumed
    /// weights, with a warning).
    fn breaks_resume(&self, _old: &Self, _prefix: &str) -> Vec<crate::resume::Change> {
        Vec::new()
    }
}

impl EmaConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !(0.0 <= self.min_decay && self.min_decay <= self.max_decay && self.max_decay <= 1.0) {
            p.push(format!(
                "ema: need 0 <= min_decay ({}) <= max_decay ({}) <= 1",
                self.min_decay, self.max_decay
            ));
        }
        if !(self.inv_gamma > 0.0 && self.power > 0.0) {
            p.push("ema.inv_gamma and ema.power must be positive".into());
        }
        p
    }
}

/// `EMAModel.get_decay(optimization_step)`, where `optimization_step` has already been
/// incremented for the current update (the first update passes 1).
pub fn ema_decay(cfg: &EmaConfig, optimization_step: u64) -> f64 {
    let step = optimization_step.saturating_sub(cfg.update_after_step + 1) as f64;
    if step <= 0.0 {
        return 0.0;
    }
    let decay = if cfg.warmup {
        1.0 - (1.0 + step / cfg.inv_gamma).powf(-cfg.power)
    } else {
        (1.0 + step) / (10.0 + step)
    };
    decay.min(cfg.max_decay).max(cfg.min_decay)
}

/// Current values of a module's parameters by id (only those in `only`, when set),
/// flattened (a reshape, not a copy).
#[derive(Default)]
struct Values<'a> {
    only: Option<&'a std::collections::HashSet<ParamId>>,
    values: HashMap<ParamId, Tensor<1>>,
}

impl ModuleVisitor for Values<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.only.is_some_and(|ids| !ids.contains(&param.id)) {
            return;
        }
        let t = param.val();
        let n = t.shape().num_elements();
        self.values.insert(param.id, t.reshape([n]));
    }
}

struct Step {
    values: HashMap<ParamId, Tensor<1>>,
    one_minus_decay: f64,
}

impl ModuleMapper for Step {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(current) = self.values.remove(&param.id) else {
            return param;
        };
        let w = self.one_minus_decay;
        param.map(|shadow| {
            let current = current.reshape(shadow.shape());
            // shadow -= (1 - decay) * (shadow - param), in diffusers' order of operations.
            shadow.clone() - (shadow - current).mul_scalar(w)
        })
    }
}

/// `EMAModel.step`: moves every shadow parameter towards the parameter with the same id in
/// `current` (which must be the shadow's structure, off the autodiff graph).
pub fn ema_update<M: Module>(shadow: M, current: &M, decay: f64) -> M {
    ema_update_only(shadow, current, decay, None)
}

/// [`ema_update`] of the parameters in `only` (all when `None`): a LoRA run averages its
/// adapters, not the frozen base.
pub fn ema_update_only<M: Module>(
    shadow: M,
    current: &M,
    decay: f64,
    only: Option<&std::collections::HashSet<ParamId>>,
) -> M {
    let mut values = Values {
        only,
        values: HashMap::new(),
    };
    current.visit(&mut values);
    shadow.map(&mut Step {
        values: values.values,
        one_minus_decay: 1.0 - decay,
    })
}

/// The shadow weights and the update counter that drives the decay schedule.
pub struct Ema<M> {
    pub shadow: M,
    /// diffusers' `optimization_step`: updates applied so far.
    pub optimization_step: u64,
    pub cfg: EmaConfig,
    /// The parameters that train (the others are frozen and need no average), or all.
    pub trainable: Option<std::collections::HashSet<ParamId>>,
}

impl<M: Module> Ema<M> {
    /// Starts the shadow as a copy of `weights` (diffusers: `EMAModel(unet.parameters())`).
    pub fn new(weights: M, cfg: EmaConfig) -> Self {
        Self {
            shadow: weights,
            optimization_step: 0,
            cfg,
            trainable: None,
        }
    }

    /// One update after an optimizer step; returns the decay used.
    pub fn step(&mut self, current: &M) -> f64 {
        self.optimization_step += 1;
        let decay = ema_decay(&self.cfg, self.optimization_step);
        let shadow = self.shadow.clone();
        self.shadow = ema_update_only(shadow, current, decay, self.trainable.as_ref());
        decay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Linear;

    fn cfg(warmup: bool, update_after_step: u64) -> EmaConfig {
        EmaConfig {
            enabled: true,
            warmup,
            update_after_step,
            ..EmaConfig::default()
        }
    }

    #[test]
    fn decay_schedule_matches_the_formula() {
        // Values computed by hand from diffusers' get_decay:
        // warmup (inv_gamma 1, power 3/4): s = step - 1; 1 - (1 + s)^-0.75.
        let w = cfg(true, 0);
        assert_eq!(ema_decay(&w, 1), 0.0);
        assert!((ema_decay(&w, 2) - (1.0 - 2f64.powf(-0.75))).abs() < 1e-15);
        assert!((ema_decay(&w, 2) - 0.405_396_4).abs() < 1e-7);
        assert!((ema_decay(&w, 11) - 0.834_440_0).abs() < 1e-7); // 1 - 11^-0.75
        assert!((ema_decay(&w, 1001) - 0.994_380_8).abs() < 1e-7); // 1 - 1001^-0.75
        // Clamped to max_decay once the curve passes it (s^-0.75 < 1e-4 beyond s ~ 215k).
        assert_eq!(ema_decay(&w, 10_000_000), 0.9999);
        // Without warmup: (1 + s) / (10 + s).
        let p = cfg(false, 0);
        assert_eq!(ema_decay(&p, 1), 0.0);
        assert!((ema_decay(&p, 2) - 2.0 / 11.0).abs() < 1e-15);
        assert!((ema_decay(&p, 91) - 91.0 / 100.0).abs() < 1e-15);
        // update_after_step delays everything: decay 0 (copy) through step u + 1.
        let d = cfg(false, 5);
        assert_eq!(ema_decay(&d, 6), 0.0);
        assert!((ema_decay(&d, 7) - 2.0 / 11.0).abs() < 1e-15);
        // min_decay is a floor once updates start.
        let m = EmaConfig {
            min_decay: 0.5,
            ..cfg(false, 0)
        };
        assert_eq!(ema_decay(&m, 2), 0.5);
        assert_eq!(ema_decay(&m, 1), 0.0); // "step <= 0: return 0.0" comes before the clamp
    }

    #[test]
    fn update_moves_the_shadow_by_one_minus_decay() {
        let device = Device::flex();
        let mut weights = Linear::new(2, 1, true, &device);
        weights.weight = Param::from_data([[1.0, 2.0]], &device);
        weights.bias = Some(Param::from_data([0.0], &device));
        let mut ema = Ema::new(weights.clone(), cfg(false, 0));
        // Step 1 has decay 0: the shadow copies the weights.
        let mut moved = weights.clone();
        moved.weight = moved.weight.map(|w| w.add_scalar(1.0)); // [[2, 3]], same ids
        assert_eq!(ema.step(&moved), 0.0);
        let w: Vec<f32> = ema.shadow.weight.val().into_data().try_to_vec().unwrap();
        assert_eq!(w, vec![2.0, 3.0]);
        // Step 2 has decay 2/11: shadow = s - (9/11) (s - p).
        let mut again = moved.clone();
        again.weight = again.weight.map(|w| w.mul_scalar(0.0));
        let d = ema.step(&again);
        assert!((d - 2.0 / 11.0).abs() < 1e-12);
        let w: Vec<f32> = ema.shadow.weight.val().into_data().try_to_vec().unwrap();
        assert!((w[0] - 2.0 * 2.0 / 11.0).abs() < 1e-6, "{w:?}");
        assert!((w[1] - 3.0 * 2.0 / 11.0).abs() < 1e-6, "{w:?}");
        // The training copy is untouched.
        let t: Vec<f32> = again.weight.val().into_data().try_to_vec().unwrap();
        assert_eq!(t, vec![0.0, 0.0]);
    }
}
