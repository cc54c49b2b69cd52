//! `Decoder`: latent → image (CompVis `model.py`).

use crate::nn::{conv2d_forward, maybe_group_norm_silu};
use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor};

use super::blocks::{AttnLayer, ResnetBlock, Upsample};
use super::config::DdConfig;
use super::encoder::{MidBlock, res_block};
use crate::nn::{conv2d, maybe_group_norm};

/// One resolution level of the decoder (`up[i]`; index = level, so `up[0]` runs last).
#[derive(Module, Debug)]
pub struct DecoderLevel {
    /// `num_res_blocks + 1` ResNet blocks.
    pub block: Vec<ResnetBlock>,
    /// Attention after each block (empty when this resolution has none).
    pub attn: Vec<AttnLayer>,
    /// Upsampling at the end (all but level 0).
    pub upsample: Option<Upsample>,
}

/// The first-stage decoder: `[B, z_channels, h, w]` → `[B, out_ch, h·f, w·f]`.
#[derive(Module, Debug)]
pub struct Decoder {
    /// Input 3x3 conv.
    pub conv_in: Conv2d,
    /// Middle block.
    pub mid: MidBlock,
    /// Levels, indexed by level (`up[0]` is the full-resolution one).
    pub up: Vec<DecoderLevel>,
    /// Output GroupNorm (absent with `norm_groups` 0).
    pub norm_out: Option<GroupNorm>,
    /// Output 3x3 conv; its weight is the "last layer" of the adaptive GAN weight.
    pub conv_out: Conv2d,
    give_pre_end: bool,
    tanh_out: bool,
}

impl Decoder {
    /// Builds the decoder of `cfg`.
    pub fn new(cfg: &DdConfig, device: &Device) -> Self {
        let levels = cfg.ch_mult.len();
        let mut block_in = cfg.ch * cfg.ch_mult[levels - 1];
        let mut curr_res = cfg.resolution >> (levels - 1);
        let conv_in = conv2d(cfg.z_channels, block_in, 3, 1, device);
        let mid = MidBlock::new(block_in, cfg, device);
        let mut up = Vec::with_capacity(levels);
        for i_level in (0..levels).rev() {
            let block_out = cfg.ch * cfg.ch_mult[i_level];
            let mut block = Vec::new();
            let mut attn = Vec::new();
            for _ in 0..=cfg.num_res_blocks {
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
            let upsample = (i_level != 0).then(|| {
                curr_res *= 2;
                Upsample::new(block_in, cfg.resamp_with_conv, device)
            });
            up.push(DecoderLevel {
                block,
                attn,
                upsample,
            });
        }
        up.reverse();
        Self {
            conv_in,
            mid,
            up,
            norm_out: maybe_group_norm(cfg.norm_groups, block_in, cfg.norm_eps, device),
            conv_out: conv2d(block_in, cfg.out_ch, 3, 1, device),
            give_pre_end: cfg.give_pre_end,
            tanh_out: cfg.tanh_out,
        }
    }

    /// `[B, z, h, w]` → `[B, out_ch, h·f, w·f]` (or the pre-`norm_out` features with `give_pre_end`).
    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let h = self.features(z);
        if self.give_pre_end {
            return h;
        }
        self.forward_parts_from(h).1
    }

    /// Returns `(input of conv_out, output)`: what the adaptive GAN weight needs to turn
    /// ∂loss/∂output into ∂loss/∂`conv_out.weight` without a second backward pass.
    pub fn forward_parts(&self, z: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let h = self.features(z);
        self.forward_parts_from(h)
    }

    fn features(&self, z: Tensor<4>) -> Tensor<4> {
        let mut h = self.mid.forward(conv2d_forward(&self.conv_in, z));
        for level in self.up.iter().rev() {
            for (i, block) in level.block.iter().enumerate() {
                h = block.forward(h, None);
                if let Some(attn) = level.attn.get(i) {
                    h = attn.forward(h);
                }
            }
            if let Some(up) = &level.upsample {
                h = up.forward(h);
            }
        }
        h
    }

    fn forward_parts_from(&self, h: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let pre = maybe_group_norm_silu(&self.norm_out, h, true);
        let out = conv2d_forward(&self.conv_out, pre.clone());
        let out = if self.tanh_out { out.tanh() } else { out };
        (pre, out)
    }
}
