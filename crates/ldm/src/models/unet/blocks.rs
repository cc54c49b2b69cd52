//! `ResBlock`, `Downsample`, `Upsample` of the UNet (not the autoencoder's: GroupNorm eps 1e-5,
//! symmetric padding, time-embedding input).

use crate::nn::{conv2d_forward, group_norm_silu};
use burn::config::Config;
use burn::module::Module;
use burn::nn::activation::SiLU;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AvgPool2d, AvgPool2dConfig};
use burn::nn::{Dropout, DropoutConfig, GroupNorm, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor};

use crate::nn::{conv2d, group_norm};

/// GroupNorm32 of the UNet: 32 groups, eps 1e-5.
pub(crate) fn normalization(c: usize, device: &Device) -> GroupNorm {
    group_norm(32, c, 1e-5, device)
}

fn nearest_x2(x: Tensor<4>) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    interpolate(
        x,
        InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([2 * h, 2 * w]),
    )
}

/// Nearest x2 upsampling, optionally followed by a 3x3 conv (`conv`).
#[derive(Module, Debug)]
pub struct Upsample {
    /// 3x3 conv (`use_conv`).
    pub conv: Option<Conv2d>,
}

impl Upsample {
    /// `Upsample(channels, use_conv, out_channels)`.
    pub fn new(channels: usize, use_conv: bool, out_channels: usize, device: &Device) -> Self {
        Self {
            conv: use_conv.then(|| conv2d(channels, out_channels, 3, 1, device)),
        }
    }

    /// `[B, C, H, W]` → `[B, C', 2H, 2W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = nearest_x2(x);
        match &self.conv {
            Some(c) => conv2d_forward(c, x),
            None => x,
        }
    }
}

/// Stride-2 3x3 conv with symmetric padding 1 (`op`), or 2x2 average pooling.
#[derive(Module, Debug)]
pub struct Downsample {
    /// The strided conv (`use_conv`).
    pub op: Option<Conv2d>,
    /// Average pooling otherwise.
    pub pool: Option<AvgPool2d>,
}

impl Downsample {
    /// `Downsample(channels, use_conv, out_channels)`.
    pub fn new(channels: usize, use_conv: bool, out_channels: usize, device: &Device) -> Self {
        if use_conv {
            let op = Conv2dConfig::new([channels, out_channels], [3, 3])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device);
            Self {
                op: Some(op),
                pool: None,
            }
        } else {
            Self {
                op: None,
                pool: Some(AvgPool2dConfig::new([2, 2]).with_strides([2, 2]).init()),
            }
        }
    }

    /// `[B, C, H, W]` → `[B, C', ⌈H/2⌉, ⌈W/2⌉]` (conv) or `⌊H/2⌋` (pool).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match (&self.op, &self.pool) {
            (Some(op), _) => op.forward(x),
            (None, Some(pool)) => pool.forward(x),
            (None, None) => x,
        }
    }
}

/// Configuration of a [`ResBlock`].
#[derive(Config, Debug)]
pub struct ResBlockConfig {
    /// Input channels.
    pub channels: usize,
    /// Width of the time embedding.
    pub emb_channels: usize,
    /// Output channels (default: `channels`).
    pub out_channels: Option<usize>,
    /// Dropout before the last conv.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// 3x3 instead of 1x1 skip conv when the channel count changes.
    #[config(default = false)]
    pub use_conv: bool,
    /// FiLM-like `norm(h)·(1 + scale) + shift` from the embedding (scale first).
    #[config(default = false)]
    pub use_scale_shift_norm: bool,
    /// Nearest-x2 upsampling inside the block (`resblock_updown`).
    #[config(default = false)]
    pub up: bool,
    /// 2x2 average-pool downsampling inside the block (`resblock_updown`).
    #[config(default = false)]
    pub down: bool,
}

/// The UNet's residual block with timestep-embedding input.
#[derive(Module, Debug)]
pub struct ResBlock {
    /// GroupNorm32, SiLU, 3x3 conv.
    pub in_layers: (GroupNorm, SiLU, Conv2d),
    /// SiLU, Linear(emb → out or 2·out).
    pub emb_layers: (SiLU, Linear),
    /// GroupNorm32, SiLU, Dropout, 3x3 conv.
    pub out_layers: (GroupNorm, SiLU, Dropout, Conv2d),
    /// Skip projection when the channel count changes.
    pub skip_connection: Option<Conv2d>,
    use_scale_shift_norm: bool,
    up: bool,
    down: bool,
}

impl ResBlockConfig {
    /// Builds the block.
    pub fn init(&self, device: &Device) -> ResBlock {
        let (c, o) = (self.channels, self.out_channels.unwrap_or(self.channels));
        let emb_out = if self.use_scale_shift_norm { 2 * o } else { o };
        let skip_connection = match (c == o, self.use_conv) {
            (true, _) => None,
            (false, true) => Some(conv2d(c, o, 3, 1, device)),
            (false, false) => Some(conv2d(c, o, 1, 0, device)),
        };
        ResBlock {
            in_layers: (
                normalization(c, device),
                SiLU::new(),
                conv2d(c, o, 3, 1, device),
            ),
            emb_layers: (
                SiLU::new(),
                LinearConfig::new(self.emb_channels, emb_out).init(device),
            ),
            out_layers: (
                normalization(o, device),
                SiLU::new(),
                DropoutConfig::new(self.dropout).init(),
                conv2d(o, o, 3, 1, device),
            ),
            skip_connection,
            use_scale_shift_norm: self.use_scale_shift_norm,
            up: self.up,
            down: self.down,
        }
    }
}

impl ResBlock {
    fn resample(&self, x: Tensor<4>) -> Tensor<4> {
        if self.up {
            nearest_x2(x)
        } else if self.down {
            AvgPool2dConfig::new([2, 2])
                .with_strides([2, 2])
                .init()
                .forward(x)
        } else {
            x
        }
    }

    /// `x` `[B, C, H, W]`, `emb` `[B, emb_channels]` → `[B, C_out, H', W']`.
    pub fn forward(&self, x: Tensor<4>, emb: Tensor<2>) -> Tensor<4> {
        let h = group_norm_silu(&self.in_layers.0, x.clone(), true);
        let (h, x) = if self.up || self.down {
            (self.resample(h), self.resample(x))
        } else {
            (h, x)
        };
        let h = conv2d_forward(&self.in_layers.2, h);
        let e = self
            .emb_layers
            .1
            .forward(self.emb_layers.0.forward(emb))
            .unsqueeze_dims::<4>(&[2, 3]);
        let (norm, act, drop, conv) = (
            &self.out_layers.0,
            &self.out_layers.1,
            &self.out_layers.2,
            &self.out_layers.3,
        );
        let h = if self.use_scale_shift_norm {
            let mut parts = e.chunk(2, 1).into_iter();
            let (scale, shift) = (parts.next().expect("scale"), parts.next().expect("shift"));
            let h = group_norm_silu(norm, h, false) * (scale + 1.0) + shift;
            conv2d_forward(conv, drop.forward(act.forward(h)))
        } else {
            conv2d_forward(conv, drop.forward(group_norm_silu(norm, h + e, true)))
        };
        let skip = match &self.skip_connection {
            Some(c) => conv2d_forward(c, x),
            None => x,
        };
        skip + h
    }
}
