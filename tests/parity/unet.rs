//! UNet vs CompVis `openaimodel.py` / `attention.py` / `util.py` (and SD2's `use_linear`).
//! Weights are synthetic (see `ldm_tests::synthetic`), inputs and outputs come from the reference.

use burn::module::Module;
use burn::tensor::{Int, Tensor};
use ldm::io::{LoadOptions, load_into};
use ldm::models::attention::{
    BasicTransformerBlock, CrossAttention, FeedForward, Geglu, SpatialTransformerConfig,
};
use ldm::models::unet::{
    AttentionBlock, Downsample, ResBlockConfig, UNetConfig, Upsample, timestep_embedding,
};
use ldm::nn::attention::AttentionMode;
use ldm_tests::synthetic;
use ldm_tests::{
    Fixture, TOL, assert_close, assert_close_tol, assert_param_grads, device, relative_error,
};

const FILE: &str = "unet.safetensors";

fn fixture() -> Fixture {
    Fixture::open(FILE)
}

fn load<M: Module>(fx: &Fixture, case: &str, mut module: M) -> M {
    let sd = synthetic::state_dict(fx, case, "");
    let report = load_into(&mut module, &sd, case, "", &LoadOptions::default()).unwrap();
    assert!(report.unused.is_empty(), "{report}");
    module
}

#[test]
fn synthetic_weights_match_python() {
    let fx = fixture();
    let expected = fx.float::<1>("selftest.values", &device());
    let ours = synthetic::values(1, "a.weight", 4, 0.0, 1.0);
    let ours = Tensor::<1>::from_floats(ours.as_slice(), &device());
    assert_eq!(relative_error(ours, expected), 0.0);
}

#[test]
fn timestep_embedding_cos_first_even_and_odd() {
    let device = device();
    let fx = fixture();
    let t = fx.float::<1>("temb.t", &device);
    assert_close(
        "temb dim 32",
        timestep_embedding(t.clone(), 32, 10000.0),
        fx.float("temb.out32", &device),
    );
    assert_close(
        "temb dim 33",
        timestep_embedding(t.clone(), 33, 10000.0),
        fx.float("temb.out33", &device),
    );
    // The perturbation the issue names: sin first must not pass.
    let e = timestep_embedding(t, 32, 10000.0);
    let halves = e.chunk(2, 1);
    let sin_first = Tensor::cat(vec![halves[1].clone(), halves[0].clone()], 1);
    let err = relative_error(sin_first, fx.float("temb.out32", &device));
    assert!(
        err > 100.0 * TOL,
        "sin-first embedding went unnoticed ({err:.2e})"
    );
}

#[test]
fn cross_attention_self_and_cross() {
    let device = device();
    let fx = fixture();
    let attn = load(
        &fx,
        "xattn_self",
        CrossAttention::new(64, None, 2, 32, 0.0, &device),
    );
    assert_close(
        "self-attention",
        attn.forward(fx.float("xattn_self.x", &device), None),
        fx.float("xattn_self.out", &device),
    );
    let attn = load(
        &fx,
        "xattn_cross",
        CrossAttention::new(64, Some(24), 2, 32, 0.0, &device),
    );
    let y = attn.forward(
        fx.float("xattn_cross.x", &device),
        Some(fx.float("xattn_cross.context", &device)),
    );
    assert_close("cross-attention", y, fx.float("xattn_cross.out", &device));
}

#[test]
fn geglu_and_feed_forward() {
    let device = device();
    let fx = fixture();
    let geglu = load(&fx, "geglu", Geglu::new(32, 64, &device));
    let x = fx.float::<3>("geglu.x", &device);
    assert_close(
        "GEGLU",
        geglu.forward(x.clone()),
        fx.float("geglu.out", &device),
    );
    // Swapped halves (gate first) must not pass.
    let mut halves = geglu.proj.forward(x).chunk(2, 2).into_iter();
    let (a, g) = (halves.next().unwrap(), halves.next().unwrap());
    let swapped = g * burn::tensor::activation::gelu(a);
    let err = relative_error(swapped, fx.float("geglu.out", &device));
    assert!(
        err > 100.0 * TOL,
        "swapped GEGLU halves went unnoticed ({err:.2e})"
    );

    let ff = load(
        &fx,
        "ff_glu",
        FeedForward::new(32, None, 4, true, 0.0, &device),
    );
    assert_close(
        "FeedForward glu",
        ff.forward(fx.float::<3>("ff_glu.x", &device)),
        fx.float("ff_glu.out", &device),
    );
    let ff = load(
        &fx,
        "ff_gelu",
        FeedForward::new(32, None, 4, false, 0.0, &device),
    );
    assert_close(
        "FeedForward gelu",
        ff.forward(fx.float::<3>("ff_gelu.x", &device)),
        fx.float("ff_gelu.out", &device),
    );
}

#[test]
fn basic_transformer_block() {
    let device = device();
    let fx = fixture();
    let block = load(
        &fx,
        "btb",
        BasicTransformerBlock::new(64, 2, 32, 0.0, Some(24), &device),
    );
    let y = block.forward(
        fx.float("btb.x", &device),
        Some(fx.float("btb.context", &device)),
    );
    assert_close("BasicTransformerBlock", y, fx.float("btb.out", &device));
}

#[test]
fn spatial_transformer_conv_and_linear_projections() {
    let device = device();
    let fx = fixture();
    let cfg = SpatialTransformerConfig::new(64, 2, 32)
        .with_depth(2)
        .with_context_dim(Some(24));
    let st = load(&fx, "st", cfg.init(&device));
    let y = st.forward(
        fx.float("st.x", &device),
        Some(fx.float("st.context", &device)),
    );
    assert_close("SpatialTransformer", y, fx.float("st.out", &device));
    let cfg = SpatialTransformerConfig::new(64, 2, 32)
        .with_context_dim(Some(24))
        .with_use_linear(true);
    let st = load(&fx, "st_linear", cfg.init(&device));
    let y = st.forward(
        fx.float("st_linear.x", &device),
        Some(fx.float("st_linear.context", &device)),
    );
    assert_close(
        "SpatialTransformer use_linear (SD2)",
        y,
        fx.float("st_linear.out", &device),
    );
}

#[test]
fn sliced_attention_equals_full() {
    let device = device();
    let fx = fixture();
    let cfg = SpatialTransformerConfig::new(64, 2, 32)
        .with_depth(2)
        .with_context_dim(Some(24));
    let mut st = load(&fx, "st", cfg.init(&device));
    let (x, ctx) = (
        fx.float::<4>("st.x", &device),
        fx.float::<3>("st.context", &device),
    );
    st.set_attention_mode(AttentionMode::Fused);
    let full = st.forward(x.clone(), Some(ctx.clone()));
    for slice in [1, 5, 7] {
        st.set_attention_mode(AttentionMode::Sliced(slice));
        assert_close_tol(
            &format!("sliced({slice}) vs full"),
            st.forward(x.clone(), Some(ctx.clone())),
            full.clone(),
            1e-5,
        );
    }
}

#[test]
fn legacy_attention_block() {
    let device = device();
    let fx = fixture();
    let block = load(
        &fx,
        "attnblock",
        AttentionBlock::new(64, 1, 32, false, &device).unwrap(),
    );
    assert_close(
        "AttentionBlock (head channels 32)",
        block.forward(fx.float("attnblock.x", &device)),
        fx.float("attnblock.out", &device),
    );
    let block = load(
        &fx,
        "attnblock_heads",
        AttentionBlock::new(64, 2, -1, false, &device).unwrap(),
    );
    let y = block.forward(fx.float("attnblock_heads.x", &device));
    assert_close(
        "AttentionBlock (2 heads)",
        y,
        fx.float("attnblock_heads.out", &device),
    );
}

#[test]
fn res_blocks_all_variants() {
    let device = device();
    let fx = fixture();
    let base = |o: usize| ResBlockConfig::new(64, 48).with_out_channels(Some(o));
    let cases = [
        ("res_plain", base(64)),
        ("res_skip1x1", base(96)),
        ("res_skip3x3", base(96).with_use_conv(true)),
        ("res_scaleshift", base(64).with_use_scale_shift_norm(true)),
        ("res_up", base(64).with_up(true)),
        ("res_down", base(64).with_down(true)),
    ];
    for (name, cfg) in cases {
        let block = load(&fx, name, cfg.init(&device));
        let y = block.forward(
            fx.float(&format!("{name}.x"), &device),
            fx.float(&format!("{name}.emb"), &device),
        );
        assert_close(name, y, fx.float(&format!("{name}.out"), &device));
    }
}

#[test]
fn down_and_up_sampling() {
    let device = device();
    let fx = fixture();
    let down = load(&fx, "down_conv", Downsample::new(64, true, 64, &device));
    assert_close(
        "Downsample conv",
        down.forward(fx.float("down_conv.x", &device)),
        fx.float("down_conv.out", &device),
    );
    let down = load(&fx, "down_pool", Downsample::new(64, false, 64, &device));
    assert_close(
        "Downsample pool",
        down.forward(fx.float("down_pool.x", &device)),
        fx.float("down_pool.out", &device),
    );
    let up = load(&fx, "up_conv", Upsample::new(64, true, 64, &device));
    assert_close(
        "Upsample conv",
        up.forward(fx.float("up_conv.x", &device)),
        fx.float("up_conv.out", &device),
    );
}

/// Builds a `UNetConfig` from the reference kwargs stored with the case; unknown keys fail loudly.
pub fn unet_config(fx: &Fixture, case: &str) -> UNetConfig {
    let v: serde_json::Value =
        serde_json::from_str(&fx.meta_json(&format!("{case}.config"))).unwrap();
    let mut cfg = UNetConfig::new();
    let uz = |x: &serde_json::Value| x.as_u64().unwrap() as usize;
    let list = |x: &serde_json::Value| {
        x.as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_u64().unwrap() as usize)
            .collect::<Vec<_>>()
    };
    for (k, x) in v.as_object().unwrap() {
        cfg = match k.as_str() {
            "class" => cfg,
            "image_size" => cfg.with_image_size(uz(x)),
            "in_channels" => cfg.with_in_channels(uz(x)),
            "out_channels" => cfg.with_out_channels(uz(x)),
            "model_channels" => cfg.with_model_channels(uz(x)),
            "num_res_blocks" => cfg.with_num_res_blocks(uz(x)),
            "attention_resolutions" => cfg.with_attention_resolutions(list(x)),
            "channel_mult" => cfg.with_channel_mult(list(x)),
            "dropout" => cfg.with_dropout(x.as_f64().unwrap()),
            "num_classes" => cfg.with_num_classes(x.as_u64().map(|n| n as usize)),
            "num_heads" => cfg.with_num_heads(x.as_i64().unwrap() as isize),
            "num_head_channels" => cfg.with_num_head_channels(x.as_i64().unwrap() as isize),
            "num_heads_upsample" => cfg.with_num_heads_upsample(x.as_i64().unwrap() as isize),
            "use_scale_shift_norm" => cfg.with_use_scale_shift_norm(x.as_bool().unwrap()),
            "resblock_updown" => cfg.with_resblock_updown(x.as_bool().unwrap()),
            "use_new_attention_order" => cfg.with_use_new_attention_order(x.as_bool().unwrap()),
            "use_spatial_transformer" => cfg.with_use_spatial_transformer(x.as_bool().unwrap()),
            "transformer_depth" => cfg.with_transformer_depth(uz(x)),
            "context_dim" => cfg.with_context_dim(x.as_u64().map(|n| n as usize)),
            "legacy" => cfg.with_legacy(x.as_bool().unwrap()),
            "use_linear_in_transformer" => cfg.with_use_linear_in_transformer(x.as_bool().unwrap()),
            "use_checkpoint" | "use_fp16" | "conv_resample" | "dims" => cfg,
            other => panic!("{case}: unhandled UNet kwarg `{other}`"),
        };
    }
    cfg
}

fn check_unet(case: &str) {
    let device = device();
    let fx = fixture();
    let mut model = unet_config(&fx, case).init(&device).unwrap();
    // Full CompVis prefix: exercises prefix detection and every key of the module tree.
    let sd = synthetic::state_dict(&fx, case, "model.diffusion_model.");
    let report = model.load_weights(&sd).unwrap();
    assert!(report.unused.is_empty(), "{report}");
    let x = fx.float::<4>(&format!("{case}.x"), &device);
    let has =
        |k: &str| fx.metadata.contains_key(k) || std::panic::catch_unwind(|| fx.shape(k)).is_ok();
    let context =
        has(&format!("{case}.context")).then(|| fx.float::<3>(&format!("{case}.context"), &device));
    let y = has(&format!("{case}.y")).then(|| fx.int::<1>(&format!("{case}.y"), &device));
    for i in 0..2 {
        let t = fx.int::<1>(&format!("{case}.t{i}"), &device).float();
        let out = model
            .try_forward(x.clone(), t, context.clone(), y.clone())
            .unwrap();
        assert_close(
            &format!("{case} t{i}"),
            out,
            fx.float(&format!("{case}.out{i}"), &device),
        );
    }
}

#[test]
fn unet_sd_like() {
    check_unet("unet_sd");
}

#[test]
fn unet_class_conditional() {
    check_unet("unet_class");
}

#[test]
fn unet_unconditional_legacy_attention() {
    check_unet("unet_uncond");
}

#[test]
fn unet_concat_conditioning() {
    check_unet("unet_concat");
}

#[test]
fn unet_sd2_linear_transformer() {
    check_unet("unet_sd2");
}

#[test]
fn unet_rejects_bad_inputs() {
    let device = device();
    let fx = fixture();
    let model = unet_config(&fx, "unet_sd").init(&device).unwrap();
    let x = fx.float::<4>("unet_sd.x", &device);
    let t = Tensor::<1, Int>::from_ints([1, 2], &device).float();
    let ctx = fx.float::<3>("unet_sd.context", &device);
    assert!(
        model.try_forward(x.clone(), t.clone(), None, None).is_err(),
        "missing context"
    );
    let odd = Tensor::<4>::zeros([2, 4, 7, 8], &device);
    assert!(
        model
            .try_forward(odd, t.clone(), Some(ctx.clone()), None)
            .is_err(),
        "odd size"
    );
    let y = Tensor::<1, Int>::from_ints([0, 1], &device);
    assert!(
        model.try_forward(x, t, Some(ctx), Some(y)).is_err(),
        "labels on an unconditional model"
    );
}

/// Training: the backward pass matches the reference's autograd. loss = Σ out·w through the
/// SD-style UNet (spatial transformers with self/cross-attention and GEGLU, ResBlocks with the
/// time embedding, skip concatenation, up/downsampling): the gradients of the input and the
/// context, and per parameter the gradient's L2 norm and sum.
#[test]
fn unet_gradients_match_reference() {
    let plain = device();
    let ad = plain.clone().autodiff();
    let fx = fixture();
    let case = "unet_grad";
    let mut model = unet_config(&fx, case).init(&ad).unwrap();
    let report = model
        .load_weights(&synthetic::state_dict(&fx, case, ""))
        .unwrap();
    assert!(
        report.unused.is_empty() && report.missing.is_empty(),
        "{report}"
    );
    let x = fx.float::<4>("unet_grad.x", &ad).require_grad();
    let ctx = fx.float::<3>("unet_grad.context", &ad).require_grad();
    let t = fx.int::<1>("unet_grad.t", &ad).float();
    let out = model
        .try_forward(x.clone(), t, Some(ctx.clone()), None)
        .unwrap();
    let grads = (out * fx.float::<4>("unet_grad.w", &ad)).sum().backward();
    assert_close(
        "unet x grad",
        x.grad(&grads).unwrap(),
        fx.float("unet_grad.x_grad", &plain),
    );
    assert_close(
        "unet context grad",
        ctx.grad(&grads).unwrap(),
        fx.float("unet_grad.context_grad", &plain),
    );
    assert_param_grads(&fx, case, &model, &grads);
}
