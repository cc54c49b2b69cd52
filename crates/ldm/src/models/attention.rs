//! Cross-attention transformer of the UNet (CompVis `ldm/modules/attention.py`; the SD2 `use_linear`
//! projections of Stability-AI/stablediffusion).

use crate::nn::{conv2d_forward, group_norm_silu};
use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{
    Dropout, DropoutConfig, Gelu, GroupNorm, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Tensor};

use crate::nn::attention::{AttentionMode, scaled_dot_product};
use crate::nn::{conv2d, group_norm};

/// Multi-head attention with bias-free q/k/v projections (`CrossAttention`); self-attention when
/// no context is given. Scale `d_head^-0.5`.
#[derive(Module, Debug)]
pub struct CrossAttention {
    /// Query projection (no bias).
    pub to_q: Linear,
    /// Key projection (no bias), from the context width.
    pub to_k: Linear,
    /// Value projection (no bias), from the context width.
    pub to_v: Linear,
    /// Output projection and dropout (`to_out.0`, `to_out.1`).
    pub to_out: (Linear, Dropout),
    heads: usize,
    dim_head: usize,
    /// How the attention core runs.
    #[module(skip)]
    pub attention_mode: AttentionMode,
}

impl CrossAttention {
    /// `CrossAttention(query_dim, context_dim, heads, dim_head, dropout)`.
    pub fn new(
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        dropout: f64,
        device: &Device,
    ) -> Self {
        let inner = heads * dim_head;
        let context_dim = context_dim.unwrap_or(query_dim);
        let proj = |i: usize| LinearConfig::new(i, inner).with_bias(false).init(device);
        Self {
            to_q: proj(query_dim),
            to_k: proj(context_dim),
            to_v: proj(context_dim),
            to_out: (
                LinearConfig::new(inner, query_dim).init(device),
                DropoutConfig::new(dropout).init(),
            ),
            heads,
            dim_head,
            attention_mode: AttentionMode::auto(),
        }
    }

    /// `x` `[B, N, query_dim]`, `context` `[B, M, context_dim]` (None: self-attention) → `[B, N, query_dim]`.
    pub fn forward(&self, x: Tensor<3>, context: Option<Tensor<3>>) -> Tensor<3> {
        let context = context.unwrap_or_else(|| x.clone());
        let (h, d) = (self.heads, self.dim_head);
        let split = |t: Tensor<3>| {
            let [b, n, _] = t.dims();
            t.reshape([b, n, h, d]).swap_dims(1, 2) // [B, H, N, D]
        };
        let q = split(self.to_q.forward(x));
        let k = split(self.to_k.forward(context.clone()));
        let v = split(self.to_v.forward(context));
        let out = scaled_dot_product(q, k, v, (d as f64).powf(-0.5), self.attention_mode);
        let [b, _, n, _] = out.dims();
        let out = out.swap_dims(1, 2).reshape([b, n, h * d]);
        self.to_out.1.forward(self.to_out.0.forward(out))
    }
}

/// `GEGLU`: `proj` to twice the width; first half is the value, second half the (exact-erf GELU) gate.
#[derive(Module, Debug)]
pub struct Geglu {
    /// `Linear(dim_in, 2·dim_out)`.
    pub proj: Linear,
}

impl Geglu {
    /// `GEGLU(dim_in, dim_out)`.
    pub fn new(dim_in: usize, dim_out: usize, device: &Device) -> Self {
        Self {
            proj: LinearConfig::new(dim_in, 2 * dim_out).init(device),
        }
    }

    /// `[.., dim_in]` → `[.., dim_out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let mut halves = self.proj.forward(x).chunk(2, D - 1).into_iter();
        let (value, gate) = (halves.next().expect("value"), halves.next().expect("gate"));
        value * gelu(gate)
    }
}

/// The first layer of a [`FeedForward`]: GEGLU, or Linear + GELU.
#[derive(Module, Debug)]
pub enum ProjectIn {
    /// `GEGLU(dim, inner)` (`net.0.proj`).
    Geglu(Geglu),
    /// `Sequential(Linear(dim, inner), GELU)` (`net.0.0`).
    Gelu((Linear, Gelu)),
}

/// `FeedForward(dim, dim_out, mult=4, glu, dropout)`: `net = [project_in, Dropout, Linear]`.
#[derive(Module, Debug)]
pub struct FeedForward {
    /// `net.0`, `net.1`, `net.2`.
    pub net: (ProjectIn, Dropout, Linear),
}

impl FeedForward {
    /// Builds the layer with inner width `mult · dim`.
    pub fn new(
        dim: usize,
        dim_out: Option<usize>,
        mult: usize,
        glu: bool,
        dropout: f64,
        device: &Device,
    ) -> Self {
        let inner = dim * mult;
        let project_in = if glu {
            ProjectIn::Geglu(Geglu::new(dim, inner, device))
        } else {
            ProjectIn::Gelu((LinearConfig::new(dim, inner).init(device), Gelu::new()))
        };
        Self {
            net: (
                project_in,
                DropoutConfig::new(dropout).init(),
                LinearConfig::new(inner, dim_out.unwrap_or(dim)).init(device),
            ),
        }
    }

    /// `[.., dim]` → `[.., dim_out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let h = match &self.net.0 {
            ProjectIn::Geglu(g) => g.forward(x),
            ProjectIn::Gelu((lin, act)) => act.forward(lin.forward(x)),
        };
        self.net.2.forward(self.net.1.forward(h))
    }
}

/// Pre-norm transformer block: self-attention, cross-attention, GEGLU feed-forward, each residual.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    /// Self-attention.
    pub attn1: CrossAttention,
    /// Feed-forward.
    pub ff: FeedForward,
    /// Cross-attention (self-attention when no context).
    pub attn2: CrossAttention,
    /// LayerNorm before `attn1` (eps 1e-5).
    pub norm1: LayerNorm,
    /// LayerNorm before `attn2`.
    pub norm2: LayerNorm,
    /// LayerNorm before `ff`.
    pub norm3: LayerNorm,
}

impl BasicTransformerBlock {
    /// `BasicTransformerBlock(dim, n_heads, d_head, dropout, context_dim, gated_ff=True)`.
    pub fn new(
        dim: usize,
        n_heads: usize,
        d_head: usize,
        dropout: f64,
        context_dim: Option<usize>,
        device: &Device,
    ) -> Self {
        let norm = || LayerNormConfig::new(dim).init(device);
        Self {
            attn1: CrossAttention::new(dim, None, n_heads, d_head, dropout, device),
            ff: FeedForward::new(dim, None, 4, true, dropout, device),
            attn2: CrossAttention::new(dim, context_dim, n_heads, d_head, dropout, device),
            norm1: norm(),
            norm2: norm(),
            norm3: norm(),
        }
    }

    /// `x` `[B, N, dim]`, `context` `[B, M, context_dim]` → `[B, N, dim]`.
    pub fn forward(&self, x: Tensor<3>, context: Option<Tensor<3>>) -> Tensor<3> {
        let x = self.attn1.forward(self.norm1.forward(x.clone()), None) + x;
        let x = self.attn2.forward(self.norm2.forward(x.clone()), context) + x;
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }
}

/// A 1x1 conv (SD v1) or a Linear applied to the tokens (SD2 `use_linear`).
#[derive(Module, Debug)]
pub enum Projection {
    /// `Conv2d(c_in, c_out, 1)` on `[B, C, H, W]`.
    Conv(Conv2d),
    /// `Linear(c_in, c_out)` on `[B, HW, C]`.
    Linear(Linear),
}

/// Configuration of a [`SpatialTransformer`].
#[derive(Config, Debug)]
pub struct SpatialTransformerConfig {
    /// Channels of the feature map.
    pub in_channels: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Width per head (`inner = n_heads · d_head`).
    pub d_head: usize,
    /// Number of transformer blocks.
    #[config(default = 1)]
    pub depth: usize,
    /// Dropout.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Width of the cross-attention context (None: self-attention only).
    pub context_dim: Option<usize>,
    /// SD2: `proj_in`/`proj_out` as Linear on tokens instead of 1x1 convs.
    #[config(default = false)]
    pub use_linear: bool,
}

/// `SpatialTransformer`: GroupNorm (eps 1e-6), `proj_in`, transformer blocks over the H·W tokens,
/// `proj_out`, residual.
#[derive(Module, Debug)]
pub struct SpatialTransformer {
    /// GroupNorm(32, C, eps 1e-6).
    pub norm: GroupNorm,
    /// Input projection.
    pub proj_in: Projection,
    /// Transformer blocks.
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    /// Output projection.
    pub proj_out: Projection,
}

impl SpatialTransformerConfig {
    /// Builds the layer.
    pub fn init(&self, device: &Device) -> SpatialTransformer {
        let (c, inner) = (self.in_channels, self.n_heads * self.d_head);
        let proj = |i: usize, o: usize| {
            if self.use_linear {
                Projection::Linear(LinearConfig::new(i, o).init(device))
            } else {
                Projection::Conv(conv2d(i, o, 1, 0, device))
            }
        };
        SpatialTransformer {
            norm: group_norm(32, c, 1e-6, device),
            proj_in: proj(c, inner),
            transformer_blocks: (0..self.depth)
                .map(|_| {
                    BasicTransformerBlock::new(
                        inner,
                        self.n_heads,
                        self.d_head,
                        self.dropout,
                        self.context_dim,
                        device,
                    )
                })
                .collect(),
            proj_out: proj(inner, c),
        }
    }
}

impl SpatialTransformer {
    /// `x` `[B, C, H, W]`, `context` `[B, M, context_dim]` → `[B, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>, context: Option<Tensor<3>>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let hn = group_norm_silu(&self.norm, x.clone(), false);
        let to_tokens = |t: Tensor<4>| {
            let ch = t.dims()[1];
            t.reshape([b, ch, h * w]).swap_dims(1, 2)
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv2d_forward(conv, hn)),
            Projection::Linear(lin) => lin.forward(to_tokens(hn)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, context.clone());
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => {
                let inner = tokens.dims()[2];
                conv2d_forward(conv, tokens.swap_dims(1, 2).reshape([b, inner, h, w]))
            }
            Projection::Linear(lin) => lin.forward(tokens).swap_dims(1, 2).reshape([b, c, h, w]),
        };
        out + x
    }

    /// Sets how every attention inside runs.
    pub fn set_attention_mode(&mut self, mode: AttentionMode) {
        for block in &mut self.transformer_blocks {
            block.attn1.attention_mode = mode;
            block.attn2.attention_mode = mode;
        }
    }
}
