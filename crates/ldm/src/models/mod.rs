//! The networks of latent diffusion, each mirroring the reference's module tree so that checkpoint
//! keys map by name.
//!
//! - [`autoencoder`]: the first stage (`AutoencoderKL`, `VQModel`), as in CompVis
//!   `ldm/modules/diffusionmodules/model.py` and `ldm/models/autoencoder.py`.

pub mod autoencoder;
