//! `UNetModel` hyper-parameters, named as in the CompVis `unet_config.params`, with presets.

use burn::config::Config;

/// UNet configuration. `-1` keeps the reference's meaning ("unset") for the head options.
#[derive(Config, Debug, PartialEq)]
pub struct UNetConfig {
    /// Nominal latent size (informational, as in the reference).
    #[config(default = 32)]
    pub image_size: usize,
    /// Input channels (latent + concat conditioning).
    #[config(default = 4)]
    pub in_channels: usize,
    /// Base width.
    #[config(default = 320)]
    pub model_channels: usize,
    /// Output channels.
    #[config(default = 4)]
    pub out_channels: usize,
    /// Residual blocks per level.
    #[config(default = 2)]
    pub num_res_blocks: usize,
    /// Downsampling factors (1, 2, 4, ...) at which attention is used.
    #[config(default = "vec![4, 2, 1]")]
    pub attention_resolutions: Vec<usize>,
    /// Dropout in the residual blocks and transformers.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Width multiplier per level.
    #[config(default = "vec![1, 2, 4, 4]")]
    pub channel_mult: Vec<usize>,
    /// Learned (conv) resampling.
    #[config(default = true)]
    pub conv_resample: bool,
    /// Number of classes for "adm"-style class conditioning (`label_emb`).
    pub num_classes: Option<usize>,
    /// Attention heads (-1: derive from `num_head_channels`).
    #[config(default = -1)]
    pub num_heads: isize,
    /// Channels per head (-1: derive from `num_heads`).
    #[config(default = -1)]
    pub num_head_channels: isize,
    /// Heads of the output blocks' `AttentionBlock`s (-1: `num_heads`).
    #[config(default = -1)]
    pub num_heads_upsample: isize,
    /// FiLM-style scale/shift from the time embedding.
    #[config(default = false)]
    pub use_scale_shift_norm: bool,
    /// Resample with up/down ResBlocks instead of Upsample/Downsample layers.
    #[config(default = false)]
    pub resblock_updown: bool,
    /// `QKVAttention` instead of `QKVAttentionLegacy`.
    #[config(default = false)]
    pub use_new_attention_order: bool,
    /// `SpatialTransformer` (cross-attention) instead of `AttentionBlock`.
    #[config(default = false)]
    pub use_spatial_transformer: bool,
    /// Transformer blocks per `SpatialTransformer`.
    #[config(default = 1)]
    pub transformer_depth: usize,
    /// Width of the cross-attention context.
    pub context_dim: Option<usize>,
    /// The reference's `legacy` head arithmetic (default true in the class; SD v1 sets false).
    #[config(default = true)]
    pub legacy: bool,
    /// SD2: Linear `proj_in`/`proj_out` in the transformers.
    #[config(default = false)]
    pub use_linear_in_transformer: bool,
}

impl UNetConfig {
    /// Checks what the reference asserts.
    pub fn validate(&self) -> crate::Result<()> {
        let err = |m: &str| Err(crate::Error::Config(m.to_string()));
        if self.use_spatial_transformer && self.context_dim.is_none() {
            return err("use_spatial_transformer needs context_dim");
        }
        if self.context_dim.is_some() && !self.use_spatial_transformer {
            return err("context_dim is set but use_spatial_transformer is false");
        }
        if self.num_heads == -1 && self.num_head_channels == -1 {
            return err("either num_heads or num_head_channels has to be set");
        }
        if self.channel_mult.is_empty() {
            return err("channel_mult must not be empty");
        }
        for m in &self.channel_mult {
            if !(self.model_channels * m).is_multiple_of(32) {
                return err("model_channels x channel_mult must be multiples of 32 (GroupNorm32)");
            }
        }
        Ok(())
    }

    /// Stable Diffusion v1 (`configs/stable-diffusion/v1-inference.yaml`): 859,520,964 parameters.
    pub fn sd_v1() -> Self {
        Self::new()
            .with_num_heads(8)
            .with_use_spatial_transformer(true)
            .with_context_dim(Some(768))
            .with_legacy(false)
    }

    /// LDM text-to-image 1.4B (`txt2img-1p4B-eval.yaml`, BERT context 1280).
    pub fn txt2img_1p4b() -> Self {
        Self::sd_v1().with_context_dim(Some(1280))
    }

    /// Class-conditional ImageNet, VQ-f8 (`cin-ldm-vq-f8.yaml`, `models/ldm/cin256`).
    pub fn cin_ldm_vq_f8() -> Self {
        Self::new()
            .with_model_channels(256)
            .with_channel_mult(vec![1, 2, 4])
            .with_num_head_channels(32)
            .with_use_spatial_transformer(true)
            .with_context_dim(Some(512))
    }

    /// Class-conditional ImageNet v2 (`cin256-v2.yaml`, VQ-f4 latents).
    pub fn cin256_v2() -> Self {
        Self::new()
            .with_image_size(64)
            .with_in_channels(3)
            .with_out_channels(3)
            .with_model_channels(192)
            .with_attention_resolutions(vec![8, 4, 2])
            .with_channel_mult(vec![1, 2, 3, 5])
            .with_num_heads(1)
            .with_use_spatial_transformer(true)
            .with_context_dim(Some(512))
    }

    /// Unconditional CelebA-HQ / FFHQ / LSUN-bedrooms, VQ-f4 (`celebahq-ldm-vq-4.yaml` and siblings).
    pub fn celebahq_ldm_vq_4() -> Self {
        Self::new()
            .with_image_size(64)
            .with_in_channels(3)
            .with_out_channels(3)
            .with_model_channels(224)
            .with_attention_resolutions(vec![8, 4, 2])
            .with_channel_mult(vec![1, 2, 3, 4])
            .with_num_head_channels(32)
    }

    /// Unconditional LSUN churches, KL-f8 (`lsun_churches-ldm-kl-8.yaml`).
    pub fn lsun_churches_ldm_kl_8() -> Self {
        Self::new()
            .with_model_channels(192)
            .with_attention_resolutions(vec![1, 2, 4, 8])
            .with_channel_mult(vec![1, 2, 2, 4, 4])
            .with_num_heads(8)
            .with_use_scale_shift_norm(true)
            .with_resblock_updown(true)
    }

    /// LDM super-resolution (`models/ldm/bsr_sr`): low-res image concatenated (3 + 3 channels).
    pub fn bsr_sr() -> Self {
        Self::new()
            .with_image_size(64)
            .with_in_channels(6)
            .with_out_channels(3)
            .with_model_channels(160)
            .with_attention_resolutions(vec![16, 8])
            .with_channel_mult(vec![1, 2, 2, 4])
            .with_num_head_channels(32)
    }

    /// LDM inpainting (`models/ldm/inpainting_big`): latent + masked-image latent + mask (3 + 3 + 1).
    pub fn inpainting_big() -> Self {
        Self::new()
            .with_image_size(64)
            .with_in_channels(7)
            .with_out_channels(3)
            .with_model_channels(256)
            .with_attention_resolutions(vec![8, 4, 2])
            .with_channel_mult(vec![1, 2, 3, 4])
            .with_num_heads(8)
            .with_resblock_updown(true)
    }

    /// Layout-to-image on OpenImages (`models/ldm/layout2img-openimages256`).
    pub fn layout2img_openimages256() -> Self {
        Self::new()
            .with_image_size(64)
            .with_in_channels(3)
            .with_out_channels(3)
            .with_model_channels(128)
            .with_attention_resolutions(vec![8, 4, 2])
            .with_channel_mult(vec![1, 2, 3, 4])
            .with_num_head_channels(32)
            .with_use_spatial_transformer(true)
            .with_transformer_depth(3)
            .with_context_dim(Some(512))
    }

    /// Semantic synthesis (`models/ldm/semantic_synthesis256`): segmentation concatenated.
    pub fn semantic_synthesis256() -> Self {
        Self::new()
            .with_image_size(64)
            .with_in_channels(6)
            .with_out_channels(3)
            .with_model_channels(128)
            .with_attention_resolutions(vec![32, 16, 8])
            .with_channel_mult(vec![1, 4, 8])
            .with_num_heads(8)
    }

    /// Text-to-image 256 with BERT 640 (`models/ldm/text2img256`).
    pub fn text2img256() -> Self {
        Self::new()
            .with_image_size(64)
            .with_in_channels(3)
            .with_out_channels(3)
            .with_model_channels(192)
            .with_attention_resolutions(vec![8, 4, 2])
            .with_channel_mult(vec![1, 2, 3, 5])
            .with_num_head_channels(32)
            .with_use_spatial_transformer(true)
            .with_context_dim(Some(640))
    }
}
