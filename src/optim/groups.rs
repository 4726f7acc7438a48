//! What a run trains, as typed parameter groups: which parameters step together, at what
//! multiple of the scheduled learning rate, and whether checkpoints hold them (PyTorch's
//! optimizer `param_groups`, with the checkpoint choice accelerate makes by what a script
//! registers).
//!
//! A family that trains its whole model needs nothing ([`ParamGroups::whole_model`]); a LoRA
//! run names its adapters (`lora::groups`), and the frozen base is in no group: it neither
//! steps nor goes into checkpoints (`build` brings it back from its files).

use std::collections::HashSet;

use burn::module::ParamId;

/// Parameters that train alike.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGroup {
    /// For messages (`unet adapters`).
    pub name: &'static str,
    pub params: HashSet<ParamId>,
    /// The group's learning rate is `lr_factor` times the schedule's.
    pub lr_factor: f64,
    /// Checkpoints hold these parameters.
    pub checkpointed: bool,
}

/// The groups of a run. Empty means the whole model: one group, the scheduled rate, all of it
/// checkpointed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParamGroups {
    groups: Vec<ParamGroup>,
}

impl ParamGroups {
    /// The whole model trains at the scheduled rate and is checkpointed.
    pub fn whole_model() -> Self {
        Self::default()
    }

    /// These groups only: parameters in none of them do not train and are not checkpointed.
    pub fn only(groups: Vec<ParamGroup>) -> Self {
        Self { groups }
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// The parameters that step at a rate of their own, each set with its factor (groups at
    /// the scheduled rate step together with everything else).
    pub fn separate_rates(&self) -> Vec<(&HashSet<ParamId>, f64)> {
        self.groups
            .iter()
            .filter(|g| g.lr_factor != 1.0)
            .map(|g| (&g.params, g.lr_factor))
            .collect()
    }

    /// The parameters checkpoints hold; `None`: all of them.
    pub fn checkpointed(&self) -> Option<HashSet<ParamId>> {
        if self.groups.is_empty() {
            return None;
        }
        Some(
            self.groups
                .iter()
                .filter(|g| g.checkpointed)
                .flat_map(|g| g.params.iter().copied())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_say_what_steps_apart_and_what_is_saved() {
        let ids = |n: u64, m: u64| (n..m).map(ParamId::from).collect::<HashSet<_>>();
        assert_eq!(ParamGroups::whole_model().checkpointed(), None);
        assert!(ParamGroups::whole_model().separate_rates().is_empty());
        let g = ParamGroups::only(vec![
            ParamGroup {
                name: "a",
                params: ids(0, 3),
                lr_factor: 1.0,
                checkpointed: true,
            },
            ParamGroup {
                name: "b",
                params: ids(3, 5),
                lr_factor: 0.5,
                checkpointed: true,
            },
            ParamGroup {
                name: "c",
                params: ids(5, 6),
                lr_factor: 1.0,
                checkpointed: false,
            },
        ]);
        assert_eq!(g.checkpointed(), Some(ids(0, 5)));
        let separate = g.separate_rates();
        assert_eq!(separate.len(), 1);
        assert_eq!((separate[0].0, separate[0].1), (&ids(3, 5), 0.5));
    }
}
