//! taming `NLayerDiscriminator` (the PatchGAN of pix2pix): 4x4 convolutions with padding 1, LeakyReLU
//! 0.2, BatchNorm (or ActNorm) between, `n_layers` stride-2 stages then two stride-1 convolutions to
//! one logit per patch; and the hinge / vanilla discriminator losses.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    BatchNorm, BatchNormConfig, Initializer, LeakyRelu, LeakyReluConfig, PaddingConfig2d,
};
use burn::tensor::{Device, Tensor};

/// [`NLayerDiscriminator`] settings.
#[derive(Config, Debug)]
pub struct NLayerDiscriminatorConfig {
    /// Input channels.
    #[config(default = 3)]
    pub input_nc: usize,
    /// Base width.
    #[config(default = 64)]
    pub ndf: usize,
    /// Stride-2 stages.
    #[config(default = 3)]
    pub n_layers: usize,
    /// ActNorm instead of BatchNorm.
    #[config(default = false)]
    pub use_actnorm: bool,
}

/// ActNorm (Kingma & Dhariwal 2018) as taming's: per-channel `scale · (x + loc)`, initialised from
/// the first training batch so the output has zero mean and unit variance per channel.
#[derive(Module, Debug)]
pub struct ActNorm {
    /// `[1, C, 1, 1]`.
    pub loc: Param<Tensor<4>>,
    /// `[1, C, 1, 1]`.
    pub scale: Param<Tensor<4>>,
}

impl ActNorm {
    fn new(c: usize, device: &Device) -> Self {
        Self {
            loc: Param::from_tensor(Tensor::zeros([1, c, 1, 1], device)),
            scale: Param::from_tensor(Tensor::ones([1, c, 1, 1], device)),
        }
    }

    /// The data-dependent initialisation: `loc = −mean`, `scale = 1/(std + 1e-6)` over B, H, W.
    pub fn initialize(&mut self, x: &Tensor<4>) {
        let [b, c, h, w] = x.dims();
        let flat = x
            .clone()
            .detach()
            .permute([1, 0, 2, 3])
            .reshape([c, b * h * w]);
        let mean = flat.clone().mean_dim(1);
        let std = flat.var(1).sqrt(); // torch.std: unbiased
        self.loc = Param::from_tensor(mean.neg().reshape([1, c, 1, 1]));
        self.scale = Param::from_tensor(std.add_scalar(1e-6).recip().reshape([1, c, 1, 1]));
    }

    /// `scale · (x + loc)`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.scale.val() * (x + self.loc.val())
    }
}

/// A layer of the discriminator's `main` sequence (indices mirror `nn.Sequential`).
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum DiscLayer {
    /// Convolution.
    Conv(Conv2d),
    /// BatchNorm2d.
    BatchNorm(BatchNorm),
    /// ActNorm.
    ActNorm(ActNorm),
    /// LeakyReLU(0.2).
    Act(LeakyRelu),
}

/// The PatchGAN discriminator (`main.N.*` keys as in taming).
#[derive(Module, Debug)]
pub struct NLayerDiscriminator {
    /// The layers.
    pub main: Vec<DiscLayer>,
}

impl NLayerDiscriminatorConfig {
    /// Builds the discriminator with taming's `weights_init`: conv weights N(0, 0.02), norm gains
    /// N(1, 0.02), norm biases 0.
    pub fn init(&self, device: &Device) -> NLayerDiscriminator {
        let conv = |i: usize, o: usize, stride: usize, bias: bool| {
            DiscLayer::Conv(
                Conv2dConfig::new([i, o], [4, 4])
                    .with_stride([stride, stride])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .with_bias(bias)
                    .with_initializer(Initializer::Normal {
                        mean: 0.0,
                        std: 0.02,
                    })
                    .init(device),
            )
        };
        let norm = |c: usize| {
            if self.use_actnorm {
                DiscLayer::ActNorm(ActNorm::new(c, device))
            } else {
                let mut bn = BatchNormConfig::new(c).init(device);
                bn.gamma = bn
                    .gamma
                    .map(|g| g.random_like(burn::tensor::Distribution::Normal(1.0, 0.02)));
                DiscLayer::BatchNorm(bn)
            }
        };
        let act = || DiscLayer::Act(LeakyReluConfig::new().with_negative_slope(0.2).init());
        // BatchNorm has an affine bias, so the convs before it have none (ActNorm: they do).
        let use_bias = self.use_actnorm;
        let ndf = self.ndf;
        let mut main = vec![conv(self.input_nc, ndf, 2, true), act()];
        let mut mult = 1;
        for n in 1..self.n_layers {
            let prev = mult;
            mult = (1 << n).min(8);
            main.extend([
                conv(ndf * prev, ndf * mult, 2, use_bias),
                norm(ndf * mult),
                act(),
            ]);
        }
        let prev = mult;
        mult = (1 << self.n_layers).min(8);
        main.extend([
            conv(ndf * prev, ndf * mult, 1, use_bias),
            norm(ndf * mult),
            act(),
        ]);
        main.push(conv(ndf * mult, 1, 1, true));
        NLayerDiscriminator { main }
    }
}

impl NLayerDiscriminator {
    /// Images `[B, C, H, W]` → patch logits `[B, 1, h, w]`. BatchNorm uses batch statistics on an
    /// autodiff device in training mode, running statistics otherwise.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.main.iter().fold(x, |h, layer| match layer {
            DiscLayer::Conv(c) => c.forward(h),
            DiscLayer::BatchNorm(bn) => bn.forward(h),
            DiscLayer::ActNorm(a) => a.forward(h),
            DiscLayer::Act(a) => a.forward(h),
        })
    }

    /// ActNorm's data-dependent initialisation on a first batch (as taming does on the first
    /// training forward): runs `x` through, initialising every ActNorm from its input.
    pub fn initialize_actnorm(&mut self, x: Tensor<4>) {
        let mut h = x;
        for layer in self.main.iter_mut() {
            h = match layer {
                DiscLayer::Conv(c) => c.forward(h),
                DiscLayer::BatchNorm(bn) => bn.forward(h),
                DiscLayer::ActNorm(a) => {
                    a.initialize(&h);
                    a.forward(h)
                }
                DiscLayer::Act(a) => a.forward(h),
            };
        }
    }
}

/// `mean(relu(1 − real)) / 2 + mean(relu(1 + fake)) / 2`.
pub fn hinge_d_loss(logits_real: Tensor<4>, logits_fake: Tensor<4>) -> Tensor<1> {
    let real = logits_real.neg().add_scalar(1.0).clamp_min(0.0).mean();
    let fake = logits_fake.add_scalar(1.0).clamp_min(0.0).mean();
    (real + fake).mul_scalar(0.5)
}

/// `(mean(softplus(−real)) + mean(softplus(fake))) / 2`.
pub fn vanilla_d_loss(logits_real: Tensor<4>, logits_fake: Tensor<4>) -> Tensor<1> {
    let softplus = |x: Tensor<4>| burn::tensor::activation::softplus(x, 1.0);
    (softplus(logits_real.neg()).mean() + softplus(logits_fake).mean()).mul_scalar(0.5)
}

/// taming `adopt_weight`: `weight` from `threshold` on, `value` before.
pub fn adopt_weight(weight: f64, global_step: usize, threshold: usize, value: f64) -> f64 {
    if global_step < threshold {
        value
    } else {
        weight
    }
}
