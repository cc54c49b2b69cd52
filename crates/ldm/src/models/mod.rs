//! The networks of latent diffusion, each mirroring the reference's module tree so that checkpoint
//! keys map by name.
//!
//! - [`autoencoder`]: the first stage (`AutoencoderKL`, `VQModel`), as in CompVis
//!   `ldm/modules/diffusionmodules/model.py` and `ldm/models/autoencoder.py`.
//! - [`attention`]: the spatial transformer with cross-attention (`ldm/modules/attention.py`).
//! - [`unet`]: the time-conditional UNet (`openaimodel.py`).

pub mod attention;
pub mod autoencoder;
pub mod unet;
