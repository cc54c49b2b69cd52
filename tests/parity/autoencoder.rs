//! First stage vs CompVis `model.py` / `autoencoder.py` / `distributions.py` and taming `VectorQuantizer2`.
//! Weights of the blocks and the KL model are synthetic (see `ldm_tests::synthetic`); the VQ model's
//! come from a torch pickle (`ae_vq.ckpt`). Inputs and outputs come from the reference.

use burn::tensor::Tensor;
use ldm::io::StateDict;
use ldm::io::{LoadOptions, load_into};
use ldm::models::autoencoder::blocks::{
    AttnBlock, Downsample, LinAttnBlock, ResnetBlock, ResnetBlockConfig, Upsample,
};
use ldm::models::autoencoder::{
    AutoencoderKL, AutoencoderKLConfig, DdConfig, DiagonalGaussianDistribution, VQModel,
    VQModelConfig,
};
use ldm_tests::synthetic;
use ldm_tests::{Fixture, assert_close, device, fixture_path};

fn ddconfig(fx: &Fixture) -> DdConfig {
    let v: serde_json::Value = serde_json::from_str(&fx.meta_json("ddconfig")).unwrap();
    let list = |k: &str| {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect::<Vec<_>>()
    };
    let num = |k: &str| v[k].as_u64().unwrap() as usize;
    DdConfig::new()
        .with_ch(num("ch"))
        .with_out_ch(num("out_ch"))
        .with_ch_mult(list("ch_mult"))
        .with_num_res_blocks(num("num_res_blocks"))
        .with_attn_resolutions(list("attn_resolutions"))
        .with_in_channels(num("in_channels"))
        .with_resolution(num("resolution"))
        .with_z_channels(num("z_channels"))
        .with_double_z(v["double_z"].as_bool().unwrap())
        .with_norm_groups(v["norm_num_groups"].as_u64().map_or(32, |n| n as usize))
}

fn meta_usize(fx: &Fixture, key: &str) -> usize {
    fx.meta_json(key).parse().unwrap()
}

/// Loads a unit block (synthetic weights of case `name`, keys under `{name}.`) and checks it on the
/// input stored in `ae_blocks.safetensors`.
fn check_block<M: burn::module::Module>(
    name: &str,
    mut module: M,
    forward: impl Fn(&M, Tensor<4>) -> Tensor<4>,
) {
    let device = device();
    let fx = Fixture::open("ae_blocks.safetensors");
    let sd = synthetic::state_dict(&fx, name, &format!("{name}."));
    let report = load_into(
        &mut module,
        &sd,
        name,
        &format!("{name}."),
        &LoadOptions::default(),
    )
    .unwrap();
    assert!(report.unused.is_empty(), "{report}");
    let x = fx.float::<4>(&format!("io.{name}.input"), &device);
    let expected = fx.float::<4>(&format!("io.{name}.output"), &device);
    assert_close(name, forward(&module, x), expected);
}

fn resnet(i: usize, o: usize, conv_shortcut: bool) -> ResnetBlock {
    ResnetBlockConfig::new(i, o)
        .with_conv_shortcut(conv_shortcut)
        .init(&device())
}

#[test]
fn resnet_block_identity_skip() {
    check_block("resnet_same", resnet(32, 32, false), |m, x| {
        m.forward(x, None)
    });
}

#[test]
fn resnet_block_nin_shortcut() {
    check_block("resnet_nin", resnet(32, 64, false), |m, x| {
        m.forward(x, None)
    });
}

#[test]
fn resnet_block_conv_shortcut() {
    check_block("resnet_conv", resnet(32, 64, true), |m, x| {
        m.forward(x, None)
    });
}

#[test]
fn attn_block() {
    check_block("attn", AttnBlock::new(32, 32, 1e-6, &device()), |m, x| {
        m.forward(x)
    });
}

#[test]
fn linear_attn_block() {
    check_block("linattn", LinAttnBlock::new(32, &device()), |m, x| {
        m.forward(x)
    });
}

#[test]
fn upsample_with_and_without_conv() {
    check_block("upsample", Upsample::new(32, true, &device()), |m, x| {
        m.forward(x)
    });
    check_block(
        "upsample_noconv",
        Upsample::new(32, false, &device()),
        |m, x| m.forward(x),
    );
}

#[test]
fn downsample_asymmetric_pad_and_avg_pool() {
    check_block(
        "downsample",
        Downsample::new(32, true, &device()),
        |m, x| m.forward(x),
    );
    check_block(
        "downsample_pool",
        Downsample::new(32, false, &device()),
        |m, x| m.forward(x),
    );
}

/// The perturbation the issue names: GroupNorm eps 1e-5 instead of the first stage's 1e-6 must be
/// caught (the fixtures feed small-variance inputs for this reason).
#[test]
fn wrong_groupnorm_eps_is_caught() {
    let device = device();
    let fx = Fixture::open("ae_blocks.safetensors");
    let sd = synthetic::state_dict(&fx, "resnet_same", "resnet_same.");
    let mut block = ResnetBlockConfig::new(32, 32)
        .with_norm_eps(1e-5)
        .init(&device);
    load_into(
        &mut block,
        &sd,
        "resnet",
        "resnet_same.",
        &LoadOptions::default(),
    )
    .unwrap();
    let y = block.forward(fx.float::<4>("io.resnet_same.input", &device), None);
    let err = ldm_tests::relative_error(y, fx.float::<4>("io.resnet_same.output", &device));
    eprintln!("eps 1e-5: relative error {err:.3e}");
    assert!(
        err > 10.0 * ldm_tests::TOL,
        "eps 1e-5 went unnoticed (err {err:.3e})"
    );
}

fn kl_model() -> (Fixture, AutoencoderKL) {
    let device = device();
    let fx = Fixture::open("ae_kl.safetensors");
    let cfg = AutoencoderKLConfig::new(ddconfig(&fx), meta_usize(&fx, "embed_dim"));
    cfg.validate().unwrap();
    let mut model = cfg.init(&device);
    // Full CompVis prefix: exercises prefix detection and every key of the module tree.
    let sd = synthetic::state_dict(&fx, "kl", "first_stage_model.");
    let report = model.load_weights(&sd).unwrap();
    assert_eq!(report.prefix, "first_stage_model.");
    assert!(report.unused.is_empty(), "{report}");
    (fx, model)
}

/// `norm_num_groups: 0` (the demo model's first stage): the reference with every `Normalize` an
/// `nn.Identity`; the model has no norm parameters and every synthetic key is used.
#[test]
fn kl_without_groupnorm() {
    let device = device();
    let fx = Fixture::open("ae_kl_nonorm.safetensors");
    let cfg = AutoencoderKLConfig::new(ddconfig(&fx), meta_usize(&fx, "embed_dim"));
    assert_eq!(cfg.ddconfig.norm_groups, 0);
    cfg.validate().unwrap();
    let mut model = cfg.init(&device);
    let sd = synthetic::state_dict(&fx, "kl", "first_stage_model.");
    let report = model.load_weights(&sd).unwrap();
    assert!(report.unused.is_empty(), "{report}");
    let x = fx.float("input.x", &device);
    assert_close(
        "encoder",
        model.encoder.forward(x.clone()),
        fx.float("out.encoder", &device),
    );
    assert_close(
        "mean",
        model.encode(x.clone()).mean,
        fx.float("out.mean", &device),
    );
    let (recon, _) = model.forward(x, false);
    assert_close(
        "forward(mode)",
        recon,
        fx.float("out.forward_mode", &device),
    );
}

#[test]
fn kl_encoder() {
    let device = device();
    let (fx, model) = kl_model();
    let h = model.encoder.forward(fx.float("input.x", &device));
    assert_close("encoder", h, fx.float("out.encoder", &device));
}

#[test]
fn kl_decoder() {
    let device = device();
    let (fx, model) = kl_model();
    let y = model.decoder.forward(fx.float("out.decoder_in", &device));
    assert_close("decoder", y, fx.float("out.decoded", &device));
}

#[test]
fn kl_encode_mode_decode() {
    let device = device();
    let (fx, model) = kl_model();
    let posterior = model.encode(fx.float("input.x", &device));
    assert_close(
        "mean",
        posterior.mean.clone(),
        fx.float("out.mean", &device),
    );
    assert_close(
        "logvar",
        posterior.logvar.clone(),
        fx.float("out.logvar", &device),
    );
    assert_close("std", posterior.std.clone(), fx.float("out.std", &device));
    let sample = posterior.sample_with_noise(fx.float("input.noise", &device));
    assert_close("sample", sample.clone(), fx.float("out.sample", &device));
    assert_close("kl", posterior.kl(), fx.float("out.kl", &device));
    assert_close("nll", posterior.nll(sample), fx.float("out.nll", &device));
    let decoded = model.decode(posterior.mode());
    assert_close("decode(mode)", decoded, fx.float("out.decoded", &device));
    let (recon, _) = model.forward(fx.float("input.x", &device), false);
    assert_close(
        "forward(sample_posterior=False)",
        recon,
        fx.float("out.forward_mode", &device),
    );
}

#[test]
fn diagonal_gaussian_kl_nll_with_clamp() {
    let device = device();
    let fx = Fixture::open("ae_kl.safetensors");
    let dist = DiagonalGaussianDistribution::new(fx.float("dist.params", &device));
    assert_close(
        "clamped logvar",
        dist.logvar.clone(),
        fx.float("dist.logvar", &device),
    );
    assert_close("kl", dist.kl(), fx.float("dist.kl", &device));
    assert_close(
        "nll",
        dist.nll(fx.float("dist.other", &device)),
        fx.float("dist.nll", &device),
    );
}

#[test]
fn kl_sample_is_seeded_and_reproducible() {
    use rand::SeedableRng;
    let device = device();
    let fx = Fixture::open("ae_kl.safetensors");
    let dist = DiagonalGaussianDistribution::new(fx.float("dist.params", &device));
    let a = dist.sample_with_rng(&mut rand::rngs::StdRng::seed_from_u64(7));
    let b = dist.sample_with_rng(&mut rand::rngs::StdRng::seed_from_u64(7));
    let c = dist.sample_with_rng(&mut rand::rngs::StdRng::seed_from_u64(8));
    assert_eq!(ldm_tests::relative_error(a.clone(), b), 0.0);
    assert!(ldm_tests::relative_error(a, c) > 1e-3);
}

fn vq_model() -> (Fixture, VQModel) {
    let device = device();
    let fx = Fixture::open("ae_vq_io.safetensors");
    let cfg = VQModelConfig::new(
        ddconfig(&fx),
        meta_usize(&fx, "n_embed"),
        meta_usize(&fx, "embed_dim"),
    );
    cfg.validate().unwrap();
    let mut model = cfg.init(&device);
    // Weights come from a Lightning-style torch zip pickle, as CompVis ships them.
    let sd = StateDict::open(fixture_path("ae_vq.ckpt")).unwrap();
    let report = model.load_weights(&sd).unwrap();
    assert_eq!(report.prefix, "first_stage_model.");
    assert!(report.unused.is_empty(), "{report}");
    (fx, model)
}

#[test]
fn vq_quantization_indices_latent_loss() {
    let device = device();
    let (fx, model) = vq_model();
    let h = model.encode_to_prequant(fx.float("input.x", &device));
    assert_close("pre-quant latent", h.clone(), fx.float("out.h", &device));
    let q = model.quantize.forward(fx.float("out.h", &device));
    let indices: Vec<i64> = q.indices.clone().into_data().iter::<i64>().collect();
    assert_eq!(indices, fx.ints("out.indices"), "code indices");
    let distinct = indices
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    assert!(distinct > 4, "fixture uses only {distinct} codes");
    assert_close("quantized", q.quantized, fx.float("out.quant", &device));
    assert_close("codebook loss", q.loss, fx.float("out.emb_loss", &device));
}

#[test]
fn vq_round_trip_and_interface() {
    let device = device();
    let (fx, model) = vq_model();
    let (dec, diff, _) = model.forward(fx.float("input.x", &device));
    assert_close(
        "VQModel.forward dec",
        dec,
        fx.float("out.forward_dec", &device),
    );
    assert_close(
        "VQModel.forward diff",
        diff,
        fx.float("out.forward_diff", &device),
    );
    let h = fx.float::<4>("out.h", &device);
    assert_close(
        "decode (quantised)",
        model.decode_latent(h.clone(), false),
        fx.float("out.decode_quantized", &device),
    );
    assert_close(
        "decode (force_not_quantize)",
        model.decode_latent(h, true),
        fx.float("out.decode_not_quantized", &device),
    );
    let code = model.decode_code(fx.int::<3>("out.indices", &device));
    assert_close("decode_code", code, fx.float("out.decode_code", &device));
}

/// The other perturbation the issue names: symmetric padding in the first-stage Downsample (the
/// UNet's convention) instead of the reference's right/bottom padding must be caught.
#[test]
fn symmetric_downsample_padding_is_caught() {
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;
    let device = device();
    let fx = Fixture::open("ae_blocks.safetensors");
    let sd = synthetic::state_dict(&fx, "downsample", "downsample.");
    let mut down = Downsample::new(32, true, &device);
    load_into(
        &mut down,
        &sd,
        "downsample",
        "downsample.",
        &LoadOptions::default(),
    )
    .unwrap();
    let conv = down.conv.as_ref().unwrap();
    let x = fx.float::<4>("io.downsample.input", &device);
    let symmetric = conv2d(
        x,
        conv.weight.val(),
        conv.bias.as_ref().map(|b| b.val()),
        ConvOptions::new([2, 2], [1, 1], [1, 1], 1),
    );
    let err = ldm_tests::relative_error(symmetric, fx.float::<4>("io.downsample.output", &device));
    eprintln!("symmetric padding: relative error {err:.3e}");
    assert!(
        err > 100.0 * ldm_tests::TOL,
        "symmetric padding went unnoticed (err {err:.3e})"
    );
}
