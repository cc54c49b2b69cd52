//! Ancestral DDPM sampling (Ho et al. 2020) as CompVis `LatentDiffusion.p_sample_loop`: x̂₀ from the
//! model (optionally clamped to [−1, 1]), the posterior mean `coef1·x̂₀ + coef2·x_t` and
//! `exp(½·log σ²_post)·z`, no noise at t = 0. With fewer steps than training timesteps the posterior
//! is taken between consecutive selected timesteps (ᾱ ratios), as diffusers' `DDPMScheduler` does;
//! with all of them it is the reference's tables exactly.

use burn::config::Config;
use burn::tensor::Tensor;

use super::{
    Denoiser, DiffusionSchedule, NoiseKind, NoiseSource, Parameterization, Scheduler, StepOutput,
};
use crate::error::{Error, Result};

/// [`Ddpm`] settings.
#[derive(Config, Debug, PartialEq)]
pub struct DdpmConfig {
    /// Number of steps; 0 = every training timestep (the reference).
    #[config(default = 0)]
    pub steps: usize,
    /// Clamp x̂₀ to [−1, 1] (the reference's `clip_denoised`; off by default for latents, whose
    /// range exceeds it).
    #[config(default = false)]
    pub clip_denoised: bool,
}

impl DdpmConfig {
    /// The sampler for a model trained on `schedule`.
    pub fn init(
        &self,
        schedule: &DiffusionSchedule,
        parameterization: Parameterization,
    ) -> Result<Ddpm> {
        let t_max = schedule.timesteps();
        let steps = if self.steps == 0 { t_max } else { self.steps };
        if steps > t_max {
            return Err(Error::Config(format!(
                "DDPM steps must be in 1..={t_max}, got {steps}"
            )));
        }
        // "leading" selection: 0, r, 2r, ... (all timesteps when steps = T).
        let ratio = t_max / steps;
        let timesteps: Vec<usize> = (0..steps).rev().map(|i| i * ratio).collect();
        let acp = |t: usize| schedule.alphas_cumprod[t];
        let mut rows = Vec::with_capacity(steps);
        for (i, &t) in timesteps.iter().enumerate() {
            let a_t = acp(t);
            let a_prev = timesteps.get(i + 1).map_or(1.0, |&p| acp(p));
            let (coef1, coef2, var) = if ratio == 1 {
                (
                    schedule.posterior_mean_coef1[t],
                    schedule.posterior_mean_coef2[t],
                    schedule.posterior_variance[t],
                )
            } else {
                let beta = 1.0 - a_t / a_prev;
                (
                    beta * a_prev.sqrt() / (1.0 - a_t),
                    (1.0 - beta).sqrt() * (1.0 - a_prev) / (1.0 - a_t),
                    beta * (1.0 - a_prev) / (1.0 - a_t),
                )
            };
            rows.push(Row {
                t,
                alpha_bar: a_t,
                coef1,
                coef2,
                std: (0.5 * var.max(1e-20).ln()).exp(),
            });
        }
        Ok(Ddpm {
            rows,
            parameterization,
            clip_denoised: self.clip_denoised,
        })
    }
}

#[derive(Debug, Clone)]
struct Row {
    t: usize,
    alpha_bar: f64,
    coef1: f64,
    coef2: f64,
    std: f64,
}

/// The ancestral sampler.
#[derive(Debug, Clone)]
pub struct Ddpm {
    rows: Vec<Row>,
    parameterization: Parameterization,
    clip_denoised: bool,
}

impl Scheduler for Ddpm {
    fn name(&self) -> &'static str {
        "ddpm"
    }

    fn timesteps(&self) -> Vec<f64> {
        self.rows.iter().map(|r| r.t as f64).collect()
    }

    fn add_noise(&self, x0: Tensor<4>, noise: Tensor<4>, index: usize) -> Tensor<4> {
        let a = self.rows[index].alpha_bar;
        x0.mul_scalar(a.sqrt()) + noise.mul_scalar((1.0 - a).sqrt())
    }

    fn step(
        &mut self,
        index: usize,
        x: Tensor<4>,
        model: &mut dyn Denoiser,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let row = self.rows[index].clone();
        let out = model.predict(x.clone(), row.t as f64)?;
        let mut pred_x0 = match self.parameterization {
            // predict_start_from_noise: √(1/ᾱ)·x − √(1/ᾱ − 1)·ε, as the reference computes it.
            Parameterization::Eps => {
                x.clone().mul_scalar((1.0 / row.alpha_bar).sqrt())
                    - out.mul_scalar((1.0 / row.alpha_bar - 1.0).sqrt())
            }
            p => p.eps_and_x0(out, &x, row.alpha_bar).1,
        };
        if self.clip_denoised {
            pred_x0 = pred_x0.clamp(-1.0, 1.0);
        }
        let mean = pred_x0.clone().mul_scalar(row.coef1) + x.clone().mul_scalar(row.coef2);
        let prev = if row.t == 0 || index + 1 == self.rows.len() {
            mean
        } else {
            let z = noise.noise(NoiseKind::Step, index, x.dims(), &x.device())?;
            mean + z.mul_scalar(row.std)
        };
        Ok(StepOutput {
            prev_sample: prev,
            pred_x0,
        })
    }
}
