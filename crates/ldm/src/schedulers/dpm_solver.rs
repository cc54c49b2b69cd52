//! DPM-Solver++ 2M (Lu et al. 2022), the multistep second-order solver in data prediction, as
//! diffusers' `DPMSolverMultistepScheduler` (`algorithm_type="dpmsolver++"`, `solver_order=2`,
//! `solver_type="midpoint"`, `lower_order_final`, final σ = 0). Works in variance-preserving space:
//! α_t = 1/√(σ²+1), σ_t = σ·α_t, λ = ln α_t − ln σ_t; the first and the last steps are first order.

use burn::config::Config;
use burn::tensor::Tensor;

use super::sigmas::Flavor;
use super::{
    Denoiser, DiffusionSchedule, NoiseSource, Parameterization, Scheduler, SigmaTables, StepOutput,
    TimestepSpacing,
};
use crate::error::Result;

/// [`DpmSolverMultistep`] settings (diffusers' defaults).
#[derive(Config, Debug, PartialEq)]
pub struct DpmSolverMultistepConfig {
    /// Number of steps.
    pub steps: usize,
    /// Karras σs (ρ = 7; timesteps rounded to integers).
    #[config(default = false)]
    pub karras: bool,
    /// Timestep spacing.
    #[config(default = "TimestepSpacing::Linspace")]
    pub spacing: TimestepSpacing,
    /// Added to `leading` timesteps.
    #[config(default = 0)]
    pub steps_offset: usize,
    /// First-order steps at the end when fewer than 15 steps (diffusers' `lower_order_final`).
    #[config(default = true)]
    pub lower_order_final: bool,
}

impl DpmSolverMultistepConfig {
    /// The sampler for a model trained on `schedule`.
    pub fn init(
        &self,
        schedule: &DiffusionSchedule,
        parameterization: Parameterization,
    ) -> Result<DpmSolverMultistep> {
        Ok(DpmSolverMultistep {
            tables: SigmaTables::new(
                schedule,
                Flavor::DpmSolver,
                self.steps,
                self.spacing,
                self.steps_offset,
                self.karras,
            )?,
            parameterization,
            lower_order_final: self.lower_order_final,
            previous: None,
        })
    }
}

/// The DPM-Solver++ 2M sampler (stateful: keeps the previous x̂₀).
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    /// Timesteps and σs.
    pub tables: SigmaTables,
    parameterization: Parameterization,
    lower_order_final: bool,
    /// (x̂₀, step index) of the previous step.
    previous: Option<(Tensor<4>, usize)>,
}

/// (α_t, σ_t, λ_t) of a Karras σ.
fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

impl Scheduler for DpmSolverMultistep {
    fn name(&self) -> &'static str {
        "dpm++2m"
    }

    fn timesteps(&self) -> Vec<f64> {
        self.tables.timesteps.clone()
    }

    fn add_noise(&self, x0: Tensor<4>, noise: Tensor<4>, index: usize) -> Tensor<4> {
        let (alpha, sigma_t, _) = alpha_sigma_lambda(self.tables.sigmas[index]);
        x0.mul_scalar(alpha) + noise.mul_scalar(sigma_t)
    }

    fn reset(&mut self) {
        self.previous = None;
    }

    fn step(
        &mut self,
        index: usize,
        x: Tensor<4>,
        model: &mut dyn Denoiser,
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let n = self.tables.timesteps.len();
        let sigma_s0 = self.tables.sigmas[index];
        let t = self.tables.timesteps[index];
        let out = model.predict(x.clone(), t)?;
        let alpha_bar = 1.0 / (sigma_s0 * sigma_s0 + 1.0);
        let m0 = self.parameterization.eps_and_x0(out, &x, alpha_bar).1;

        let sigma_next = self.tables.sigmas[index + 1];
        let last = index + 1 == n;
        // Final σ = 0 always takes a first-order step (its λ is infinite): x ← x̂₀.
        let prev = if sigma_next == 0.0 {
            m0.clone()
        } else {
            let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(sigma_next);
            let (_, sigma_s, lambda_s0) = alpha_sigma_lambda(sigma_s0);
            let h = lambda_t - lambda_s0;
            let first_order = match &self.previous {
                None => true,
                Some((_, i)) => *i + 1 != index,
            } || (last && self.lower_order_final && n < 15);
            let base = x.mul_scalar(sigma_t / sigma_s)
                - m0.clone().mul_scalar(alpha_t * ((-h).exp() - 1.0));
            if first_order {
                base
            } else {
                let (m1, _) = self.previous.as_ref().expect("checked above");
                let sigma_s1 = self.tables.sigmas[index - 1];
                let (_, _, lambda_s1) = alpha_sigma_lambda(sigma_s1);
                let r0 = (lambda_s0 - lambda_s1) / h;
                let d1 = (m0.clone() - m1.clone()).div_scalar(r0);
                base - d1.mul_scalar(0.5 * alpha_t * ((-h).exp() - 1.0))
            }
        };
        self.previous = Some((m0.clone(), index));
        Ok(StepOutput {
            prev_sample: prev,
            pred_x0: m0,
        })
    }
}
