//! Schedules and DDIM tables vs CompVis `make_beta_schedule` / `DDPM.register_schedule` /
//! `make_ddim_timesteps` / `make_ddim_sampling_parameters` (max relative error 1e-6).

use ldm::schedulers::{
    BetaSchedule, DdimDiscretization, DiffusionSchedule, ddim_tables, ddim_timesteps,
};
use ldm_tests::{Fixture, device};

const FILE: &str = "schedules.safetensors";

fn max_rel(ours: &[f64], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    ours.iter()
        .zip(reference)
        .map(|(a, b)| {
            let b = *b as f64;
            (a - b).abs() / b.abs().max(1e-30)
        })
        .fold(0.0, f64::max)
}

fn floats(fx: &Fixture, key: &str) -> Vec<f32> {
    fx.float::<1>(key, &device())
        .into_data()
        .iter::<f32>()
        .collect()
}

#[test]
fn beta_schedules_and_derived_tables() {
    let fx = Fixture::open(FILE);
    for (name, kind, ls, le) in [
        ("linear_sd", BetaSchedule::Linear, 0.00085, 0.012),
        ("cosine", BetaSchedule::Cosine { s: 8e-3 }, 1e-4, 2e-2),
        ("sqrt_linear", BetaSchedule::SqrtLinear, 1e-4, 2e-2),
        ("sqrt", BetaSchedule::Sqrt, 1e-4, 2e-2),
    ] {
        let s = DiffusionSchedule::new(kind, 1000, ls, le).unwrap();
        let tables: [(&str, &Vec<f64>); 12] = [
            ("betas", &s.betas),
            ("alphas_cumprod", &s.alphas_cumprod),
            ("alphas_cumprod_prev", &s.alphas_cumprod_prev),
            ("sqrt_alphas_cumprod", &s.sqrt_alphas_cumprod),
            (
                "sqrt_one_minus_alphas_cumprod",
                &s.sqrt_one_minus_alphas_cumprod,
            ),
            (
                "log_one_minus_alphas_cumprod",
                &s.log_one_minus_alphas_cumprod,
            ),
            ("sqrt_recip_alphas_cumprod", &s.sqrt_recip_alphas_cumprod),
            (
                "sqrt_recipm1_alphas_cumprod",
                &s.sqrt_recipm1_alphas_cumprod,
            ),
            ("posterior_variance", &s.posterior_variance),
            (
                "posterior_log_variance_clipped",
                &s.posterior_log_variance_clipped,
            ),
            ("posterior_mean_coef1", &s.posterior_mean_coef1),
            ("posterior_mean_coef2", &s.posterior_mean_coef2),
        ];
        for (buffer, ours) in tables {
            let err = max_rel(ours, &floats(&fx, &format!("{name}.{buffer}")));
            assert!(err <= 1e-6, "{name}.{buffer}: max relative error {err:.2e}");
        }
    }
}

#[test]
fn cosine_schedule_is_not_all_zero() {
    // The integer-division bug of other ports would give t = 0 + s everywhere.
    let s = DiffusionSchedule::new(BetaSchedule::Cosine { s: 8e-3 }, 1000, 0.0, 0.0).unwrap();
    assert!(s.betas.iter().all(|b| *b > 0.0));
}

#[test]
fn ddim_timesteps_and_sigmas() {
    let fx = Fixture::open(FILE);
    let sched = DiffusionSchedule::stable_diffusion();
    for (mname, method) in [
        ("uniform", DdimDiscretization::Uniform),
        ("quad", DdimDiscretization::Quad),
    ] {
        for steps in [10, 20, 30, 50] {
            let key = format!("ddim.{mname}.{steps}");
            for eta in [0, 1] {
                let t = ddim_tables(&sched, method, steps, eta as f64).unwrap();
                let want: Vec<usize> = fx
                    .ints(&format!("{key}.timesteps"))
                    .into_iter()
                    .map(|v| v as usize)
                    .collect();
                assert_eq!(t.timesteps, want, "{key} timesteps (with the +1 offset)");
                for (name, ours) in [("alphas", &t.alphas), ("alphas_prev", &t.alphas_prev)] {
                    let err = max_rel(ours, &floats(&fx, &format!("{key}.eta{eta}.{name}")));
                    assert!(err <= 1e-6, "{key} eta {eta} {name}: {err:.2e}");
                }
                let reference = floats(&fx, &format!("{key}.eta{eta}.sigmas"));
                if eta == 0 {
                    assert!(
                        t.sigmas.iter().all(|s| *s == 0.0) && reference.iter().all(|s| *s == 0.0)
                    );
                } else {
                    let err = max_rel(&t.sigmas, &reference);
                    assert!(err <= 1e-6, "{key} sigmas: {err:.2e}");
                }
            }
        }
    }
}

#[test]
fn ddim_offset_is_the_references() {
    // Without the +1 offset the tables differ from the reference's.
    let t = ddim_timesteps(DdimDiscretization::Uniform, 50, 1000).unwrap();
    assert_eq!(t[0], 1);
    assert_eq!(*t.last().unwrap(), 981);
    // S = T would index past the end in the reference; here it is handled.
    let all = ddim_timesteps(DdimDiscretization::Uniform, 1000, 1000).unwrap();
    assert_eq!(all.len(), 1000);
    assert!(ddim_timesteps(DdimDiscretization::Uniform, 0, 1000).is_err());
}
