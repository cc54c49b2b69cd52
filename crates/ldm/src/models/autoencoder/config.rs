//! The `ddconfig` block of the CompVis first-stage YAML files, with the shipped configs as presets.

use burn::config::Config;
use serde::{Deserialize, Serialize};

/// Which attention the first stage uses (`attn_type` in CompVis `make_attn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttnType {
    /// Single-head spatial softmax attention ([`AttnBlock`](super::blocks::AttnBlock)).
    #[default]
    Vanilla,
    /// [`LinAttnBlock`](super::blocks::LinAttnBlock) (linear attention, no residual).
    Linear,
    /// No attention at all (`nn.Identity`, e.g. `vq-f4-noattn`).
    None,
}

/// Encoder/decoder hyper-parameters, named as in CompVis `ddconfig`.
#[derive(Config, Debug, PartialEq)]
pub struct DdConfig {
    /// Base channel count.
    #[config(default = 128)]
    pub ch: usize,
    /// Decoder output channels.
    #[config(default = 3)]
    pub out_ch: usize,
    /// Channel multiplier per level; the downsampling factor is `2^(len-1)`.
    #[config(default = "vec![1, 2, 4, 4]")]
    pub ch_mult: Vec<usize>,
    /// ResNet blocks per level (the decoder uses one more).
    #[config(default = 2)]
    pub num_res_blocks: usize,
    /// Resolutions (in pixels, counted from `resolution`) at which attention follows each block.
    #[config(default = "vec![]")]
    pub attn_resolutions: Vec<usize>,
    /// Dropout inside the ResNet blocks.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Learned (conv) resampling instead of nearest/avg-pool only.
    #[config(default = true)]
    pub resamp_with_conv: bool,
    /// Image channels.
    #[config(default = 3)]
    pub in_channels: usize,
    /// Nominal training resolution; only used to decide where attention goes.
    #[config(default = 256)]
    pub resolution: usize,
    /// Latent channels.
    #[config(default = 4)]
    pub z_channels: usize,
    /// Encoder outputs mean and log-variance (`2 * z_channels`).
    #[config(default = true)]
    pub double_z: bool,
    /// Attention flavour.
    #[config(default = "AttnType::Vanilla")]
    pub attn_type: AttnType,
    /// Decoder returns the features before `norm_out` (used by some LDM variants).
    #[config(default = false)]
    pub give_pre_end: bool,
    /// Decoder applies `tanh` at the end.
    #[config(default = false)]
    pub tanh_out: bool,
    /// GroupNorm epsilon (`Normalize` in the reference: 1e-6).
    #[config(default = 1e-6)]
    pub norm_eps: f64,
    /// GroupNorm groups (`Normalize`: 32; diffusers' `norm_num_groups`). 0 removes every
    /// normalisation layer: not in either reference, but GroupNorm subtracts each group's mean,
    /// which on flat-colour images (the demo's shapes) is the colour itself, and the autoencoder
    /// then needs many times more steps to learn colours.
    #[config(default = 32)]
    pub norm_groups: usize,
}

impl DdConfig {
    /// Spatial downsampling factor `f = 2^(levels-1)`.
    pub fn downsampling_factor(&self) -> usize {
        1 << (self.ch_mult.len().saturating_sub(1))
    }

    /// Checks what the reference would assert or crash on.
    pub fn validate(&self) -> crate::Result<()> {
        let err = |m: String| Err(crate::Error::Config(m));
        if self.ch_mult.is_empty() {
            return err("ch_mult must not be empty".into());
        }
        for m in &self.ch_mult {
            let c = self.ch * m;
            if c == 0 || (self.norm_groups > 0 && !c.is_multiple_of(self.norm_groups)) {
                return err(format!(
                    "channel count {c} (ch {} x mult {m}) is not a multiple of {} GroupNorm groups",
                    self.ch, self.norm_groups
                ));
            }
        }
        if self.norm_groups > 0 && !self.ch.is_multiple_of(self.norm_groups) {
            return err(format!(
                "ch {} is not a multiple of {} GroupNorm groups",
                self.ch, self.norm_groups
            ));
        }
        Ok(())
    }

    fn ldm(
        z_channels: usize,
        ch_mult: Vec<usize>,
        attn_resolutions: Vec<usize>,
        double_z: bool,
    ) -> Self {
        Self::new()
            .with_z_channels(z_channels)
            .with_ch_mult(ch_mult)
            .with_attn_resolutions(attn_resolutions)
            .with_double_z(double_z)
    }

    /// `models/first_stage_models/kl-f4`: z 3, mult [1,2,4].
    pub fn kl_f4() -> Self {
        Self::ldm(3, vec![1, 2, 4], vec![], true)
    }
    /// `kl-f8` (also the Stable Diffusion v1 VAE): z 4, mult [1,2,4,4].
    pub fn kl_f8() -> Self {
        Self::ldm(4, vec![1, 2, 4, 4], vec![], true)
    }
    /// `kl-f16`: z 16, mult [1,1,2,2,4], attention at 16.
    pub fn kl_f16() -> Self {
        Self::ldm(16, vec![1, 1, 2, 2, 4], vec![16], true)
    }
    /// `kl-f32`: z 64, mult [1,1,2,2,4,4], attention at 16 and 8.
    pub fn kl_f32() -> Self {
        Self::ldm(64, vec![1, 1, 2, 2, 4, 4], vec![16, 8], true)
    }
    /// `vq-f4`: z 3, mult [1,2,4].
    pub fn vq_f4() -> Self {
        Self::ldm(3, vec![1, 2, 4], vec![], false)
    }
    /// `vq-f4-noattn`: as `vq-f4` without any attention.
    pub fn vq_f4_noattn() -> Self {
        Self::vq_f4().with_attn_type(AttnType::None)
    }
    /// `vq-f8` and `vq-f8-n256`: z 4, mult [1,2,2,4], attention at 32.
    pub fn vq_f8() -> Self {
        Self::ldm(4, vec![1, 2, 2, 4], vec![32], false)
    }
    /// `vq-f16`: z 8, mult [1,1,2,2,4], attention at 16.
    pub fn vq_f16() -> Self {
        Self::ldm(8, vec![1, 1, 2, 2, 4], vec![16], false)
    }
}
