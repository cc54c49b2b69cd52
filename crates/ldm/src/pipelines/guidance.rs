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
pub struct Guided<'a, M: DiffusionModel + ?Sized> {
    model: &'a M,
    cond: Conditioning,
    batched: Option<Conditioning>,
    scale: f64,
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
        })
    }
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
                Ok(uncond.clone() + (cond - uncond).mul_scalar(self.scale))
            }
        }
    }
}
