//! Training (feature `train`): image-folder data, the first-stage (autoencoder + PatchGAN) trainer
//! in Burn's `Learner` with its dashboard.

pub mod autoencoder;
pub mod data;
pub mod diffusion;
pub mod metrics;
mod shared;
