//! Noise schedules, training targets and samplers (diffusers `schedulers/`).

pub mod sampling;
pub mod schedule;
