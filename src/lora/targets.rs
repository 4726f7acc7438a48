//! Which layers get adapters: every `Linear` a LoRA can target, visited with its module path
//! (diffusers'/transformers' parameter path without `.weight`, also the key of the LoRA files),
//! PEFT's matching rules for `target_modules`, and attaching fresh adapters.

use burn::module::Module;
use burn::prelude::*;

use super::adapter::LoraAdapter;
use super::{LoraConfig, LoraError, Targets};
use crate::models::attention::{Attention, BasicTransformerBlock, FeedForwardLayer};
use crate::models::backbone::Backbone;
use crate::models::clip::CLIPTextModel;
use crate::models::transformer_2d::{Projection, Transformer2DModel};
use crate::models::unet_2d_blocks::AttentionLayer;
use crate::models::unet_2d_condition::UNet2DConditionModel;
use crate::nn::Linear;

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

impl Linears for Backbone {
    fn linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        match self {
            Backbone::Unet2DCondition(u) => u.linears(prefix, f),
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
pub fn linear_paths<M: Linears + ?Sized>(model: &mut M) -> Vec<String> {
    let mut paths = Vec::new();
    model.linears("", &mut |p, _| paths.push(p.to_string()));
    paths
}

/// Which paths `targets` selects, or an error naming the targets that match nothing.
pub fn select(targets: &Targets, paths: &[String], what: &str) -> Result<Vec<String>, LoraError> {
    let selected: Vec<String> = match targets {
        Targets::Names(names) => {
            let matches = |p: &str, n: &str| p == n || p.ends_with(&format!(".{n}"));
            let unused: Vec<String> = names
                .iter()
                .filter(|n| !paths.iter().any(|p| matches(p, n)))
                .cloned()
                .collect();
            if !unused.is_empty() {
                return Err(LoraError::UnmatchedNames {
                    what: what.to_string(),
                    unused,
                    examples: example_suffixes(paths),
                });
            }
            paths
                .iter()
                .filter(|p| names.iter().any(|n| matches(p, n)))
                .cloned()
                .collect()
        }
        Targets::Regex(r) => {
            let re =
                regex::Regex::new(&format!("^(?:{r})$")).map_err(|source| LoraError::BadRegex {
                    what: what.to_string(),
                    regex: r.clone(),
                    source,
                })?;
            let s: Vec<String> = paths.iter().filter(|p| re.is_match(p)).cloned().collect();
            if s.is_empty() {
                return Err(LoraError::UnmatchedRegex {
                    what: what.to_string(),
                    regex: r.clone(),
                    example: paths.first().cloned(),
                });
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
) -> Result<(M, Vec<String>), LoraError> {
    let mut model = model;
    let paths = linear_paths(&mut model);
    let selected = select(targets, &paths, what)?;
    let model = attach_selected(model, cfg, &selected, device);
    Ok((model, selected))
}

/// Attaches fresh adapters to the layers at `selected` paths (chosen once by [`select`]) and
/// freezes everything else. The init RNG (`nn::seed_init`) draws the `down` factors in path
/// order.
pub fn attach_selected<M: Module + Linears>(
    model: M,
    cfg: &LoraConfig,
    selected: &[String],
    device: &Device,
) -> M {
    let mut model = model.no_grad();
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
    model
}

/// The parameter ids of every adapter below `model` (both factors).
pub fn adapter_param_ids<M: Linears + ?Sized>(
    model: &mut M,
) -> std::collections::HashSet<burn::module::ParamId> {
    let mut ids = std::collections::HashSet::new();
    model.linears("", &mut |_, l| {
        if let Some(a) = &l.lora {
            ids.insert(a.down.weight.id);
            ids.insert(a.up.weight.id);
        }
    });
    ids
}
