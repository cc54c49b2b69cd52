//! The time-conditional UNet of LDM (CompVis `ldm/modules/diffusionmodules/openaimodel.py`).
//!
//! | reference | here |
//! |---|---|
//! | `timestep_embedding` | [`timestep_embedding`] |
//! | `ResBlock`, `Downsample`, `Upsample` | [`ResBlock`], [`Downsample`], [`Upsample`] |
//! | `AttentionBlock` + `QKVAttentionLegacy` / `QKVAttention` | [`AttentionBlock`] |
//! | `SpatialTransformer` & co. | [`crate::models::attention`] |
//! | `UNetModel` | [`UNetModel`], configured by [`UNetConfig`] (presets for the CompVis/SD configs) |

mod attention_block;
mod blocks;
mod config;
mod embedding;
mod model;

pub use attention_block::AttentionBlock;
pub use blocks::{Downsample, ResBlock, ResBlockConfig, Upsample};
pub use config::UNetConfig;
pub use embedding::timestep_embedding;
pub use model::{UNetLayer, UNetModel};
