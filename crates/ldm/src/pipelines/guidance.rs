//! Conditioning routing and classifier-free guidance.

use std::str::FromStr;

use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::unet::UNetModel;
use crate::schedulers::Denoiser;

/// How the conditioning reaches the UNet (CompVis `conditioning_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConditioningKey {
    /// Unconditional.
    #[default]
    None,
    /// Context for the cross-attention layers (text, class embeddings).
    Crossattn,
    /// Channels concatenated to the latent (inpainting, super-resolution).
    Concat,
    /// Both of the above.
    Hybrid,
    /// Class labels through the UNet's `label_emb`.
    Adm,
}

impl FromStr for ConditioningKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" | "null" | "" => Ok(Self::None),
            "crossattn" => Ok(Self::Crossattn),
            "concat" => Ok(Self::Concat),
            "hybrid" => Ok(Self::Hybrid),
            "adm" => Ok(Self::Adm),
            other => Err(Error::Config(format!(
                "unknown conditioning_key `{other}` (expected crossattn, concat, hybrid, adm or none)"
            ))),
        }
    }
}

/// The conditioning of a batch; which fields are used depends on the [`ConditioningKey`].
#[derive(Debug, Clone, Default)]
pub struct Conditioning {
    /// Cross-attention context `[B, L, D]`.
    pub context: Option<Tensor<3>>,
    /// Channels concatenated to the latent `[B, C_c, h, w]`.
    pub concat: Option<Tensor<4>>,
    /// Class labels `[B]` (`adm`).
    pub y: Option<Tensor<1, Int>>,
}

impl Conditioning {
    /// No conditioning.
    pub fn none() -> Self {
        Self::default()
    }

    /// Cross-attention context only.
    pub fn context(context: Tensor<3>) -> Self {
        Self {
            context: Some(context),
            ..Self::default()
        }
    }

    /// Concat channels only.
    pub fn concat(concat: Tensor<4>) -> Self {
        Self {
            concat: Some(concat),
            ..Self::default()
        }
    }

    /// Class labels only.
    pub fn labels(y: Tensor<1, Int>) -> Self {
        Self {
            y: Some(y),
            ..Self::default()
        }
    }

    /// The batch size, if any field is set.
    pub fn batch(&self) -> Option<usize> {
        self.context
            .as_ref()
            .map(|c| c.dims()[0])
            .or_else(|| self.concat.as_ref().map(|c| c.dims()[0]))
            .or_else(|| self.y.as_ref().map(|y| y.dims()[0]))
    }

    /// `cat([a, b])` along the batch, field by field (the reference's CFG batching `cat([uc, c])`).
    pub fn cat(a: &Self, b: &Self) -> Result<Self> {
        fn both<T: Clone>(
            what: &str,
            a: &Option<T>,
            b: &Option<T>,
            f: impl Fn(T, T) -> T,
        ) -> Result<Option<T>> {
            match (a, b) {
                (Some(x), Some(y)) => Ok(Some(f(x.clone(), y.clone()))),
                (None, None) => Ok(None),
                _ => Err(Error::Config(format!(
                    "conditional and unconditional inputs differ: only one has `{what}`"
                ))),
            }
        }
        let context = both("context", &a.context, &b.context, |x, y| {
            Tensor::cat(vec![x, y], 0)
        })?;
        if let (Some(x), Some(y)) = (&a.context, &b.context) {
            // Different prompt lengths cannot be batched (the reference pads both to 77 tokens).
            if x.dims()[1..] != y.dims()[1..] {
                return Err(Error::Shape {
                    what: "unconditional context".into(),
                    expected: format!("[_, {}, {}]", x.dims()[1], x.dims()[2]),
                    got: y.dims().to_vec(),
                });
            }
        }
        Ok(Self {
            context,
            concat: both("concat", &a.concat, &b.concat, |x, y| {
                Tensor::cat(vec![x, y], 0)
            })?,
            y: both("y", &a.y, &b.y, |x, y| Tensor::cat(vec![x, y], 0))?,
        })
    }
}

/// A conditional diffusion model: the raw UNet output for latent `x` at timestep `t` under `cond`.
pub trait DiffusionModel {
    /// One evaluation (the reference's `apply_model`).
    fn apply_model(&self, x: Tensor<4>, t: f64, cond: &Conditioning) -> Result<Tensor<4>>;
}

/// CompVis `DiffusionWrapper`: routes the conditioning into the UNet by [`ConditioningKey`].
#[derive(Debug)]
pub struct DiffusionWrapper {
    /// The denoiser.
    pub unet: UNetModel,
    /// The routing.
    pub key: ConditioningKey,
}

impl DiffusionModel for DiffusionWrapper {
    fn apply_model(&self, x: Tensor<4>, t: f64, cond: &Conditioning) -> Result<Tensor<4>> {
        let b = x.dims()[0];
        let device = x.device();
        let t = Tensor::<1>::full([b], t, &device);
        // Reduced-precision UNets take their input in their dtype; the sampler stays in f32.
        let dtype: burn::tensor::FloatDType = self.unet.dtype().into();
        let f32_out = |r: Result<Tensor<4>>| r.map(|o| o.cast(burn::tensor::FloatDType::F32));
        let x = x.cast(dtype);
        let need = |what: &str, present: bool| -> Result<()> {
            if present {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "conditioning_key {:?} needs `{what}` conditioning, which was not given",
                    self.key
                )))
            }
        };
        let with_concat = |x: Tensor<4>| -> Result<Tensor<4>> {
            let c = cond.concat.clone().expect("checked");
            let (xd, cd) = (x.dims(), c.dims());
            if cd[0] != xd[0] || cd[2..] != xd[2..] {
                return Err(Error::Shape {
                    what: "concat conditioning".into(),
                    expected: format!("[{}, _, {}, {}]", xd[0], xd[2], xd[3]),
                    got: cd.to_vec(),
                });
            }
            Ok(Tensor::cat(vec![x, c.cast(dtype)], 1))
        };
        f32_out(match self.key {
            ConditioningKey::None => self.unet.try_forward(x, t, None, None),
            ConditioningKey::Crossattn => {
                need("context", cond.context.is_some())?;
                self.unet.try_forward(x, t, cond.context.clone(), None)
            }
            ConditioningKey::Concat => {
                need("concat", cond.concat.is_some())?;
                self.unet.try_forward(with_concat(x)?, t, None, None)
            }
            ConditioningKey::Hybrid => {
                need("concat", cond.concat.is_some())?;
                need("context", cond.context.is_some())?;
                self.unet
                    .try_forward(with_concat(x)?, t, cond.context.clone(), None)
            }
            ConditioningKey::Adm => {
                need("y", cond.y.is_some())?;
                self.unet.try_forward(x, t, None, cond.y.clone())
            }
        })
    }
}

/// A [`Denoiser`] with classifier-free guidance: `ε_u + s·(ε_c − ε_u)` from one batched call on
/// `cat([x, x])` with `cat([uc, c])`, as the reference samplers do. Without an unconditional input,
/// or with scale 1, the model runs once on `c` only.
///
/// With a guidance rescale φ > 0 (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
/// Steps are Flawed", §3.4; diffusers' `guidance_rescale`), the guided output is pulled back to
/// the per-sample standard deviation of the conditional one, `φ·g·std(ε_c)/std(g) + (1 − φ)·g`,
/// which keeps high scales from over-exposing v-prediction / offset-noise models.
pub struct Guided<'a, M: DiffusionModel + ?Sized> {
    model: &'a M,
    cond: Conditioning,
    batched: Option<Conditioning>,
    scale: f64,
    rescale: f64,
}

impl<'a, M: DiffusionModel + ?Sized> Guided<'a, M> {
    /// Guidance of `model` towards `cond` away from `uncond` with `scale`.
    pub fn new(
        model: &'a M,
        cond: Conditioning,
        uncond: Option<Conditioning>,
        scale: f64,
    ) -> Result<Self> {
        let batched = match uncond {
            Some(uc) if scale != 1.0 => Some(Conditioning::cat(&uc, &cond)?),
            _ => None,
        };
        Ok(Self {
            model,
            cond,
            batched,
            scale,
            rescale: 0.0,
        })
    }

    /// Guidance rescale φ in [0, 1] (0: plain guidance, as the reference).
    pub fn with_rescale(mut self, rescale: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&rescale) {
            return Err(crate::Error::Input(format!(
                "guidance rescale {rescale} is outside [0, 1]"
            )));
        }
        self.rescale = rescale;
        Ok(self)
    }
}

/// Per-sample standard deviation over `[C, H, W]`, unbiased (`torch.std`'s default, which
/// diffusers' `rescale_noise_cfg` uses), shaped `[B, 1, 1, 1]`.
fn sample_std(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let n = c * h * w;
    let flat = x.reshape([b, n]);
    let mean = flat.clone().mean_dim(1);
    let var = (flat - mean)
        .square()
        .sum_dim(1)
        .div_scalar((n.max(2) - 1) as f64);
    var.sqrt().reshape([b, 1, 1, 1])
}

impl<M: DiffusionModel + ?Sized> Denoiser for Guided<'_, M> {
    fn predict(&mut self, x: Tensor<4>, t: f64) -> Result<Tensor<4>> {
        match &self.batched {
            None => self.model.apply_model(x, t, &self.cond),
            Some(c_in) => {
                let b = x.dims()[0];
                let x_in = Tensor::cat(vec![x.clone(), x], 0);
                let out = self.model.apply_model(x_in, t, c_in)?;
                let [_, c, h, w] = out.dims();
                let uncond = out.clone().slice([0..b, 0..c, 0..h, 0..w]);
                let cond = out.slice([b..2 * b, 0..c, 0..h, 0..w]);
                let guided = uncond.clone() + (cond.clone() - uncond).mul_scalar(self.scale);
                if self.rescale == 0.0 {
                    return Ok(guided);
                }
                let ratio = sample_std(cond) / sample_std(guided.clone()).clamp_min(1e-12);
                let rescaled = guided.clone() * ratio;
                Ok(rescaled.mul_scalar(self.rescale) + guided.mul_scalar(1.0 - self.rescale))
            }
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    /// ε_u = x and ε_c = 3x + 1: the context (0 or 1 per sample) picks the branch.
    struct Affine;

    impl DiffusionModel for Affine {
        fn apply_model(&self, x: Tensor<4>, _t: f64, cond: &Conditioning) -> Result<Tensor<4>> {
            let c = cond
                .context
                .clone()
                .expect("context")
                .reshape([-1, 1, 1, 1]);
            Ok(x.clone() + x * c.clone().mul_scalar(2.0) + c)
        }
    }

    /// Guidance rescale against diffusers' `rescale_noise_cfg`, written out per sample in f64.
    #[test]
    fn guidance_rescale_matches_diffusers_formula() {
        let device = Device::flex();
        let (b, n) = (2, 2 * 3 * 3);
        let xs: Vec<f32> = (0..b * n)
            .map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0)
            .collect();
        let x = Tensor::<4>::from_data(TensorData::new(xs.clone(), [b, 2, 3, 3]), &device);
        let ctx = |v: f32| Conditioning::context(Tensor::full([b, 1, 1], v, &device));
        let (scale, phi) = (7.5, 0.7);
        let mut guided = Guided::new(&Affine, ctx(1.0), Some(ctx(0.0)), scale)
            .unwrap()
            .with_rescale(phi)
            .unwrap();
        let got: Vec<f32> = guided
            .predict(x, 500.0)
            .unwrap()
            .into_data()
            .try_to_vec()
            .unwrap();
        let std = |v: &[f64]| {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            (v.iter().map(|a| (a - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
        };
        for s in 0..b {
            let u: Vec<f64> = xs[s * n..(s + 1) * n].iter().map(|&a| a as f64).collect();
            let c: Vec<f64> = u.iter().map(|a| 3.0 * a + 1.0).collect();
            let g: Vec<f64> = u.iter().zip(&c).map(|(u, c)| u + scale * (c - u)).collect();
            let r = std(&c) / std(&g);
            for i in 0..n {
                let want = phi * g[i] * r + (1.0 - phi) * g[i];
                let err = (got[s * n + i] as f64 - want).abs();
                assert!(
                    err < 1e-4 * want.abs().max(1.0),
                    "sample {s}, {i}: {} vs {want}",
                    got[s * n + i]
                );
            }
        }
        assert!(
            Guided::new(&Affine, ctx(1.0), Some(ctx(0.0)), scale)
                .unwrap()
                .with_rescale(1.5)
                .is_err()
        );
    }
}
