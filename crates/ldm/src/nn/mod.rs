//! Building blocks shared by the models: the attention core and PyTorch-default constructors.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig2d};
use burn::tensor::Device;

/// `nn.Conv2d(c_in, c_out, k, stride=1, padding=pad)`.
pub(crate) fn conv2d(c_in: usize, c_out: usize, k: usize, pad: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [k, k])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .init(device)
}

/// `nn.GroupNorm(groups, c, eps, affine=True)`.
pub(crate) fn group_norm(groups: usize, c: usize, eps: f64, device: &Device) -> GroupNorm {
    GroupNormConfig::new(groups, c)
        .with_epsilon(eps)
        .init(device)
}

/// [`group_norm`], or no normalisation at all when `groups` is 0 (the first stage's
/// `norm_num_groups: 0`).
pub(crate) fn maybe_group_norm(
    groups: usize,
    c: usize,
    eps: f64,
    device: &Device,
) -> Option<GroupNorm> {
    (groups > 0).then(|| group_norm(groups, c, eps, device))
}

pub mod attention;
pub mod conv;
pub mod norm;

pub use conv::conv2d_forward;
pub use norm::{group_norm_silu, maybe_group_norm_silu};
