//! DDIM (Song et al. 2021) exactly as CompVis `DDIMSampler`: the reference's timestep selection with
//! its +1 offset, `alphas_prev` starting at ᾱ[0], σ = η·√((1−ᾱ_prev)/(1−ᾱ)·(1−ᾱ/ᾱ_prev)), and the
//! update x_prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev−σ²)·ε + σ·z. v-models convert as SD 2's sampler does.

use burn::config::Config;
use burn::tensor::Tensor;

use super::{
    DdimDiscretization, DdimTables, Denoiser, DiffusionSchedule, NoiseKind, NoiseSource,
    Parameterization, Scheduler, StepOutput, ddim_tables, ddim_tables_for,
};
use crate::error::Result;

/// [`Ddim`] settings.
#[derive(Config, Debug, PartialEq)]
pub struct DdimConfig {
    /// Number of sampling steps S.
    pub steps: usize,
    /// η: 0 is deterministic DDIM, 1 matches the DDPM posterior variance.
    #[config(default = 0.0)]
    pub eta: f64,
    /// Timestep selection (`ddim_discretize`).
    #[config(default = "DdimDiscretization::Uniform")]
    pub discretization: DdimDiscretization,
    /// Explicit ascending timesteps instead of the reference's selection (overrides `steps`).
    pub timesteps: Option<Vec<usize>>,
}

impl DdimConfig {
    /// The sampler for a model trained on `schedule`.
    pub fn init(
        &self,
        schedule: &DiffusionSchedule,
        parameterization: Parameterization,
    ) -> Result<Ddim> {
        let tables = match &self.timesteps {
            Some(ts) => ddim_tables_for(schedule, ts.clone(), self.eta)?,
            None => ddim_tables(schedule, self.discretization, self.steps, self.eta)?,
        };
        Ok(Ddim {
            tables,
            parameterization,
        })
    }
}

/// The DDIM sampler.
#[derive(Debug, Clone)]
pub struct Ddim {
    /// The per-step tables (ascending, as the reference stores them).
    pub tables: DdimTables,
    parameterization: Parameterization,
}

impl Scheduler for Ddim {
    fn name(&self) -> &'static str {
        "ddim"
    }

    fn timesteps(&self) -> Vec<f64> {
        self.tables.sampling_timesteps()
    }

    fn add_noise(&self, x0: Tensor<4>, noise: Tensor<4>, index: usize) -> Tensor<4> {
        self.tables.add_noise(x0, noise, index)
    }

    fn step(
        &mut self,
        index: usize,
        x: Tensor<4>,
        model: &mut dyn Denoiser,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let k = self.tables.table_index(index);
        let t = self.tables.timesteps[k];
        let out = model.predict(x.clone(), t as f64)?;
        let (a_t, a_prev, sigma) = (
            self.tables.alphas[k],
            self.tables.alphas_prev[k],
            self.tables.sigmas[k],
        );
        let (eps, pred_x0) = self.parameterization.eps_and_x0(out, &x, a_t);
        let dir_xt = eps.mul_scalar((1.0 - a_prev - sigma * sigma).sqrt());
        let mut prev = pred_x0.clone().mul_scalar(a_prev.sqrt()) + dir_xt;
        if sigma > 0.0 {
            let z = noise.noise(NoiseKind::Step, index, x.dims(), &x.device())?;
            prev = prev + z.mul_scalar(sigma);
        }
        Ok(StepOutput {
            prev_sample: prev,
            pred_x0,
        })
    }
}
