//! What the training loop applies to weights and gradients, model-independent: learning-rate
//! schedules, the EMA of the weights, whole-model gradient operations (global norm, clipping,
//! flattening for the all-reduce) and the mixed-precision setting.

pub mod ema;
pub mod grad;
pub mod groups;
pub mod lr;
pub mod precision;
