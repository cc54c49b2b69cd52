//! CompVis `LPIPSWithDiscriminator` (KL autoencoders, `contperceptual.py`) and
//! `VQLPIPSWithDiscriminator` (VQ autoencoders, `vqperceptual.py`), computing exactly the
//! reference's logged scalars, including the adaptive GAN weight
//! `λ = ‖∇_L nll‖ / (‖∇_L g‖ + 1e-4)` clamped to [0, 1e4] × `disc_weight` at the decoder's last
//! layer L = `decoder.conv_out.weight`.
//!
//! Burn has no `retain_graph`, so λ is computed on detached copies of the reconstruction
//! (∂loss/∂recon for each term, turned into ∂loss/∂L with `conv2d_weight_backward`), and the
//! generator returns a *surrogate* whose gradient with respect to every autoencoder parameter is
//! the gradient of the reference's total loss: `Σ recon · (∂nll/∂recon + λ·f·∂g/∂recon) + kl_weight·KL`
//! (+ the codebook loss for VQ).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::conv::Conv2d;
use burn::tensor::module::conv2d_weight_backward;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::discriminator::{
    NLayerDiscriminator, NLayerDiscriminatorConfig, adopt_weight, hinge_d_loss, vanilla_d_loss,
};
use super::lpips::Lpips;
use crate::models::autoencoder::DiagonalGaussianDistribution;

/// Which discriminator loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscLossKind {
    /// `hinge_d_loss`.
    #[default]
    Hinge,
    /// `vanilla_d_loss`.
    Vanilla,
}

/// Settings of both losses (names as in the CompVis `lossconfig.params`).
#[derive(Config, Debug)]
pub struct PerceptualLossConfig {
    /// Global step from which the GAN terms count (`disc_start`).
    pub disc_start: usize,
    /// Initial learned log-variance (KL).
    #[config(default = 0.0)]
    pub logvar_init: f64,
    /// KL weight.
    #[config(default = 1.0)]
    pub kl_weight: f64,
    /// Codebook loss weight (VQ).
    #[config(default = 1.0)]
    pub codebook_weight: f64,
    /// Discriminator stages.
    #[config(default = 3)]
    pub disc_num_layers: usize,
    /// Discriminator input channels.
    #[config(default = 3)]
    pub disc_in_channels: usize,
    /// Discriminator base width.
    #[config(default = 64)]
    pub disc_ndf: usize,
    /// GAN factor once `disc_start` is reached.
    #[config(default = 1.0)]
    pub disc_factor: f64,
    /// Multiplier of the adaptive weight.
    #[config(default = 1.0)]
    pub disc_weight: f64,
    /// LPIPS weight (0 disables the perceptual term).
    #[config(default = 1.0)]
    pub perceptual_weight: f64,
    /// ActNorm in the discriminator.
    #[config(default = false)]
    pub use_actnorm: bool,
    /// Discriminator loss.
    #[config(default = "DiscLossKind::Hinge")]
    pub disc_loss: DiscLossKind,
    /// KL nll reduction: the reference's sum over C, H, W averaged over the batch (`true`), or a
    /// plain mean (`false`; only for ablations — it shrinks the nll gradient and so the adaptive
    /// weight by C·H·W).
    #[config(default = true)]
    pub kl_nll_sum_over_batch: bool,
}

/// The loss module: learned log-variance (KL), frozen LPIPS, discriminator.
#[derive(Module, Debug)]
pub struct PerceptualLoss {
    /// `logvar` (shape `[1]`; the reference's is a 0-d parameter that its optimizers never update).
    pub logvar: Param<Tensor<1>>,
    /// LPIPS (frozen).
    pub perceptual_loss: Lpips,
    /// The PatchGAN.
    pub discriminator: NLayerDiscriminator,
    kl_weight: f64,
    codebook_weight: f64,
    disc_start: usize,
    disc_factor: f64,
    disc_weight: f64,
    perceptual_weight: f64,
    hinge: bool,
    nll_sum: bool,
}

impl PerceptualLossConfig {
    /// Builds the loss (LPIPS and discriminator weights random until loaded).
    pub fn init(&self, device: &Device) -> PerceptualLoss {
        PerceptualLoss {
            logvar: Param::from_tensor(Tensor::full([1], self.logvar_init, device)),
            perceptual_loss: Lpips::new(device),
            discriminator: NLayerDiscriminatorConfig::new()
                .with_input_nc(self.disc_in_channels)
                .with_ndf(self.disc_ndf)
                .with_n_layers(self.disc_num_layers)
                .with_use_actnorm(self.use_actnorm)
                .init(device),
            kl_weight: self.kl_weight,
            codebook_weight: self.codebook_weight,
            disc_start: self.disc_start,
            disc_factor: self.disc_factor,
            disc_weight: self.disc_weight,
            perceptual_weight: self.perceptual_weight,
            hinge: self.disc_loss == DiscLossKind::Hinge,
            nll_sum: self.kl_nll_sum_over_batch,
        }
    }
}

/// Named scalars, as the reference logs them (without the `train/` prefix).
#[derive(Debug, Clone, Default)]
pub struct LossLog(pub Vec<(&'static str, f64)>);

impl LossLog {
    /// One value by name.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
    fn push(&mut self, name: &'static str, v: f64) {
        self.0.push((name, v));
    }
}

/// The generator side of one step.
#[derive(Debug)]
pub struct GeneratorLoss {
    /// Backward this: its gradient w.r.t. the autoencoder's parameters is the reference total loss's.
    pub surrogate: Tensor<1>,
    /// The reference's logged scalars (`total_loss`, `nll_loss`, `rec_loss`, `d_weight`, ...).
    pub log: LossLog,
}

fn scalar(t: Tensor<1>) -> f64 {
    t.into_scalar::<f32>() as f64
}

/// How the adaptive weight is taken: at the decoder's last layer (the reference), or — only to
/// show that the choice matters — at another conv layer given by the caller.
pub struct LastLayer<'a> {
    /// The layer's input (`h` of `Decoder::forward_parts`).
    pub input: Tensor<4>,
    /// The layer (`decoder.conv_out`).
    pub conv: &'a Conv2d,
}

impl PerceptualLoss {
    /// The step from which the GAN terms count.
    pub fn disc_start(&self) -> usize {
        self.disc_start
    }

    /// Pixel + perceptual reconstruction term per element, `[B, C, H, W]` (`rec_loss` before reduction).
    fn rec_loss(&self, inputs: Tensor<4>, recon: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let l1 = (inputs.clone() - recon.clone()).abs();
        if self.perceptual_weight > 0.0 {
            let p = self.perceptual_loss.forward(inputs, recon);
            (l1 + p.clone().mul_scalar(self.perceptual_weight), p)
        } else {
            let p = l1.zeros_like().slice([0..1, 0..1, 0..1, 0..1]);
            (l1, p)
        }
    }

    /// (∂L/∂weight of `last`) for upstream gradient `dy` of its output.
    fn last_layer_grad(last: &LastLayer<'_>, dy: Tensor<4>) -> Tensor<4> {
        let w = last.conv.weight.val().inner();
        let [_, _, kh, _] = w.dims();
        let pad = kh / 2;
        let opts = ConvOptions::new([1, 1], [pad, pad], [1, 1], 1);
        conv2d_weight_backward(last.input.clone().inner(), w, dy.inner(), opts)
    }

    /// λ from the two upstream gradients (0 if `disc_factor` is 0, as the reference).
    fn adaptive_weight(&self, last: &LastLayer<'_>, d_nll: Tensor<4>, d_g: Tensor<4>) -> f64 {
        if self.disc_factor <= 0.0 {
            return 0.0;
        }
        let g_nll = Self::last_layer_grad(last, d_nll);
        let g_g = Self::last_layer_grad(last, d_g);
        let n_nll = g_nll.square().sum().sqrt().into_scalar::<f32>() as f64;
        let n_g = g_g.square().sum().sqrt().into_scalar::<f32>() as f64;
        (n_nll / (n_g + 1e-4)).clamp(0.0, 1e4) * self.disc_weight
    }

    /// ∂(−mean D(recon))/∂recon on a detached copy, and the value.
    fn generator_term(&self, recon: &Tensor<4>) -> (Tensor<4>, f64) {
        let leaf = recon.clone().detach().require_grad();
        let g = self.discriminator.forward(leaf.clone()).mean().neg();
        let value = scalar(g.clone().inner());
        let grads = g.backward();
        (leaf.grad(&grads).expect("leaf is tracked"), value)
    }

    /// KL autoencoder generator step (`optimizer_idx=0` of `LPIPSWithDiscriminator`). Tensors live
    /// on an autodiff device; `recon` is the decoder output, `last.input` its last layer's input.
    pub fn generator_kl(
        &self,
        inputs: Tensor<4>,
        recon: Tensor<4>,
        posterior: &DiagonalGaussianDistribution,
        last: &LastLayer<'_>,
        global_step: usize,
    ) -> GeneratorLoss {
        let b = inputs.dims()[0] as f64;
        // nll on a detached leaf: value and ∂nll/∂recon.
        let leaf = recon.clone().detach().require_grad();
        let (rec, _) = self.rec_loss(inputs.clone(), leaf.clone());
        let logvar = self.logvar.val().reshape([1, 1, 1, 1]);
        let nll = rec.clone() / logvar.clone().exp() + logvar;
        let nll_loss = if self.nll_sum {
            nll.sum().div_scalar(b)
        } else {
            nll.mean()
        };
        let nll_value = scalar(nll_loss.clone().inner());
        let d_nll = leaf.grad(&nll_loss.backward()).expect("leaf is tracked");
        let rec_mean = scalar(rec.inner().mean());
        let kl_loss = posterior.kl().sum().div_scalar(b);
        let kl_value = scalar(kl_loss.clone().inner());
        let (d_g, g_value) = self.generator_term(&recon);
        let d_weight = self.adaptive_weight(last, d_nll.clone(), d_g.clone());
        let factor = adopt_weight(self.disc_factor, global_step, self.disc_start, 0.0);
        let total = nll_value + self.kl_weight * kl_value + d_weight * factor * g_value;
        let upstream = Tensor::from_inner(d_nll + d_g.mul_scalar(d_weight * factor));
        let surrogate = (recon * upstream).sum() + kl_loss.mul_scalar(self.kl_weight);
        let mut log = LossLog::default();
        log.push("total_loss", total);
        log.push("logvar", scalar(self.logvar.val().inner()));
        log.push("kl_loss", kl_value);
        log.push("nll_loss", nll_value);
        log.push("rec_loss", rec_mean);
        log.push("d_weight", d_weight);
        log.push("disc_factor", factor);
        log.push("g_loss", g_value);
        GeneratorLoss { surrogate, log }
    }

    /// VQ autoencoder generator step (`optimizer_idx=0` of `VQLPIPSWithDiscriminator`): nll is the
    /// *mean* of the reconstruction term (not sum/B as for KL); `codebook_loss` is added.
    pub fn generator_vq(
        &self,
        inputs: Tensor<4>,
        recon: Tensor<4>,
        codebook_loss: Tensor<1>,
        last: &LastLayer<'_>,
        global_step: usize,
    ) -> GeneratorLoss {
        let leaf = recon.clone().detach().require_grad();
        let (rec, p) = self.rec_loss(inputs, leaf.clone());
        let nll_loss = rec.clone().mean();
        let nll_value = scalar(nll_loss.clone().inner());
        let d_nll = leaf.grad(&nll_loss.backward()).expect("leaf is tracked");
        let (d_g, g_value) = self.generator_term(&recon);
        let d_weight = self.adaptive_weight(last, d_nll.clone(), d_g.clone());
        let factor = adopt_weight(self.disc_factor, global_step, self.disc_start, 0.0);
        let q_value = scalar(codebook_loss.clone().inner().mean());
        let total = nll_value + d_weight * factor * g_value + self.codebook_weight * q_value;
        let upstream = Tensor::from_inner(d_nll + d_g.mul_scalar(d_weight * factor));
        let surrogate =
            (recon * upstream).sum() + codebook_loss.mean().mul_scalar(self.codebook_weight);
        let mut log = LossLog::default();
        log.push("total_loss", total);
        log.push("quant_loss", q_value);
        log.push("nll_loss", nll_value);
        log.push("rec_loss", scalar(rec.inner().mean()));
        log.push("p_loss", scalar(p.inner().mean()));
        log.push("d_weight", d_weight);
        log.push("disc_factor", factor);
        log.push("g_loss", g_value);
        GeneratorLoss { surrogate, log }
    }

    /// Discriminator step (`optimizer_idx=1`): `disc_factor · d_loss(D(x), D(recon))` on detached
    /// inputs; returns the loss to backward (discriminator parameters only) and the log.
    pub fn discriminator_step(
        &self,
        inputs: Tensor<4>,
        recon: Tensor<4>,
        global_step: usize,
    ) -> (Tensor<1>, LossLog) {
        let real = self.discriminator.forward(inputs.detach());
        let fake = self.discriminator.forward(recon.detach());
        let factor = adopt_weight(self.disc_factor, global_step, self.disc_start, 0.0);
        let d = if self.hinge {
            hinge_d_loss(real.clone(), fake.clone())
        } else {
            vanilla_d_loss(real.clone(), fake.clone())
        };
        let d_loss = d.mul_scalar(factor);
        let mut log = LossLog::default();
        log.push("disc_loss", scalar(d_loss.clone().inner()));
        log.push("logits_real", scalar(real.inner().mean()));
        log.push("logits_fake", scalar(fake.inner().mean()));
        (d_loss, log)
    }
}
