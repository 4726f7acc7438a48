//! transformers' `CLIPTextModel` (`models/clip/modeling_clip.py`), Stable Diffusion 1.x's text
//! encoder, with transformers' parameter names (`text_model.embeddings.token_embedding`,
//! `text_model.encoder.layers.N.self_attn.q_proj`, ...) and config.

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::sigmoid;
use serde::{Deserialize, Serialize};

use super::attention::multi_head_attention;
use crate::io::config_json::ConfigJson;
use crate::kernels::gelu;
use crate::nn::{Embedding, LayerNorm, Linear};

/// `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP, SD 1.x).
    QuickGelu,
    /// The exact, erf-based GELU (OpenCLIP, SD 2.x).
    Gelu,
}

/// transformers' `CLIPTextConfig` (the fields the text model uses). Defaults are SD 1.x's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CLIPTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: HiddenAct,
    pub layer_norm_eps: f64,
    pub bos_token_id: usize,
    pub eos_token_id: usize,
    pub pad_token_id: usize,
}

impl Default for CLIPTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: HiddenAct::QuickGelu,
            layer_norm_eps: 1e-5,
            bos_token_id: 49406,
            eos_token_id: 49407,
            pad_token_id: 1,
        }
    }
}

impl CLIPTextConfig {
    pub fn problems(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            out.push(format!(
                "{prefix}: hidden_size = {} is not divisible by num_attention_heads = {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_hidden_layers == 0 || self.vocab_size == 0 || self.max_position_embeddings == 0
        {
            out.push(format!(
                "{prefix}: num_hidden_layers, vocab_size and max_position_embeddings must be \
                 positive"
            ));
        }
        out
    }

    pub fn init(&self, device: &Device) -> CLIPTextModel {
        CLIPTextModel::new(self, device)
    }

    /// The `text_encoder/config.json` transformers reads.
    pub fn to_transformers_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "projection_dim": self.hidden_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        })
    }

    /// Reads a transformers `text_encoder/config.json`.
    pub fn from_transformers_json(
        value: &serde_json::Value,
    ) -> Result<Self, crate::io::config_json::ConfigJsonError> {
        let json = ConfigJson::new(value, "CLIPTextModel")?;
        if let Some(archs) = json.get::<Vec<String>>("architectures")?
            && !archs.iter().any(|a| a == "CLIPTextModel")
        {
            return Err(crate::io::config_json::ConfigJsonError::UnsupportedClass {
                what: format!("architectures = {archs:?}"),
                supported: "CLIPTextModel (the only text encoder supported)".into(),
            });
        }
        json.expect("hidden_act", &["quick_gelu".into(), "gelu".into()])?;
        let mut c = Self::default();
        json.take("vocab_size", &mut c.vocab_size)?;
        json.take("hidden_size", &mut c.hidden_size)?;
        json.take("intermediate_size", &mut c.intermediate_size)?;
        json.take("num_hidden_layers", &mut c.num_hidden_layers)?;
        json.take("num_attention_heads", &mut c.num_attention_heads)?;
        json.take("max_position_embeddings", &mut c.max_position_embeddings)?;
        json.take("hidden_act", &mut c.hidden_act)?;
        json.take("layer_norm_eps", &mut c.layer_norm_eps)?;
        json.take("bos_token_id", &mut c.bos_token_id)?;
        json.take("eos_token_id", &mut c.eos_token_id)?;
        json.take("pad_token_id", &mut c.pad_token_id)?;
        Ok(c)
    }
}

#[derive(Module, Debug)]
pub struct CLIPTextEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}

#[derive(Module, Debug)]
pub struct CLIPAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub heads: usize,
}

#[derive(Module, Debug)]
pub struct CLIPMLP {
    pub fc1: Linear,
    pub fc2: Linear,
    pub quick_gelu: bool,
}

impl CLIPMLP {
    /// # Shapes
    /// - `x`: `[b, n, hidden]`; returns the same
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.fc1.forward(x);
        let h = if self.quick_gelu {
            h.clone() * sigmoid(h.mul_scalar(1.702))
        } else {
            gelu(h)
        };
        self.fc2.forward(h)
    }
}

#[derive(Module, Debug)]
pub struct CLIPEncoderLayer {
    pub self_attn: CLIPAttention,
    pub layer_norm1: LayerNorm<1>,
    pub mlp: CLIPMLP,
    pub layer_norm2: LayerNorm<1>,
}

impl CLIPEncoderLayer {
    /// Pre-norm causal self-attention and MLP, each with a residual.
    ///
    /// # Shapes
    /// - `x`: `[b, n, hidden]`; returns the same
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.layer_norm1.forward(x.clone());
        let a = &self.self_attn;
        let attended = multi_head_attention(
            a.q_proj.forward(h.clone()),
            a.k_proj.forward(h.clone()),
            a.v_proj.forward(h),
            a.heads,
            true,
        );
        let x = a.out_proj.forward(attended) + x;
        self.mlp.forward(self.layer_norm2.forward(x.clone())) + x
    }
}

#[derive(Module, Debug)]
pub struct CLIPEncoder {
    pub layers: Vec<CLIPEncoderLayer>,
}

#[derive(Module, Debug)]
pub struct CLIPTextTransformer {
    pub embeddings: CLIPTextEmbeddings,
    pub encoder: CLIPEncoder,
    pub final_layer_norm: LayerNorm<1>,
}

#[derive(Module, Debug)]
pub struct CLIPTextModel {
    pub text_model: CLIPTextTransformer,
}

impl CLIPTextModel {
    pub fn new(cfg: &CLIPTextConfig, device: &Device) -> Self {
        let d = cfg.hidden_size;
        let norm = || LayerNorm::new([d], device).with_eps(cfg.layer_norm_eps);
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| CLIPEncoderLayer {
                self_attn: CLIPAttention {
                    q_proj: Linear::new(d, d, true, device),
                    k_proj: Linear::new(d, d, true, device),
                    v_proj: Linear::new(d, d, true, device),
                    out_proj: Linear::new(d, d, true, device),
                    heads: cfg.num_attention_heads,
                },
                layer_norm1: norm(),
                mlp: CLIPMLP {
                    fc1: Linear::new(d, cfg.intermediate_size, true, device),
                    fc2: Linear::new(cfg.intermediate_size, d, true, device),
                    quick_gelu: cfg.hidden_act == HiddenAct::QuickGelu,
                },
                layer_norm2: norm(),
            })
            .collect();
        Self {
            text_model: CLIPTextTransformer {
                embeddings: CLIPTextEmbeddings {
                    token_embedding: Embedding::normal(cfg.vocab_size, d, device),
                    position_embedding: Embedding::normal(cfg.max_position_embeddings, d, device),
                },
                encoder: CLIPEncoder { layers },
                final_layer_norm: norm(),
            },
        }
    }

    /// The text embeddings the U-Net attends to: `last_hidden_state` with `clip_skip = 1`;
    /// with `clip_skip = k` (A1111's and kohya's "clip skip", diffusers' `clip_skip = k - 1`) the
    /// output of the k-th layer from the end, through the final layer norm as diffusers does.
    ///
    /// # Shapes
    /// - `input_ids`: `[b, n]` (n <= max_position_embeddings); returns `[b, n, hidden]`
    pub fn forward(&self, input_ids: Tensor<2, Int>, clip_skip: usize) -> Tensor<3> {
        let dtype = self
            .text_model
            .embeddings
            .token_embedding
            .weight
            .val()
            .dtype();
        self.forward_in(input_ids, clip_skip, dtype)
    }

    /// [`Self::forward`] computing in `dtype` (mixed precision): the embeddings are cast to it and
    /// every layer follows.
    pub fn forward_in(
        &self,
        input_ids: Tensor<2, Int>,
        clip_skip: usize,
        dtype: DType,
    ) -> Tensor<3> {
        let [b, n] = input_ids.dims();
        let t = &self.text_model;
        let device = input_ids.device();
        let tokens = t
            .embeddings
            .token_embedding
            .forward(input_ids.reshape([b * n]));
        let d = tokens.dims()[1];
        let positions = Tensor::<1, Int>::arange(0..n as i64, &device);
        let pos = t.embeddings.position_embedding.forward(positions);
        let h = tokens.reshape([b, n, d]) + pos.unsqueeze::<3>();
        let mut h = crate::dtype::as_dtype(h, dtype);
        let layers = t.encoder.layers.len();
        let run = layers - (clip_skip.max(1) - 1).min(layers - 1);
        for layer in &t.encoder.layers[..run] {
            h = layer.forward(h);
        }
        t.final_layer_norm.forward(h)
    }
}
