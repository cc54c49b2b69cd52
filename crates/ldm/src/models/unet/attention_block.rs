//! The legacy non-spatial `AttentionBlock` (unconditional and concat-conditioned LDMs).

use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::{Conv1d, Conv1dConfig};
use burn::tensor::{Device, Tensor};

use super::blocks::normalization;
use crate::nn::attention::{AttentionMode, scaled_dot_product};

/// `AttentionBlock`: GroupNorm32, `qkv` Conv1d(C, 3C, 1), multi-head attention, `proj_out` Conv1d, residual.
///
/// `QKVAttentionLegacy` (the default) lays the qkv channels out per head as `[q_h | k_h | v_h]`;
/// `QKVAttention` (`use_new_attention_order`) as `[q (all heads) | k | v]`. Both scale q and k by
/// `ch^-1/4`, i.e. scores by `ch^-1/2`.
#[derive(Module, Debug)]
pub struct AttentionBlock {
    /// GroupNorm32.
    pub norm: GroupNorm,
    /// Conv1d C → 3C.
    pub qkv: Conv1d,
    /// Conv1d C → C.
    pub proj_out: Conv1d,
    heads: usize,
    new_order: bool,
    /// How the attention core runs.
    #[module(skip)]
    pub attention_mode: AttentionMode,
}

impl AttentionBlock {
    /// `AttentionBlock(channels, num_heads, num_head_channels, use_new_attention_order)`; a
    /// `num_head_channels` of -1 means "use `num_heads`".
    pub fn new(
        channels: usize,
        num_heads: isize,
        num_head_channels: isize,
        new_order: bool,
        device: &Device,
    ) -> crate::Result<Self> {
        let heads = if num_head_channels == -1 {
            num_heads
        } else {
            if num_head_channels <= 0 || !channels.is_multiple_of(num_head_channels as usize) {
                return Err(crate::Error::Config(format!(
                    "attention channels {channels} are not divisible by num_head_channels {num_head_channels}"
                )));
            }
            (channels / num_head_channels as usize) as isize
        };
        if heads <= 0 || !channels.is_multiple_of(heads as usize) {
            return Err(crate::Error::Config(format!(
                "attention channels {channels} do not split into {heads} heads"
            )));
        }
        let conv1d = |o: usize| Conv1dConfig::new(channels, o, 1).init(device);
        Ok(Self {
            norm: normalization(channels, device),
            qkv: conv1d(3 * channels),
            proj_out: conv1d(channels),
            heads: heads as usize,
            new_order,
            attention_mode: AttentionMode::auto(),
        })
    }

    /// `[B, C, H, W]` → `[B, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let t = h * w;
        let x = x.reshape([b, c, t]);
        let qkv = self.qkv.forward(self.norm.forward(x.clone())); // [B, 3C, T]
        let (heads, ch) = (self.heads, c / self.heads);
        // -> [3, B, heads, ch, T] in the layout of the chosen attention order
        let qkv = if self.new_order {
            qkv.reshape([b, 3, heads, ch, t]).swap_dims(0, 1)
        } else {
            qkv.reshape([b, heads, 3, ch, t]).permute([2, 0, 1, 3, 4])
        };
        let part = |i: usize| {
            qkv.clone()
                .narrow(0, i, 1)
                .reshape([b, heads, ch, t])
                .swap_dims(2, 3)
        }; // [B, H, T, ch]
        let out = scaled_dot_product(
            part(0),
            part(1),
            part(2),
            (ch as f64).powf(-0.5),
            self.attention_mode,
        );
        let out = out.swap_dims(2, 3).reshape([b, c, t]); // heads back to channels
        (x + self.proj_out.forward(out)).reshape([b, c, h, w])
    }
}
