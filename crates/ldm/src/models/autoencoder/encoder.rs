//! `Encoder`: image → latent moments (CompVis `model.py`).

use crate::nn::{conv2d_forward, maybe_group_norm_silu};
use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor};

use super::blocks::{AttnLayer, Downsample, ResnetBlock, ResnetBlockConfig};
use super::config::DdConfig;
use crate::nn::{conv2d, maybe_group_norm};

/// One resolution level of the encoder (`down[i]`).
#[derive(Module, Debug)]
pub struct EncoderLevel {
    /// ResNet blocks.
    pub block: Vec<ResnetBlock>,
    /// Attention after each block (empty when this resolution has none).
    pub attn: Vec<AttnLayer>,
    /// Downsampling at the end (all but the last level).
    pub downsample: Option<Downsample>,
}

/// The middle of encoder and decoder: ResNet, attention, ResNet.
#[derive(Module, Debug)]
pub struct MidBlock {
    /// First ResNet block.
    pub block_1: ResnetBlock,
    /// Attention.
    pub attn_1: AttnLayer,
    /// Second ResNet block.
    pub block_2: ResnetBlock,
}

impl MidBlock {
    pub(crate) fn new(c: usize, cfg: &DdConfig, device: &Device) -> Self {
        let block = || res_block(c, c, cfg, device);
        Self {
            block_1: block(),
            attn_1: AttnLayer::new(cfg.attn_type, c, cfg.norm_groups, cfg.norm_eps, device),
            block_2: block(),
        }
    }

    /// `[B, C, H, W]` → `[B, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self.block_1.forward(x, None);
        let h = self.attn_1.forward(h);
        self.block_2.forward(h, None)
    }
}

pub(crate) fn res_block(i: usize, o: usize, cfg: &DdConfig, device: &Device) -> ResnetBlock {
    ResnetBlockConfig::new(i, o)
        .with_dropout(cfg.dropout)
        .with_norm_eps(cfg.norm_eps)
        .with_norm_groups(cfg.norm_groups)
        .init(device)
}

/// The first-stage encoder: `[B, in_channels, H, W]` → `[B, 2·z_channels (double_z) | z_channels, H/f, W/f]`.
#[derive(Module, Debug)]
pub struct Encoder {
    /// Input 3x3 conv.
    pub conv_in: Conv2d,
    /// Levels, highest resolution first.
    pub down: Vec<EncoderLevel>,
    /// Middle block.
    pub mid: MidBlock,
    /// Output GroupNorm (absent with `norm_groups` 0).
    pub norm_out: Option<GroupNorm>,
    /// Output 3x3 conv.
    pub conv_out: Conv2d,
}

impl Encoder {
    /// Builds the encoder of `cfg` (call [`DdConfig::validate`] first for a friendly error).
    pub fn new(cfg: &DdConfig, device: &Device) -> Self {
        let levels = cfg.ch_mult.len();
        let mut curr_res = cfg.resolution;
        let mut block_in = cfg.ch;
        let mut down = Vec::with_capacity(levels);
        for (i_level, mult) in cfg.ch_mult.iter().enumerate() {
            let block_out = cfg.ch * mult;
            let mut block = Vec::new();
            let mut attn = Vec::new();
            for _ in 0..cfg.num_res_blocks {
                block.push(res_block(block_in, block_out, cfg, device));
                block_in = block_out;
                if cfg.attn_resolutions.contains(&curr_res) {
                    attn.push(AttnLayer::new(
                        cfg.attn_type,
                        block_in,
                        cfg.norm_groups,
                        cfg.norm_eps,
                        device,
                    ));
                }
            }
            let downsample = (i_level != levels - 1).then(|| {
                curr_res /= 2;
                Downsample::new(block_in, cfg.resamp_with_conv, device)
            });
            down.push(EncoderLevel {
                block,
                attn,
                downsample,
            });
        }
        let z_out = if cfg.double_z {
            2 * cfg.z_channels
        } else {
            cfg.z_channels
        };
        Self {
            conv_in: conv2d(cfg.in_channels, cfg.ch, 3, 1, device),
            down,
            mid: MidBlock::new(block_in, cfg, device),
            norm_out: maybe_group_norm(cfg.norm_groups, block_in, cfg.norm_eps, device),
            conv_out: conv2d(block_in, z_out, 3, 1, device),
        }
    }

    /// `[B, C, H, W]` → moments `[B, 2z | z, H/f, W/f]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = conv2d_forward(&self.conv_in, x);
        for level in &self.down {
            for (i, block) in level.block.iter().enumerate() {
                h = block.forward(h, None);
                if let Some(attn) = level.attn.get(i) {
                    h = attn.forward(h);
                }
            }
            if let Some(down) = &level.downsample {
                h = down.forward(h);
            }
        }
        let h = self.mid.forward(h);
        conv2d_forward(
            &self.conv_out,
            maybe_group_norm_silu(&self.norm_out, h, true),
        )
    }
}
