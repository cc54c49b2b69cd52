//! First-stage training losses against the reference (`xtask/fixtures/gen_losses.py`): taming's
//! `LPIPS` (VGG16 with synthetic weights, the real v0.1 `lin` weights), `NLayerDiscriminator`
//! (BatchNorm in eval and train mode, ActNorm with its data-dependent init), hinge / vanilla
//! losses, and every logged scalar of CompVis `LPIPSWithDiscriminator` (KL) and
//! `VQLPIPSWithDiscriminator` (VQ) before and at `disc_start`, adaptive weight included.

use burn::store::burn_pack::{Bytes, DType, Tensor as PackTensor};
use burn::tensor::{Device, Tensor};
use ldm::io::{LoadOptions, StateDict, load_into};
use ldm::losses::{
    LastLayer, Lpips, NLayerDiscriminator, NLayerDiscriminatorConfig, PerceptualLoss,
    PerceptualLossConfig, hinge_d_loss, vanilla_d_loss,
};
use ldm::models::autoencoder::{
    AutoencoderKL, AutoencoderKLConfig, DdConfig, VQModel, VQModelConfig,
};
use ldm_tests::{Fixture, assert_close, device, synthetic};

const FILE: &str = "losses.safetensors";

fn fixture() -> Fixture {
    Fixture::open(FILE)
}

/// Fixture tensors renamed into a state dict.
fn from_fixture(fx: &Fixture, pairs: &[(String, String)]) -> StateDict {
    let device = burn::tensor::Device::default();
    let tensors = pairs.iter().map(|(key, name)| {
        let shape = fx.shape(key);
        let data: Vec<f32> = match shape.len() {
            4 => fx
                .float::<4>(key, &device)
                .into_data()
                .iter::<f32>()
                .collect(),
            1 => fx
                .float::<1>(key, &device)
                .into_data()
                .iter::<f32>()
                .collect(),
            n => panic!("rank {n}"),
        };
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        PackTensor::new(
            name.clone(),
            DType::F32,
            shape,
            None,
            Bytes::from_bytes_vec(bytes),
        )
    });
    StateDict::from_tensors(tensors, format!("{FILE}:renamed"))
}

fn lpips(fx: &Fixture, device: &Device) -> Lpips {
    let vgg = synthetic::state_dict(fx, "lpips", "");
    let lins = from_fixture(
        fx,
        &(0..5)
            .map(|i| {
                (
                    format!("lpips.lin.lin{i}.model.1.weight"),
                    format!("lin{i}.model.1.weight"),
                )
            })
            .collect::<Vec<_>>(),
    );
    let mut m = Lpips::new(device);
    let report = m.load_weights(&[&vgg, &lins]).unwrap();
    assert!(report.unused.is_empty(), "{report}");
    m
}

fn scalar(fx: &Fixture, key: &str) -> f64 {
    let device = burn::tensor::Device::default();
    fx.float::<1>(key, &device).into_scalar::<f32>() as f64
}

#[test]
fn lpips_matches_taming_and_the_lpips_package() {
    let device = device();
    let fx = fixture();
    let m = lpips(&fx, &device);
    let out = m.forward(fx.float("inputs.x", &device), fx.float("inputs.y", &device));
    let want = fx.float::<4>("lpips.out", &device);
    assert_close("LPIPS", out.reshape(want.dims()), want);
}

fn discriminator(
    fx: &Fixture,
    case: &str,
    ndf: usize,
    actnorm: bool,
    device: &Device,
) -> NLayerDiscriminator {
    let mut d = NLayerDiscriminatorConfig::new()
        .with_ndf(ndf)
        .with_n_layers(2)
        .with_use_actnorm(actnorm)
        .init(device);
    let sd = synthetic::state_dict(fx, case, "");
    let report = load_into(&mut d, &sd, "discriminator", "", &LoadOptions::default()).unwrap();
    assert!(report.unused.is_empty(), "{report}");
    d
}

#[test]
fn patchgan_batchnorm_eval_and_train() {
    let device = device();
    let fx = fixture();
    let x = fx.float::<4>("inputs.x", &device);
    let d = discriminator(&fx, "patchgan", 16, false, &device);
    assert_close(
        "PatchGAN eval",
        d.forward(x.clone()),
        fx.float("patchgan.out_eval", &device),
    );
    // Training mode (batch statistics) is what an autodiff device runs.
    let ad = device.clone().autodiff();
    let d = discriminator(&fx, "patchgan", 16, false, &ad);
    let out = d.forward(x.to_device(&ad));
    assert_close(
        "PatchGAN train",
        out.inner(),
        fx.float("patchgan.out_train", &device),
    );
}

#[test]
fn patchgan_actnorm_initialises_from_the_first_batch() {
    let device = device();
    let fx = fixture();
    let (x, y) = (
        fx.float::<4>("inputs.x", &device),
        fx.float::<4>("inputs.y", &device),
    );
    let mut d = discriminator(&fx, "patchgan_actnorm", 16, true, &device);
    assert_close(
        "ActNorm before init",
        d.forward(x.clone()),
        fx.float("patchgan_actnorm.out_eval_uninit", &device),
    );
    d.initialize_actnorm(x.clone());
    assert_close(
        "ActNorm first batch",
        d.forward(x),
        fx.float("patchgan_actnorm.out_first", &device),
    );
    assert_close(
        "ActNorm second batch",
        d.forward(y),
        fx.float("patchgan_actnorm.out_second", &device),
    );
    for i in [3usize, 6] {
        if let ldm::losses::DiscLayer::ActNorm(a) = &d.main[i] {
            assert_close(
                &format!("loc {i}"),
                a.loc.val(),
                fx.float(&format!("patchgan_actnorm.init.main.{i}.loc"), &device),
            );
            assert_close(
                &format!("scale {i}"),
                a.scale.val(),
                fx.float(&format!("patchgan_actnorm.init.main.{i}.scale"), &device),
            );
        } else {
            panic!("main.{i} is not ActNorm");
        }
    }
}

#[test]
fn hinge_and_vanilla_d_losses() {
    let device = device();
    let fx = fixture();
    let (r, f) = (
        fx.float::<4>("dloss.logits_real", &device),
        fx.float::<4>("dloss.logits_fake", &device),
    );
    assert_close(
        "hinge",
        hinge_d_loss(r.clone(), f.clone()),
        fx.float("dloss.hinge", &device),
    );
    assert_close(
        "vanilla",
        vanilla_d_loss(r, f),
        fx.float("dloss.vanilla", &device),
    );
}

fn ddconfig(double_z: bool) -> DdConfig {
    DdConfig::new()
        .with_ch(32)
        .with_ch_mult(vec![1, 2])
        .with_num_res_blocks(1)
        .with_resolution(32)
        .with_z_channels(4)
        .with_double_z(double_z)
}

fn loss_module(
    fx: &Fixture,
    cfg: PerceptualLossConfig,
    disc_case: &str,
    ndf: usize,
    device: &Device,
) -> PerceptualLoss {
    let mut loss = cfg.with_disc_ndf(ndf).init(device);
    loss.perceptual_loss = lpips(fx, device);
    loss.discriminator = discriminator(fx, disc_case, ndf, false, device);
    loss
}

/// The tiny KL autoencoder's reconstruction on an autodiff device: (posterior, last-layer input,
/// reconstruction, model).
fn kl_forward(
    fx: &Fixture,
    ad: &Device,
) -> (
    ldm::models::autoencoder::DiagonalGaussianDistribution,
    Tensor<4>,
    Tensor<4>,
    AutoencoderKL,
) {
    let mut ae = AutoencoderKLConfig::new(ddconfig(true), 4).init(ad);
    let report = ae
        .load_weights(&synthetic::state_dict(fx, "kl_loss.ae", ""))
        .unwrap();
    assert!(report.unused.is_empty(), "{report}");
    let x = fx.float::<4>("inputs.x", ad);
    let posterior = ae.encode(x);
    let z = posterior.sample_with_noise(fx.float("kl_loss.posterior_noise", ad));
    let (h, recon) = ae.decoder.forward_parts(ae.post_quant_conv.forward(z));
    (posterior, h, recon, ae)
}

fn check_log(case: &str, step: usize, log: &ldm::losses::LossLog, names: &[&str]) {
    let fx = fixture();
    for name in names {
        let want = scalar(&fx, &format!("{case}.step{step}.{name}"));
        let got = log.get(name).unwrap_or_else(|| panic!("{name} not logged"));
        let err = (got - want).abs() / want.abs().max(1e-6);
        eprintln!("{case} step {step} {name}: {got:.6e} vs {want:.6e} (rel {err:.1e})");
        assert!(err <= 1e-4, "{case} step {step} {name}: {got} vs {want}");
    }
}

const KL_NAMES: [&str; 8] = [
    "total_loss",
    "logvar",
    "kl_loss",
    "nll_loss",
    "rec_loss",
    "d_weight",
    "disc_factor",
    "g_loss",
];
const D_NAMES: [&str; 3] = ["disc_loss", "logits_real", "logits_fake"];

fn kl_config(logvar: f64) -> PerceptualLossConfig {
    PerceptualLossConfig::new(50)
        .with_logvar_init(logvar)
        .with_kl_weight(0.5)
        .with_disc_num_layers(2)
        .with_disc_weight(0.5)
}

#[test]
fn kl_loss_logs_match_lpips_with_discriminator() {
    let ad = device().autodiff();
    let fx = fixture();
    let (posterior, h, recon, ae) = kl_forward(&fx, &ad);
    assert_close(
        "KL reconstruction",
        recon.clone().inner(),
        fx.float("kl_loss.reconstructions", &device()),
    );
    let loss = loss_module(&fx, kl_config(0.0), "kl_loss.disc", 64, &ad);
    let x = fx.float::<4>("inputs.x", &ad);
    let last = LastLayer {
        input: h.clone(),
        conv: &ae.decoder.conv_out,
    };
    for step in [49, 50] {
        let g = loss.generator_kl(x.clone(), recon.clone(), &posterior, &last, step);
        check_log("kl_loss", step, &g.log, &KL_NAMES);
        let (_, d) = loss.discriminator_step(x.clone(), recon.clone(), step);
        check_log("kl_loss", step, &d, &D_NAMES);
    }
    // A learned log-variance other than 0 (its `+ logvar` and `/ exp(logvar)` terms).
    let loss = loss_module(&fx, kl_config(0.25), "kl_loss.disc", 64, &ad);
    let g = loss.generator_kl(x, recon, &posterior, &last, 50);
    check_log("kl_loss_logvar", 50, &g.log, &KL_NAMES);
}

/// The parity test catches the two classic mistakes: the adaptive weight taken at another layer,
/// and the nll reduced by a mean instead of the reference's sum / B.
#[test]
fn kl_loss_catches_wrong_layer_and_wrong_reduction() {
    let ad = device().autodiff();
    let fx = fixture();
    let want = scalar(&fx, "kl_loss.step50.d_weight");
    // λ by plain autograd on fresh graphs (one forward per term), at a chosen decoder conv.
    let lp = lpips(&fx, &ad);
    let disc = discriminator(&fx, "kl_loss.disc", 64, false, &ad);
    let grad_norm = |layer: &str, term: &str| -> f64 {
        let (_, _, recon, ae) = kl_forward(&fx, &ad);
        let x = fx.float::<4>("inputs.x", &ad);
        let b = x.dims()[0] as f64;
        let loss = match term {
            "nll" => ((x.clone() - recon.clone()).abs() + lp.forward(x, recon))
                .sum()
                .div_scalar(b),
            _ => disc.forward(recon).mean().neg(),
        };
        let grads = loss.backward();
        let w = match layer {
            "conv_out" => &ae.decoder.conv_out.weight,
            _ => &ae.decoder.conv_in.weight,
        };
        w.val()
            .grad(&grads)
            .unwrap()
            .square()
            .sum()
            .sqrt()
            .into_scalar::<f32>() as f64
    };
    let lambda = |layer: &str| {
        (grad_norm(layer, "nll") / (grad_norm(layer, "g") + 1e-4)).clamp(0.0, 1e4) * 0.5
    };
    let right = lambda("conv_out");
    eprintln!("autograd d_weight at decoder.conv_out: {right:.4e} (reference {want:.4e})");
    assert!(
        (right - want).abs() / want <= 1e-3,
        "autograd cross-check: {right} vs {want}"
    );
    let wrong = lambda("conv_in");
    eprintln!("d_weight at decoder.conv_in: {wrong:.4e} vs reference {want:.4e}");
    assert!(
        (wrong - want).abs() / want > 1e-2,
        "wrong layer not caught: {wrong} vs {want}"
    );
    // Mean instead of sum / B.
    let (posterior, h, recon, ae) = kl_forward(&fx, &ad);
    let x = fx.float::<4>("inputs.x", &ad);
    let loss = loss_module(
        &fx,
        kl_config(0.0).with_kl_nll_sum_over_batch(false),
        "kl_loss.disc",
        64,
        &ad,
    );
    let last = LastLayer {
        input: h,
        conv: &ae.decoder.conv_out,
    };
    let g = loss.generator_kl(x, recon, &posterior, &last, 50);
    for name in ["nll_loss", "d_weight"] {
        let (got, want) = (
            g.log.get(name).unwrap(),
            scalar(&fx, &format!("kl_loss.step50.{name}")),
        );
        eprintln!("mean-reduced {name}: {got:.4e} vs reference {want:.4e}");
        assert!(
            (got - want).abs() / want.abs() > 1e-2,
            "mean reduction not caught on {name}"
        );
    }
}

#[test]
fn vq_loss_logs_match_vqlpips_with_discriminator() {
    let device = device();
    let ad = device.clone().autodiff();
    let fx = fixture();
    let mut ae: VQModel = VQModelConfig::new(ddconfig(false), 32, 4).init(&ad);
    let report = ae
        .load_weights(&synthetic::state_dict(&fx, "vq_loss.ae", ""))
        .unwrap();
    assert!(report.unused.is_empty(), "{report}");
    let x = fx.float::<4>("inputs.x", &ad);
    let q = ae.encode(x.clone());
    let idx: Vec<i64> = q.indices.clone().into_data().iter::<i64>().collect();
    assert_eq!(idx, fx.ints("vq_loss.indices"), "code indices");
    assert_close(
        "codebook loss",
        q.loss.clone().inner(),
        fx.float("vq_loss.codebook_loss", &device),
    );
    let (h, recon) = ae
        .decoder
        .forward_parts(ae.post_quant_conv.forward(q.quantized));
    assert_close(
        "VQ reconstruction",
        recon.clone().inner(),
        fx.float("vq_loss.reconstructions", &device),
    );
    let cfg = PerceptualLossConfig::new(50)
        .with_disc_num_layers(2)
        .with_disc_weight(0.5);
    let loss = loss_module(&fx, cfg, "vq_loss.disc", 16, &ad);
    let last = LastLayer {
        input: h,
        conv: &ae.decoder.conv_out,
    };
    for step in [49, 50] {
        let g = loss.generator_vq(x.clone(), recon.clone(), q.loss.clone(), &last, step);
        check_log(
            "vq_loss",
            step,
            &g.log,
            &[
                "total_loss",
                "quant_loss",
                "nll_loss",
                "rec_loss",
                "p_loss",
                "d_weight",
                "disc_factor",
                "g_loss",
            ],
        );
        let (_, d) = loss.discriminator_step(x.clone(), recon.clone(), step);
        check_log("vq_loss", step, &d, &D_NAMES);
    }
}

/// The generator surrogate's gradient equals plain autograd of the reference's total loss
/// (nll + kl_weight·KL + λ·f·g with λ fixed), for encoder and decoder parameters.
#[test]
fn kl_surrogate_gradient_equals_total_loss_gradient() {
    let ad = device().autodiff();
    let fx = fixture();
    let lp = lpips(&fx, &ad);
    let disc = discriminator(&fx, "kl_loss.disc", 64, false, &ad);
    let loss = loss_module(&fx, kl_config(0.0), "kl_loss.disc", 64, &ad);
    let x = fx.float::<4>("inputs.x", &ad);
    // Surrogate.
    let (posterior, h, recon, ae) = kl_forward(&fx, &ad);
    let last = LastLayer {
        input: h,
        conv: &ae.decoder.conv_out,
    };
    let g = loss.generator_kl(x.clone(), recon, &posterior, &last, 50);
    let lambda = g.log.get("d_weight").unwrap();
    let grads = g.surrogate.backward();
    let sur_enc = ae.encoder.conv_in.weight.val().grad(&grads).unwrap();
    let sur_dec = ae.decoder.conv_out.weight.val().grad(&grads).unwrap();
    // Plain autograd of the total on a fresh graph.
    let (posterior, _, recon, ae) = kl_forward(&fx, &ad);
    let b = x.dims()[0] as f64;
    let nll = ((x.clone() - recon.clone()).abs() + lp.forward(x, recon.clone()))
        .sum()
        .div_scalar(b);
    let kl = posterior.kl().sum().div_scalar(b);
    let g_loss = disc.forward(recon).mean().neg();
    let total = nll + kl.mul_scalar(0.5) + g_loss.mul_scalar(lambda);
    let grads = total.backward();
    let enc = ae.encoder.conv_in.weight.val().grad(&grads).unwrap();
    let dec = ae.decoder.conv_out.weight.val().grad(&grads).unwrap();
    assert_close("encoder.conv_in grad", sur_enc, enc);
    assert_close("decoder.conv_out grad", sur_dec, dec);
}
