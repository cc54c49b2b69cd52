//! The sampling loop shared by every scheduler.

use burn::tensor::Tensor;

use super::{Denoiser, NoiseKind, NoiseSource, Scheduler};
use crate::error::{Error, Result};

/// Mask blending for inpainting with any model (CompVis `DDIMSampler.sample(mask=, x0=)`): before
/// each step the known region is replaced by `x0` noised to the step's level.
#[derive(Debug, Clone)]
pub struct Inpainting {
    /// `[B or 1, 1 or C, H, W]`, 1 where `x0` is kept, 0 where the model fills in.
    pub mask: Tensor<4>,
    /// The clean latent of the known image, `[B, C, H, W]`.
    pub x0: Tensor<4>,
}

/// What the per-step callback sees.
#[derive(Debug)]
pub struct StepInfo<'a> {
    /// Step index (0-based, counting from the first step actually run).
    pub step: usize,
    /// Number of steps that will run.
    pub total: usize,
    /// The model timestep of this step.
    pub timestep: f64,
    /// The latent after the step.
    pub x: &'a Tensor<4>,
    /// The step's estimate of the clean latent.
    pub pred_x0: &'a Tensor<4>,
}

/// Options of [`sample`].
#[derive(Default)]
pub struct SampleOptions<'a> {
    /// First step to run (img2img: the start index; the input must be at that step's noise level).
    pub start: usize,
    /// Mask blending (inpainting with a non-inpainting model).
    pub inpainting: Option<Inpainting>,
    /// Called after every step (progress bars, previews).
    pub callback: Option<&'a mut dyn FnMut(StepInfo<'_>)>,
}

/// Runs `scheduler` from step `opts.start` on `x` (already at that step's noise level, e.g.
/// `noise · init_noise_sigma()` for a full run) and returns the final latent.
///
/// Errors if the model produces a non-finite value (reported with the step), so a NaN never
/// reaches the decoder silently.
pub fn sample(
    scheduler: &mut dyn Scheduler,
    model: &mut dyn Denoiser,
    mut x: Tensor<4>,
    noise: &mut dyn NoiseSource,
    mut opts: SampleOptions<'_>,
) -> Result<Tensor<4>> {
    let timesteps = scheduler.timesteps();
    let n = timesteps.len();
    if opts.start > n {
        return Err(Error::Config(format!(
            "start step {} is past the {n} steps of {}",
            opts.start,
            scheduler.name()
        )));
    }
    if let Some(inp) = &opts.inpainting {
        let [b, c, h, w] = x.dims();
        let [mb, mc, mh, mw] = inp.mask.dims();
        if inp.x0.dims() != x.dims()
            || (mb != 1 && mb != b)
            || (mc != 1 && mc != c)
            || (mh, mw) != (h, w)
        {
            return Err(Error::Shape {
                what: "inpainting mask / x0".into(),
                expected: format!("mask [{b}|1, {c}|1, {h}, {w}] and x0 {:?}", x.dims()),
                got: [inp.mask.dims().to_vec(), inp.x0.dims().to_vec()].concat(),
            });
        }
    }
    scheduler.reset();
    // `index` is the step's number for the scheduler and the noise source, not only a position.
    #[allow(clippy::needless_range_loop)]
    for index in opts.start..n {
        if let Some(inp) = &opts.inpainting {
            let z = noise.noise(NoiseKind::Blend, index, x.dims(), &x.device())?;
            let known = scheduler.add_noise(inp.x0.clone(), z, index);
            let keep = inp.mask.clone();
            x = known * keep.clone() + x * keep.neg().add_scalar(1.0);
        }
        let out = scheduler.step(index, x, model, noise)?;
        x = out.prev_sample;
        // One reduction: the sum is non-finite iff some element is (or, harmlessly, on overflow).
        if !x.clone().sum().into_scalar::<f32>().is_finite() {
            return Err(Error::Input(format!(
                "{} step {index} (t = {}) produced NaN or infinite values",
                scheduler.name(),
                timesteps[index]
            )));
        }
        if let Some(cb) = opts.callback.as_mut() {
            cb(StepInfo {
                step: index - opts.start,
                total: n - opts.start,
                timestep: timesteps[index],
                x: &x,
                pred_x0: &out.pred_x0,
            });
        }
    }
    Ok(x)
}
