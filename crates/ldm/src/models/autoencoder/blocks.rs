//! Building blocks of the first-stage encoder and decoder (CompVis
//! `ldm/modules/diffusionmodules/model.py`). Field names equal the reference's attribute names, so
//! state-dict keys map one to one.

use crate::nn::{conv2d_forward, maybe_group_norm_silu};
use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::pool::{AvgPool2d, AvgPool2dConfig};
use burn::nn::{Dropout, DropoutConfig, GroupNorm, Identity, Linear, LinearConfig};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor};

use super::config::AttnType;
use crate::nn::attention::{AttentionMode, scaled_dot_product};
use crate::nn::{conv2d, maybe_group_norm};

/// Configuration of a [`ResnetBlock`].
#[derive(Config, Debug)]
pub struct ResnetBlockConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// When the channel count changes: 3x3 `conv_shortcut` instead of 1x1 `nin_shortcut`.
    #[config(default = false)]
    pub conv_shortcut: bool,
    /// Width of the time embedding (`temb_proj`); 0 (no projection) in the autoencoders.
    #[config(default = 0)]
    pub temb_channels: usize,
    /// Dropout between the two convolutions.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// GroupNorm epsilon (1e-6 in the reference's `Normalize`).
    #[config(default = 1e-6)]
    pub norm_eps: f64,
    /// GroupNorm groups (0: no normalisation).
    #[config(default = 32)]
    pub norm_groups: usize,
}

/// Pre-activation residual block: `skip(x) + conv2(drop(silu(norm2(conv1(silu(norm1(x))) [+ temb]))))`.
#[derive(Module, Debug)]
pub struct ResnetBlock {
    /// First GroupNorm (absent with `norm_groups` 0).
    pub norm1: Option<GroupNorm>,
    /// First 3x3 convolution.
    pub conv1: Conv2d,
    /// Time-embedding projection (absent in the autoencoders).
    pub temb_proj: Option<Linear>,
    /// Second GroupNorm (absent with `norm_groups` 0).
    pub norm2: Option<GroupNorm>,
    /// Dropout.
    pub dropout: Dropout,
    /// Second 3x3 convolution.
    pub conv2: Conv2d,
    /// 3x3 skip projection (when `conv_shortcut` and channels change).
    pub conv_shortcut: Option<Conv2d>,
    /// 1x1 skip projection (when channels change).
    pub nin_shortcut: Option<Conv2d>,
}

impl ResnetBlockConfig {
    /// Builds the block.
    pub fn init(&self, device: &Device) -> ResnetBlock {
        let (i, o) = (self.in_channels, self.out_channels);
        let (shortcut_conv, nin) = match (i == o, self.conv_shortcut) {
            (true, _) => (None, None),
            (false, true) => (Some(conv2d(i, o, 3, 1, device)), None),
            (false, false) => (None, Some(conv2d(i, o, 1, 0, device))),
        };
        ResnetBlock {
            norm1: maybe_group_norm(self.norm_groups, i, self.norm_eps, device),
            conv1: conv2d(i, o, 3, 1, device),
            temb_proj: (self.temb_channels > 0)
                .then(|| LinearConfig::new(self.temb_channels, o).init(device)),
            norm2: maybe_group_norm(self.norm_groups, o, self.norm_eps, device),
            dropout: DropoutConfig::new(self.dropout).init(),
            conv2: conv2d(o, o, 3, 1, device),
            conv_shortcut: shortcut_conv,
            nin_shortcut: nin,
        }
    }
}

impl ResnetBlock {
    /// `x`: `[B, C_in, H, W]`, `temb`: `[B, temb_channels]` (only with `temb_proj`) → `[B, C_out, H, W]`.
    pub fn forward(&self, x: Tensor<4>, temb: Option<Tensor<2>>) -> Tensor<4> {
        let mut h = conv2d_forward(
            &self.conv1,
            maybe_group_norm_silu(&self.norm1, x.clone(), true),
        );
        if let (Some(proj), Some(temb)) = (&self.temb_proj, temb) {
            h = h + proj.forward(silu(temb)).unsqueeze_dims::<4>(&[2, 3]);
        }
        let h = conv2d_forward(
            &self.conv2,
            self.dropout
                .forward(maybe_group_norm_silu(&self.norm2, h, true)),
        );
        let skip = match (&self.conv_shortcut, &self.nin_shortcut) {
            (Some(c), _) => conv2d_forward(c, x),
            (None, Some(c)) => conv2d_forward(c, x),
            (None, None) => x,
        };
        skip + h
    }
}

/// Single-head spatial self-attention with 1x1-conv projections and a residual (`AttnBlock`).
#[derive(Module, Debug)]
pub struct AttnBlock {
    /// GroupNorm before the projections (absent with `norm_groups` 0).
    pub norm: Option<GroupNorm>,
    /// Query projection (1x1 conv).
    pub q: Conv2d,
    /// Key projection (1x1 conv).
    pub k: Conv2d,
    /// Value projection (1x1 conv).
    pub v: Conv2d,
    /// Output projection (1x1 conv).
    pub proj_out: Conv2d,
    /// How the attention core runs (fused or sliced).
    #[module(skip)]
    pub attention_mode: AttentionMode,
}

impl AttnBlock {
    /// Builds the block for `channels` channels.
    pub fn new(channels: usize, norm_groups: usize, norm_eps: f64, device: &Device) -> Self {
        Self {
            norm: maybe_group_norm(norm_groups, channels, norm_eps, device),
            q: conv2d(channels, channels, 1, 0, device),
            k: conv2d(channels, channels, 1, 0, device),
            v: conv2d(channels, channels, 1, 0, device),
            proj_out: conv2d(channels, channels, 1, 0, device),
            attention_mode: AttentionMode::auto(),
        }
    }

    /// `[B, C, H, W]` → `[B, C, H, W]`; softmax(q kᵀ / √C) v over the H·W positions.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let hn = maybe_group_norm_silu(&self.norm, x.clone(), false);
        // [B, C, H, W] -> [B, 1, HW, C]: one head holding all channels.
        let tokens = |t: Tensor<4>| {
            t.reshape([b, c, h * w])
                .swap_dims(1, 2)
                .unsqueeze_dim::<4>(1)
        };
        let q = tokens(conv2d_forward(&self.q, hn.clone()));
        let k = tokens(conv2d_forward(&self.k, hn.clone()));
        let v = tokens(conv2d_forward(&self.v, hn));
        let out = scaled_dot_product(q, k, v, (c as f64).powf(-0.5), self.attention_mode); // [B, 1, HW, C]
        let out = out
            .reshape([b, h * w, c])
            .swap_dims(1, 2)
            .reshape([b, c, h, w]);
        x + conv2d_forward(&self.proj_out, out)
    }
}

/// `LinAttnBlock` = `LinearAttention(dim=C, heads=1, dim_head=C)`: softmax over positions on the keys,
/// `context = k vᵀ`, `out = contextᵀ q`. Note: the reference applies **no** norm and **no** residual.
#[derive(Module, Debug)]
pub struct LinAttnBlock {
    /// Joint q/k/v projection (1x1 conv, no bias), channels `[q | k | v]`.
    pub to_qkv: Conv2d,
    /// Output projection (1x1 conv).
    pub to_out: Conv2d,
}

impl LinAttnBlock {
    /// Builds the block for `channels` channels.
    pub fn new(channels: usize, device: &Device) -> Self {
        Self {
            to_qkv: burn::nn::conv::Conv2dConfig::new([channels, 3 * channels], [1, 1])
                .with_bias(false)
                .init(device),
            to_out: conv2d(channels, channels, 1, 0, device),
        }
    }

    /// `[B, C, H, W]` → `[B, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let qkv = self.to_qkv.forward(x).reshape([b, 3, c, h * w]);
        let part = |i: usize| qkv.clone().narrow(1, i, 1).reshape([b, c, h * w]);
        let (q, k, v) = (part(0), softmax(part(1), 2), part(2));
        let context = k.matmul(v.swap_dims(1, 2)); // [B, C(d), C(e)]
        let out = context.swap_dims(1, 2).matmul(q); // [B, C(e), HW]
        self.to_out.forward(out.reshape([b, c, h, w]))
    }
}

/// The attention slot of a level or of the mid block, by [`AttnType`].
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum AttnLayer {
    /// [`AttnBlock`].
    Vanilla(AttnBlock),
    /// [`LinAttnBlock`].
    Linear(LinAttnBlock),
    /// `nn.Identity` (no parameters).
    Identity(Identity),
}

impl AttnLayer {
    /// Builds the layer `make_attn(channels, attn_type)` would build.
    pub fn new(
        attn_type: AttnType,
        channels: usize,
        norm_groups: usize,
        norm_eps: f64,
        device: &Device,
    ) -> Self {
        match attn_type {
            AttnType::Vanilla => {
                Self::Vanilla(AttnBlock::new(channels, norm_groups, norm_eps, device))
            }
            AttnType::Linear => Self::Linear(LinAttnBlock::new(channels, device)),
            AttnType::None => Self::Identity(Identity::new()),
        }
    }

    /// `[B, C, H, W]` → `[B, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Self::Vanilla(a) => a.forward(x),
            Self::Linear(a) => a.forward(x),
            Self::Identity(_) => x,
        }
    }
}

/// Nearest-neighbour x2 upsampling, optionally followed by a 3x3 conv.
#[derive(Module, Debug)]
pub struct Upsample {
    /// The 3x3 convolution (`with_conv`).
    pub conv: Option<Conv2d>,
}

impl Upsample {
    /// Builds the layer.
    pub fn new(channels: usize, with_conv: bool, device: &Device) -> Self {
        Self {
            conv: with_conv.then(|| conv2d(channels, channels, 3, 1, device)),
        }
    }

    /// `[B, C, H, W]` → `[B, C, 2H, 2W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let x = interpolate(
            x,
            InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([2 * h, 2 * w]),
        );
        match &self.conv {
            Some(conv) => conv2d_forward(conv, x),
            None => x,
        }
    }
}

/// Stride-2 downsampling: pad right and bottom by one, then a 3x3 stride-2 conv without padding
/// (the reference's asymmetric padding), or 2x2 average pooling.
#[derive(Module, Debug)]
pub struct Downsample {
    /// The stride-2 convolution (`with_conv`).
    pub conv: Option<Conv2d>,
    /// Average pooling (without conv).
    pub pool: Option<AvgPool2d>,
}

impl Downsample {
    /// Builds the layer.
    pub fn new(channels: usize, with_conv: bool, device: &Device) -> Self {
        if with_conv {
            let conv = burn::nn::conv::Conv2dConfig::new([channels, channels], [3, 3])
                .with_stride([2, 2])
                .init(device);
            Self {
                conv: Some(conv),
                pool: None,
            }
        } else {
            Self {
                conv: None,
                pool: Some(AvgPool2dConfig::new([2, 2]).with_strides([2, 2]).init()),
            }
        }
    }

    /// `[B, C, H, W]` → `[B, C, H/2, W/2]` (even sizes; odd sizes follow the reference's floor).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match (&self.conv, &self.pool) {
            (Some(conv), _) => conv.forward(x.pad((0, 1, 0, 1), 0.0)),
            (None, Some(pool)) => pool.forward(x),
            (None, None) => x,
        }
    }
}
