//! GroupNorm (optionally followed by SiLU) with a fused CPU path for inference.
//!
//! Burn's `GroupNorm` is a chain of tensor ops (mean, subtract, square, mean, divide, scale, shift)
//! and SiLU two more, each a full pass over the activation with a fresh allocation; on Flex, for
//! f32 tensors outside autodiff, [`group_norm_silu`] does the statistics in one pass (f64
//! accumulators) and normalisation, affine and SiLU in a second, in parallel over channels.
//! Everything else goes through `GroupNorm::forward` (and `activation::silu`).

use burn::nn::GroupNorm;
use burn::tensor::Tensor;
use burn::tensor::activation::silu;

/// `GroupNorm(x)` for `x` `[B, C, H, W]`, then SiLU when `with_silu`.
pub fn group_norm_silu(norm: &GroupNorm, x: Tensor<4>, with_silu: bool) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if fast_path(norm, &x) {
        return flex_group_norm(norm, x, with_silu);
    }
    let y = norm.forward(x);
    if with_silu { silu(y) } else { y }
}

/// [`group_norm_silu`] with an optional norm: `None` is the identity (then SiLU when `with_silu`).
pub fn maybe_group_norm_silu(norm: &Option<GroupNorm>, x: Tensor<4>, with_silu: bool) -> Tensor<4> {
    match norm {
        Some(n) => group_norm_silu(n, x, with_silu),
        None if with_silu => silu(x),
        None => x,
    }
}

#[cfg(feature = "flex")]
fn fast_path(norm: &GroupNorm, x: &Tensor<4>) -> bool {
    let device = x.device();
    super::conv::fast_cpu_path_enabled()
        && !device.is_autodiff()
        && device == burn::tensor::Device::flex()
        && x.dtype() == burn::tensor::DType::F32
        && norm.affine
        && x.dims()[1] == norm.num_channels
        && norm.num_channels.is_multiple_of(norm.num_groups)
}

#[cfg(feature = "flex")]
fn flex_group_norm(norm: &GroupNorm, x: Tensor<4>, with_silu: bool) -> Tensor<4> {
    use burn::tensor::TensorData;
    use rayon::prelude::*;

    let device = x.device();
    let [b, c, h, w] = x.dims();
    let hw = h * w;
    let groups = norm.num_groups;
    let per_group = c / groups;
    let gamma = norm.gamma.as_ref().expect("affine").val().into_data();
    let beta = norm.beta.as_ref().expect("affine").val().into_data();
    let gamma: &[f32] = gamma.as_slice().expect("f32 gamma");
    let beta: &[f32] = beta.as_slice().expect("f32 beta");
    let data = x.into_data();
    let x: &[f32] = data.as_slice().expect("f32 data");
    let group_len = per_group * hw;
    // (mean, 1/std) per (batch, group).
    let stats: Vec<(f32, f32)> = x
        .par_chunks(group_len)
        .map(|g| {
            let (mut s, mut s2) = (0f64, 0f64);
            for &v in g {
                let v = v as f64;
                s += v;
                s2 += v * v;
            }
            let n = g.len() as f64;
            let mean = s / n;
            let var = (s2 / n - mean * mean).max(0.0);
            (mean as f32, (1.0 / (var + norm.epsilon).sqrt()) as f32)
        })
        .collect();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(plane, (dst, src))| {
            let ch = plane % c;
            let (mean, inv) = stats[(plane / c) * groups + ch / per_group];
            let scale = inv * gamma[ch];
            let shift = beta[ch] - mean * scale;
            if with_silu {
                for (d, &v) in dst.iter_mut().zip(src) {
                    let y = v * scale + shift;
                    *d = y / (1.0 + (-y).exp());
                }
            } else {
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = v * scale + shift;
                }
            }
        });
    Tensor::from_data(TensorData::new(out, [b, c, h, w]), &device)
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::nn::GroupNormConfig;
    use burn::tensor::{Device, Distribution};

    #[test]
    fn fused_group_norm_matches_burn() {
        let device = Device::flex();
        for (c, groups, h, w, eps) in [
            (64, 32, 9, 7, 1e-6),
            (32, 8, 16, 16, 1e-5),
            (6, 3, 1, 1, 1e-6),
        ] {
            let mut norm = GroupNormConfig::new(groups, c)
                .with_epsilon(eps)
                .init(&device);
            norm.gamma = norm.gamma.map(|g| {
                g.map(|t| Tensor::random([c], Distribution::Normal(1.0, 0.5), &t.device()))
            });
            norm.beta = norm.beta.map(|g| {
                g.map(|t| Tensor::random([c], Distribution::Normal(0.0, 0.5), &t.device()))
            });
            let x = Tensor::<4>::random([2, c, h, w], Distribution::Normal(0.3, 2.0), &device);
            assert!(fast_path(&norm, &x));
            for with_silu in [false, true] {
                let fast = group_norm_silu(&norm, x.clone(), with_silu);
                let y = norm.forward(x.clone());
                let reference = if with_silu { silu(y) } else { y };
                let scale = reference.clone().abs().max().into_scalar::<f64>();
                let err = (fast - reference).abs().max().into_scalar::<f64>();
                assert!(
                    err <= 1e-5 * scale,
                    "c{c} g{groups} silu {with_silu}: {err} vs {scale}"
                );
            }
        }
    }
}
