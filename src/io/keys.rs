//! Key translation between the layouts checkpoints come in and our module paths (which are
//! diffusers' / transformers' names): the one place that renames weight keys.
//!
//! A [`Renamed`] view presents a [`TensorSource`] under model-side names, so strict loading
//! reports missing and unexpected keys in the names the model uses.

use std::collections::BTreeMap;

use burn::tensor::TensorData;

use super::safetensors::TensorSource;

/// A tensor source seen through a key map: `model key -> source key`. Keys the map leaves out
/// keep their names; keys listed in `ignored` (buffers such as `position_ids`) disappear.
pub struct Renamed<'a, S: TensorSource + ?Sized> {
    source: &'a S,
    to_source: BTreeMap<String, String>,
}

impl<'a, S: TensorSource + ?Sized> Renamed<'a, S> {
    /// Renames every source key `k` for which `rename(k)` is `Some(model_key)`, keeps the
    /// others, and drops those for which `drop(k)` holds.
    pub fn new(
        source: &'a S,
        rename: impl Fn(&str) -> Option<String>,
        drop: impl Fn(&str) -> bool,
    ) -> Self {
        let to_source = source
            .keys()
            .into_iter()
            .filter(|k| !drop(k))
            .map(|k| (rename(&k).unwrap_or_else(|| k.clone()), k))
            .collect();
        Self { source, to_source }
    }
}

impl<S: TensorSource + ?Sized> TensorSource for Renamed<'_, S> {
    fn keys(&self) -> Vec<String> {
        self.to_source.keys().cloned().collect()
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.source.shape(self.to_source.get(key)?)
    }
    fn read(&self, key: &str) -> Result<TensorData, String> {
        let source_key = self
            .to_source
            .get(key)
            .ok_or_else(|| format!("no tensor {key:?}"))?;
        self.source.read(source_key)
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
}
