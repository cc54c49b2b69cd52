//! LDM's `BERTEmbedder` transformer: CompVis `x_transformer.TransformerWrapper` with an
//! `Encoder(dim, depth)` — token embedding, absolute position embedding, pre-norm layers of
//! (LayerNorm, attention with 8 heads × 64) and (LayerNorm, GELU feed-forward), final LayerNorm.
//! No padding mask (as the reference). `to_logits` is kept so checkpoints load, but unused.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Int, Tensor};

use super::check_token_ids;
use crate::error::Result;
use crate::models::attention::FeedForward;
use crate::nn::attention::{AttentionMode, scaled_dot_product};

/// Configuration of a [`TransformerWrapper`] (`BERTEmbedder(n_embed, n_layer, vocab_size, max_seq_len)`).
#[derive(Config, Debug, PartialEq)]
pub struct BertEmbedderConfig {
    /// Width (`n_embed`).
    pub n_embed: usize,
    /// Number of (attention, feed-forward) layer pairs (`n_layer`).
    pub n_layer: usize,
    /// Vocabulary (bert-base-uncased: 30522).
    #[config(default = 30522)]
    pub vocab_size: usize,
    /// Positions.
    #[config(default = 77)]
    pub max_seq_len: usize,
    /// Attention heads (x-transformers default 8).
    #[config(default = 8)]
    pub heads: usize,
    /// Width per head (x-transformers default 64; inner width `heads · dim_head`, not `n_embed`).
    #[config(default = 64)]
    pub dim_head: usize,
}

impl BertEmbedderConfig {
    /// `txt2img-1p4B`: n_embed 1280, 32 layers (581,994,042 parameters with `to_logits`).
    pub fn txt2img_1p4b() -> Self {
        Self::new(1280, 32)
    }
    /// `text2img256`: n_embed 640, 32 layers.
    pub fn text2img256() -> Self {
        Self::new(640, 32)
    }

    /// Builds the model (lazy parameters).
    pub fn init(&self, device: &Device) -> TransformerWrapper {
        let d = self.n_embed;
        let inner = self.heads * self.dim_head;
        let ln = || LayerNormConfig::new(d).init(device);
        let mut layers = Vec::with_capacity(2 * self.n_layer);
        for _ in 0..self.n_layer {
            let no_bias =
                |i: usize, o: usize| LinearConfig::new(i, o).with_bias(false).init(device);
            let attn = XAttention {
                to_q: no_bias(d, inner),
                to_k: no_bias(d, inner),
                to_v: no_bias(d, inner),
                to_out: LinearConfig::new(inner, d).init(device),
                heads: self.heads,
                dim_head: self.dim_head,
            };
            layers.push((ln(), XBlock::Attention(attn)));
            layers.push((
                ln(),
                XBlock::FeedForward(FeedForward::new(d, None, 4, false, 0.0, device)),
            ));
        }
        TransformerWrapper {
            token_emb: EmbeddingConfig::new(self.vocab_size, d).init(device),
            pos_emb: AbsolutePositionalEmbedding {
                emb: EmbeddingConfig::new(self.max_seq_len, d).init(device),
            },
            attn_layers: AttentionLayers { layers },
            norm: ln(),
            to_logits: LinearConfig::new(d, self.vocab_size).init(device),
            vocab_size: self.vocab_size,
            max_seq_len: self.max_seq_len,
        }
    }
}

/// x-transformers `Attention` (no mask, no memory, no talking heads): bias-free q/k/v, biased `to_out`.
#[derive(Module, Debug)]
pub struct XAttention {
    /// Query projection.
    pub to_q: Linear,
    /// Key projection.
    pub to_k: Linear,
    /// Value projection.
    pub to_v: Linear,
    /// Output projection.
    pub to_out: Linear,
    heads: usize,
    dim_head: usize,
}

impl XAttention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, _] = x.dims();
        let (h, d) = (self.heads, self.dim_head);
        let split = |t: Tensor<3>| t.reshape([b, n, h, d]).swap_dims(1, 2);
        let q = split(self.to_q.forward(x.clone()));
        let k = split(self.to_k.forward(x.clone()));
        let v = split(self.to_v.forward(x));
        let out = scaled_dot_product(q, k, v, (d as f64).powf(-0.5), AttentionMode::Fused);
        self.to_out
            .forward(out.swap_dims(1, 2).reshape([b, n, h * d]))
    }
}

/// The block of one layer.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum XBlock {
    /// Self-attention (`'a'`).
    Attention(XAttention),
    /// Feed-forward (`'f'`).
    FeedForward(FeedForward),
}

/// `AttentionLayers`: `layers.N = (norm, block)` (the parameter-free `Residual` is implicit).
#[derive(Module, Debug)]
pub struct AttentionLayers {
    /// Pre-norm and block of each layer.
    pub layers: Vec<(LayerNorm, XBlock)>,
}

/// `AbsolutePositionalEmbedding` (`pos_emb.emb`).
#[derive(Module, Debug)]
pub struct AbsolutePositionalEmbedding {
    /// `[max_seq_len, dim]`.
    pub emb: Embedding,
}

/// `TransformerWrapper` as `BERTEmbedder` uses it (`return_embeddings=True`).
#[derive(Module, Debug)]
pub struct TransformerWrapper {
    /// Token embedding.
    pub token_emb: Embedding,
    /// Position embedding.
    pub pos_emb: AbsolutePositionalEmbedding,
    /// The layers.
    pub attn_layers: AttentionLayers,
    /// Final LayerNorm.
    pub norm: LayerNorm,
    /// Unused by the embedder; present in checkpoints.
    pub to_logits: Linear,
    vocab_size: usize,
    max_seq_len: usize,
}

impl TransformerWrapper {
    /// Token ids `[B, L]` → embeddings `[B, L, n_embed]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [_, l] = ids.dims();
        let positions = Tensor::<1, Int>::arange(0..l as i64, &ids.device()).reshape([1, l]);
        let mut x = self.token_emb.forward(ids) + self.pos_emb.emb.forward(positions);
        for (norm, block) in &self.attn_layers.layers {
            let h = norm.forward(x.clone());
            let h = match block {
                XBlock::Attention(a) => a.forward(h),
                XBlock::FeedForward(f) => f.forward(h),
            };
            x = x + h;
        }
        self.norm.forward(x)
    }

    /// [`forward`](Self::forward) after checking ids and length.
    pub fn try_forward(&self, ids: Tensor<2, Int>) -> Result<Tensor<3>> {
        check_token_ids(&ids, "BERT token ids", self.max_seq_len, self.vocab_size)?;
        Ok(self.forward(ids))
    }
}
