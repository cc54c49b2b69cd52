//! Where the samplers' randomness comes from: a seeded host RNG (the same seed gives the same noise on
//! every backend), or caller-supplied tensors keyed by purpose and step (bit-reproducible comparison
//! with other implementations).

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::error::{Error, Result};

/// What a noise tensor is for; suppliers of fixed noise key their tensors by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoiseKind {
    /// x_T, the starting latent (index 0).
    Initial,
    /// The fresh noise of a stochastic step (DDIM η > 0, DDPM, Euler ancestral); index = step.
    Step,
    /// The `q_sample(x0, t)` noise of mask blending before step `index`.
    Blend,
    /// The noise that takes an init latent to the start level of img2img (index 0).
    Encode,
    /// A draw from the first stage's posterior (KL `sample()`), index 0.
    Posterior,
}

/// A source of standard-normal noise.
pub trait NoiseSource {
    /// A `[B, C, H, W]` tensor of unit-variance noise for `kind` at step `index`.
    fn noise(
        &mut self,
        kind: NoiseKind,
        index: usize,
        shape: [usize; 4],
        device: &Device,
    ) -> Result<Tensor<4>>;
}

/// Standard-normal noise from a seeded host RNG (`StdRng`), drawn in call order. The same seed
/// reproduces the same images on every backend.
#[derive(Debug)]
pub struct SeededNoise {
    rng: StdRng,
}

impl SeededNoise {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn noise(
        &mut self,
        _kind: NoiseKind,
        _index: usize,
        shape: [usize; 4],
        device: &Device,
    ) -> Result<Tensor<4>> {
        let data =
            TensorData::random::<f32, _, _>(shape, Distribution::Normal(0.0, 1.0), &mut self.rng);
        Ok(Tensor::from_data(data, device))
    }
}

/// Noise given by a function of (kind, index, shape); e.g. tensors read from files.
pub struct FnNoise<F>(pub F);

impl<F> NoiseSource for FnNoise<F>
where
    F: FnMut(NoiseKind, usize, [usize; 4], &Device) -> Result<Tensor<4>>,
{
    fn noise(
        &mut self,
        kind: NoiseKind,
        index: usize,
        shape: [usize; 4],
        device: &Device,
    ) -> Result<Tensor<4>> {
        let t = (self.0)(kind, index, shape, device)?;
        if t.dims() != shape {
            return Err(Error::Shape {
                what: format!("supplied {kind:?} noise for step {index}"),
                expected: format!("{shape:?}"),
                got: t.dims().to_vec(),
            });
        }
        Ok(t)
    }
}
