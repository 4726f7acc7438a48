//! The parameter groups a LoRA run trains: the adapters, nothing else. The backbone's adapters
//! step at the scheduled rate, the text encoders' at `lora.text_encoder_lr` (kohya's
//! `--text_encoder_lr`); both are checkpointed; the frozen base is in no group.

use super::targets::{Linears, adapter_param_ids};
use crate::optim::groups::{ParamGroup, ParamGroups};

/// The groups of a model whose backbone and text encoders carry adapters; the text encoders'
/// adapters step at `text_encoder_lr_factor` times the schedule's rate.
pub fn adapter_groups(
    backbone: &mut dyn Linears,
    text_encoders: &mut [&mut dyn Linears],
    text_encoder_lr_factor: f64,
) -> ParamGroups {
    let mut groups = vec![ParamGroup {
        name: "backbone adapters",
        params: adapter_param_ids(backbone),
        lr_factor: 1.0,
        checkpointed: true,
    }];
    let text: std::collections::HashSet<_> = text_encoders
        .iter_mut()
        .flat_map(|te| adapter_param_ids(&mut **te))
        .collect();
    if !text.is_empty() {
        groups.push(ParamGroup {
            name: "text encoder adapters",
            params: text,
            lr_factor: text_encoder_lr_factor,
            checkpointed: true,
        });
    }
    ParamGroups::only(groups)
}
