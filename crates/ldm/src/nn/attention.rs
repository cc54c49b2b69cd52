//! The attention core every attention layer of the crate calls.
//!
//! `softmax(q kᵀ · scale) v` on `[B, H, L, D]` tensors, either in one call of Burn's fused
//! attention op (flash-style tiling on backends that have it) or **sliced** over query rows so that
//! at most `[B, H, slice, Lk]` scores exist at once — for 64x64 latents (4096 tokens) the full score
//! matrix of SD v1's first transformer is 2 × 8 × 4096² floats = 1 GiB.

use burn::tensor::Tensor;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use serde::{Deserialize, Serialize};

/// How attention is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AttentionMode {
    /// One call of the backend's fused attention op.
    #[default]
    Fused,
    /// Query rows in slices of this many (≥ 1); bounds the score memory to `B·H·slice·Lk` floats.
    Sliced(usize),
    /// Sliced automatically when the full score matrix would exceed this many MiB.
    Auto(usize),
}

impl AttentionMode {
    /// The default used by the models: slice when the scores would exceed 256 MiB.
    pub fn auto() -> Self {
        Self::Auto(256)
    }
}

/// `softmax(q kᵀ · scale) v`: `q` `[B, H, Lq, D]`, `k` `[B, H, Lk, D]`, `v` `[B, H, Lk, Dv]` → `[B, H, Lq, Dv]`.
pub fn scaled_dot_product(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f64,
    mode: AttentionMode,
) -> Tensor<4> {
    // Softmax stays in f32 under reduced precision.
    let dtype = q.dtype();
    if dtype != burn::tensor::DType::F32 {
        let f32 = burn::tensor::FloatDType::F32;
        let out = scaled_dot_product(q.cast(f32), k.cast(f32), v.cast(f32), scale, mode);
        return out.cast(burn::tensor::FloatDType::from(dtype));
    }
    let [b, h, lq, _] = q.dims();
    let lk = k.dims()[2];
    let options = AttentionModuleOptions {
        scale: Some(scale),
        ..Default::default()
    };
    let slice = match mode {
        AttentionMode::Fused => None,
        AttentionMode::Sliced(n) => Some(n.max(1)),
        AttentionMode::Auto(mib) => {
            let bytes = (b * h * lq * lk * 4) as f64;
            let budget = (mib.max(1) as f64) * 1024.0 * 1024.0;
            (bytes > budget).then(|| ((budget / (b * h * lk * 4) as f64).floor() as usize).max(1))
        }
    };
    match slice {
        Some(n) if n < lq => {
            let chunks = (0..lq)
                .step_by(n)
                .map(|start| {
                    let len = n.min(lq - start);
                    attention(
                        q.clone().narrow(2, start, len),
                        k.clone(),
                        v.clone(),
                        None,
                        None,
                        options,
                    )
                })
                .collect();
            Tensor::cat(chunks, 2)
        }
        _ => attention(q, k, v, None, None, options),
    }
}

/// Causal `softmax(q kᵀ · scale + mask) v` (position i attends to j ≤ i), for text encoders; `[B, H, L, D]`.
pub fn scaled_dot_product_causal(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f64,
) -> Tensor<4> {
    let options = AttentionModuleOptions {
        scale: Some(scale),
        is_causal: true,
        ..Default::default()
    };
    attention(q, k, v, None, None, options)
}
