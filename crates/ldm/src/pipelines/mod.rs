//! Putting the parts together: conditioning routing (CompVis `DiffusionWrapper`), classifier-free
//! guidance, and the [`LatentDiffusion`] model with its text-to-image, class-conditional,
//! unconditional, img2img, inpainting and super-resolution pipelines.

mod guidance;
mod latent_diffusion;
mod pipeline;

pub use pipeline::{Pipeline, PipelineOptions, load_tokenizer};

pub use guidance::{Conditioning, ConditioningKey, DiffusionModel, DiffusionWrapper, Guided};
pub use latent_diffusion::{
    CondStage, FirstStage, Generated, Img2ImgNoising, LatentDiffusion, SamplingRequest,
    images_to_rgb8, run_request,
};
