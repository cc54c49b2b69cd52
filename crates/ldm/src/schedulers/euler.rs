//! Euler sampler in σ space (Karras et al. 2022, "Algorithm 2" without churn), as diffusers'
//! `EulerDiscreteScheduler`: x lives at scale √(σ²+1), the model sees x/√(σ²+1) at a (fractional)
//! timestep, x̂₀ = x − σ·ε, and x ← x + (x − x̂₀)/σ · (σ_next − σ).

use burn::config::Config;
use burn::tensor::Tensor;

use super::sigmas::Flavor;
use super::{
    Denoiser, DiffusionSchedule, NoiseSource, Parameterization, Scheduler, SigmaTables, StepOutput,
    TimestepSpacing,
};
use crate::error::Result;

/// [`Euler`] settings (diffusers' defaults).
#[derive(Config, Debug, PartialEq)]
pub struct EulerConfig {
    /// Number of steps.
    pub steps: usize,
    /// Karras σs (ρ = 7).
    #[config(default = false)]
    pub karras: bool,
    /// Timestep spacing.
    #[config(default = "TimestepSpacing::Linspace")]
    pub spacing: TimestepSpacing,
    /// Added to `leading` timesteps.
    #[config(default = 0)]
    pub steps_offset: usize,
}

impl EulerConfig {
    /// The sampler for a model trained on `schedule`.
    pub fn init(
        &self,
        schedule: &DiffusionSchedule,
        parameterization: Parameterization,
    ) -> Result<Euler> {
        Ok(Euler {
            tables: SigmaTables::new(
                schedule,
                Flavor::Euler,
                self.steps,
                self.spacing,
                self.steps_offset,
                self.karras,
            )?,
            spacing: self.spacing,
            parameterization,
        })
    }
}

/// The Euler sampler.
#[derive(Debug, Clone)]
pub struct Euler {
    /// Timesteps and σs.
    pub tables: SigmaTables,
    spacing: TimestepSpacing,
    parameterization: Parameterization,
}

/// x̂₀ from a σ-space sample `x` and the model output at x/√(σ²+1).
pub(crate) fn sigma_space_x0(
    parameterization: Parameterization,
    model: &mut dyn Denoiser,
    x: &Tensor<4>,
    sigma: f64,
    t: f64,
) -> Result<Tensor<4>> {
    let c_in = 1.0 / (sigma * sigma + 1.0).sqrt();
    let x_in = x.clone().mul_scalar(c_in);
    let out = model.predict(x_in.clone(), t)?;
    Ok(match parameterization {
        Parameterization::Eps => x.clone() - out.mul_scalar(sigma),
        Parameterization::V => {
            out.mul_scalar(-sigma * c_in) + x.clone().div_scalar(sigma * sigma + 1.0)
        }
        Parameterization::X0 => out,
    })
}

/// diffusers' `init_noise_sigma` for the Euler family.
pub(crate) fn euler_init_sigma(tables: &SigmaTables, spacing: TimestepSpacing) -> f64 {
    let max = tables.sigmas.iter().cloned().fold(0.0, f64::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    }
}

impl Scheduler for Euler {
    fn name(&self) -> &'static str {
        "euler"
    }

    fn timesteps(&self) -> Vec<f64> {
        self.tables.timesteps.clone()
    }

    fn init_noise_sigma(&self) -> f64 {
        euler_init_sigma(&self.tables, self.spacing)
    }

    fn add_noise(&self, x0: Tensor<4>, noise: Tensor<4>, index: usize) -> Tensor<4> {
        x0 + noise.mul_scalar(self.tables.sigmas[index])
    }

    fn step(
        &mut self,
        index: usize,
        x: Tensor<4>,
        model: &mut dyn Denoiser,
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let (sigma, sigma_next) = (self.tables.sigmas[index], self.tables.sigmas[index + 1]);
        let t = self.tables.timesteps[index];
        let pred_x0 = sigma_space_x0(self.parameterization, model, &x, sigma, t)?;
        let derivative = (x.clone() - pred_x0.clone()).div_scalar(sigma);
        let prev = x + derivative.mul_scalar(sigma_next - sigma);
        Ok(StepOutput {
            prev_sample: prev,
            pred_x0,
        })
    }
}
