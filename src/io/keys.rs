//! Key translation between the layouts checkpoints come in and our module paths (which are
//! diffusers' / transformers' names): the one place that renames weight keys.
//!
//! A [`View`] presents a [`TensorSource`] under model-side names, so strict loading reports
//! missing and unexpected keys in the names the model uses. An entry may also take rows of a
//! fused tensor (OpenCLIP's `in_proj_weight`) or reshape one (1x1 convolutions stored for
//! linear layers), still one tensor at a time.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::tensor::TensorData;

use super::safetensors::{TensorError, TensorSource};

/// Where a model key's tensor comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    /// Only these rows (first dimension) of the source tensor.
    pub rows: Option<Range<usize>>,
    /// Reshaped to this (same element count) after slicing.
    pub shape: Option<Vec<usize>>,
}

impl Entry {
    pub fn plain(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            rows: None,
            shape: None,
        }
    }
}

/// A tensor source seen under model-side keys.
pub struct View<'a, S: TensorSource + ?Sized> {
    source: &'a S,
    entries: BTreeMap<String, Entry>,
}

impl<'a, S: TensorSource + ?Sized> View<'a, S> {
    /// Every source key `k` under `rename(k)` (its own name when `None`), except those for which
    /// `drop(k)` holds.
    pub fn renamed(
        source: &'a S,
        rename: impl Fn(&str) -> Option<String>,
        drop: impl Fn(&str) -> bool,
    ) -> Self {
        let entries = source
            .keys()
            .into_iter()
            .filter(|k| !drop(k))
            .map(|k| (rename(&k).unwrap_or_else(|| k.clone()), Entry::plain(k)))
            .collect();
        Self { source, entries }
    }

    /// Exactly these entries, `model key -> where it comes from`.
    pub fn from_entries(source: &'a S, entries: BTreeMap<String, Entry>) -> Self {
        Self { source, entries }
    }
}

impl<S: TensorSource + ?Sized> TensorSource for View<'_, S> {
    fn keys(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        let e = self.entries.get(key)?;
        if let Some(shape) = &e.shape {
            return Some(shape.clone());
        }
        let mut shape = self.source.shape(&e.key)?;
        if let Some(rows) = &e.rows {
            shape[0] = rows.len();
        }
        Some(shape)
    }

    fn read(&self, key: &str) -> Result<TensorData, TensorError> {
        let e = self
            .entries
            .get(key)
            .ok_or_else(|| TensorError::Missing(key.to_string()))?;
        let data = self.source.read(&e.key)?;
        let data = match &e.rows {
            None => data,
            Some(rows) => {
                let shape = data.shape().to_vec();
                let per_row: usize = shape[1..].iter().product();
                let width = data.dtype().size();
                let bytes = data.as_bytes();
                let (start, end) = (rows.start * per_row * width, rows.end * per_row * width);
                if end > bytes.len() {
                    return Err(TensorError::Rows {
                        key: e.key.clone(),
                        start: rows.start,
                        end: rows.end,
                        shape,
                    });
                }
                let mut new_shape = shape;
                new_shape[0] = rows.len();
                TensorData::from_bytes_vec(bytes[start..end].to_vec(), new_shape, data.dtype())
            }
        };
        Ok(match &e.shape {
            Some(shape) => {
                let dtype = data.dtype();
                TensorData::from_bytes_vec(data.into_bytes().to_vec(), shape.clone(), dtype)
            }
            None => data,
        })
    }
}

/// Tracks the dotted path while a visitor or mapper walks a module.
///
/// Struct fields and `Vec` indices are joined by dots; enum variant names are left out, so a
/// model's key is its diffusers key. Two kinds of field name the pipeline component they hold,
/// as diffusers names a pipeline's components (so a latent diffusion model's keys are
/// `unet.*`, `text_encoder.*`, the prefixes of diffusers' LoRA files too):
/// - a field `backbone` holding the enum `Backbone` takes the component name of its variant
///   ([`backbone_component`]);
/// - a field `text_encoders` (a `Vec`) names its i-th element `text_encoder`,
///   `text_encoder_2`, ... ([`super::layout::component_name`]).
#[derive(Default)]
pub(crate) struct PathStack {
    parts: Vec<String>,
    /// What each `enter` did, undone by its `exit`.
    entered: Vec<Entered>,
}

enum Entered {
    Pushed,
    Skipped,
    /// The last part was replaced; the old name comes back on exit.
    Renamed(String),
}

/// The pipeline component a variant of `models::backbone::Backbone` is (diffusers' name of the
/// folder and of the key prefix); `None` for an unknown variant, which is then left out.
pub(crate) fn backbone_component(variant: &str) -> Option<&'static str> {
    match variant {
        "Unet2DCondition" => Some("unet"),
        _ => None,
    }
}

impl PathStack {
    pub(crate) fn enter(&mut self, name: &str, container: &str) {
        let last = self.parts.last().map(String::as_str);
        let rename = match (container, last) {
            ("Enum:Backbone", Some("backbone")) => backbone_component(name).map(str::to_string),
            ("Vec", Some("text_encoders")) => name
                .parse::<usize>()
                .ok()
                .map(|i| super::layout::component_name("text_encoder", i)),
            _ => None,
        };
        let entered = match rename {
            Some(component) => {
                let last = self.parts.last_mut().expect("matched a last part above");
                Entered::Renamed(std::mem::replace(last, component))
            }
            None if container.starts_with("Enum:") => Entered::Skipped,
            None => {
                self.parts.push(name.to_string());
                Entered::Pushed
            }
        };
        self.entered.push(entered);
    }

    pub(crate) fn exit(&mut self) {
        match self.entered.pop() {
            Some(Entered::Pushed) => {
                self.parts.pop();
            }
            Some(Entered::Renamed(old)) => {
                if let Some(last) = self.parts.last_mut() {
                    *last = old;
                }
            }
            Some(Entered::Skipped) | None => {}
        }
    }

    pub(crate) fn key(&self) -> String {
        self.parts.join(".")
    }
}

/// Old diffusers VAE checkpoints name the mid-block attention `query/key/value/proj_attn`
/// (diffusers' `_from_deprecated_attn_block`); today's names are `to_q/to_k/to_v/to_out.0`.
pub fn vae_legacy_attention(key: &str) -> Option<String> {
    let (head, tail) = key.split_once(".attentions.")?;
    let (index, rest) = tail.split_once('.')?;
    let rest = [
        ("query.", "to_q."),
        ("key.", "to_k."),
        ("value.", "to_v."),
        ("proj_attn.", "to_out.0."),
    ]
    .iter()
    .find_map(|(old, new)| rest.strip_prefix(old).map(|r| format!("{new}{r}")))?;
    Some(format!("{head}.attentions.{index}.{rest}"))
}

/// transformers 5 saves `CLIPTextModel` without the `text_model.` level that transformers 4,
/// Stable Diffusion's `text_encoder/model.safetensors` and our module paths have.
pub fn clip_text_model_prefix(key: &str) -> Option<String> {
    (!key.starts_with("text_model.")).then(|| format!("text_model.{key}"))
}

/// Buffers some CLIP checkpoints carry that are not parameters (`position_ids`).
pub fn clip_buffer(key: &str) -> bool {
    key.ends_with("embeddings.position_ids")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::safetensors::HostTensor;

    #[test]
    fn legacy_vae_names_map_to_diffusers_names() {
        assert_eq!(
            vae_legacy_attention("encoder.mid_block.attentions.0.query.weight").as_deref(),
            Some("encoder.mid_block.attentions.0.to_q.weight")
        );
        assert_eq!(
            vae_legacy_attention("decoder.mid_block.attentions.0.proj_attn.bias").as_deref(),
            Some("decoder.mid_block.attentions.0.to_out.0.bias")
        );
        assert_eq!(
            vae_legacy_attention("decoder.mid_block.attentions.0.group_norm.bias"),
            None
        );
        assert_eq!(vae_legacy_attention("encoder.conv_in.weight"), None);
    }

    #[test]
    fn entries_slice_rows_and_reshape() {
        let fused = HostTensor {
            shape: vec![6, 2],
            data: (0..12).map(|v| v as f32).collect(),
        };
        let source = BTreeMap::from([("in_proj".to_string(), fused)]);
        let entries = BTreeMap::from([(
            "k".to_string(),
            Entry {
                key: "in_proj".into(),
                rows: Some(2..4),
                shape: Some(vec![2, 2, 1, 1]),
            },
        )]);
        let view = View::from_entries(&source, entries);
        assert_eq!(view.shape("k"), Some(vec![2, 2, 1, 1]));
        let k = view.read("k").unwrap();
        assert_eq!(k.shape().to_vec(), vec![2, 2, 1, 1]);
        assert_eq!(
            k.convert::<f32>().try_into_vec::<f32>().unwrap(),
            vec![4.0, 5.0, 6.0, 7.0]
        );
    }
}
