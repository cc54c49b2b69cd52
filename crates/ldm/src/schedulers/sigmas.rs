//! σ-space tables of the diffusers-style samplers (Euler, Euler ancestral, DPM-Solver++):
//! timestep spacing, σ(t) = √((1−ᾱ)/ᾱ) interpolated at the selected timesteps, Karras σs, and the
//! appended final σ = 0. Follows diffusers 0.35 (`set_timesteps`, `_sigma_to_t`,
//! `_convert_to_karras`), with the tables rounded to f32 where diffusers stores them in f32.

use serde::{Deserialize, Serialize};

use super::DiffusionSchedule;
use crate::error::{Error, Result};

/// diffusers' `timestep_spacing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// Evenly spaced from T−1 down to 0 (diffusers' default for these samplers).
    #[default]
    Linspace,
    /// Multiples of T/N (+ `steps_offset`), as SD's original configs.
    Leading,
    /// Evenly spaced ending at T−1.
    Trailing,
}

impl std::str::FromStr for TimestepSpacing {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linspace" => Ok(Self::Linspace),
            "leading" => Ok(Self::Leading),
            "trailing" => Ok(Self::Trailing),
            other => Err(Error::Config(format!(
                "unknown timestep spacing `{other}` (expected linspace, leading or trailing)"
            ))),
        }
    }
}

/// Timesteps (one per step) and σs (one more: the final σ = 0).
#[derive(Debug, Clone, PartialEq)]
pub struct SigmaTables {
    /// Model timesteps in sampling order (fractional for Euler with `linspace`/Karras).
    pub timesteps: Vec<f64>,
    /// σ at each step, then 0.
    pub sigmas: Vec<f64>,
}

/// Which diffusers scheduler's conventions to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    /// Euler / Euler ancestral: float timesteps, N points.
    Euler,
    /// DPM-Solver multistep: integer timesteps from N+1 points, Karras timesteps rounded.
    DpmSolver,
}

/// σ(t) of every training timestep, computed from ᾱ in f32 as diffusers does.
fn train_sigmas(schedule: &DiffusionSchedule) -> Vec<f64> {
    schedule
        .alphas_cumprod
        .iter()
        .map(|&a| {
            let a = a as f32;
            (((1.0 - a) / a).sqrt()) as f64
        })
        .collect()
}

/// `np.interp(x, arange(n), ys)`.
fn interp(x: f64, ys: &[f64]) -> f64 {
    if x <= 0.0 {
        return ys[0];
    }
    let last = ys.len() - 1;
    if x >= last as f64 {
        return ys[last];
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    ys[i] + (ys[i + 1] - ys[i]) * w
}

/// diffusers' `_sigma_to_t`: the fractional timestep of `sigma` by interpolation in log σ.
fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // last index with log_sigma >= log_sigmas[i] (0 if none), at most n − 2
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// Karras et al. (2022) σs with ρ = 7 between `sigma_max` and `sigma_min`.
fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    (0..n)
        .map(|i| {
            let ramp = if n == 1 {
                0.0
            } else {
                i as f64 / (n - 1) as f64
            };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect()
}

/// `np.linspace(a, b, n)`.
fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    let step = (b - a) / (n - 1) as f64;
    (0..n)
        .map(|i| if i == n - 1 { b } else { a + step * i as f64 })
        .collect()
}

/// `np.arange(start, 0, -step)` (step > 0).
fn arange_down(start: f64, step: f64) -> Vec<f64> {
    let n = (start / step).ceil() as usize;
    (0..n).map(|i| start - step * i as f64).collect()
}

impl SigmaTables {
    pub(crate) fn new(
        schedule: &DiffusionSchedule,
        flavor: Flavor,
        steps: usize,
        spacing: TimestepSpacing,
        steps_offset: usize,
        use_karras: bool,
    ) -> Result<Self> {
        let t_train = schedule.timesteps();
        if steps == 0 || steps > t_train {
            return Err(Error::Config(format!(
                "number of steps must be in 1..={t_train}, got {steps}"
            )));
        }
        let tf = t_train as f64;
        let n = steps;
        let mut timesteps: Vec<f64> = match (flavor, spacing) {
            (Flavor::Euler, TimestepSpacing::Linspace) => linspace(0.0, tf - 1.0, n)
                .into_iter()
                .rev()
                .map(|t| t as f32 as f64)
                .collect(),
            (Flavor::Euler, TimestepSpacing::Leading) => {
                let ratio = t_train / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio + steps_offset) as f64)
                    .collect()
            }
            (Flavor::DpmSolver, TimestepSpacing::Linspace) => {
                let mut v: Vec<f64> = linspace(0.0, tf - 1.0, n + 1)
                    .into_iter()
                    .map(f64::round_ties_even)
                    .rev()
                    .collect();
                v.pop();
                v
            }
            (Flavor::DpmSolver, TimestepSpacing::Leading) => {
                let ratio = t_train / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + steps_offset) as f64)
                    .collect()
            }
            (_, TimestepSpacing::Trailing) => arange_down(tf, tf / n as f64)
                .into_iter()
                .map(|t| t.round_ties_even() - 1.0)
                .collect(),
        };
        if timesteps.iter().any(|&t| t < 0.0 || t > tf - 1.0) {
            return Err(Error::Config(format!(
                "{spacing:?} spacing with steps_offset {steps_offset} gives timesteps outside 0..{t_train}: {timesteps:?}"
            )));
        }
        let all = train_sigmas(schedule);
        let log_sigmas: Vec<f64> = all.iter().map(|s| (s.ln() as f32) as f64).collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &all)).collect();
        if use_karras {
            let (lo, hi) = match flavor {
                Flavor::Euler => (sigmas[sigmas.len() - 1], sigmas[0]),
                Flavor::DpmSolver => (all[0], all[all.len() - 1]),
            };
            sigmas = karras(lo, hi, n);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
            if flavor == Flavor::DpmSolver {
                timesteps = timesteps.into_iter().map(f64::round_ties_even).collect();
            } else {
                timesteps = timesteps.into_iter().map(|t| t as f32 as f64).collect();
            }
        }
        sigmas.push(0.0);
        let sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        Ok(Self { timesteps, sigmas })
    }
}
