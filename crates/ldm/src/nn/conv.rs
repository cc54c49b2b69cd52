//! 2-D convolution with a faster CPU path, for inference and training.
//!
//! [`conv2d_forward`] is what every model calls instead of `Conv2d::forward`. On the Flex backend,
//! for f32 tensors, the convolutions that dominate UNet and VAE time (k x k,
//! stride 1, "same" padding, one group, no dilation — 3x3 and 1x1) run as im2col over blocks of
//! output rows followed by one multithreaded `gemm` per block that writes straight into the NCHW
//! output. Flex's own convolution converts the input to NHWC on one thread, re-packs the weights for
//! every 512-pixel tile and scatters each tile's result back to NCHW; a profile of the SD VAE decode
//! put those steps at about a quarter of its time.
//!
//! Under autodiff the same kernels run as a custom tracked operation (Burn's `extension` feature):
//! the input gradient is the same convolution of the output gradient with the flipped, transposed
//! weight, and the weight gradient one gemm of the output gradient with the im2col matrix of several
//! whole images at a time. Burn's Flex backward instead runs a transposed convolution (a gemm, then
//! a serial col2im) and a convolution with an H x W kernel, the slowest case of its convolution.
//! Measured: the SD UNet's training step at a 32x32 latent, batch 2 (`ldm bench --workload
//! unet-train-32`), about 15 s instead of 18 s on 2 cores (glibc malloc; 9.8 s in the `ldm` binary,
//! whose allocator keeps freed buffers).
//!
//! Everything else (other backends, reduced precision, strided or grouped convolutions) goes
//! through `Conv2d::forward` unchanged.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

/// `conv.forward(x)` for `x` `[B, C_in, H, W]`, through the fast CPU path when it applies.
pub fn conv2d_forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if let Some(k) = fast_path_kernel(conv, &x) {
        if !x.device().is_autodiff() {
            return flex_same_conv(conv, x, k);
        }
        let bias = conv.bias.as_ref().map(|b| b.val());
        if let Some(y) = tracked::same_conv(&x, &conv.weight.val(), bias.as_ref(), k) {
            return y;
        }
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
    let on_flex = if device.is_autodiff() {
        device.inner() == burn::tensor::Device::flex()
    } else {
        device == burn::tensor::Device::flex()
    };
    if !on_flex {
        return None;
    }
    let f32 = burn::tensor::DType::F32;
    if x.dtype() != f32
        || conv.weight.val().dtype() != f32
        || conv.bias.as_ref().is_some_and(|b| b.val().dtype() != f32)
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

#[cfg(feature = "flex")]
fn flex_same_conv(conv: &Conv2d, x: Tensor<4>, k: usize) -> Tensor<4> {
    use burn::tensor::TensorData;

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
    let wm: &[f32] = weight.as_slice().expect("f32 weight");
    let bias = conv.bias.as_ref().map(|b| b.val().into_data());
    let bias: Option<&[f32]> = bias.as_ref().map(|d| d.as_slice().expect("f32 bias"));
    let out = kernels::same_conv(x, [b, c_in, h, w], wm, c_out, bias, k);
    Tensor::from_data(TensorData::new(out, [b, c_out, h, w]), &device)
}

/// The f32 kernels behind the fast path: a "same" convolution and the two gradients training needs.
#[cfg(feature = "flex")]
mod kernels {
    use rayon::prelude::*;

    /// Largest im2col block, in floats (32 MiB).
    const COL_BLOCK_FLOATS: usize = 8 << 20;

    /// Writes rows `r0..r0 + rows` of image `xb` (`[C_in, H, W]`) as im2col columns:
    /// `col[((c·k + i)·k + j)·ld + off + (r − r0)·W + ow] = x[c, r + i − p, ow + j − p]` (0 outside),
    /// for every channel in parallel.
    #[allow(clippy::too_many_arguments)]
    fn im2col(
        xb: &[f32],
        [c_in, h, w]: [usize; 3],
        k: usize,
        r0: usize,
        rows: usize,
        col: &mut [f32],
        ld: usize,
        off: usize,
    ) {
        let hw = h * w;
        let p = (k - 1) / 2;
        col[..c_in * k * k * ld]
            .par_chunks_mut(k * k * ld)
            .enumerate()
            .for_each(|(c, block)| {
                let xc = &xb[c * hw..(c + 1) * hw];
                for i in 0..k {
                    for j in 0..k {
                        let dst = &mut block[(i * k + j) * ld + off..][..rows * w];
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
    }

    /// `dst (+)= lhs · rhs` for an `m x n` `dst` (row stride `dst_rs`, unit column stride), an
    /// `m x k` `lhs` (`(pointer, row stride)`, unit column stride) and a `k x n` `rhs`
    /// (`(pointer, column stride, row stride)`), multithreaded; `dst` is read only when
    /// `accumulate`.
    ///
    /// # Safety
    /// Every element the strides address must lie inside its allocation, and `dst` must not
    /// overlap `lhs` or `rhs`.
    unsafe fn gemm_f32(
        [m, n, k]: [usize; 3],
        dst: *mut f32,
        dst_rs: isize,
        accumulate: bool,
        (lhs, lhs_rs): (*const f32, isize),
        (rhs, rhs_cs, rhs_rs): (*const f32, isize, isize),
    ) {
        // SAFETY: forwarded to the caller.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst,
                1,
                dst_rs,
                accumulate,
                lhs,
                1,
                lhs_rs,
                rhs,
                rhs_cs,
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

    /// Rows of one image per im2col block, so that a block stays under `block_floats` (at least
    /// one row).
    fn rows_per_block(kk: usize, h: usize, w: usize, block_floats: usize) -> usize {
        (block_floats / (kk * w)).clamp(1, h)
    }

    /// A k x k, stride-1, zero-padded "same" convolution of `x` (`[B, C_in, H, W]`) with `wm`
    /// (`[C_out, C_in, k, k]` row-major, i.e. the `[C_out, C_in·k·k]` matrix) plus `bias`:
    /// `[B, C_out, H, W]` row-major.
    pub(super) fn same_conv(
        x: &[f32],
        [b, c_in, h, w]: [usize; 4],
        wm: &[f32],
        c_out: usize,
        bias: Option<&[f32]>,
        k: usize,
    ) -> Vec<f32> {
        let hw = h * w;
        let kk = c_in * k * k;
        assert_eq!(x.len(), b * c_in * hw, "conv2d: input size");
        assert_eq!(wm.len(), c_out * kk, "conv2d: weight size");
        let mut out = vec![0f32; b * c_out * hw];
        // Bias first; the gemm then accumulates into it.
        if let Some(bias) = bias {
            out.par_chunks_mut(hw)
                .enumerate()
                .for_each(|(i, row)| row.fill(bias[i % c_out]));
        }
        let read_dst = bias.is_some();
        let rows_per_block = if k == 1 {
            h
        } else {
            rows_per_block(kk, h, w, COL_BLOCK_FLOATS)
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
                    im2col(xb, [c_in, h, w], k, r0, rows, &mut col, n, 0);
                    &col[..kk * n]
                };
                // out[:, r0·W ..] (row stride H·W) = W [C_out, kk] · rhs [kk, n] (row stride: n,
                // or H·W for the 1x1 case reading x directly).
                let rhs_rs = if k == 1 { hw } else { n } as isize;
                // SAFETY: dst is `c_out` rows of `n` floats at stride `hw` from `r0·w` inside `ob`
                // (`c_out·hw` floats); lhs is `c_out x kk` contiguous; rhs is `kk` rows of `n` at
                // stride `rhs_rs` within `rhs`.
                unsafe {
                    gemm_f32(
                        [c_out, n, kk],
                        ob.as_mut_ptr().add(r0 * w),
                        hw as isize,
                        read_dst,
                        (wm.as_ptr(), kk as isize),
                        (rhs.as_ptr(), 1, rhs_rs),
                    );
                }
            }
        }
        out
    }

    /// The weight gradient of [`same_conv`]: `dW[o, (c, i, j)] = Σ_b Σ_p dy[b, o, p] ·
    /// col_b[(c, i, j), p]`, `[C_out, C_in·k·k]` row-major. Whole images are batched into one im2col
    /// block (one gemm over all their pixels) when they fit; larger images go by row blocks.
    pub(super) fn same_conv_weight_grad(
        x: &[f32],
        dims: [usize; 4],
        dy: &[f32],
        c_out: usize,
        k: usize,
    ) -> Vec<f32> {
        same_conv_weight_grad_blocked(x, dims, dy, c_out, k, COL_BLOCK_FLOATS)
    }

    /// [`same_conv_weight_grad`] with im2col blocks of at most `block_floats` floats (at least
    /// one image row).
    pub(super) fn same_conv_weight_grad_blocked(
        x: &[f32],
        [b, c_in, h, w]: [usize; 4],
        dy: &[f32],
        c_out: usize,
        k: usize,
        block_floats: usize,
    ) -> Vec<f32> {
        let hw = h * w;
        let kk = c_in * k * k;
        assert_eq!(x.len(), b * c_in * hw, "conv2d backward: input size");
        assert_eq!(
            dy.len(),
            b * c_out * hw,
            "conv2d backward: output-gradient size"
        );
        let mut dw = vec![0f32; c_out * kk];
        // Blocks of (image, first row, rows); one block covers `imgs` whole images or part of one.
        let per_block = block_floats / (kk * hw).max(1);
        let mut blocks: Vec<Vec<(usize, usize, usize)>> = Vec::new();
        if per_block >= 1 {
            let imgs: Vec<usize> = (0..b).collect();
            for chunk in imgs.chunks(per_block) {
                blocks.push(chunk.iter().map(|&bi| (bi, 0, h)).collect());
            }
        } else {
            let rpb = rows_per_block(kk, h, w, block_floats);
            for bi in 0..b {
                for r0 in (0..h).step_by(rpb) {
                    blocks.push(vec![(bi, r0, rpb.min(h - r0))]);
                }
            }
        }
        let max_n = blocks
            .iter()
            .map(|blk| blk.iter().map(|&(_, _, rows)| rows * w).sum::<usize>())
            .max()
            .unwrap_or(0);
        let mut col = vec![0f32; kk * max_n];
        let mut dyt = vec![0f32; c_out * max_n];
        for (bn, blk) in blocks.iter().enumerate() {
            let n: usize = blk.iter().map(|&(_, _, rows)| rows * w).sum();
            let mut off = 0;
            for &(bi, r0, rows) in blk {
                let xb = &x[bi * c_in * hw..(bi + 1) * c_in * hw];
                im2col(xb, [c_in, h, w], k, r0, rows, &mut col, n, off);
                // dyT[o, off ..] = dy[bi, o, r0·W .. (r0 + rows)·W]
                let dyb = &dy[bi * c_out * hw..(bi + 1) * c_out * hw];
                dyt[..c_out * n]
                    .par_chunks_mut(n)
                    .enumerate()
                    .for_each(|(o, row)| {
                        row[off..off + rows * w]
                            .copy_from_slice(&dyb[o * hw + r0 * w..o * hw + (r0 + rows) * w]);
                    });
                off += rows * w;
            }
            // dW [C_out, kk] (+)= dyT [C_out, n] · colᵀ [n, kk]; colᵀ[p, q] = col[q·n + p].
            // SAFETY: dst is `c_out x kk` contiguous in `dw`; lhs `c_out x n` contiguous in `dyt`;
            // rhs reads `col[q·n + p]` for q < kk, p < n, inside `col`.
            unsafe {
                gemm_f32(
                    [c_out, kk, n],
                    dw.as_mut_ptr(),
                    kk as isize,
                    bn > 0,
                    (dyt.as_ptr(), n as isize),
                    (col.as_ptr(), n as isize, 1),
                );
            }
        }
        dw
    }

    /// The weight of the input gradient: `W'[c, o, i, j] = W[o, c, k−1−i, k−1−j]`, so that
    /// `dx = same_conv(dy, W')` (stride 1, symmetric "same" padding).
    pub(super) fn flipped_transposed(wm: &[f32], c_out: usize, c_in: usize, k: usize) -> Vec<f32> {
        let kk = k * k;
        let mut wt = vec![0f32; c_in * c_out * kk];
        wt.par_chunks_mut(c_out * kk)
            .enumerate()
            .for_each(|(c, dst)| {
                for o in 0..c_out {
                    let src = &wm[(o * c_in + c) * kk..][..kk];
                    for (t, v) in dst[o * kk..(o + 1) * kk].iter_mut().enumerate() {
                        *v = src[kk - 1 - t];
                    }
                }
            });
        wt
    }

    /// The bias gradient: `Σ_b Σ_p dy[b, o, p]`.
    pub(super) fn bias_grad(dy: &[f32], b: usize, c_out: usize, hw: usize) -> Vec<f32> {
        (0..c_out)
            .into_par_iter()
            .map(|o| {
                (0..b)
                    .map(|bi| {
                        dy[(bi * c_out + o) * hw..][..hw]
                            .iter()
                            .map(|&v| v as f64)
                            .sum::<f64>()
                    })
                    .sum::<f64>() as f32
            })
            .collect()
    }
}

/// Training on Flex: the same convolution as a custom autodiff operation whose forward and both
/// gradients run through [`kernels`]. Burn's own Flex backward takes the input gradient through a
/// transposed convolution (a gemm, then a serial col2im) and the weight gradient through a
/// convolution with an H x W kernel, the slowest case of Flex's convolution.
#[cfg(feature = "flex")]
mod tracked {
    use super::kernels;
    use burn::backend::Flex;
    use burn::backend::autodiff::Autodiff;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::{
        BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
    };
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::flex::FlexTensor;
    use burn::backend::{TensorMetadata, tensor::FloatTensor};
    use burn::tensor::{Tensor, TensorData};
    use std::borrow::Cow;

    /// A float tensor of `Autodiff<Flex, C>`, whatever the checkpointing strategy `C`.
    type AutodiffTensor = FloatTensor<Autodiff<Flex>>;

    fn f32s(t: &FlexTensor) -> Cow<'_, [f32]> {
        match t.as_slice::<f32>() {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(t.to_contiguous().as_slice::<f32>().expect("f32").to_vec()),
        }
    }

    fn dims4(t: &FlexTensor) -> [usize; 4] {
        let s = t.shape();
        [s[0], s[1], s[2], s[3]]
    }

    fn forward(x: &FlexTensor, w: &FlexTensor, bias: Option<&FlexTensor>, k: usize) -> FlexTensor {
        let [b, c_in, h, wd] = dims4(x);
        let c_out = w.shape()[0];
        let bias = bias.map(f32s);
        let out = kernels::same_conv(
            &f32s(x),
            [b, c_in, h, wd],
            &f32s(w),
            c_out,
            bias.as_deref(),
            k,
        );
        FlexTensor::from_data(TensorData::new(out, [b, c_out, h, wd]))
    }

    /// Backward of the tracked convolution; `N` is 3 with a bias, 2 without.
    #[derive(Debug)]
    struct SameConvBackward {
        k: usize,
    }

    impl<const N: usize> Backward<Flex, N> for SameConvBackward {
        /// The forward's input and weight.
        type State = (FlexTensor, FlexTensor);

        fn backward(
            self,
            ops: Ops<Self::State, N>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let k = self.k;
            let grad = grads.consume::<Flex>(&ops.node);
            let (x, w) = ops.state;
            let [b, c_in, h, wd] = dims4(&x);
            let c_out = w.shape()[0];
            let dy = f32s(&grad);
            if let Some(node) = &ops.parents[0] {
                let wt = kernels::flipped_transposed(&f32s(&w), c_out, c_in, k);
                let dx = kernels::same_conv(&dy, [b, c_out, h, wd], &wt, c_in, None, k);
                let dx = FlexTensor::from_data(TensorData::new(dx, [b, c_in, h, wd]));
                grads.register::<Flex>(node.id, dx);
            }
            if let Some(node) = &ops.parents[1] {
                let dw = kernels::same_conv_weight_grad(&f32s(&x), [b, c_in, h, wd], &dy, c_out, k);
                let dw = FlexTensor::from_data(TensorData::new(dw, [c_out, c_in, k, k]));
                grads.register::<Flex>(node.id, dw);
            }
            if N == 3
                && let Some(node) = &ops.parents[N - 1]
            {
                let db = kernels::bias_grad(&dy, b, c_out, h * wd);
                grads
                    .register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(db, [c_out])));
            }
        }
    }

    fn conv<C: CheckpointStrategy>(
        x: AutodiffTensor,
        w: AutodiffTensor,
        bias: Option<AutodiffTensor>,
        k: usize,
    ) -> AutodiffTensor {
        let op = SameConvBackward { k };
        match bias {
            Some(bias) => match op
                .prepare::<C>([x.node(), w.node(), bias.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let out = forward(x.primitive(), w.primitive(), Some(bias.primitive()), k);
                    prep.finish((x.into_primitive(), w.into_primitive()), out)
                }
                OpsKind::UnTracked(prep) => prep.finish(forward(
                    x.primitive(),
                    w.primitive(),
                    Some(bias.primitive()),
                    k,
                )),
            },
            None => match op
                .prepare::<C>([x.node(), w.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let out = forward(x.primitive(), w.primitive(), None, k);
                    prep.finish((x.into_primitive(), w.into_primitive()), out)
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(forward(x.primitive(), w.primitive(), None, k))
                }
            },
        }
    }

    macro_rules! try_strategy {
        ($C:ty, $x:expr, $w:expr, $bias:expr, $k:expr) => {
            if let Ok(xp) = $x.clone().try_into_primitive::<Autodiff<Flex, $C>>() {
                let wp = $w.clone().try_into_primitive::<Autodiff<Flex, $C>>().ok()?;
                let bp = match $bias {
                    Some(b) => Some(b.clone().try_into_primitive::<Autodiff<Flex, $C>>().ok()?),
                    None => None,
                };
                let out = conv::<$C>(xp, wp, bp, $k);
                return Some(Tensor::from_primitive::<Autodiff<Flex, $C>>(out));
            }
        };
    }

    /// The convolution as a tracked operation when `x`, `w` and `bias` are autodiff tensors on
    /// Flex; `None` otherwise (the caller then takes Burn's path). They must be f32, as
    /// `fast_path_kernel` checks.
    pub(super) fn same_conv(
        x: &Tensor<4>,
        w: &Tensor<4>,
        bias: Option<&Tensor<1>>,
        k: usize,
    ) -> Option<Tensor<4>> {
        try_strategy!(NoCheckpointing, x, w, bias, k);
        try_strategy!(BalancedCheckpointing, x, w, bias, k);
        None
    }
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
    }

    /// The tracked convolution's output and gradients (input, weight, bias) against Burn's own
    /// autodiff convolution.
    fn check_grads(c_in: usize, c_out: usize, k: usize, h: usize, w: usize, bias: bool) {
        let device = Device::flex().autodiff();
        let conv = Conv2dConfig::new([c_in, c_out], [k, k])
            .with_padding(PaddingConfig2d::Explicit(
                (k - 1) / 2,
                (k - 1) / 2,
                (k - 1) / 2,
                (k - 1) / 2,
            ))
            .with_bias(bias)
            .init(&device);
        let x0 = Tensor::<4>::random([3, c_in, h, w], Distribution::Normal(0.0, 1.0), &device);
        let r = Tensor::<4>::random([3, c_out, h, w], Distribution::Normal(0.0, 1.0), &device);
        assert!(fast_path_kernel(&conv, &x0).is_some());
        let run = |tracked: bool| {
            let x = x0.clone().detach().require_grad();
            let y = if tracked {
                let b = conv.bias.as_ref().map(|b| b.val());
                tracked::same_conv(&x, &conv.weight.val(), b.as_ref(), k)
                    .expect("the tracked path applies")
            } else {
                conv.forward(x.clone())
            };
            let grads = (y.clone() * r.clone()).sum().backward();
            let gx = x.grad(&grads).expect("input grad");
            let gw = conv.weight.val().grad(&grads).expect("weight grad");
            let gb = conv
                .bias
                .as_ref()
                .map(|b| b.val().grad(&grads).expect("bias grad"));
            (y.inner(), gx, gw, gb)
        };
        let (y, gx, gw, gb) = run(true);
        let (ry, rgx, rgw, rgb) = run(false);
        let close = |name: &str, a: Tensor<4>, b: Tensor<4>| {
            let scale = b.clone().abs().max().into_scalar::<f64>();
            let err = (a - b).abs().max().into_scalar::<f64>();
            assert!(
                err <= 1e-5 * scale,
                "{name} k{k} {c_in}->{c_out} {h}x{w}: err {err} vs {scale}"
            );
        };
        close("output", y, ry);
        close("input grad", gx, rgx);
        close("weight grad", gw, rgw);
        if let (Some(a), Some(b)) = (gb, rgb) {
            close(
                "bias grad",
                a.reshape([1, 1, 1, c_out]),
                b.reshape([1, 1, 1, c_out]),
            );
        }
    }

    #[test]
    fn tracked_conv_gradients_match_burn() {
        check_grads(3, 8, 3, 9, 7, true);
        check_grads(16, 5, 3, 1, 1, false);
        check_grads(8, 16, 3, 16, 12, true);
        check_grads(12, 6, 1, 6, 10, true);
        check_grads(4, 4, 5, 11, 13, false);
    }

    #[test]
    fn tracked_conv_weight_grad_by_row_blocks() {
        // An image too large for one im2col block goes by row blocks.
        let (c_in, c_out, k, h, w) = (2usize, 3usize, 3usize, 40usize, 30usize);
        let x: Vec<f32> = (0..2 * c_in * h * w)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let dy: Vec<f32> = (0..2 * c_out * h * w)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 24.0)
            .collect();
        let whole = kernels::same_conv_weight_grad(&x, [2, c_in, h, w], &dy, c_out, k);
        let rows = kernels::same_conv_weight_grad_blocked(
            &x,
            [2, c_in, h, w],
            &dy,
            c_out,
            k,
            7 * w * c_in * k * k,
        );
        for (a, b) in whole.iter().zip(&rows) {
            assert!((a - b).abs() <= 1e-3 * a.abs().max(1.0), "{a} vs {b}");
        }
    }
}
