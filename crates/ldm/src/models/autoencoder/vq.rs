//! `VectorQuantizer` (taming `VectorQuantizer2`) and `VQModel` / `VQModelInterface`
//! (CompVis `ldm/models/autoencoder.py`).

use crate::nn::conv2d_forward;
use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{Embedding, EmbeddingConfig, Initializer};
use burn::tensor::{Device, Int, Tensor};

use super::config::DdConfig;
use super::decoder::Decoder;
use super::encoder::Encoder;
use crate::nn::conv2d;

/// Configuration of a [`VectorQuantizer`].
#[derive(Config, Debug)]
pub struct VectorQuantizerConfig {
    /// Codebook size.
    pub n_embed: usize,
    /// Code dimension.
    pub embed_dim: usize,
    /// Commitment weight β.
    #[config(default = 0.25)]
    pub beta: f64,
    /// The reference's default (`legacy=True`): β multiplies the codebook term instead of the
    /// commitment term (a documented upstream bug kept for compatibility).
    #[config(default = true)]
    pub legacy: bool,
}

impl VectorQuantizerConfig {
    /// Builds the quantizer; the codebook starts as U(-1/n, 1/n) like the reference.
    pub fn init(&self, device: &Device) -> VectorQuantizer {
        let bound = 1.0 / self.n_embed as f64;
        VectorQuantizer {
            embedding: EmbeddingConfig::new(self.n_embed, self.embed_dim)
                .with_initializer(Initializer::Uniform {
                    min: -bound,
                    max: bound,
                })
                .init(device),
            beta: self.beta,
            legacy: self.legacy,
        }
    }
}

/// Nearest-neighbour vector quantisation with a straight-through gradient.
#[derive(Module, Debug)]
pub struct VectorQuantizer {
    /// The codebook `[n_embed, embed_dim]`.
    pub embedding: Embedding,
    beta: f64,
    legacy: bool,
}

/// What [`VectorQuantizer::forward`] returns.
#[derive(Debug, Clone)]
pub struct VqOutput {
    /// Quantised latent `[B, C, H, W]` (straight-through: its gradient flows to the input).
    pub quantized: Tensor<4>,
    /// Codebook + commitment loss (scalar, shape `[1]`).
    pub loss: Tensor<1>,
    /// Code indices `[B, H, W]`.
    pub indices: Tensor<3, Int>,
}

impl VectorQuantizer {
    /// Codebook size.
    pub fn n_embed(&self) -> usize {
        self.embedding.weight.shape()[0]
    }

    /// Code indices of `z` `[B, C, H, W]` → `[B, H, W]` (argmin of squared distance; first on ties).
    pub fn indices(&self, z: Tensor<4>) -> Tensor<3, Int> {
        let [b, c, h, w] = z.dims();
        let flat = z.permute([0, 2, 3, 1]).reshape([b * h * w, c]);
        let codebook = self.embedding.weight.val();
        // ‖z‖² + ‖e‖² − 2 z·eᵀ, as the reference computes it.
        let d = flat.clone().square().sum_dim(1)
            + codebook.clone().square().sum_dim(1).reshape([1, -1])
            - flat.matmul(codebook.transpose()).mul_scalar(2.0);
        d.argmin(1).reshape([b, h, w])
    }

    /// Quantises `z` `[B, C, H, W]`.
    pub fn forward(&self, z: Tensor<4>) -> VqOutput {
        let indices = self.indices(z.clone().detach());
        let z_q = self.get_codebook_entry(indices.clone());
        let commit = (z_q.clone().detach() - z.clone()).square().mean();
        let codebook = (z_q.clone() - z.clone().detach()).square().mean();
        let loss = if self.legacy {
            commit + codebook.mul_scalar(self.beta)
        } else {
            commit.mul_scalar(self.beta) + codebook
        };
        let quantized = z.clone() + (z_q - z).detach();
        VqOutput {
            quantized,
            loss,
            indices,
        }
    }

    /// Codebook vectors for `indices` `[B, H, W]` → `[B, C, H, W]`.
    pub fn get_codebook_entry(&self, indices: Tensor<3, Int>) -> Tensor<4> {
        let [b, h, w] = indices.dims();
        let codes = self
            .embedding
            .weight
            .val()
            .select(0, indices.reshape([b * h * w]));
        let c = codes.dims()[1];
        codes.reshape([b, h, w, c]).permute([0, 3, 1, 2])
    }
}

/// Configuration of a [`VQModel`].
#[derive(Config, Debug)]
pub struct VQModelConfig {
    /// Encoder/decoder configuration (`double_z` false).
    pub ddconfig: DdConfig,
    /// Codebook size.
    pub n_embed: usize,
    /// Code dimension.
    pub embed_dim: usize,
    /// Commitment weight β.
    #[config(default = 0.25)]
    pub beta: f64,
}

impl VQModelConfig {
    /// `vq-f4` (8192 codes of dim 3).
    pub fn vq_f4() -> Self {
        Self::new(DdConfig::vq_f4(), 8192, 3)
    }
    /// `vq-f4-noattn` (the first stage of `inpainting_big`).
    pub fn vq_f4_noattn() -> Self {
        Self::new(DdConfig::vq_f4_noattn(), 8192, 3)
    }
    /// `vq-f8` (16384 codes of dim 4).
    pub fn vq_f8() -> Self {
        Self::new(DdConfig::vq_f8(), 16384, 4)
    }
    /// `vq-f8-n256` (256 codes of dim 4).
    pub fn vq_f8_n256() -> Self {
        Self::new(DdConfig::vq_f8(), 256, 4)
    }
    /// `vq-f16` (16384 codes of dim 8).
    pub fn vq_f16() -> Self {
        Self::new(DdConfig::vq_f16(), 16384, 8)
    }

    /// Checks the configuration.
    pub fn validate(&self) -> crate::Result<()> {
        self.ddconfig.validate()?;
        if self.ddconfig.double_z {
            return Err(crate::Error::Config(
                "VQModel needs ddconfig.double_z = false".into(),
            ));
        }
        Ok(())
    }

    /// Builds the model.
    pub fn init(&self, device: &Device) -> VQModel {
        let z = self.ddconfig.z_channels;
        VQModel {
            encoder: Encoder::new(&self.ddconfig, device),
            decoder: Decoder::new(&self.ddconfig, device),
            quantize: VectorQuantizerConfig::new(self.n_embed, self.embed_dim)
                .with_beta(self.beta)
                .init(device),
            quant_conv: conv2d(z, self.embed_dim, 1, 0, device),
            post_quant_conv: conv2d(self.embed_dim, z, 1, 0, device),
        }
    }
}

/// Vector-quantised autoencoder. LDM diffuses its *pre-quantisation* latent
/// ([`encode_to_prequant`](Self::encode_to_prequant), `VQModelInterface.encode`) and quantises at
/// decode time ([`decode_latent`](Self::decode_latent)).
#[derive(Module, Debug)]
pub struct VQModel {
    /// Image → latent.
    pub encoder: Encoder,
    /// Latent → image.
    pub decoder: Decoder,
    /// The codebook.
    pub quantize: VectorQuantizer,
    /// 1x1 conv `z → embed_dim`.
    pub quant_conv: Conv2d,
    /// 1x1 conv `embed_dim → z`.
    pub post_quant_conv: Conv2d,
}

impl VQModel {
    /// `[B, 3, H, W]` → pre-quantisation latent `[B, embed_dim, H/f, W/f]`.
    pub fn encode_to_prequant(&self, x: Tensor<4>) -> Tensor<4> {
        conv2d_forward(&self.quant_conv, self.encoder.forward(x))
    }

    /// `VQModel.encode`: encode and quantise.
    pub fn encode(&self, x: Tensor<4>) -> VqOutput {
        self.quantize.forward(self.encode_to_prequant(x))
    }

    /// `VQModel.decode`: quantised latent → image.
    pub fn decode(&self, quant: Tensor<4>) -> Tensor<4> {
        self.decoder
            .forward(conv2d_forward(&self.post_quant_conv, quant))
    }

    /// Code indices `[B, h, w]` → image.
    pub fn decode_code(&self, indices: Tensor<3, Int>) -> Tensor<4> {
        self.decode(self.quantize.get_codebook_entry(indices))
    }

    /// `VQModelInterface.decode`: quantise `h` (unless `force_not_quantize`), then decode.
    pub fn decode_latent(&self, h: Tensor<4>, force_not_quantize: bool) -> Tensor<4> {
        let quant = if force_not_quantize {
            h
        } else {
            self.quantize.forward(h).quantized
        };
        self.decode(quant)
    }

    /// Reconstruction: `(decoded, codebook loss, indices)`.
    pub fn forward(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<1>, Tensor<3, Int>) {
        let q = self.encode(x);
        (self.decode(q.quantized), q.loss, q.indices)
    }

    /// The weight the adaptive GAN weight differentiates against (`decoder.conv_out.weight`).
    pub fn last_layer(&self) -> Tensor<4> {
        self.decoder.conv_out.weight.val()
    }
}
