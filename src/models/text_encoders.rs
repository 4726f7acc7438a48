//! The text side of the conditioning: an ordered set of text encoders (one for SD 1.x/2.x, two
//! for SDXL), each with its tokenizer, its clip skip, and whether its pooled output conditions
//! the backbone. [`encode`] turns prompts into a [`Conditioning`]: every encoder's hidden states
//! concatenated along the width (diffusers' SDXL `prompt_embeds`), the pooled output of the one
//! marked pooled.

use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::DType;

use super::clip::CLIPTextModel;
use super::conditioning::Conditioning;
use crate::tokenizer::{ClipTokenizer, TokenizerError};

/// How one text encoder of a pipeline is used.
#[derive(Clone)]
pub struct TextEncoderSlot {
    pub tokenizer: Arc<ClipTokenizer>,
    /// 1 = the last layer (A1111/kohya's clip skip; see [`CLIPTextModel::forward`]).
    pub clip_skip: usize,
    /// Its pooled output conditions the backbone (SDXL's second encoder).
    pub pooled: bool,
}

impl TextEncoderSlot {
    /// An encoder whose last layer's hidden states are the context (SD 1.x/2.x).
    pub fn hidden_states(tokenizer: Arc<ClipTokenizer>) -> Self {
        Self {
            tokenizer,
            clip_skip: 1,
            pooled: false,
        }
    }

    /// Token ids of `prompts`, `[n, max_length]`; a prompt that does not tokenize is an error.
    pub fn token_ids(
        &self,
        prompts: &[&str],
        device: &Device,
    ) -> Result<Tensor<2, Int>, TokenizerError> {
        token_ids(&self.tokenizer, prompts, device)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(
        "text encoder {index} is marked as giving a pooled embedding, which CLIPTextModel does \
         not (that is CLIPTextModelWithProjection's, SDXL's second encoder)"
    )]
    NoPooledOutput { index: usize },
    #[error("{encoders} text encoders but {models} models to run them")]
    Mismatch { encoders: usize, models: usize },
}

/// Token ids of `prompts` for `tokenizer`, `[n, max_length]`.
pub fn token_ids(
    tokenizer: &ClipTokenizer,
    prompts: &[&str],
    device: &Device,
) -> Result<Tensor<2, Int>, TokenizerError> {
    let len = tokenizer.max_length;
    let mut ids = Vec::with_capacity(prompts.len() * len);
    for p in prompts {
        ids.extend(tokenizer.encode(p)?.into_iter().map(i64::from));
    }
    Ok(Tensor::from_data(
        TensorData::new(ids, [prompts.len(), len]),
        device,
    ))
}

/// The conditioning of `prompts` under the encoders `slots` run by `models` (one each, in
/// order), computing in `dtype` (`None`: each encoder's weights' dtype).
///
/// # Shapes
/// - returns `context` `[n, max_length, Σ hidden]`
pub fn encode(
    slots: &[TextEncoderSlot],
    models: &[&CLIPTextModel],
    prompts: &[&str],
    dtype: Option<DType>,
    device: &Device,
) -> Result<Conditioning, TextError> {
    if slots.len() != models.len() {
        return Err(TextError::Mismatch {
            encoders: slots.len(),
            models: models.len(),
        });
    }
    let mut hidden = Vec::with_capacity(slots.len());
    for (index, (slot, model)) in slots.iter().zip(models).enumerate() {
        if slot.pooled {
            return Err(TextError::NoPooledOutput { index });
        }
        let ids = slot.token_ids(prompts, device)?;
        hidden.push(match dtype {
            Some(d) => model.forward_in(ids, slot.clip_skip, d),
            None => model.forward(ids, slot.clip_skip),
        });
    }
    let context = match hidden.len() {
        1 => hidden.pop().expect("one"),
        _ => Tensor::cat(hidden, 2),
    };
    Ok(Conditioning::text(context))
}
