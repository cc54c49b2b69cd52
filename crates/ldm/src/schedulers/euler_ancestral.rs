//! Euler ancestral sampler, as diffusers' `EulerAncestralDiscreteScheduler` (k-diffusion's
//! `sample_euler_ancestral` with η = 1): an Euler step down to σ_down, then fresh noise of scale σ_up,
//! where σ_up² = σ_next²(σ² − σ_next²)/σ² and σ_down² = σ_next² − σ_up².

use burn::config::Config;
use burn::tensor::Tensor;

use super::euler::{euler_init_sigma, sigma_space_x0};
use super::sigmas::Flavor;
use super::{
    Denoiser, DiffusionSchedule, NoiseKind, NoiseSource, Parameterization, Scheduler, SigmaTables,
    StepOutput, TimestepSpacing,
};
use crate::error::Result;

/// [`EulerAncestral`] settings (diffusers' defaults).
#[derive(Config, Debug, PartialEq)]
pub struct EulerAncestralConfig {
    /// Number of steps.
    pub steps: usize,
    /// Timestep spacing.
    #[config(default = "TimestepSpacing::Linspace")]
    pub spacing: TimestepSpacing,
    /// Added to `leading` timesteps.
    #[config(default = 0)]
    pub steps_offset: usize,
}

impl EulerAncestralConfig {
    /// The sampler for a model trained on `schedule`.
    pub fn init(
        &self,
        schedule: &DiffusionSchedule,
        parameterization: Parameterization,
    ) -> Result<EulerAncestral> {
        Ok(EulerAncestral {
            tables: SigmaTables::new(
                schedule,
                Flavor::Euler,
                self.steps,
                self.spacing,
                self.steps_offset,
                false,
            )?,
            spacing: self.spacing,
            parameterization,
        })
    }
}

/// The Euler ancestral sampler.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    /// Timesteps and σs.
    pub tables: SigmaTables,
    spacing: TimestepSpacing,
    parameterization: Parameterization,
}

impl Scheduler for EulerAncestral {
    fn name(&self) -> &'static str {
        "euler-a"
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
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let (sigma, sigma_to) = (self.tables.sigmas[index], self.tables.sigmas[index + 1]);
        let t = self.tables.timesteps[index];
        let pred_x0 = sigma_space_x0(self.parameterization, model, &x, sigma, t)?;
        let sigma_up =
            (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
        let derivative = (x.clone() - pred_x0.clone()).div_scalar(sigma);
        let mut prev = x.clone() + derivative.mul_scalar(sigma_down - sigma);
        if sigma_up > 0.0 {
            let z = noise.noise(NoiseKind::Step, index, x.dims(), &x.device())?;
            prev = prev + z.mul_scalar(sigma_up);
        }
        Ok(StepOutput {
            prev_sample: prev,
            pred_x0,
        })
    }
}
