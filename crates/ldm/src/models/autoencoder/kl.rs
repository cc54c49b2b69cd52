//! `AutoencoderKL` (CompVis `ldm/models/autoencoder.py`).

use crate::nn::conv2d_forward;
use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor};

use super::config::DdConfig;
use super::decoder::Decoder;
use super::distribution::DiagonalGaussianDistribution;
use super::encoder::Encoder;
use crate::nn::conv2d;

/// Configuration of an [`AutoencoderKL`] (`ddconfig` + `embed_dim`).
#[derive(Config, Debug)]
pub struct AutoencoderKLConfig {
    /// Encoder/decoder configuration; `double_z` must be true.
    pub ddconfig: DdConfig,
    /// Latent channels after `quant_conv`.
    pub embed_dim: usize,
}

impl AutoencoderKLConfig {
    /// `kl-f4`.
    pub fn kl_f4() -> Self {
        Self::new(DdConfig::kl_f4(), 3)
    }
    /// `kl-f8`, the Stable Diffusion v1 VAE (83,653,863 parameters).
    pub fn kl_f8() -> Self {
        Self::new(DdConfig::kl_f8(), 4)
    }
    /// `kl-f16`.
    pub fn kl_f16() -> Self {
        Self::new(DdConfig::kl_f16(), 16)
    }
    /// `kl-f32`.
    pub fn kl_f32() -> Self {
        Self::new(DdConfig::kl_f32(), 64)
    }

    /// Checks the configuration.
    pub fn validate(&self) -> crate::Result<()> {
        self.ddconfig.validate()?;
        if !self.ddconfig.double_z {
            return Err(crate::Error::Config(
                "AutoencoderKL needs ddconfig.double_z = true".into(),
            ));
        }
        Ok(())
    }

    /// Builds the model (parameters are allocated lazily, on first use or load).
    pub fn init(&self, device: &Device) -> AutoencoderKL {
        let z = self.ddconfig.z_channels;
        AutoencoderKL {
            encoder: Encoder::new(&self.ddconfig, device),
            decoder: Decoder::new(&self.ddconfig, device),
            quant_conv: conv2d(2 * z, 2 * self.embed_dim, 1, 0, device),
            post_quant_conv: conv2d(self.embed_dim, z, 1, 0, device),
        }
    }
}

/// KL-regularised autoencoder: images ↔ latents with a diagonal Gaussian posterior.
#[derive(Module, Debug)]
pub struct AutoencoderKL {
    /// Image → moments.
    pub encoder: Encoder,
    /// Latent → image.
    pub decoder: Decoder,
    /// 1x1 conv on the moments (`2z → 2·embed_dim`).
    pub quant_conv: Conv2d,
    /// 1x1 conv before the decoder (`embed_dim → z`).
    pub post_quant_conv: Conv2d,
}

impl AutoencoderKL {
    /// `[B, 3, H, W]` in [-1, 1] → posterior over `[B, embed_dim, H/f, W/f]`.
    pub fn encode(&self, x: Tensor<4>) -> DiagonalGaussianDistribution {
        DiagonalGaussianDistribution::new(conv2d_forward(&self.quant_conv, self.encoder.forward(x)))
    }

    /// `[B, embed_dim, h, w]` → `[B, 3, h·f, w·f]`.
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        self.decoder
            .forward(conv2d_forward(&self.post_quant_conv, z))
    }

    /// Reconstruction through a posterior sample (`sample_posterior`) or its mode.
    pub fn forward(
        &self,
        x: Tensor<4>,
        sample_posterior: bool,
    ) -> (Tensor<4>, DiagonalGaussianDistribution) {
        let posterior = self.encode(x);
        let z = if sample_posterior {
            posterior.sample()
        } else {
            posterior.mode()
        };
        (self.decode(z), posterior)
    }

    /// The weight the adaptive GAN weight differentiates against (`decoder.conv_out.weight`).
    pub fn last_layer(&self) -> Tensor<4> {
        self.decoder.conv_out.weight.val()
    }
}
