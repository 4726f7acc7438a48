//! LoRA on Stable Diffusion's U-Net and CLIP text encoder: the `[lora]` section, attaching
//! adapters to the `Linear` layers whose module path matches `target_modules` (PEFT's
//! matching rules), and the module paths those layers have in diffusers/transformers, which
//! are also the keys of the LoRA files (`io::lora`).
//!
//! Adapters live inside [`Linear`](crate::nn::Linear) (`lora: Option<LoraAdapter>`); see
//! `nn` for the forward pass. burn 0.22's built-in `Module::apply_lora` is not used: it adapts
//! burn's `[in, out]` weight layout (ours is PyTorch's `[out, in]`), composes the dense
//! `W + scale · A B` in every forward (one extra full-size GEMM in the backward of each
//! adapted layer, where the factored form needs two thin ones), and has no dropout.

use burn::module::Module;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::attention::{Attention, BasicTransformerBlock, FeedForwardLayer};
use super::clip::CLIPTextModel;
use super::transformer_2d::{Projection, Transformer2DModel};
use super::unet_2d_blocks::AttentionLayer;
use super::unet_2d_condition::UNet2DConditionModel;
use crate::nn::{Linear, LoraAdapter, LoraInit};

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
            field(prefix, "rank", &old.rank, &self.rank, "changes the adapters' shape"),
            field(prefix, "alpha", &old.alpha, &self.alpha, "changes the adapters' scale"),
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

/// Visits every `Linear` a LoRA can target, with its module path (diffusers'/transformers'
/// parameter path without `.weight`), below `prefix`.
pub trait Linears {
    fn linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear));
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

impl Linears for Attention {
    fn linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        f(&join(prefix, "to_q"), &mut self.to_q);
        f(&join(prefix, "to_k"), &mut self.to_k);
        f(&join(prefix, "to_v"), &mut self.to_v);
        for (i, l) in self.to_out.iter_mut().enumerate() {
            f(&join(prefix, &format!("to_out.{i}")), l);
        }
    }
}

impl Linears for BasicTransformerBlock {
    fn linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.attn1.linears(&join(prefix, "attn1"), f);
        self.attn2.linears(&join(prefix, "attn2"), f);
        for (i, layer) in self.ff.net.iter_mut().enumerate() {
            match layer {
                FeedForwardLayer::Geglu(g) => {
                    f(&join(prefix, &format!("ff.net.{i}.proj")), &mut g.proj)
                }
                FeedForwardLayer::Linear(l) => f(&join(prefix, &format!("ff.net.{i}")), l),
                FeedForwardLayer::Dropout(_) => {}
            }
        }
    }
}

impl Linears for Transformer2DModel {
    fn linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        if let Projection::Linear(l) = &mut self.proj_in {
            f(&join(prefix, "proj_in"), l);
        }
        for (i, b) in self.transformer_blocks.iter_mut().enumerate() {
            b.linears(&join(prefix, &format!("transformer_blocks.{i}")), f);
        }
        if let Projection::Linear(l) = &mut self.proj_out {
            f(&join(prefix, "proj_out"), l);
        }
    }
}

fn attention_layers(
    layers: &mut [AttentionLayer],
    prefix: &str,
    f: &mut dyn FnMut(&str, &mut Linear),
) {
    for (i, a) in layers.iter_mut().enumerate() {
        let p = join(prefix, &format!("attentions.{i}"));
        match a {
            AttentionLayer::Spatial(a) => a.linears(&p, f),
            AttentionLayer::Transformer(t) => t.linears(&p, f),
        }
    }
}

impl Linears for UNet2DConditionModel {
    fn linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        for (i, b) in self.down_blocks.iter_mut().enumerate() {
            attention_layers(
                &mut b.attentions,
                &join(prefix, &format!("down_blocks.{i}")),
                f,
            );
        }
        attention_layers(
            &mut self.mid_block.attentions,
            &join(prefix, "mid_block"),
            f,
        );
        for (i, b) in self.up_blocks.iter_mut().enumerate() {
            attention_layers(
                &mut b.attentions,
                &join(prefix, &format!("up_blocks.{i}")),
                f,
            );
        }
    }
}

impl Linears for CLIPTextModel {
    fn linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        for (i, l) in self.text_model.encoder.layers.iter_mut().enumerate() {
            let p = join(prefix, &format!("text_model.encoder.layers.{i}"));
            let a = &mut l.self_attn;
            f(&join(&p, "self_attn.q_proj"), &mut a.q_proj);
            f(&join(&p, "self_attn.k_proj"), &mut a.k_proj);
            f(&join(&p, "self_attn.v_proj"), &mut a.v_proj);
            f(&join(&p, "self_attn.out_proj"), &mut a.out_proj);
            f(&join(&p, "mlp.fc1"), &mut l.mlp.fc1);
            f(&join(&p, "mlp.fc2"), &mut l.mlp.fc2);
        }
    }
}

/// Every adaptable layer's module path (relative to the model).
pub fn linear_paths<M: Linears>(model: &mut M) -> Vec<String> {
    let mut paths = Vec::new();
    model.linears("", &mut |p, _| paths.push(p.to_string()));
    paths
}

/// Which paths `targets` selects, or an error naming the targets that match nothing.
pub fn select(targets: &Targets, paths: &[String], what: &str) -> Result<Vec<String>, String> {
    let selected: Vec<String> = match targets {
        Targets::Names(names) => {
            let matches = |p: &str, n: &str| p == n || p.ends_with(&format!(".{n}"));
            let unused: Vec<&String> = names
                .iter()
                .filter(|n| !paths.iter().any(|p| matches(p, n)))
                .collect();
            if !unused.is_empty() {
                return Err(format!(
                    "{what}: {unused:?} match no layer of the model; adaptable layers end in \
                     e.g. {:?}",
                    example_suffixes(paths)
                ));
            }
            paths
                .iter()
                .filter(|p| names.iter().any(|n| matches(p, n)))
                .cloned()
                .collect()
        }
        Targets::Regex(r) => {
            let re =
                regex::Regex::new(&format!("^(?:{r})$")).map_err(|e| format!("{what}: {e}"))?;
            let s: Vec<String> = paths.iter().filter(|p| re.is_match(p)).cloned().collect();
            if s.is_empty() {
                return Err(format!(
                    "{what} = {r:?} matches no layer of the model (matched against whole paths \
                     such as {:?})",
                    paths.first()
                ));
            }
            s
        }
    };
    Ok(selected)
}

fn example_suffixes(paths: &[String]) -> Vec<String> {
    let mut s: Vec<String> = paths
        .iter()
        .map(|p| {
            let parts: Vec<&str> = p.split('.').collect();
            // `to_out.0`, `ff.net.2`: keep a trailing index with its name.
            match parts.as_slice() {
                [.., a, b] if b.parse::<usize>().is_ok() => format!("{a}.{b}"),
                [.., b] => b.to_string(),
                [] => String::new(),
            }
        })
        .collect();
    s.sort();
    s.dedup();
    s
}

/// Attaches fresh adapters to the layers `targets` selects and freezes everything else;
/// returns the adapted paths. The init RNG (`nn::seed_init`) draws the `down` factors in
/// path order.
pub fn attach<M: Module + Linears>(
    model: M,
    cfg: &LoraConfig,
    targets: &Targets,
    what: &str,
    device: &Device,
) -> Result<(M, Vec<String>), String> {
    let mut model = model.no_grad();
    let paths = linear_paths(&mut model);
    let selected = select(targets, &paths, what)?;
    let set: std::collections::HashSet<&String> = selected.iter().collect();
    model.linears("", &mut |p, l| {
        if set.contains(&p.to_string()) {
            let [out, inp] = l.weight.dims();
            l.lora = Some(LoraAdapter::new(
                inp,
                out,
                cfg.rank,
                cfg.alpha,
                cfg.dropout,
                cfg.init,
                device,
            ));
        }
    });
    Ok((model, selected))
}

/// Whether a parameter key belongs to a LoRA adapter (what LoRA checkpoints hold).
pub fn is_adapter_key(key: &str) -> bool {
    key.contains(".lora.down.") || key.contains(".lora.up.")
}

/// Folds every adapter into its layer's weight.
pub fn merge_all<M: Linears>(model: &mut M) {
    model.linears("", &mut |_, l| {
        if l.lora.is_some() {
            let merged = std::mem::replace(
                l,
                Linear {
                    weight: l.weight.clone(),
                    bias: None,
                    lora: None,
                },
            )
            .merge_lora();
            *l = merged;
        }
    });
}
