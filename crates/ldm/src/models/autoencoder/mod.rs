//! First-stage autoencoders: the perceptual compression of LDM (paper §3.1).
//!
//! | reference (CompVis) | here |
//! |---|---|
//! | `ResnetBlock`, `AttnBlock`, `LinAttnBlock`, `Upsample`, `Downsample` | [`blocks`] |
//! | `Encoder`, `Decoder` | [`Encoder`], [`Decoder`] |
//! | `DiagonalGaussianDistribution` | [`DiagonalGaussianDistribution`] |
//! | `AutoencoderKL` | [`AutoencoderKL`] |
//! | taming `VectorQuantizer2`, `VQModel`, `VQModelInterface` | [`VectorQuantizer`], [`VQModel`] |

pub mod blocks;
mod config;
mod decoder;
mod distribution;
mod encoder;
mod kl;
mod vq;

pub use config::{AttnType, DdConfig};
pub use decoder::Decoder;
pub use distribution::DiagonalGaussianDistribution;
pub use encoder::Encoder;
pub use kl::{AutoencoderKL, AutoencoderKLConfig};
pub use vq::{VQModel, VQModelConfig, VectorQuantizer, VectorQuantizerConfig, VqOutput};
