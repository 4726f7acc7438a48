//! What a latent denoising backbone is conditioned on, as one value: whatever the backbone
//! reads, `None` where absent. The U-Net of SD 1.x/2.x reads `context` (and `class_labels` when
//! class-conditioned); SDXL's added conditioning (`pooled`, `time_ids`) and a class-conditional
//! DiT (`class_labels`) read the other fields. A new kind of conditioning is a new field here.

use burn::prelude::*;

/// One batch's conditioning.
#[derive(Debug, Clone, Default)]
pub struct Conditioning {
    /// Token embeddings the cross-attention attends to, `[b, tokens, width]` (the text
    /// encoders' hidden states, concatenated along the width when there are several).
    pub context: Option<Tensor<3>>,
    /// A pooled text embedding, `[b, width]` (SDXL's `text_embeds`).
    pub pooled: Option<Tensor<2>>,
    /// Class labels, `[b]` (the null class for guidance is the backbone's last class).
    pub class_labels: Option<Tensor<1, Int>>,
    /// Added micro-conditioning, `[b, n]` (SDXL's `time_ids`: original size, crop top-left,
    /// target size).
    pub time_ids: Option<Tensor<2>>,
}

impl Conditioning {
    /// Nothing: an unconditional model (or the unconditional branch of one without a null
    /// input of its own).
    pub fn none() -> Self {
        Self::default()
    }

    pub fn text(context: Tensor<3>) -> Self {
        Self {
            context: Some(context),
            ..Self::default()
        }
    }

    pub fn classes(labels: Tensor<1, Int>) -> Self {
        Self {
            class_labels: Some(labels),
            ..Self::default()
        }
    }

    /// Each field's batch of one repeated `n` times.
    pub fn repeat(&self, n: usize) -> Self {
        Self {
            context: self.context.as_ref().map(|t| {
                let [_, len, d] = t.dims();
                t.clone().expand([n, len, d])
            }),
            pooled: self.pooled.as_ref().map(|t| {
                let [_, d] = t.dims();
                t.clone().expand([n, d])
            }),
            class_labels: self
                .class_labels
                .as_ref()
                .map(|t| t.clone().repeat_dim(0, n)),
            time_ids: self.time_ids.as_ref().map(|t| {
                let [_, d] = t.dims();
                t.clone().expand([n, d])
            }),
        }
    }

    /// `[first; second]` along the batch, field by field (classifier-free guidance runs the
    /// unconditional and the conditional branch as one batch, diffusers' order). A field only
    /// one side has cannot be batched: both must have the same fields.
    pub fn cat(first: &Self, second: &Self) -> Self {
        fn both<T: Clone>(a: &Option<T>, b: &Option<T>, cat: impl Fn(T, T) -> T) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(cat(a.clone(), b.clone())),
                (None, None) => None,
                _ => panic!("Conditioning::cat: one branch has a field the other lacks"),
            }
        }
        Self {
            context: both(&first.context, &second.context, |a, b| {
                Tensor::cat(vec![a, b], 0)
            }),
            pooled: both(&first.pooled, &second.pooled, |a, b| {
                Tensor::cat(vec![a, b], 0)
            }),
            class_labels: both(&first.class_labels, &second.class_labels, |a, b| {
                Tensor::cat(vec![a, b], 0)
            }),
            time_ids: both(&first.time_ids, &second.time_ids, |a, b| {
                Tensor::cat(vec![a, b], 0)
            }),
        }
    }

    /// The same values on `device`.
    pub fn to_device(&self, device: &Device) -> Self {
        Self {
            context: self.context.clone().map(|t| t.to_device(device)),
            pooled: self.pooled.clone().map(|t| t.to_device(device)),
            class_labels: self.class_labels.clone().map(|t| t.to_device(device)),
            time_ids: self.time_ids.clone().map(|t| t.to_device(device)),
        }
    }
}

/// A latent denoising backbone: predicts the noise (or `v`, or the sample, as trained) of
/// latents at timesteps, under a conditioning.
pub trait LatentBackbone {
    /// # Shapes
    /// - `latents` `[b, c, h, w]`, `timesteps` `[b]` (float); returns `[b, c_out, h, w]`
    fn predict(&self, latents: Tensor<4>, timesteps: Tensor<1>, cond: &Conditioning) -> Tensor<4>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guidance_batches_concatenate_field_by_field() {
        let device = Device::flex();
        let cond = Conditioning::text(Tensor::ones([1, 3, 2], &device));
        let uncond = Conditioning::text(Tensor::zeros([1, 3, 2], &device));
        let both = Conditioning::cat(&uncond.repeat(2), &cond.repeat(2));
        let values = crate::nn::to_host(both.context.unwrap());
        assert_eq!(values.len(), 4 * 3 * 2);
        assert!(values[..12].iter().all(|v| *v == 0.0) && values[12..].iter().all(|v| *v == 1.0));
        let labels =
            Conditioning::classes(Tensor::from_data(TensorData::new(vec![3i64], [1]), &device));
        let n = labels.repeat(3).class_labels.unwrap();
        assert_eq!(
            n.into_data().convert::<i64>().try_to_vec::<i64>().unwrap(),
            vec![3, 3, 3]
        );
    }
}
