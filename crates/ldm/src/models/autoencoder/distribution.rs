//! `DiagonalGaussianDistribution` (CompVis `ldm/modules/distributions/distributions.py`).

use burn::tensor::{Distribution, Tensor, TensorData};
use rand::Rng;

/// A diagonal Gaussian over latents, parameterised by the encoder's moments `[mean | logvar]`.
#[derive(Debug, Clone)]
pub struct DiagonalGaussianDistribution {
    /// `[B, C, H, W]`.
    pub mean: Tensor<4>,
    /// Log-variance clamped to `[-30, 20]`, `[B, C, H, W]`.
    pub logvar: Tensor<4>,
    /// `exp(0.5 · logvar)`.
    pub std: Tensor<4>,
    /// `exp(logvar)`.
    pub var: Tensor<4>,
    deterministic: bool,
}

impl DiagonalGaussianDistribution {
    /// Splits `parameters` `[B, 2C, H, W]` into mean and log-variance along channels.
    pub fn new(parameters: Tensor<4>) -> Self {
        let mut halves = parameters.chunk(2, 1).into_iter();
        let mean = halves.next().expect("two chunks");
        let logvar = halves.next().expect("two chunks").clamp(-30.0, 20.0);
        let std = logvar.clone().mul_scalar(0.5).exp();
        let var = logvar.clone().exp();
        Self {
            mean,
            logvar,
            std,
            var,
            deterministic: false,
        }
    }

    /// The reference's `deterministic=True`: zero variance, `kl` and `nll` are zero.
    pub fn deterministic(parameters: Tensor<4>) -> Self {
        let mut d = Self::new(parameters);
        d.std = d.mean.zeros_like();
        d.var = d.mean.zeros_like();
        d.deterministic = true;
        d
    }

    /// `mean + std · ε` with ε drawn by the backend's generator (seed it with `device.seed`).
    pub fn sample(&self) -> Tensor<4> {
        let noise = self.mean.random_like(Distribution::Normal(0.0, 1.0));
        self.sample_with_noise(noise)
    }

    /// `mean + std · ε` with ε from a host RNG: the same seed gives the same sample on every backend.
    pub fn sample_with_rng<R: Rng>(&self, rng: &mut R) -> Tensor<4> {
        let shape = self.mean.shape();
        let data = TensorData::random::<f32, _, _>(shape, Distribution::Normal(0.0, 1.0), rng);
        let noise = Tensor::<4>::from_data(data, &self.mean.device());
        self.sample_with_noise(noise)
    }

    /// `mean + std · noise` with caller-supplied noise `[B, C, H, W]`.
    pub fn sample_with_noise(&self, noise: Tensor<4>) -> Tensor<4> {
        self.mean.clone() + self.std.clone() * noise
    }

    /// The mean.
    pub fn mode(&self) -> Tensor<4> {
        self.mean.clone()
    }

    /// KL to the standard normal, summed over C, H, W: `[B]`.
    pub fn kl(&self) -> Tensor<1> {
        if self.deterministic {
            return Tensor::zeros([self.mean.dims()[0]], &self.mean.device());
        }
        let t = self.mean.clone().square() + self.var.clone() - self.logvar.clone() - 1.0;
        t.sum_dims_squeeze::<1, _>(&[1, 2, 3]).mul_scalar(0.5)
    }

    /// KL to another diagonal Gaussian, summed over C, H, W: `[B]`.
    pub fn kl_to(&self, other: &Self) -> Tensor<1> {
        if self.deterministic {
            return Tensor::zeros([self.mean.dims()[0]], &self.mean.device());
        }
        let t = (self.mean.clone() - other.mean.clone()).square() / other.var.clone()
            + self.var.clone() / other.var.clone()
            - self.logvar.clone()
            + other.logvar.clone()
            - 1.0;
        t.sum_dims_squeeze::<1, _>(&[1, 2, 3]).mul_scalar(0.5)
    }

    /// Negative log-likelihood of `sample`, summed over C, H, W: `[B]`.
    pub fn nll(&self, sample: Tensor<4>) -> Tensor<1> {
        if self.deterministic {
            return Tensor::zeros([self.mean.dims()[0]], &self.mean.device());
        }
        let log_two_pi = (2.0 * std::f64::consts::PI).ln();
        let t = self.logvar.clone()
            + (sample - self.mean.clone()).square() / self.var.clone()
            + log_two_pi;
        t.sum_dims_squeeze::<1, _>(&[1, 2, 3]).mul_scalar(0.5)
    }
}
