//! β schedules and everything `DDPM.register_schedule` derives from them.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `make_beta_schedule` kinds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Linear in √β (LDM / SD: `linear_start` 0.00085, `linear_end` 0.012).
    Linear,
    /// Improved-DDPM cosine schedule with offset `s` (β clipped to 0.999), in floating-point time.
    Cosine {
        /// The offset `cosine_s` (8e-3 in the reference).
        s: f64,
    },
    /// Linear in β.
    SqrtLinear,
    /// √ of a linear ramp.
    Sqrt,
}

/// A diffusion schedule with the reference's derived tables (all length `timesteps`).
#[derive(Debug, Clone, PartialEq)]
pub struct DiffusionSchedule {
    /// β_t.
    pub betas: Vec<f64>,
    /// ᾱ_t = ∏ (1 − β).
    pub alphas_cumprod: Vec<f64>,
    /// ᾱ_{t−1} (1 at t = 0).
    pub alphas_cumprod_prev: Vec<f64>,
    /// √ᾱ.
    pub sqrt_alphas_cumprod: Vec<f64>,
    /// √(1 − ᾱ).
    pub sqrt_one_minus_alphas_cumprod: Vec<f64>,
    /// ln(1 − ᾱ).
    pub log_one_minus_alphas_cumprod: Vec<f64>,
    /// √(1/ᾱ).
    pub sqrt_recip_alphas_cumprod: Vec<f64>,
    /// √(1/ᾱ − 1).
    pub sqrt_recipm1_alphas_cumprod: Vec<f64>,
    /// Posterior variance of q(x_{t−1} | x_t, x_0) (with `v_posterior` = 0).
    pub posterior_variance: Vec<f64>,
    /// ln(max(posterior variance, 1e-20)).
    pub posterior_log_variance_clipped: Vec<f64>,
    /// Coefficient of x_0 in the posterior mean.
    pub posterior_mean_coef1: Vec<f64>,
    /// Coefficient of x_t in the posterior mean.
    pub posterior_mean_coef2: Vec<f64>,
}

/// `make_beta_schedule(schedule, n, linear_start, linear_end, cosine_s)`, in f64.
pub fn make_beta_schedule(
    schedule: BetaSchedule,
    n: usize,
    linear_start: f64,
    linear_end: f64,
) -> Result<Vec<f64>> {
    if n < 2 {
        return Err(Error::Config(format!(
            "a schedule needs at least 2 timesteps, got {n}"
        )));
    }
    // torch.linspace(a, b, n): a + i·(b − a)/(n − 1)
    let linspace = |a: f64, b: f64| -> Vec<f64> {
        let step = (b - a) / (n - 1) as f64;
        (0..n)
            .map(|i| if i == n - 1 { b } else { a + step * i as f64 })
            .collect()
    };
    Ok(match schedule {
        BetaSchedule::Linear => linspace(linear_start.sqrt(), linear_end.sqrt())
            .into_iter()
            .map(|x| x * x)
            .collect(),
        BetaSchedule::SqrtLinear => linspace(linear_start, linear_end),
        BetaSchedule::Sqrt => linspace(linear_start, linear_end)
            .into_iter()
            .map(f64::sqrt)
            .collect(),
        BetaSchedule::Cosine { s } => {
            // Floating-point time: t = i / n + s (an integer division here zeroes the schedule).
            let alphas: Vec<f64> = (0..=n)
                .map(|i| {
                    let t = i as f64 / n as f64 + s;
                    (t / (1.0 + s) * std::f64::consts::PI / 2.0).cos().powi(2)
                })
                .collect();
            let a0 = alphas[0];
            let alphas: Vec<f64> = alphas.iter().map(|a| a / a0).collect();
            (0..n)
                .map(|i| (1.0 - alphas[i + 1] / alphas[i]).clamp(0.0, 0.999))
                .collect()
        }
    })
}

impl DiffusionSchedule {
    /// The schedule of an LDM config (`beta_schedule`, `timesteps`, `linear_start`, `linear_end`).
    pub fn new(
        schedule: BetaSchedule,
        timesteps: usize,
        linear_start: f64,
        linear_end: f64,
    ) -> Result<Self> {
        Ok(Self::from_betas(make_beta_schedule(
            schedule,
            timesteps,
            linear_start,
            linear_end,
        )?))
    }

    /// Stable Diffusion v1 / LDM text-to-image: linear, 1000 steps, 0.00085 → 0.012.
    pub fn stable_diffusion() -> Self {
        Self::new(BetaSchedule::Linear, 1000, 0.00085, 0.012).expect("valid schedule")
    }

    /// Derived tables from given betas (`given_betas`).
    pub fn from_betas(betas: Vec<f64>) -> Self {
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let mut acp = Vec::with_capacity(betas.len());
        let mut prod = 1.0;
        for a in &alphas {
            prod *= a;
            acp.push(prod);
        }
        let prev: Vec<f64> = std::iter::once(1.0)
            .chain(acp[..acp.len() - 1].iter().copied())
            .collect();
        let map = |f: &dyn Fn(usize) -> f64| (0..betas.len()).map(f).collect::<Vec<f64>>();
        let posterior_variance = map(&|i| betas[i] * (1.0 - prev[i]) / (1.0 - acp[i]));
        Self {
            sqrt_alphas_cumprod: map(&|i| acp[i].sqrt()),
            sqrt_one_minus_alphas_cumprod: map(&|i| (1.0 - acp[i]).sqrt()),
            log_one_minus_alphas_cumprod: map(&|i| (1.0 - acp[i]).ln()),
            sqrt_recip_alphas_cumprod: map(&|i| (1.0 / acp[i]).sqrt()),
            sqrt_recipm1_alphas_cumprod: map(&|i| (1.0 / acp[i] - 1.0).sqrt()),
            posterior_log_variance_clipped: posterior_variance
                .iter()
                .map(|v| v.max(1e-20).ln())
                .collect(),
            posterior_mean_coef1: map(&|i| betas[i] * prev[i].sqrt() / (1.0 - acp[i])),
            posterior_mean_coef2: map(&|i| (1.0 - prev[i]) * alphas[i].sqrt() / (1.0 - acp[i])),
            posterior_variance,
            alphas_cumprod_prev: prev,
            alphas_cumprod: acp,
            betas,
        }
    }

    /// Number of diffusion timesteps.
    pub fn timesteps(&self) -> usize {
        self.betas.len()
    }
}

/// DDIM timestep selection (`ddim_discretize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DdimDiscretization {
    /// Every `T / S`-th step.
    Uniform,
    /// Quadratically spaced up to 0.8·T.
    Quad,
}

/// `make_ddim_timesteps`: the reference's S timesteps **with its +1 offset** (so the first step
/// targets ᾱ at index 1 and the last step's "previous" ᾱ is ᾱ[0], not 1). For S = T the offset
/// would index past the end (the reference crashes); there the plain steps 0..T−1 are used.
pub fn ddim_timesteps(
    method: DdimDiscretization,
    steps: usize,
    timesteps: usize,
) -> Result<Vec<usize>> {
    if steps == 0 || steps > timesteps {
        return Err(Error::Config(format!(
            "DDIM steps must be in 1..={timesteps}, got {steps}"
        )));
    }
    let raw: Vec<usize> = match method {
        DdimDiscretization::Uniform => {
            let c = timesteps / steps;
            (0..timesteps).step_by(c).collect()
        }
        DdimDiscretization::Quad => {
            let end = (timesteps as f64 * 0.8).sqrt();
            (0..steps)
                .map(|i| {
                    let x = if steps == 1 {
                        0.0
                    } else if i == steps - 1 {
                        end
                    } else {
                        end / (steps - 1) as f64 * i as f64
                    };
                    (x * x) as usize
                })
                .collect()
        }
    };
    if raw.iter().any(|&t| t + 1 >= timesteps) {
        tracing::warn!(
            "{steps} DDIM steps of {timesteps}: the reference's +1 offset would overflow; using unshifted steps"
        );
        return Ok(raw);
    }
    Ok(raw.into_iter().map(|t| t + 1).collect())
}

/// The per-step tables `DDIMSampler.make_schedule` builds.
#[derive(Debug, Clone, PartialEq)]
pub struct DdimTables {
    /// The selected timesteps (ascending).
    pub timesteps: Vec<usize>,
    /// ᾱ at each selected timestep.
    pub alphas: Vec<f64>,
    /// ᾱ at the previous selected timestep; ᾱ[0] for the first.
    pub alphas_prev: Vec<f64>,
    /// σ = η √((1 − ᾱ_prev)/(1 − ᾱ) · (1 − ᾱ/ᾱ_prev)).
    pub sigmas: Vec<f64>,
}

impl DdimTables {
    /// Table index of sampling step `index` (the reference's `index = total_steps − i − 1`).
    pub fn table_index(&self, index: usize) -> usize {
        self.timesteps.len() - 1 - index
    }

    /// The timesteps in sampling order (decreasing).
    pub fn sampling_timesteps(&self) -> Vec<f64> {
        self.timesteps.iter().rev().map(|&t| t as f64).collect()
    }

    /// `x0` noised to the input level of sampling step `index`: `√ᾱ·x0 + √(1−ᾱ)·noise`.
    pub fn add_noise(&self, x0: Tensor<4>, noise: Tensor<4>, index: usize) -> Tensor<4> {
        let a = self.alphas[self.table_index(index)];
        x0.mul_scalar(a.sqrt()) + noise.mul_scalar((1.0 - a).sqrt())
    }
}

/// `make_ddim_sampling_parameters` on `alphas_cumprod` rounded to f32, as the reference reads them
/// from its float32 buffer.
pub fn ddim_tables(
    schedule: &DiffusionSchedule,
    method: DdimDiscretization,
    steps: usize,
    eta: f64,
) -> Result<DdimTables> {
    let timesteps = ddim_timesteps(method, steps, schedule.timesteps())?;
    ddim_tables_for(schedule, timesteps, eta)
}

/// The DDIM tables for explicit ascending `timesteps` (e.g. diffusers' "trailing" selection, or an
/// ablation without the reference's offset).
pub fn ddim_tables_for(
    schedule: &DiffusionSchedule,
    timesteps: Vec<usize>,
    eta: f64,
) -> Result<DdimTables> {
    let t_max = schedule.timesteps();
    if timesteps.is_empty()
        || timesteps.iter().any(|&t| t >= t_max)
        || timesteps.windows(2).any(|w| w[0] > w[1])
    {
        // Non-decreasing, not strictly: the reference's `quad` selection repeats small timesteps.
        return Err(Error::Config(format!(
            "DDIM timesteps must be non-empty, increasing and below {t_max}, got {timesteps:?}"
        )));
    }
    let acp = |i: usize| schedule.alphas_cumprod[i] as f32 as f64;
    let alphas: Vec<f64> = timesteps.iter().map(|&t| acp(t)).collect();
    let alphas_prev: Vec<f64> = std::iter::once(acp(0))
        .chain(timesteps[..timesteps.len() - 1].iter().map(|&t| acp(t)))
        .collect();
    let sigmas = alphas
        .iter()
        .zip(&alphas_prev)
        .map(|(a, p)| eta * ((1.0 - p) / (1.0 - a) * (1.0 - a / p)).sqrt())
        .collect();
    Ok(DdimTables {
        timesteps,
        alphas,
        alphas_prev,
        sigmas,
    })
}
