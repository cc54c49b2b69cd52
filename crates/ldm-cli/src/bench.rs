//! `ldm bench`: time the SD-v1 workloads with random weights at real shapes, each in its own
//! process (so peak memory is that workload's), optionally beside PyTorch/diffusers running the
//! same workloads (`--torch xtask/bench/bench_torch.py`) to print ratios measured in the same run.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use ldm::burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use ldm::device::Precision;
use ldm::io::{CondStageSpec, FirstStageSpec, LdmSpec};
use ldm::schedulers::{SamplerKind, SamplerOptions, SeededNoise};

/// The workloads, in the order they run.
pub const WORKLOADS: [(&str, &str); 7] = [
    ("unet-32", "UNet step, CFG batch 2, 32x32 latent (256 px)"),
    (
        "unet-train-32",
        "UNet training step (forward, MSE, backward), batch 2, 32x32 latent",
    ),
    ("unet-64", "UNet step, CFG batch 2, 64x64 latent (512 px)"),
    ("vae-32", "VAE decode 32x32 -> 256x256"),
    ("vae-64", "VAE decode 64x64 -> 512x512"),
    ("clip", "CLIP ViT-L/14 text encoder, 2 x 77 tokens"),
    ("txt2img-256", "txt2img 256x256, 20 DDIM steps, CFG 7.5"),
];

/// `ldm bench`.
#[derive(Args, Debug)]
pub struct Bench {
    /// Workloads, comma-separated (unet-32, unet-train-32, unet-64, vae-32, vae-64, clip,
    /// txt2img-256) or `all`.
    #[arg(long, default_value = "all")]
    pub workload: String,
    /// Model shapes: `sd-v1` (the real ones) or `tiny` (a smoke test of the bench itself).
    #[arg(long, default_value = "sd-v1")]
    pub preset: String,
    /// Device: cpu, wgpu, cuda[:N], ... (the backend must be compiled in).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision of the UNet and VAE weights and activations (f32, f16, bf16).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Untimed warm-up runs (reported separately: kernel compilation on GPU backends).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Also run this PyTorch script (xtask/bench/bench_torch.py) on each workload and print ratios.
    #[arg(long)]
    pub torch: Option<PathBuf>,
    /// PyTorch's device for --torch: cpu or cuda (default: cuda when --device is a GPU backend).
    #[arg(long)]
    pub torch_device: Option<String>,
    /// Python interpreter for --torch.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Threads for PyTorch (match the Rust side: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON line per workload (the child-process protocol; also handy for scripts).
    #[arg(long)]
    pub json: bool,
    /// Run the workloads in this process (no per-workload memory figure).
    #[arg(long, hide = true)]
    pub in_process: bool,
}

/// One workload's timings.
#[derive(Debug, Clone)]
struct Timing {
    workload: String,
    warmup_s: Vec<f64>,
    runs_s: Vec<f64>,
    median_s: f64,
    peak_bytes: Option<u64>,
    memory_kind: &'static str,
    build_s: f64,
}

impl Timing {
    fn json(&self) -> String {
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.4}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "{{\"impl\":\"ldm\",\"workload\":\"{}\",\"warmup_s\":[{}],\"runs_s\":[{}],\"median_s\":{:.4},\"peak_bytes\":{},\"memory_kind\":\"{}\",\"build_s\":{:.2}}}",
            self.workload,
            list(&self.warmup_s),
            list(&self.runs_s),
            self.median_s,
            self.peak_bytes.map_or("null".into(), |b| b.to_string()),
            self.memory_kind,
            self.build_s
        )
    }

    fn from_json(line: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let list = |k: &str| -> Vec<f64> {
            v[k].as_array()
                .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                .unwrap_or_default()
        };
        Some(Self {
            workload: v["workload"].as_str()?.to_string(),
            warmup_s: list("warmup_s"),
            runs_s: list("runs_s"),
            median_s: v["median_s"].as_f64()?,
            peak_bytes: v["peak_bytes"].as_u64(),
            memory_kind: if v["memory_kind"].as_str() == Some("device") {
                "device"
            } else {
                "rss"
            },
            build_s: v["build_s"].as_f64().unwrap_or(0.0),
        })
    }
}

/// Linux peak resident set (`VmHWM`), bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

const TINY: &str = r#"
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params: {linear_start: 0.00085, linear_end: 0.012, timesteps: 1000, conditioning_key: crossattn, scale_factor: 0.18215,
    unet_config: {target: ldm.modules.diffusionmodules.openaimodel.UNetModel, params: {image_size: 32, in_channels: 4,
      out_channels: 4, model_channels: 32, attention_resolutions: [2], num_res_blocks: 1, channel_mult: [1, 2],
      num_heads: 2, use_spatial_transformer: true, context_dim: 768, legacy: false}},
    first_stage_config: {target: ldm.models.autoencoder.AutoencoderKL, params: {embed_dim: 4, ddconfig: {double_z: true,
      z_channels: 4, resolution: 64, in_channels: 3, out_ch: 3, ch: 32, ch_mult: [1, 1, 2, 2], num_res_blocks: 1,
      attn_resolutions: [], dropout: 0.0}}},
    cond_stage_config: {target: ldm.modules.encoders.modules.FrozenCLIPEmbedder}}
"#;

fn spec(preset: &str) -> Result<LdmSpec> {
    Ok(match preset {
        "sd-v1" => LdmSpec::preset_named("sd-v1")?,
        "tiny" => LdmSpec::from_yaml_str(TINY)?,
        other => bail!("--preset {other}: expected sd-v1 or tiny"),
    })
}

/// Times `f` (which must end with a read back to the host so queued GPU work is counted).
fn time(
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut once = || -> Result<f64> {
        let t = Instant::now();
        f()?;
        Ok(t.elapsed().as_secs_f64())
    };
    let w = (0..warmup).map(|_| once()).collect::<Result<Vec<_>>>()?;
    let r = (0..runs).map(|_| once()).collect::<Result<Vec<_>>>()?;
    Ok((w, r))
}

fn sync4(x: Tensor<4>) {
    // A one-element read forces the whole graph to run (lazy / async backends).
    let _ = x.slice([0..1, 0..1, 0..1, 0..1]).into_data();
}

/// A UNet workload's inputs, batch 2: a random latent `[2, C, S, S]` at side `side` (halved for the
/// tiny preset), timestep `t` for both, a random 77-token context.
fn unet_inputs(
    unet: &ldm::models::unet::UNetModel,
    side: usize,
    preset: &str,
    t: f32,
    device: &Device,
) -> (Tensor<4>, Tensor<1>, Tensor<3>) {
    let side = side / if preset == "tiny" { 2 } else { 1 };
    let c = unet.in_channels();
    let ctx = unet.context_dim().unwrap_or(768);
    let x = Tensor::<4>::random([2, c, side, side], Distribution::Normal(0.0, 1.0), device);
    let t = Tensor::<1>::from_data(TensorData::new(vec![t, t], [2]), device);
    let context = Tensor::<3>::random([2, 77, ctx], Distribution::Normal(0.0, 1.0), device);
    (x, t, context)
}

fn run_one(b: &Bench, workload: &str, device: &Device) -> Result<Timing> {
    let spec = spec(&b.preset)?;
    let build = Instant::now();
    let dtype = b.precision.dtype();
    match workload {
        "unet-32" | "unet-64" => {
            let mut unet = spec.unet.init(device)?;
            if b.precision != Precision::F32 {
                unet = ldm::device::cast_module(unet, dtype);
            }
            let side = if workload == "unet-32" { 32 } else { 64 };
            let (x, t, context) = unet_inputs(&unet, side, &b.preset, 999.0, device);
            let x = x.cast(dtype);
            let build_s = build.elapsed().as_secs_f64();
            let r = time(b.warmup, b.runs, || {
                sync4(unet.forward(x.clone(), t.clone(), Some(context.clone()), None));
                Ok(())
            })?;
            finish(workload, r, build_s, device)
        }
        "unet-train-32" => {
            if b.precision != Precision::F32 {
                bail!("{workload} runs in f32 only");
            }
            let device = device.clone().autodiff();
            let unet = spec.unet.init(&device)?;
            let (x, t, context) = unet_inputs(&unet, 32, &b.preset, 500.0, &device);
            let build_s = build.elapsed().as_secs_f64();
            let r = time(b.warmup, b.runs, || {
                let out = unet.forward(x.clone(), t.clone(), Some(context.clone()), None);
                let _grads = (out.clone() * out).mean().backward();
                device
                    .sync()
                    .map_err(|e| anyhow::anyhow!("device sync: {e:?}"))?;
                Ok(())
            })?;
            finish(workload, r, build_s, &device)
        }
        "vae-32" | "vae-64" => {
            let FirstStageSpec::Kl(cfg) = &spec.first_stage else {
                bail!("the preset's first stage is not a KL autoencoder");
            };
            let mut vae = cfg.init(device);
            if b.precision != Precision::F32 {
                vae = ldm::device::cast_module(vae, dtype);
            }
            let side =
                if workload == "vae-32" { 32 } else { 64 } / if b.preset == "tiny" { 4 } else { 1 };
            let z = Tensor::<4>::random([1, 4, side, side], Distribution::Normal(0.0, 1.0), device)
                .cast(dtype);
            let build_s = build.elapsed().as_secs_f64();
            let r = time(b.warmup, b.runs, || {
                sync4(vae.decode(z.clone()));
                Ok(())
            })?;
            finish(workload, r, build_s, device)
        }
        "clip" => {
            let CondStageSpec::Clip { config, .. } = &spec.cond_stage else {
                bail!("the preset's conditioning is not CLIP");
            };
            let clip = config.init(device);
            let vocab = config.vocab_size as i64;
            let ids: Vec<i64> = (0..2 * 77).map(|i| (i as i64 * 7919) % vocab).collect();
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 77]), device);
            let build_s = build.elapsed().as_secs_f64();
            let r = time(b.warmup, b.runs, || {
                let h = clip.forward(ids.clone()).last_hidden_state;
                let _ = h.slice([0..1, 0..1, 0..1]).into_data();
                Ok(())
            })?;
            finish(workload, r, build_s, device)
        }
        "txt2img-256" => {
            let model = spec.build_uninit(device)?.with_precision(b.precision)?;
            let size = if b.preset == "tiny" { 128 } else { 256 };
            let build_s = build.elapsed().as_secs_f64();
            let r = time(b.warmup, b.runs, || {
                let out = model.txt2img(
                    &["a photograph of an astronaut riding a horse"],
                    None,
                    size,
                    size,
                    7.5,
                    SamplerOptions::new(SamplerKind::Ddim, 20),
                    &mut SeededNoise::new(0),
                    None,
                )?;
                let _ = out.to_rgb8();
                Ok(())
            })?;
            finish(workload, r, build_s, device)
        }
        other => bail!(
            "unknown workload `{other}` (expected {})",
            WORKLOADS.map(|w| w.0).join(", ")
        ),
    }
}

fn finish(
    workload: &str,
    (warmup_s, runs_s): (Vec<f64>, Vec<f64>),
    build_s: f64,
    device: &Device,
) -> Result<Timing> {
    let mut sorted = runs_s.clone();
    sorted.sort_by(f64::total_cmp);
    let median_s = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let (peak_bytes, memory_kind) = match device.memory_pool_usage() {
        Some(u) => (Some(u.bytes_reserved), "device"),
        None => (peak_rss(), "rss"),
    };
    Ok(Timing {
        workload: workload.to_string(),
        warmup_s,
        runs_s,
        median_s,
        peak_bytes,
        memory_kind,
        build_s,
    })
}

/// Runs one workload in a child process (`ldm bench --in-process --json`).
fn child(b: &Bench, workload: &str) -> Result<Timing> {
    let exe = std::env::current_exe().context("locating the ldm binary")?;
    let out = Command::new(exe)
        .args([
            "-q",
            "bench",
            "--in-process",
            "--json",
            "--workload",
            workload,
        ])
        .args(["--preset", &b.preset, "--device", &b.device])
        .args(["--precision", &b.precision.to_string()])
        .args([
            "--runs",
            &b.runs.to_string(),
            "--warmup",
            &b.warmup.to_string(),
        ])
        .output()
        .context("starting the bench child process")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "workload {workload} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    stdout
        .lines()
        .rev()
        .find_map(Timing::from_json)
        .with_context(|| format!("workload {workload}: no result in {stdout:?}"))
}

/// Runs the PyTorch script on one workload.
fn torch(b: &Bench, script: &PathBuf, workload: &str) -> Result<(Timing, serde_json::Value)> {
    let threads = b.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let gpu = ["cuda", "wgpu", "vulkan"]
        .iter()
        .any(|p| b.device.starts_with(p))
        && !b.device.ends_with(":cpu");
    let device = b
        .torch_device
        .clone()
        .unwrap_or_else(|| if gpu { "cuda".into() } else { "cpu".into() });
    let out = Command::new(&b.python)
        .arg(script)
        .args(["--workload", workload, "--device", &device])
        .args(["--dtype", &b.precision.to_string()])
        .args(["--threads", &threads.to_string()])
        .args([
            "--runs",
            &b.runs.to_string(),
            "--warmup",
            &b.warmup.to_string(),
        ])
        .output()
        .with_context(|| format!("starting {} {}", b.python, script.display()))?;
    if !out.status.success() {
        bail!(
            "PyTorch workload {workload} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("PyTorch workload {workload}: no JSON line"))?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let t = Timing::from_json(line).context("PyTorch JSON without the expected keys")?;
    Ok((t, v))
}

fn mib(b: Option<u64>) -> String {
    b.map_or("-".into(), |b| format!("{:.0} MiB", b as f64 / 1048576.0))
}

pub fn run(b: Bench) -> Result<()> {
    if b.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let names: Vec<String> = if b.workload == "all" {
        WORKLOADS.iter().map(|w| w.0.to_string()).collect()
    } else {
        b.workload
            .split(',')
            .map(|s| s.trim().to_string())
            .collect()
    };
    for n in &names {
        if !WORKLOADS.iter().any(|w| w.0 == n) {
            bail!(
                "unknown workload `{n}` (expected {} or all)",
                WORKLOADS.map(|w| w.0).join(", ")
            );
        }
    }
    if b.in_process {
        let device = ldm::device::parse_device(&b.device)?;
        for n in &names {
            let t = run_one(&b, n, &device)?;
            if b.json {
                println!("{}", t.json());
            } else {
                println!(
                    "{n}: median {:.3}s (warm-up {:?}), peak {}",
                    t.median_s,
                    t.warmup_s,
                    mib(t.peak_bytes)
                );
            }
        }
        return Ok(());
    }
    println!(
        "ldm bench — preset {}, device {}, precision {}, {} run(s) after {} warm-up, {} CPU thread(s) available",
        b.preset,
        b.device,
        b.precision,
        b.runs,
        b.warmup,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    if b.torch.is_some() {
        println!(
            "{:<13} {:>10} {:>10} {:>12} {:>10} {:>10} {:>9}",
            "workload", "ldm", "warm-up", "peak", "PyTorch", "peak", "ldm/PyTorch"
        );
    } else {
        println!(
            "{:<13} {:>10} {:>10} {:>12}",
            "workload", "ldm", "warm-up", "peak"
        );
    }
    for n in &names {
        let ours = child(&b, n)?;
        if b.json {
            println!("{}", ours.json());
        }
        let warm = ours
            .warmup_s
            .first()
            .map_or("-".into(), |w| format!("{w:.2}s"));
        match &b.torch {
            Some(script) => {
                let (pt, raw) = torch(&b, script, n)?;
                if b.json {
                    println!("{raw}");
                }
                println!(
                    "{:<13} {:>9.3}s {:>10} {:>12} {:>9.3}s {:>10} {:>8.2}x",
                    n,
                    ours.median_s,
                    warm,
                    mib(ours.peak_bytes),
                    pt.median_s,
                    mib(pt.peak_bytes),
                    ours.median_s / pt.median_s
                );
            }
            None => println!(
                "{:<13} {:>9.3}s {:>10} {:>12}",
                n,
                ours.median_s,
                warm,
                mib(ours.peak_bytes)
            ),
        }
    }
    Ok(())
}
