//! 2-D convolution with a faster CPU path for inference.
//!
//! [`conv2d_forward`] is what every model calls instead of `Conv2d::forward`. On the Flex backend,
//! for f32 tensors outside autodiff, the convolutions that dominate UNet and VAE time (k x k,
//! stride 1, "same" padding, one group, no dilation — 3x3 and 1x1) run as im2col over blocks of
//! output rows followed by one multithreaded `gemm` per block that writes straight into the NCHW
//! output. Flex's own convolution converts the input to NHWC on one thread, re-packs the weights for
//! every 512-pixel tile and scatters each tile's result back to NCHW; a profile of the SD VAE decode
//! put those steps at about a quarter of its time. Everything else (other backends, autodiff,
//! reduced precision, strided or grouped convolutions) goes through `Conv2d::forward` unchanged.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

/// `conv.forward(x)` for `x` `[B, C_in, H, W]`, through the fast CPU path when it applies.
pub fn conv2d_forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if let Some(k) = fast_path_kernel(conv, &x) {
        return flex_same_conv(conv, x, k);
    }
    conv.forward(x)
}

/// The kernel size when `conv` on `x` can take the fast path.
#[cfg(feature = "flex")]
fn fast_path_kernel(conv: &Conv2d, x: &Tensor<4>) -> Option<usize> {
    if !fast_cpu_path_enabled() {
        return None;
    }
    let device = x.device();
    if device.is_autodiff() || device != burn::tensor::Device::flex() {
        return None;
    }
    if x.dtype() != burn::tensor::DType::F32
        || conv.weight.val().dtype() != burn::tensor::DType::F32
    {
        return None;
    }
    let [kh, kw] = conv.kernel_size;
    if kh != kw
        || kh % 2 == 0
        || conv.stride != [1, 1]
        || conv.dilation != [1, 1]
        || conv.groups != 1
    {
        return None;
    }
    let p = (kh - 1) / 2;
    match &conv.padding {
        PaddingConfig2d::Explicit(a, b, c, d) if [*a, *b, *c, *d] == [p; 4] => Some(kh),
        PaddingConfig2d::Valid if kh == 1 => Some(1),
        PaddingConfig2d::Same => Some(kh),
        _ => None,
    }
}

/// 0 = unset (read `LDM_FAST_CPU` on first use), 1 = on, 2 = off.
#[cfg(feature = "flex")]
static FAST_PATH: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Switches the fast CPU paths (this convolution and [`super::norm::group_norm_silu`]) on or off,
/// for comparisons. Default: on, unless the environment
/// variable `LDM_FAST_CPU` is `0`.
#[cfg(feature = "flex")]
pub fn set_fast_cpu_paths(on: bool) {
    FAST_PATH.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(feature = "flex")]
pub(crate) fn fast_cpu_path_enabled() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    match FAST_PATH.load(Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("LDM_FAST_CPU").map_or(true, |v| v != "0");
            set_fast_cpu_paths(on);
            on
        }
    }
}

/// Largest im2col block, in floats (32 MiB).
#[cfg(feature = "flex")]
const COL_BLOCK_FLOATS: usize = 8 << 20;

#[cfg(feature = "flex")]
fn flex_same_conv(conv: &Conv2d, x: Tensor<4>, k: usize) -> Tensor<4> {
    use burn::tensor::TensorData;
    use rayon::prelude::*;

    let device = x.device();
    let [b, c_in, h, w] = x.dims();
    let weight = conv.weight.val();
    let [c_out, wc_in, _, _] = weight.dims();
    assert_eq!(
        wc_in, c_in,
        "conv2d: input has {c_in} channels, weight expects {wc_in}"
    );
    let x = x.into_data();
    let x: &[f32] = x.as_slice().expect("f32 data");
    let weight = weight.into_data();
    // [C_out, C_in, k, k] row-major is already the [C_out, C_in·k·k] matrix im2col needs.
    let wm: &[f32] = weight.as_slice().expect("f32 weight");
    let bias = conv.bias.as_ref().map(|b| b.val().into_data());
    let bias: Option<&[f32]> = bias.as_ref().map(|d| d.as_slice().expect("f32 bias"));

    let hw = h * w;
    let kk = c_in * k * k;
    let mut out = vec![0f32; b * c_out * hw];
    // Bias first; the gemm then accumulates into it.
    if let Some(bias) = bias {
        out.par_chunks_mut(hw)
            .enumerate()
            .for_each(|(i, row)| row.fill(bias[i % c_out]));
    }
    let read_dst = bias.is_some();
    let p = (k - 1) / 2;
    let rows_per_block = if k == 1 {
        h
    } else {
        (COL_BLOCK_FLOATS / (kk * w)).clamp(1, h)
    };
    let mut col = if k == 1 {
        Vec::new()
    } else {
        vec![0f32; kk * rows_per_block * w]
    };
    for bi in 0..b {
        let xb = &x[bi * c_in * hw..(bi + 1) * c_in * hw];
        let ob = &mut out[bi * c_out * hw..(bi + 1) * c_out * hw];
        for r0 in (0..h).step_by(rows_per_block) {
            let rows = rows_per_block.min(h - r0);
            let n = rows * w;
            let rhs: &[f32] = if k == 1 {
                xb
            } else {
                // col[(c·k + i)·k + j, (r − r0)·W + ow] = x[c, r + i − p, ow + j − p] (0 outside).
                col[..kk * n]
                    .par_chunks_mut(k * k * n)
                    .enumerate()
                    .for_each(|(c, block)| {
                        let xc = &xb[c * hw..(c + 1) * hw];
                        for i in 0..k {
                            for j in 0..k {
                                let dst = &mut block[(i * k + j) * n..(i * k + j + 1) * n];
                                for r in 0..rows {
                                    let drow = &mut dst[r * w..(r + 1) * w];
                                    let sr = (r0 + r + i) as isize - p as isize;
                                    if sr < 0 || sr >= h as isize {
                                        drow.fill(0.0);
                                        continue;
                                    }
                                    let srow = &xc[sr as usize * w..(sr as usize + 1) * w];
                                    let shift = j as isize - p as isize;
                                    if shift >= 0 {
                                        let s = shift as usize;
                                        drow[..w - s].copy_from_slice(&srow[s..]);
                                        drow[w - s..].fill(0.0);
                                    } else {
                                        let s = (-shift) as usize;
                                        drow[..s].fill(0.0);
                                        drow[s..].copy_from_slice(&srow[..w - s]);
                                    }
                                }
                            }
                        }
                    });
                &col[..kk * n]
            };
            // out[:, r0·W ..] (row stride H·W) = W [C_out, kk] · rhs [kk, n] (row stride: n, or
            // H·W for the 1x1 case reading x directly).
            let rhs_rs = if k == 1 { hw } else { n } as isize;
            unsafe {
                gemm::gemm(
                    c_out,
                    n,
                    kk,
                    ob.as_mut_ptr().add(r0 * w),
                    1,
                    hw as isize,
                    read_dst,
                    wm.as_ptr(),
                    1,
                    kk as isize,
                    rhs.as_ptr(),
                    1,
                    rhs_rs,
                    1.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
    }
    Tensor::from_data(TensorData::new(out, [b, c_out, h, w]), &device)
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Device, Distribution};

    fn check(
        c_in: usize,
        c_out: usize,
        k: usize,
        h: usize,
        w: usize,
        bias: bool,
        padding: PaddingConfig2d,
    ) {
        let device = Device::flex();
        let conv = Conv2dConfig::new([c_in, c_out], [k, k])
            .with_padding(padding)
            .with_bias(bias)
            .init(&device);
        let x = Tensor::<4>::random([2, c_in, h, w], Distribution::Normal(0.0, 1.0), &device);
        assert!(fast_path_kernel(&conv, &x).is_some());
        let fast = conv2d_forward(&conv, x.clone());
        let reference = conv.forward(x);
        let scale = reference.clone().abs().max().into_scalar::<f64>();
        let err = (fast - reference).abs().max().into_scalar::<f64>();
        assert!(
            err <= 1e-5 * scale,
            "k{k} {c_in}->{c_out} {h}x{w}: err {err} vs scale {scale}"
        );
    }

    #[test]
    fn fast_cpu_conv_matches_burn_conv() {
        let p1 = PaddingConfig2d::Explicit(1, 1, 1, 1);
        check(3, 8, 3, 9, 7, true, p1.clone());
        check(16, 5, 3, 1, 1, false, p1.clone());
        check(32, 16, 3, 64, 20, true, p1);
        check(24, 12, 1, 6, 10, true, PaddingConfig2d::Valid);
        check(8, 8, 5, 11, 13, true, PaddingConfig2d::Explicit(2, 2, 2, 2));
    }

    #[test]
    fn other_convolutions_keep_burns_path() {
        let device = Device::flex();
        let x = Tensor::<4>::zeros([1, 4, 8, 8], &device);
        let strided = Conv2dConfig::new([4, 4], [3, 3])
            .with_stride([2, 2])
            .init(&device);
        assert!(fast_path_kernel(&strided, &x).is_none());
        let asym = Conv2dConfig::new([4, 4], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(0, 0, 1, 1))
            .init(&device);
        assert!(fast_path_kernel(&asym, &x).is_none());
        let conv = Conv2dConfig::new([4, 4], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device.clone().autodiff());
        let xa = Tensor::<4>::zeros([1, 4, 8, 8], &device.autodiff());
        assert!(fast_path_kernel(&conv, &xa).is_none());
    }
}
