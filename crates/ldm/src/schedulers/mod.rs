//! The diffusion process and its samplers.
//!
//! - [`schedule`](DiffusionSchedule): β schedules and the tables CompVis `DDPM.register_schedule`
//!   derives (computed in f64), DDIM timestep/σ tables.
//! - One [`Scheduler`] trait, each sampler in its own file: [`Ddim`], [`Plms`], [`Ddpm`] (the
//!   reference's three, matched step for step), [`DpmSolverMultistep`] (DPM-Solver++ 2M),
//!   [`Euler`] and [`EulerAncestral`] (matched to diffusers).
//! - [`sample`]: the sampling loop (img2img start index, mask blending, per-step callback).
//!
//! A scheduler calls the model itself (through [`Denoiser`]), so multi-evaluation steps (PLMS's first
//! step) and input scaling (Euler) stay inside the scheduler. All samplers take their randomness from a
//! [`NoiseSource`]: a seeded host RNG or caller-supplied tensors.

mod ddim;
mod ddpm;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod noise;
mod plms;
mod sampling;
mod schedule;
mod sigmas;

use std::fmt;
use std::str::FromStr;

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use ddim::{Ddim, DdimConfig};
pub use ddpm::{Ddpm, DdpmConfig};
pub use dpm_solver::{DpmSolverMultistep, DpmSolverMultistepConfig};
pub use euler::{Euler, EulerConfig};
pub use euler_ancestral::{EulerAncestral, EulerAncestralConfig};
pub use noise::{FnNoise, NoiseKind, NoiseSource, SeededNoise};
pub use plms::{Plms, PlmsConfig};
pub use sampling::{Inpainting, SampleOptions, StepInfo, sample};
pub use schedule::{
    BetaSchedule, DdimDiscretization, DdimTables, DiffusionSchedule, ddim_tables, ddim_tables_for,
    ddim_timesteps, make_beta_schedule,
};
pub use sigmas::{SigmaTables, TimestepSpacing};

/// What the denoiser predicts (`parameterization` in CompVis configs, `prediction_type` in diffusers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parameterization {
    /// The added noise ε (LDM, SD v1).
    #[default]
    Eps,
    /// The clean sample x₀.
    X0,
    /// v = √ᾱ ε − √(1−ᾱ) x₀ (SD 2.x 768).
    V,
}

impl FromStr for Parameterization {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "eps" | "epsilon" => Ok(Self::Eps),
            "x0" | "sample" => Ok(Self::X0),
            "v" | "v_prediction" => Ok(Self::V),
            other => Err(Error::Config(format!(
                "unknown parameterization `{other}` (expected eps, x0 or v)"
            ))),
        }
    }
}

impl Parameterization {
    /// (ε, x̂₀) from the raw model output at `x` = √ᾱ x₀ + √(1−ᾱ) ε (variance-preserving space).
    pub fn eps_and_x0(
        self,
        out: Tensor<4>,
        x: &Tensor<4>,
        alpha_bar: f64,
    ) -> (Tensor<4>, Tensor<4>) {
        let (a, s) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
        match self {
            Self::Eps => {
                let x0 = (x.clone() - out.clone().mul_scalar(s)).div_scalar(a);
                (out, x0)
            }
            Self::X0 => {
                let eps = (x.clone() - out.clone().mul_scalar(a)).div_scalar(s);
                (eps, out)
            }
            Self::V => {
                let eps = out.clone().mul_scalar(a) + x.clone().mul_scalar(s);
                let x0 = x.clone().mul_scalar(a) - out.mul_scalar(s);
                (eps, x0)
            }
        }
    }
}

/// The model as a sampler sees it: raw output (ε, x₀ or v, per [`Parameterization`]) for the latent
/// `x` `[B, C, H, W]` at training timestep `t` (fractional for some schedulers). Classifier-free
/// guidance is applied inside (see `pipelines::Guided`).
pub trait Denoiser {
    /// One model evaluation.
    fn predict(&mut self, x: Tensor<4>, t: f64) -> Result<Tensor<4>>;
}

impl<F: FnMut(Tensor<4>, f64) -> Result<Tensor<4>>> Denoiser for F {
    fn predict(&mut self, x: Tensor<4>, t: f64) -> Result<Tensor<4>> {
        self(x, t)
    }
}

/// The result of one sampling step.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The latent after the step.
    pub prev_sample: Tensor<4>,
    /// The step's estimate of the clean latent.
    pub pred_x0: Tensor<4>,
}

/// A sampler over a fixed number of steps. Step `index` runs from the noise level of
/// `timesteps()[index]` to the next one (or to clean at the end).
pub trait Scheduler {
    /// Short name (`ddim`, `plms`, ...).
    fn name(&self) -> &'static str;

    /// The timestep the model sees at each step, in sampling order (decreasing).
    fn timesteps(&self) -> Vec<f64>;

    /// Number of steps.
    fn num_steps(&self) -> usize {
        self.timesteps().len()
    }

    /// Factor from unit-variance noise to x_T (1 for variance-preserving samplers; σ_max-based for
    /// the Euler family, which works in σ space).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// `x0` noised to the input level of step `index` (img2img start, mask blending).
    fn add_noise(&self, x0: Tensor<4>, noise: Tensor<4>, index: usize) -> Tensor<4>;

    /// Forgets the multistep history; [`sample`] calls it before the first step.
    fn reset(&mut self) {}

    /// Runs step `index` from `x`, calling `model` as often as the method needs.
    fn step(
        &mut self,
        index: usize,
        x: Tensor<4>,
        model: &mut dyn Denoiser,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput>;
}

/// The samplers, by their command-line names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SamplerKind {
    /// [`Ddim`] (`ddim`).
    #[default]
    Ddim,
    /// [`Plms`] (`plms`).
    Plms,
    /// [`Ddpm`] (`ddpm`).
    Ddpm,
    /// [`DpmSolverMultistep`] (`dpm++2m`).
    DpmPp2m,
    /// [`Euler`] (`euler`).
    Euler,
    /// [`EulerAncestral`] (`euler-a`).
    EulerAncestral,
}

impl SamplerKind {
    /// All kinds with their names.
    pub const ALL: [(Self, &'static str); 6] = [
        (Self::Ddim, "ddim"),
        (Self::Plms, "plms"),
        (Self::Ddpm, "ddpm"),
        (Self::DpmPp2m, "dpm++2m"),
        (Self::Euler, "euler"),
        (Self::EulerAncestral, "euler-a"),
    ];
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Self::ALL.iter().find(|(k, _)| k == self).map(|(_, n)| *n);
        f.write_str(name.unwrap_or("?"))
    }
}

impl FromStr for SamplerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.to_ascii_lowercase();
        let alias = match s.as_str() {
            "dpmpp2m" | "dpm++_2m" | "dpmpp_2m" | "dpm-solver++" => "dpm++2m",
            "euler_a" | "euler-ancestral" | "euler_ancestral" => "euler-a",
            other => other,
        };
        Self::ALL
            .iter()
            .find(|(_, n)| *n == alias)
            .map(|(k, _)| *k)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
                Error::Config(format!(
                    "unknown sampler `{s}`; expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// Everything needed to build any sampler; fields a sampler doesn't use are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplerOptions {
    /// Which sampler.
    pub kind: SamplerKind,
    /// Number of steps (DDPM: 0 means every training timestep, as the reference).
    pub steps: usize,
    /// DDIM η (0 = deterministic, 1 = DDPM-like); PLMS requires 0.
    pub eta: f64,
    /// DDIM/PLMS timestep selection.
    pub discretization: DdimDiscretization,
    /// Karras σs for DPM-Solver++ / Euler.
    pub karras: bool,
    /// Timestep spacing for DPM-Solver++ / Euler (diffusers' `timestep_spacing`).
    pub spacing: TimestepSpacing,
    /// diffusers' `steps_offset` (for `leading` spacing).
    pub steps_offset: usize,
    /// DDPM: clamp x̂₀ to [−1, 1] (the reference's `clip_denoised`).
    pub clip_denoised: bool,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            kind: SamplerKind::Ddim,
            steps: 50,
            eta: 0.0,
            discretization: DdimDiscretization::Uniform,
            karras: false,
            spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            clip_denoised: false,
        }
    }
}

impl SamplerOptions {
    /// A sampler of `kind` with `steps` steps and defaults otherwise.
    pub fn new(kind: SamplerKind, steps: usize) -> Self {
        Self {
            kind,
            steps,
            ..Self::default()
        }
    }

    /// Builds the sampler for a model trained on `schedule` with `parameterization`.
    pub fn build(
        &self,
        schedule: &DiffusionSchedule,
        parameterization: Parameterization,
    ) -> Result<Box<dyn Scheduler>> {
        Ok(match self.kind {
            SamplerKind::Ddim => Box::new(
                DdimConfig::new(self.steps)
                    .with_eta(self.eta)
                    .with_discretization(self.discretization)
                    .init(schedule, parameterization)?,
            ),
            SamplerKind::Plms => {
                if self.eta != 0.0 {
                    return Err(Error::Config(format!(
                        "PLMS requires eta = 0 (got {})",
                        self.eta
                    )));
                }
                Box::new(
                    PlmsConfig::new(self.steps)
                        .with_discretization(self.discretization)
                        .init(schedule, parameterization)?,
                )
            }
            SamplerKind::Ddpm => Box::new(
                DdpmConfig::new()
                    .with_steps(self.steps)
                    .with_clip_denoised(self.clip_denoised)
                    .init(schedule, parameterization)?,
            ),
            SamplerKind::DpmPp2m => Box::new(
                DpmSolverMultistepConfig::new(self.steps)
                    .with_karras(self.karras)
                    .with_spacing(self.spacing)
                    .with_steps_offset(self.steps_offset)
                    .init(schedule, parameterization)?,
            ),
            SamplerKind::Euler => Box::new(
                EulerConfig::new(self.steps)
                    .with_karras(self.karras)
                    .with_spacing(self.spacing)
                    .with_steps_offset(self.steps_offset)
                    .init(schedule, parameterization)?,
            ),
            SamplerKind::EulerAncestral => Box::new(
                EulerAncestralConfig::new(self.steps)
                    .with_spacing(self.spacing)
                    .with_steps_offset(self.steps_offset)
                    .init(schedule, parameterization)?,
            ),
        })
    }
}
