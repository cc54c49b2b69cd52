//! CLIP text transformer as Hugging Face `CLIPTextModel` (what SD v1's `FrozenCLIPEmbedder` runs):
//! token + position embeddings, pre-LN layers with causal self-attention, `quick_gelu` MLP, final
//! LayerNorm. Field names follow the HF state dict (`text_model.encoder.layers.N.self_attn.q_proj`, ...).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use super::check_token_ids;
use crate::error::{Error, Result};
use crate::nn::attention::scaled_dot_product_causal;

/// The MLP activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    /// `x · σ(1.702 x)` (OpenAI CLIP, SD v1).
    #[default]
    QuickGelu,
    /// Exact erf GELU.
    Gelu,
}

/// `CLIPTextConfig` fields that matter for inference.
#[derive(Config, Debug, PartialEq)]
pub struct ClipTextConfig {
    /// Vocabulary size.
    #[config(default = 49408)]
    pub vocab_size: usize,
    /// Width.
    #[config(default = 768)]
    pub hidden_size: usize,
    /// MLP width.
    #[config(default = 3072)]
    pub intermediate_size: usize,
    /// Layers.
    #[config(default = 12)]
    pub num_hidden_layers: usize,
    /// Heads.
    #[config(default = 12)]
    pub num_attention_heads: usize,
    /// Positions (77).
    #[config(default = 77)]
    pub max_position_embeddings: usize,
    /// MLP activation.
    #[config(default = "ClipActivation::QuickGelu")]
    pub hidden_act: ClipActivation,
    /// LayerNorm epsilon.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
}

impl ClipTextConfig {
    /// OpenAI CLIP ViT-L/14 text encoder (SD v1): 123,060,480 parameters.
    pub fn vit_l_14() -> Self {
        Self::new()
    }

    /// Reads a Hugging Face `config.json` (of a `CLIPTextModel` or a full `CLIPModel`, whose
    /// `text_config` is used); missing fields take the ViT-L/14 values.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| Error::Config(format!("CLIP config.json: {e}")))?;
        let v = v.get("text_config").unwrap_or(&v);
        let mut c = Self::new();
        let u = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
        if let Some(x) = u("vocab_size") {
            c.vocab_size = x;
        }
        if let Some(x) = u("hidden_size") {
            c.hidden_size = x;
        }
        if let Some(x) = u("intermediate_size") {
            c.intermediate_size = x;
        }
        if let Some(x) = u("num_hidden_layers") {
            c.num_hidden_layers = x;
        }
        if let Some(x) = u("num_attention_heads") {
            c.num_attention_heads = x;
        }
        if let Some(x) = u("max_position_embeddings") {
            c.max_position_embeddings = x;
        }
        if let Some(x) = v.get("layer_norm_eps").and_then(|x| x.as_f64()) {
            c.layer_norm_eps = x;
        }
        if let Some(act) = v.get("hidden_act").and_then(|x| x.as_str()) {
            c.hidden_act = match act {
                "quick_gelu" => ClipActivation::QuickGelu,
                "gelu" => ClipActivation::Gelu,
                other => {
                    return Err(Error::Config(format!(
                        "unsupported CLIP hidden_act `{other}` (quick_gelu, gelu)"
                    )));
                }
            };
        }
        if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(Error::Config(
                "hidden_size must be divisible by num_attention_heads".into(),
            ));
        }
        Ok(c)
    }

    /// Builds the model (lazy parameters).
    pub fn init(&self, device: &Device) -> ClipTextModel {
        let d = self.hidden_size;
        let ln = || {
            LayerNormConfig::new(d)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let lin = |i: usize, o: usize| LinearConfig::new(i, o).init(device);
        let layers = (0..self.num_hidden_layers)
            .map(|_| ClipEncoderLayer {
                self_attn: ClipAttention {
                    q_proj: lin(d, d),
                    k_proj: lin(d, d),
                    v_proj: lin(d, d),
                    out_proj: lin(d, d),
                    heads: self.num_attention_heads,
                },
                layer_norm1: ln(),
                mlp: ClipMlp {
                    fc1: lin(d, self.intermediate_size),
                    fc2: lin(self.intermediate_size, d),
                    act: self.hidden_act == ClipActivation::QuickGelu,
                },
                layer_norm2: ln(),
            })
            .collect();
        ClipTextModel {
            text_model: ClipTextTransformer {
                embeddings: ClipTextEmbeddings {
                    token_embedding: EmbeddingConfig::new(self.vocab_size, d).init(device),
                    position_embedding: EmbeddingConfig::new(self.max_position_embeddings, d)
                        .init(device),
                },
                encoder: ClipEncoder { layers },
                final_layer_norm: ln(),
            },
            vocab_size: self.vocab_size,
            max_positions: self.max_position_embeddings,
        }
    }
}

/// Multi-head self-attention with biases (`self_attn`).
#[derive(Module, Debug)]
pub struct ClipAttention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub out_proj: Linear,
    heads: usize,
}

impl ClipAttention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, l, d] = x.dims();
        let hd = d / self.heads;
        let split = |t: Tensor<3>| t.reshape([b, l, self.heads, hd]).swap_dims(1, 2);
        let q = split(self.q_proj.forward(x.clone()));
        let k = split(self.k_proj.forward(x.clone()));
        let v = split(self.v_proj.forward(x));
        let out = scaled_dot_product_causal(q, k, v, (hd as f64).powf(-0.5));
        self.out_proj
            .forward(out.swap_dims(1, 2).reshape([b, l, d]))
    }
}

/// `fc1`, activation, `fc2`.
#[derive(Module, Debug)]
pub struct ClipMlp {
    /// Up projection.
    pub fc1: Linear,
    /// Down projection.
    pub fc2: Linear,
    act: bool,
}

impl ClipMlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.fc1.forward(x);
        let h = if self.act {
            h.clone() * sigmoid(h.mul_scalar(1.702))
        } else {
            gelu(h)
        };
        self.fc2.forward(h)
    }
}

/// One pre-LN transformer layer.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    /// Causal self-attention.
    pub self_attn: ClipAttention,
    /// LayerNorm before attention.
    pub layer_norm1: LayerNorm,
    /// Feed-forward.
    pub mlp: ClipMlp,
    /// LayerNorm before the MLP.
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

/// `embeddings`: token and absolute position embeddings.
#[derive(Module, Debug)]
pub struct ClipTextEmbeddings {
    /// `[vocab, d]`.
    pub token_embedding: Embedding,
    /// `[77, d]`.
    pub position_embedding: Embedding,
}

/// The layer stack.
#[derive(Module, Debug)]
pub struct ClipEncoder {
    /// Layers.
    pub layers: Vec<ClipEncoderLayer>,
}

/// `text_model`.
#[derive(Module, Debug)]
pub struct ClipTextTransformer {
    /// Embeddings.
    pub embeddings: ClipTextEmbeddings,
    /// Layers.
    pub encoder: ClipEncoder,
    /// Final LayerNorm.
    pub final_layer_norm: LayerNorm,
}

/// Outputs of [`ClipTextModel::forward`].
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// After the final LayerNorm, `[B, L, d]` (SD v1's conditioning).
    pub last_hidden_state: Tensor<3>,
    /// Output of the second-to-last layer (`hidden_states[-2]`, no final norm), `[B, L, d]`.
    pub penultimate: Tensor<3>,
}

/// `CLIPTextModel`.
#[derive(Module, Debug)]
pub struct ClipTextModel {
    /// The transformer.
    pub text_model: ClipTextTransformer,
    vocab_size: usize,
    max_positions: usize,
}

impl ClipTextModel {
    /// Token ids `[B, L]` (L ≤ 77) → hidden states.
    pub fn forward(&self, ids: Tensor<2, Int>) -> ClipTextOutput {
        let tm = &self.text_model;
        let [_, l] = ids.dims();
        let positions = Tensor::<1, Int>::arange(0..l as i64, &ids.device()).reshape([1, l]);
        let mut x = tm.embeddings.token_embedding.forward(ids)
            + tm.embeddings.position_embedding.forward(positions);
        let n = tm.encoder.layers.len();
        let mut penultimate = x.clone();
        for (i, layer) in tm.encoder.layers.iter().enumerate() {
            x = layer.forward(x);
            if i + 2 == n {
                penultimate = x.clone();
            }
        }
        ClipTextOutput {
            last_hidden_state: tm.final_layer_norm.forward(x),
            penultimate,
        }
    }

    /// [`forward`](Self::forward) after checking that ids are in the vocabulary and fit the positions.
    pub fn try_forward(&self, ids: Tensor<2, Int>) -> Result<ClipTextOutput> {
        check_token_ids(&ids, "CLIP token ids", self.max_positions, self.vocab_size)?;
        Ok(self.forward(ids))
    }
}
