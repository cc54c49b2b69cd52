//! # ldm — Latent Diffusion Models on Burn
//!
//! A Rust port of CompVis' latent diffusion (Rombach et al., CVPR 2022) and Stable Diffusion v1 on the
//! [Burn](https://burn.dev) deep-learning framework (0.22). Modules follow the reference's module tree
//! one to one, so CompVis checkpoints load by name, and each one is checked numerically against the
//! reference in `tests/` (fixtures written by `xtask/fixtures/*.py` from the reference code).
//!
//! The backend is chosen by cargo features (`flex` — the default CPU backend —, `ndarray`, `wgpu`,
//! `vulkan`, `cuda`) and at run time by the [`Device`](burn::tensor::Device); see [`device`].
//!
//! ```no_run
//! use ldm::models::autoencoder::{AutoencoderKL, AutoencoderKLConfig};
//! use ldm::io::StateDict;
//!
//! # fn main() -> Result<(), ldm::Error> {
//! let device = ldm::device::parse_device("cpu")?;
//! let mut vae = AutoencoderKLConfig::kl_f8().init(&device);
//! let weights = StateDict::open("sd-v1-5.safetensors")?;
//! let report = vae.load_weights(&weights)?;   // fails naming any missing key
//! println!("{report}");
//! # Ok(()) }
//! ```

#[cfg(feature = "mimalloc")]
pub mod alloc;
pub mod conditioning;
pub mod demo;
pub mod device;
pub mod error;
pub mod io;
pub mod losses;
pub mod models;
pub mod nn;
pub mod pipelines;
pub mod schedulers;
#[cfg(feature = "train")]
pub mod training;

pub use burn;
pub use error::{Error, Result};
