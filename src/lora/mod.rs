//! LoRA (Hu et al. 2021) in one place: the `[lora]` section and its resume rules (here), the
//! adapter on a linear layer and its dropout ([`adapter`]), which layers get one
//! ([`targets`]), folding adapters and LoRA files into weights and collecting trained adapters
//! for export ([`merge`]), and the parameter groups a LoRA run trains ([`groups`]).
//!
//! Adapters live inside [`Linear`](crate::nn::Linear) (`lora: Option<LoraAdapter>`). burn
//! 0.22's built-in `Module::apply_lora` is not used: it adapts burn's `[in, out]` weight layout
//! (ours is PyTorch's `[out, in]`), composes the dense `W + scale · A B` in every forward (one
//! extra full-size GEMM in the backward of each adapted layer, where the factored form needs
//! two thin ones), and has no dropout. The file layouts (diffusers, PEFT, kohya keys) are
//! `io::lora`'s.

pub mod adapter;
pub mod groups;
pub mod merge;
pub mod targets;

use serde::{Deserialize, Serialize};

pub use adapter::{LoraAdapter, LoraInit};
pub use targets::{Linears, adapter_param_ids, attach, attach_selected, linear_paths, select};

/// What a LoRA run adapts, decided once before training: the settings and the selected layer
/// paths of the backbone and of each text encoder (empty: that encoder stays frozen).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPlan {
    pub config: LoraConfig,
    pub backbone: Vec<String>,
    pub text_encoders: Vec<Vec<String>>,
}

/// What can go wrong choosing, attaching, folding or exporting adapters.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(
        "{what}: {unused:?} match no layer of the model; adaptable layers end in e.g. {examples:?}"
    )]
    UnmatchedNames {
        what: String,
        unused: Vec<String>,
        examples: Vec<String>,
    },
    #[error(
        "{what} = {regex:?} matches no layer of the model (matched against whole paths such as \
         {example:?})"
    )]
    UnmatchedRegex {
        what: String,
        regex: String,
        example: Option<String>,
    },
    #[error("{what}: {regex:?} is not a valid regular expression")]
    BadRegex {
        what: String,
        regex: String,
        #[source]
        source: regex::Error,
    },
    #[error(
        "{path}: does not fit this model ({} of {total} modules):\n  {}",
        problems.len(),
        problems.iter().take(8).cloned().collect::<Vec<_>>().join("\n  ")
    )]
    DoesNotFit {
        path: std::path::PathBuf,
        total: usize,
        problems: Vec<String>,
    },
    #[error(
        "{path} at scale {scale}: the merged weight of {layer} is not finite (beyond f32's \
         3.4e38); lower the scale"
    )]
    NotFinite {
        path: std::path::PathBuf,
        scale: f64,
        layer: String,
    },
    #[error("--lora {arg}: the scale after ':' must be a finite number")]
    ScaleNotFinite { arg: String },
    #[error("the model has no LoRA adapters to export")]
    NoAdapters,
    #[error(transparent)]
    Io(#[from] crate::io::IoError),
}

/// `lora.target_modules`: module names (a layer matches when its path is the name or ends
/// with `.name`, as PEFT's list form) or one regular expression matched against the whole
/// path (PEFT's string form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    Names(Vec<String>),
    Regex(String),
}

/// `[lora]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    /// The adapter output is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Dropout on the adapter's input (training only), as PEFT's `lora_dropout`.
    pub dropout: f64,
    /// Which U-Net layers get adapters.
    pub target_modules: Targets,
    /// `gaussian` (PEFT's `init_lora_weights="gaussian"`, diffusers' LoRA scripts) or
    /// `kaiming` (kohya's and PEFT's default): how `down` starts; `up` starts at zero.
    pub init: LoraInit,
    /// Also adapt the CLIP text encoder.
    pub text_encoder: bool,
    /// Which text encoder layers get adapters.
    pub text_encoder_target_modules: Targets,
    /// The text encoder adapters' learning rate (default: `train.learning_rate`).
    pub text_encoder_lr: Option<f64>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: Targets::Names(
                ["to_q", "to_k", "to_v", "to_out.0"]
                    .map(String::from)
                    .to_vec(),
            ),
            init: LoraInit::Gaussian,
            text_encoder: false,
            text_encoder_target_modules: Targets::Names(
                ["q_proj", "k_proj", "v_proj", "out_proj"]
                    .map(String::from)
                    .to_vec(),
            ),
            text_encoder_lr: None,
        }
    }
}

impl crate::resume::ResumeRules for LoraConfig {
    /// The adapters a checkpoint holds: their shape, scale and the layers they sit on.
    /// Dropout, init (used only when adapters are created) and the text encoder's learning
    /// rate may change.
    fn breaks_resume(&self, old: &Self, prefix: &str) -> Vec<crate::resume::Change> {
        use crate::resume::field;
        let layers = "changes which layers carry adapters";
        [
            field(
                prefix,
                "rank",
                &old.rank,
                &self.rank,
                "changes the adapters' shape",
            ),
            field(
                prefix,
                "alpha",
                &old.alpha,
                &self.alpha,
                "changes the adapters' scale",
            ),
            field(
                prefix,
                "target_modules",
                &old.target_modules,
                &self.target_modules,
                layers,
            ),
            field(
                prefix,
                "text_encoder",
                &old.text_encoder,
                &self.text_encoder,
                layers,
            ),
            field(
                prefix,
                "text_encoder_target_modules",
                &old.text_encoder_target_modules,
                &self.text_encoder_target_modules,
                layers,
            ),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

impl LoraConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.rank == 0 {
            p.push("lora.rank must be at least 1".into());
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            p.push(format!("lora.alpha = {} must be positive", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            p.push(format!("lora.dropout = {} must be in [0, 1)", self.dropout));
        }
        for (what, t) in [
            ("lora.target_modules", &self.target_modules),
            (
                "lora.text_encoder_target_modules",
                &self.text_encoder_target_modules,
            ),
        ] {
            match t {
                Targets::Names(n) if n.is_empty() => p.push(format!("{what} is empty")),
                Targets::Regex(r) => {
                    if let Err(e) = regex::Regex::new(&format!("^(?:{r})$")) {
                        p.push(format!(
                            "{what} = {r:?} is not a valid regular expression: {e}"
                        ));
                    }
                }
                _ => {}
            }
        }
        if let Some(lr) = self.text_encoder_lr
            && !(lr > 0.0 && lr.is_finite())
        {
            p.push(format!("lora.text_encoder_lr = {lr} must be positive"));
        }
        p
    }
}
