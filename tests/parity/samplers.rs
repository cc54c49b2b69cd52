//! Sampler trajectories against the reference samplers (`xtask/fixtures/gen_samplers.py`: CompVis
//! `DDIMSampler`, `PLMSSampler`, `LatentDiffusion.p_sample_loop`, SD2 `stochastic_encode`/`decode`)
//! and diffusers' schedulers (`gen_diffusers.py`: DPM-Solver++ 2M, Euler, Euler ancestral), driven
//! by the same model, initial noise and per-step noise.
//!
//! The model is either a deterministic toy function (defined identically in both generators) or a
//! tiny UNet with synthetic weights. Per-step noise is not stored: it is the synthetic hash of
//! `"{case}/{kind}/{index}"` (see `tests/common/synthetic.rs`), keyed by purpose and step.

use burn::tensor::{Device, Tensor, TensorData};
use ldm::Result;
use ldm::pipelines::{
    Conditioning, ConditioningKey, DiffusionModel, DiffusionWrapper, Guided, Img2ImgNoising,
    SamplingRequest, run_request,
};
use ldm::schedulers::{
    BetaSchedule, DdimConfig, DdimDiscretization, DiffusionSchedule, FnNoise, Inpainting,
    NoiseKind, NoiseSource, Parameterization, PlmsConfig, SampleOptions, SamplerKind,
    SamplerOptions, Scheduler, StepInfo, TimestepSpacing, sample,
};
use ldm_tests::{Fixture, assert_close, device, relative_error, synthetic};
use serde_json::Value;

const COMPVIS: &str = "samplers.safetensors";
const DIFFUSERS: &str = "diffusers_schedulers.safetensors";

/// The generators' toy denoiser:
/// `tanh(0.9x + 0.5c) · (0.6 + 0.3 cos(3s)) + 0.1 s x` with s = t/1000 and c `[B, 4, 1, 1]`
/// carried in the `concat` field.
struct Toy;

impl DiffusionModel for Toy {
    fn apply_model(&self, x: Tensor<4>, t: f64, cond: &Conditioning) -> Result<Tensor<4>> {
        let s = t as f32 / 1000.0;
        let factor = 0.6f32 + 0.3f32 * (3.0f32 * s).cos();
        let pre = match &cond.concat {
            Some(c) => x.clone().mul_scalar(0.9) + c.clone().mul_scalar(0.5),
            None => x.clone().mul_scalar(0.9),
        };
        Ok(pre.tanh().mul_scalar(factor) + x.mul_scalar(0.1f32 * s))
    }
}

fn config(fx: &Fixture, case: &str) -> Value {
    serde_json::from_str(&fx.meta_json(&format!("{case}.config"))).unwrap()
}

/// Noise as the generators replace it: `values(7, "{case}/{kind}/{index}", shape, 0, 1.7)`.
fn synthetic_noise(
    case: &str,
    kind: NoiseKind,
    index: usize,
    shape: [usize; 4],
    device: &Device,
) -> Tensor<4> {
    let kind = match kind {
        NoiseKind::Step => "step",
        NoiseKind::Blend => "blend",
        other => panic!("{case}: unexpected {other:?} noise request"),
    };
    let n = shape.iter().product();
    let v = synthetic::values(7, &format!("{case}/{kind}/{index}"), n, 0.0, 1.7);
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// A noise source serving the case's synthetic step/blend noise and its stored encode noise.
fn fixture_noise<'a>(fx: &'a Fixture, case: &'a str) -> impl NoiseSource + 'a {
    FnNoise(move |kind, index, shape, device: &Device| {
        Ok(match kind {
            NoiseKind::Encode => fx.float::<4>(&format!("{case}.encode_noise"), device),
            k => synthetic_noise(case, k, index, shape, device),
        })
    })
}

enum Model {
    Toy(Toy),
    Unet(DiffusionWrapper),
}

impl Model {
    fn as_dyn(&self) -> &dyn DiffusionModel {
        match self {
            Model::Toy(t) => t,
            Model::Unet(u) => u,
        }
    }
}

fn build_model(fx: &Fixture, case: &str, kind: &str, device: &Device) -> Model {
    if kind == "toy" {
        return Model::Toy(Toy);
    }
    let unet_case = format!("{case}.unet");
    let mut unet = crate::unet::unet_config(fx, &unet_case)
        .init(device)
        .unwrap();
    let report = unet
        .load_weights(&synthetic::state_dict(fx, &unet_case, ""))
        .unwrap();
    assert!(report.unused.is_empty(), "{report}");
    let key = match kind {
        "unet_crossattn" => ConditioningKey::Crossattn,
        "unet_concat" => ConditioningKey::Concat,
        other => panic!("unknown model kind {other}"),
    };
    Model::Unet(DiffusionWrapper { unet, key })
}

fn conditioning(
    fx: &Fixture,
    case: &str,
    kind: &str,
    which: &str,
    device: &Device,
) -> Conditioning {
    let key = format!("{case}.{which}");
    match kind {
        "toy" => Conditioning::concat(fx.float::<4>(&key, device)),
        "unet_crossattn" => Conditioning::context(fx.float::<3>(&key, device)),
        "unet_concat" => Conditioning::concat(fx.float::<4>(&format!("{case}.c_concat"), device)),
        other => panic!("unknown model kind {other}"),
    }
}

fn schedule_of(cfg: &Value) -> DiffusionSchedule {
    let s = &cfg["schedule"];
    let kind = match s["beta_schedule"].as_str().unwrap() {
        "linear" => BetaSchedule::Linear,
        "cosine" => BetaSchedule::Cosine {
            s: s["cosine_s"].as_f64().unwrap(),
        },
        other => panic!("schedule {other}"),
    };
    DiffusionSchedule::new(
        kind,
        s["timesteps"].as_u64().unwrap() as usize,
        s["linear_start"].as_f64().unwrap(),
        s["linear_end"].as_f64().unwrap(),
    )
    .unwrap()
}

/// Runs a CompVis case through `run_request` (the pipelines' sampling entry point) and returns
/// (final latents, latent after the first step).
fn run_compvis(
    case: &str,
    tweak: impl FnOnce(&mut SamplerOptions),
) -> (Tensor<4>, Tensor<4>, Fixture) {
    let device = device();
    let fx = Fixture::open(COMPVIS);
    let cfg = config(&fx, case);
    let kind = cfg["model"].as_str().unwrap();
    let model = build_model(&fx, case, kind, &device);
    let scale = cfg["scale"].as_f64().unwrap();
    let shape: Vec<usize> = cfg["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let shape: [usize; 4] = shape.try_into().unwrap();
    let mut sampler = SamplerOptions::new(
        cfg["sampler"]
            .as_str()
            .unwrap()
            .parse::<SamplerKind>()
            .unwrap(),
        cfg["steps"].as_u64().unwrap() as usize,
    );
    sampler.eta = cfg["eta"].as_f64().unwrap();
    sampler.discretization = match cfg["discretize"].as_str().unwrap() {
        "uniform" => DdimDiscretization::Uniform,
        _ => DdimDiscretization::Quad,
    };
    sampler.clip_denoised = cfg["clip_denoised"].as_bool().unwrap();
    tweak(&mut sampler);
    let cond = conditioning(&fx, case, kind, "cond", &device);
    let mut request = SamplingRequest {
        uncond: (scale != 1.0).then(|| conditioning(&fx, case, kind, "uncond", &device)),
        guidance_scale: scale,
        sampler,
        ..SamplingRequest::new(cond, shape)
    };
    if cfg["mask"].as_bool().unwrap() {
        request.inpainting = Some(Inpainting {
            mask: fx.float(&format!("{case}.mask"), &device),
            x0: fx.float(&format!("{case}.x0"), &device),
        });
    }
    if let Some(i2i) = cfg["img2img"].as_object() {
        let strength = i2i["strength"].as_f64().unwrap();
        let t_enc = i2i["t_enc"].as_u64().unwrap();
        let encode_index = i2i["encode_index"].as_u64().unwrap();
        request.init = Some((fx.float(&format!("{case}.x0"), &device), strength));
        request.img2img_noising = if encode_index == t_enc {
            Img2ImgNoising::Reference
        } else {
            assert_eq!(encode_index + 1, t_enc);
            Img2ImgNoising::FirstStep
        };
    } else {
        request.x_t = Some(fx.float(&format!("{case}.x_T"), &device));
    }
    let parameterization: Parameterization =
        cfg["parameterization"].as_str().unwrap().parse().unwrap();
    let mut first = None;
    let mut cb = |info: StepInfo<'_>| {
        if info.step == 0 {
            first = Some(info.x.clone());
        }
    };
    let mut noise = fixture_noise(&fx, case);
    let out = run_request(
        model.as_dyn(),
        &schedule_of(&cfg),
        parameterization,
        &request,
        &device,
        &mut noise,
        Some(&mut cb),
    )
    .unwrap();
    drop(noise);
    (out, first.expect("at least one step"), fx)
}

fn x_inter(fx: &Fixture, case: &str, i: usize, device: &Device) -> Tensor<4> {
    let all = fx.float::<5>(&format!("{case}.x_inter"), device);
    let [_, b, c, h, w] = all.dims();
    all.slice([i..i + 1, 0..b, 0..c, 0..h, 0..w])
        .reshape([b, c, h, w])
}

fn check_compvis(case: &str) {
    let device = device();
    let (out, first, fx) = run_compvis(case, |_| {});
    assert_close(
        &format!("{case} step 0"),
        first,
        x_inter(&fx, case, 1, &device),
    );
    assert_close(
        &format!("{case} final"),
        out,
        fx.float(&format!("{case}.out"), &device),
    );
}

#[test]
fn ddim_eta0_guided() {
    check_compvis("ddim_s20_eta0_cfg");
}

#[test]
fn ddim_eta1_supplied_noise() {
    check_compvis("ddim_s10_eta1");
}

#[test]
fn ddim_quad_eta_half_guided() {
    check_compvis("ddim_s15_quad_eta05");
}

#[test]
fn ddim_50_steps() {
    check_compvis("ddim_s50_eta0");
}

#[test]
fn ddim_v_parameterization() {
    check_compvis("ddim_v");
}

#[test]
fn plms_guided() {
    check_compvis("plms_s20_cfg");
}

#[test]
fn plms_four_steps() {
    check_compvis("plms_s4");
}

#[test]
fn plms_ten_steps() {
    check_compvis("plms_s10");
}

#[test]
fn ddpm_full_chain_supplied_noise() {
    check_compvis("ddpm_eps");
}

#[test]
fn ddpm_x0_clipped_cosine() {
    check_compvis("ddpm_x0_clip_cosine");
}

#[test]
fn img2img_first_step_noising() {
    check_compvis("img2img_fixed");
}

#[test]
fn img2img_reference_noising() {
    check_compvis("img2img_reference");
}

#[test]
fn inpainting_mask_blending() {
    check_compvis("inpaint_blend_ddim");
}

#[test]
fn inpainting_mask_blending_eta1_guided() {
    check_compvis("inpaint_blend_ddim_eta1_cfg");
}

#[test]
fn unet_ddim_guided() {
    check_compvis("unet_ddim_cfg");
}

#[test]
fn unet_concat_inpainting_model() {
    check_compvis("unet_inpaint_concat");
}

/// Without the reference's +1 timestep offset the DDIM trajectory leaves the tolerance.
#[test]
fn ddim_without_timestep_offset_is_caught() {
    let device = device();
    let case = "ddim_s20_eta0_cfg";
    let fx = Fixture::open(COMPVIS);
    let cfg = config(&fx, case);
    let schedule = schedule_of(&cfg);
    let with_offset = DdimConfig::new(20)
        .init(&schedule, Parameterization::Eps)
        .unwrap();
    assert_eq!(with_offset.tables.timesteps[..3], [1, 51, 101]);
    let raw: Vec<usize> = (0..1000).step_by(50).collect();
    let mut ddim = DdimConfig::new(20)
        .with_timesteps(Some(raw))
        .init(&schedule, Parameterization::Eps)
        .unwrap();
    let out = run_scheduler(&fx, case, &mut ddim, &device);
    let err = relative_error(out, fx.float(&format!("{case}.out"), &device));
    eprintln!("DDIM without +1 offset: relative error {err:.3e}");
    assert!(
        err > 1e-3,
        "dropping the offset should break parity, error only {err:.3e}"
    );
}

/// Replacing PLMS's two-evaluation first step by a plain step leaves the tolerance.
#[test]
fn plms_without_pseudo_first_step_is_caught() {
    let device = device();
    let case = "plms_s20_cfg";
    let fx = Fixture::open(COMPVIS);
    let cfg = config(&fx, case);
    let schedule = schedule_of(&cfg);
    let mut plms = PlmsConfig::new(20)
        .with_pseudo_improved_euler_start(false)
        .init(&schedule, Parameterization::Eps)
        .unwrap();
    let out = run_scheduler(&fx, case, &mut plms, &device);
    let err = relative_error(out, fx.float(&format!("{case}.out"), &device));
    eprintln!("PLMS without pseudo improved-Euler start: relative error {err:.3e}");
    assert!(
        err > 1e-3,
        "changing the first step should break parity, error only {err:.3e}"
    );
    // ... and the same run with the reference first step passes.
    let mut plms = PlmsConfig::new(20)
        .init(&schedule, Parameterization::Eps)
        .unwrap();
    let out = run_scheduler(&fx, case, &mut plms, &device);
    assert_close(
        "PLMS reference start",
        out,
        fx.float(&format!("{case}.out"), &device),
    );
}

/// A toy-model CompVis case run on an explicit scheduler (guidance as stored).
fn run_scheduler(
    fx: &Fixture,
    case: &str,
    scheduler: &mut dyn Scheduler,
    device: &Device,
) -> Tensor<4> {
    let cfg = config(fx, case);
    let scale = cfg["scale"].as_f64().unwrap();
    let cond = conditioning(fx, case, "toy", "cond", device);
    let uncond = (scale != 1.0).then(|| conditioning(fx, case, "toy", "uncond", device));
    let mut denoiser = Guided::new(&Toy, cond, uncond, scale).unwrap();
    let mut noise = fixture_noise(fx, case);
    sample(
        scheduler,
        &mut denoiser,
        fx.float(&format!("{case}.x_T"), device),
        &mut noise,
        SampleOptions::default(),
    )
    .unwrap()
}

fn check_diffusers(case: &str) {
    let device = device();
    let fx = Fixture::open(DIFFUSERS);
    let cfg = config(&fx, case);
    let kind = match cfg["scheduler"].as_str().unwrap() {
        "dpmpp_2m" => SamplerKind::DpmPp2m,
        "euler" => SamplerKind::Euler,
        "euler_a" => SamplerKind::EulerAncestral,
        other => panic!("{other}"),
    };
    let mut opts = SamplerOptions::new(kind, cfg["steps"].as_u64().unwrap() as usize);
    opts.karras = cfg["use_karras_sigmas"].as_bool().unwrap();
    opts.spacing = cfg["timestep_spacing"]
        .as_str()
        .unwrap()
        .parse::<TimestepSpacing>()
        .unwrap();
    opts.steps_offset = cfg["steps_offset"].as_u64().unwrap() as usize;
    let parameterization: Parameterization =
        cfg["prediction_type"].as_str().unwrap().parse().unwrap();
    let schedule = DiffusionSchedule::stable_diffusion();
    let mut scheduler = opts.build(&schedule, parameterization).unwrap();

    // Tables.
    let ts = Tensor::<1>::from_data(
        TensorData::new(
            scheduler
                .timesteps()
                .iter()
                .map(|&t| t as f32)
                .collect::<Vec<_>>(),
            [scheduler.num_steps()],
        ),
        &device,
    );
    ldm_tests::assert_close_tol(
        &format!("{case} timesteps"),
        ts,
        fx.float(&format!("{case}.timesteps"), &device),
        1e-6,
    );
    let init = scheduler.init_noise_sigma();
    let want = cfg["init_noise_sigma"].as_f64().unwrap();
    assert!(
        (init - want).abs() <= 1e-5 * want,
        "{case}: init_noise_sigma {init} vs {want}"
    );

    let scale = cfg["scale"].as_f64().unwrap();
    let cond = Conditioning::concat(fx.float(&format!("{case}.cond"), &device));
    let uncond =
        (scale != 1.0).then(|| Conditioning::concat(fx.float(&format!("{case}.uncond"), &device)));
    let mut denoiser = Guided::new(&Toy, cond, uncond, scale).unwrap();
    let x = fx
        .float::<4>(&format!("{case}.x_T"), &device)
        .mul_scalar(init);
    assert_close(
        &format!("{case} x_T · init σ"),
        x.clone(),
        x_inter(&fx, case, 0, &device),
    );
    let mut first = None;
    let mut cb = |info: StepInfo<'_>| {
        if info.step == 0 {
            first = Some(info.x.clone());
        }
    };
    let mut noise = FnNoise(|kind, index, shape, device: &Device| {
        Ok(synthetic_noise(case, kind, index, shape, device))
    });
    let out = sample(
        scheduler.as_mut(),
        &mut denoiser,
        x,
        &mut noise,
        SampleOptions {
            callback: Some(&mut cb),
            ..SampleOptions::default()
        },
    )
    .unwrap();
    assert_close(
        &format!("{case} step 0"),
        first.unwrap(),
        x_inter(&fx, case, 1, &device),
    );
    assert_close(
        &format!("{case} final"),
        out,
        fx.float(&format!("{case}.out"), &device),
    );
}

#[test]
fn dpm_solver_pp_2m_guided() {
    check_diffusers("dpmpp_2m_s20_cfg");
}

#[test]
fn dpm_solver_pp_2m_karras() {
    check_diffusers("dpmpp_2m_karras_s15");
}

#[test]
fn dpm_solver_pp_2m_leading() {
    check_diffusers("dpmpp_2m_leading_s10");
}

#[test]
fn dpm_solver_pp_2m_few_steps() {
    check_diffusers("dpmpp_2m_s8");
}

#[test]
fn dpm_solver_pp_2m_v() {
    check_diffusers("dpmpp_2m_v_s10");
}

#[test]
fn euler_guided() {
    check_diffusers("euler_s20_cfg");
}

#[test]
fn euler_karras() {
    check_diffusers("euler_karras_s15");
}

#[test]
fn euler_leading() {
    check_diffusers("euler_leading_s10");
}

#[test]
fn euler_trailing() {
    check_diffusers("euler_trailing_s10");
}

#[test]
fn euler_v() {
    check_diffusers("euler_v_s10");
}

#[test]
fn euler_ancestral_supplied_noise() {
    check_diffusers("euler_a_s20");
}

#[test]
fn euler_ancestral_leading_guided() {
    check_diffusers("euler_a_leading_cfg_s10");
}
