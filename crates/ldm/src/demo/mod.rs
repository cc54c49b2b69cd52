//! The built-in demo model: a small text-to-image LDM for 64x64 "shapes" images
//! (`a large red circle on a blue background`), trained by this project with its own trainers
//! (`cargo xtask train-demo`: [`shapes`] dataset → KL-f4 autoencoder → UNet + BERT-style encoder).
//!
//! Its f16 weights are compiled into the library, so `ldm txt2img --prompt ...` works with no
//! download; [`Pipeline::demo`](crate::pipelines::Pipeline::demo) loads it.

pub mod shapes;

use crate::io::StateDict;
use crate::{Error, Result};

/// The demo model's CompVis YAML (the one it was trained with).
pub const CONFIG_YAML: &str = include_str!("../../assets/demo/config.yaml");

/// The demo autoencoder's training YAML.
pub const AUTOENCODER_YAML: &str = include_str!("../../assets/demo/autoencoder.yaml");

/// Name the demo model reports in logs and PNG metadata.
pub const NAME: &str = "ldm-demo-shapes";

/// The demo model's default classifier-free guidance scale (`ldm txt2img` without `--scale`,
/// `ldm eval shapes`). Lower than Stable Diffusion's 7.5, as the reference's scripts pick a scale
/// per model (LDM txt2img.py 5.0, SD 7.5): at 7.5 this small model oversaturates flat colours
/// into speckles. Chosen on the seen prompts of `ldm eval shapes`, not the held-out ones (the
/// README's demo section has the figures).
pub const GUIDANCE_SCALE: f64 = 2.0;

#[cfg(ldm_demo_weights)]
static WEIGHTS: &[u8] = include_bytes!("../../assets/demo/model.safetensors");
#[cfg(not(ldm_demo_weights))]
static WEIGHTS: &[u8] = &[];

/// The built-in weights (safetensors bytes), if this build has them.
pub fn weights() -> Option<&'static [u8]> {
    (!WEIGHTS.is_empty()).then_some(WEIGHTS)
}

/// The built-in weights as a state dict.
pub fn state_dict() -> Result<StateDict> {
    let bytes = weights().ok_or_else(|| {
        Error::Config(
            "this build has no demo model (crates/ldm/assets/demo/model.safetensors was absent at \
             build time; `cargo xtask train-demo` makes it): give --ckpt"
                .into(),
        )
    })?;
    StateDict::from_safetensors_bytes(bytes.to_vec(), format!("<built-in {NAME}>"))
}
