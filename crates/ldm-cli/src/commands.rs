//! The subcommands.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ldm::burn::tensor::{Device, Tensor};
use ldm::io::{LdmSpec, StateDict, model_shapes};
use ldm::pipelines::{Conditioning, Generated, Pipeline, PipelineOptions, SamplingRequest};
use ldm::schedulers::{SamplerKind, SamplerOptions, SeededNoise, StepInfo};

use crate::ModelArgs;
use crate::output::{self, OutDir, RgbImage};

/// Sampling settings shared by the generating subcommands.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampler: ddim, plms, ddpm, dpm++2m, euler, euler-a.
    #[arg(long, default_value = "ddim")]
    pub sampler: SamplerKind,
    /// Number of sampling steps (ddpm: 0 = all training timesteps).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// DDIM η (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Karras σs (dpm++2m, euler).
    #[arg(long)]
    pub karras: bool,
    /// Images per batch.
    #[arg(long, default_value_t = 1)]
    pub n_samples: usize,
    /// Number of batches.
    #[arg(long, default_value_t = 1)]
    pub n_iter: usize,
    /// Seed of the noise (the same seed reproduces the same images on every backend).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// x_T as float32 .npy [n_samples, C, h, w] (unit variance), for runs reproducible across
    /// implementations.
    #[arg(long)]
    pub init_noise: Option<PathBuf>,
    /// Also write the final latents (before decoding) to <outdir>/latents-NNNN.npy.
    #[arg(long)]
    pub save_latents: bool,
    /// Output folder.
    #[arg(long, default_value = "outputs")]
    pub outdir: PathBuf,
}

/// `ldm txt2img`'s guidance scale for checkpoints (Stable Diffusion's).
pub const DEFAULT_GUIDANCE_SCALE: f64 = 7.5;

/// `ldm txt2img`.
#[derive(Args, Debug)]
pub struct Txt2Img {
    /// The prompt (every sample of a batch uses it).
    #[arg(long, required_unless_present = "from_file")]
    pub prompt: Option<String>,
    /// A file with one prompt per line, batched --n-samples at a time (as CompVis txt2img.py).
    #[arg(long, conflicts_with = "prompt")]
    pub from_file: Option<PathBuf>,
    /// What to steer away from (the unconditional prompt of guidance).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Classifier-free guidance scale (1 = no guidance) [default: 7.5; the built-in demo
    /// model's own, 2, when no --ckpt is given]
    #[arg(long)]
    pub scale: Option<f64>,
    /// Guidance rescale φ in [0, 1] (diffusers' `guidance_rescale`; 0: off, as the reference).
    #[arg(long, default_value_t = 0.0)]
    pub guidance_rescale: f64,
    /// Image height in pixels (default: the model's native size).
    #[arg(long, short = 'H')]
    pub height: Option<usize>,
    /// Image width in pixels (default: the model's native size).
    #[arg(long, short = 'W')]
    pub width: Option<usize>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// `ldm sample`.
#[derive(Args, Debug)]
pub struct Sample {
    /// Class label (class-conditional models); repeat for several, else every sample uses it.
    #[arg(long)]
    pub class_label: Vec<usize>,
    /// The "no class" label for guidance (cin256-v2: 1000).
    #[arg(long)]
    pub uc_class: Option<usize>,
    /// Guidance scale (needs --uc-class unless the model has a known unconditional label).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// `ldm img2img`.
#[derive(Args, Debug)]
pub struct Img2Img {
    /// The init image (its size must be a multiple of the model's factor, e.g. 8 or 64 for SD).
    #[arg(long)]
    pub init_image: PathBuf,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Negative prompt.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// How much to change: int(strength · steps) steps run, from that noise level.
    #[arg(long, default_value_t = 0.75)]
    pub strength: f64,
    /// Guidance scale.
    #[arg(long, default_value_t = 5.0)]
    pub scale: f64,
    /// Noise the init latent as CompVis img2img.py does (one step too many) to reproduce old outputs.
    #[arg(long)]
    pub reference_noising: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// `ldm inpaint`.
#[derive(Args, Debug)]
pub struct Inpaint {
    /// The image.
    #[arg(long)]
    pub image: PathBuf,
    /// The mask, same size: white (≥ 50%) = repaint, black = keep.
    #[arg(long)]
    pub mask: PathBuf,
    /// Prompt (text-conditioned models).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Guidance scale (text-conditioned models).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// `ldm upscale`.
#[derive(Args, Debug)]
pub struct Upscale {
    /// The low-resolution image.
    #[arg(long)]
    pub image: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// `ldm autoencode`.
#[derive(Args, Debug)]
pub struct Autoencode {
    /// The image.
    #[arg(long)]
    pub input: PathBuf,
    /// Also write the (scaled) latent as .npy.
    #[arg(long)]
    pub save_latents: bool,
    /// Output folder.
    #[arg(long, default_value = "outputs")]
    pub outdir: PathBuf,
    /// Seed of the posterior sample (KL first stages).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// `ldm inspect`.
#[derive(Args, Debug)]
pub struct Inspect {
    /// Checkpoint or diffusers folder (optional with --preset / --config).
    #[arg(long)]
    pub ckpt: Option<PathBuf>,
    /// CompVis YAML config.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Built-in preset.
    #[arg(long)]
    pub preset: Option<String>,
    /// Device for building the model (parameters are not allocated).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

fn device(spec: &str) -> Result<Device> {
    Ok(ldm::device::parse_device(spec)?)
}

pub(crate) fn load(args: &ModelArgs) -> Result<(Pipeline, Device)> {
    let device = device(&args.device)?;
    let t = Instant::now();
    let options = PipelineOptions {
        config: args.config.clone(),
        preset: args.preset.clone(),
        tokenizer: args.tokenizer.clone(),
        use_ema: args.use_ema,
        allow_missing: args.allow_missing,
        precision: args.precision,
    };
    let pipe = match &args.ckpt {
        Some(ckpt) => Pipeline::from_files(ckpt, &options, &device)
            .with_context(|| format!("loading {}", ckpt.display()))?,
        None => {
            let pipe =
                Pipeline::demo(&options, &device).context("loading the built-in demo model")?;
            tracing::info!(
                "no --ckpt: using the built-in demo model ({}, 64x64 shapes, e.g. \"a large red circle on a blue background\")",
                ldm::demo::NAME
            );
            pipe
        }
    };
    tracing::info!(
        "loaded {} ({}) in {:.1}s",
        pipe.source.display(),
        pipe.name,
        t.elapsed().as_secs_f64()
    );
    Ok((pipe, device))
}

fn sampler_options(pipe: &Pipeline, s: &SamplingArgs) -> SamplerOptions {
    let mut o = pipe.sampler(s.sampler, s.steps);
    o.eta = s.eta;
    o.karras = s.karras;
    o
}

fn progress(total: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps, {per_sec}, ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn check_batch(s: &SamplingArgs) -> Result<()> {
    if s.n_samples == 0 || s.n_iter == 0 {
        bail!("--n-samples and --n-iter must be at least 1");
    }
    if s.init_noise.is_some() && s.n_iter != 1 {
        bail!("--init-noise gives one batch of x_T; use --n-iter 1");
    }
    Ok(())
}

/// Runs `n_iter` rounds over `requests` (one batch each, with x_T drawn per batch or read from
/// --init-noise), writes samples, the grid and latents, and prints a summary.
fn run_batches(
    pipe: &Pipeline,
    device: &Device,
    s: &SamplingArgs,
    mut requests: Vec<(SamplingRequest, String)>,
    decode: &dyn Fn(Tensor<4>) -> Tensor<4>,
) -> Result<()> {
    check_batch(s)?;
    let mut out = OutDir::new(&s.outdir)?;
    if let Some(path) = &s.init_noise {
        if requests.len() != 1 {
            bail!(
                "--init-noise gives x_T for one batch; this run has {} batches",
                requests.len()
            );
        }
        let x = output::read_npy(path, device)?;
        let want = requests[0].0.shape;
        if x.dims() != want {
            bail!(
                "{}: x_T has shape {:?}, this run needs {want:?} ([n_samples, C, h, w])",
                path.display(),
                x.dims(),
            );
        }
        requests[0].0.x_t = Some(x);
    }
    let hash = match ldm::demo::weights().filter(|_| pipe.name == ldm::demo::NAME) {
        Some(bytes) => output::bytes_hash(bytes),
        None => output::model_hash(&pipe.source),
    };
    let mut noise = SeededNoise::new(s.seed);
    let start = Instant::now();
    let mut images: Vec<RgbImage> = Vec::new();
    let mut latents = Vec::new();
    let mut written = Vec::new();
    let total = s.n_iter * requests.len();
    for it in 0..s.n_iter {
        for (b, (request, describe)) in requests.iter().enumerate() {
            let [_, _, h, w] = request.shape;
            let text = format!(
                "{describe}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model hash: {hash}, Model: {}, Eta: {}, Precision: {:?}",
                s.steps,
                s.sampler,
                request.guidance_scale,
                s.seed,
                w * pipe.model.downsample,
                h * pipe.model.downsample,
                pipe.name,
                s.eta,
                pipe.model.model.unet.dtype()
            );
            let steps = request
                .sampler
                .build(&pipe.model.schedule, pipe.model.parameterization)?
                .num_steps();
            let pb = progress(
                steps,
                &format!("batch {}/{total}", it * requests.len() + b + 1),
            );
            let mut cb = |_: StepInfo<'_>| pb.inc(1);
            let z = pipe
                .model
                .sample_latents(request, &mut noise, Some(&mut cb))?;
            pb.finish_and_clear();
            let batch = output::to_images(decode(z.clone()));
            for img in &batch {
                written.push(out.save_sample(img, &text)?);
            }
            images.extend(batch);
            latents.push(z);
        }
    }
    let idx = out.take_batch_index();
    let grid = out.grid_path(idx);
    let text = requests.first().map(|(_, d)| d.clone()).unwrap_or_default();
    out.save_grid(&grid, &images, s.n_samples, &text)?;
    if s.save_latents {
        output::write_npy(&out.latents_path(idx), Tensor::cat(latents, 0))?;
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{} image(s) in {secs:.1}s ({:.2}s/image): {} … {}, grid {}{}",
        written.len(),
        secs / written.len().max(1) as f64,
        written
            .first()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        written
            .last()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        grid.display(),
        if s.save_latents {
            format!(", latents {}", out.latents_path(idx).display())
        } else {
            String::new()
        }
    );
    Ok(())
}

pub(crate) fn native_size(pipe: &Pipeline) -> usize {
    pipe.model.model.unet.image_size() * pipe.model.downsample
}

pub fn txt2img(a: Txt2Img) -> Result<()> {
    let n = a.sampling.n_samples;
    let batches: Vec<Vec<String>> = match (&a.prompt, &a.from_file) {
        (Some(p), _) => vec![vec![p.clone(); n]],
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            let lines: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if lines.is_empty() {
                bail!("{} holds no prompts", f.display());
            }
            lines.chunks(n.max(1)).map(<[String]>::to_vec).collect()
        }
        (None, None) => bail!("give --prompt or --from-file"),
    };
    let (pipe, device) = load(&a.model)?;
    let scale = a.scale.unwrap_or(if pipe.name == ldm::demo::NAME {
        ldm::demo::GUIDANCE_SCALE
    } else {
        DEFAULT_GUIDANCE_SCALE
    });
    let size = native_size(&pipe);
    let mut requests = Vec::new();
    for prompts in batches {
        let shape = pipe.model.latent_shape(
            prompts.len(),
            a.height.unwrap_or(size),
            a.width.unwrap_or(size),
        )?;
        let cond = pipe.model.text_conditioning(&prompts)?;
        let uncond = (scale != 1.0)
            .then(|| {
                pipe.model.text_conditioning(&vec![
                    a.negative_prompt.as_deref().unwrap_or("");
                    prompts.len()
                ])
            })
            .transpose()?;
        let request = SamplingRequest {
            uncond,
            guidance_scale: scale,
            guidance_rescale: a.guidance_rescale,
            sampler: sampler_options(&pipe, &a.sampling),
            ..SamplingRequest::new(cond, shape)
        };
        let describe = format!(
            "{}\nNegative prompt: {}",
            prompts.join(" | "),
            a.negative_prompt.as_deref().unwrap_or("")
        );
        requests.push((request, describe));
    }
    run_batches(&pipe, &device, &a.sampling, requests, &|z| {
        pipe.model.decode_latents(z)
    })
}

pub fn sample(a: Sample) -> Result<()> {
    let (pipe, device) = load(&a.model)?;
    let n = a.sampling.n_samples;
    let size = native_size(&pipe);
    let shape = pipe.model.latent_shape(n, size, size)?;
    let (cond, uncond, describe) = if a.class_label.is_empty() {
        if a.scale != 1.0 {
            bail!("guidance (--scale) needs class labels");
        }
        (Conditioning::none(), None, "unconditional".to_string())
    } else {
        let labels: Vec<usize> = match a.class_label.len() {
            1 => vec![a.class_label[0]; n],
            k if k == n => a.class_label.clone(),
            k => bail!("{k} class labels for --n-samples {n}; give one or {n}"),
        };
        let cond = pipe.model.class_conditioning(&labels)?;
        let uncond = if a.scale != 1.0 {
            let uc = match (a.uc_class, &pipe.model.cond_stage) {
                (Some(u), _) => u,
                (None, ldm::pipelines::CondStage::Class(e))
                    if e.unconditional_label().is_some() =>
                {
                    e.unconditional_label().unwrap()
                }
                _ => bail!(
                    "--scale {} needs --uc-class (the label meaning \"no class\")",
                    a.scale
                ),
            };
            Some(pipe.model.class_conditioning(&vec![uc; n])?)
        } else {
            None
        };
        (cond, uncond, format!("class {labels:?}"))
    };
    let request = SamplingRequest {
        uncond,
        guidance_scale: a.scale,
        sampler: sampler_options(&pipe, &a.sampling),
        ..SamplingRequest::new(cond, shape)
    };
    run_batches(
        &pipe,
        &device,
        &a.sampling,
        vec![(request, describe)],
        &|z| pipe.model.decode_latents(z),
    )
}

fn repeat(x: Tensor<4>, n: usize) -> Tensor<4> {
    Tensor::cat(vec![x; n], 0)
}

pub fn img2img(a: Img2Img) -> Result<()> {
    let (pipe, device) = load(&a.model)?;
    let n = a.sampling.n_samples;
    let image = output::load_image(&a.init_image, &device)?;
    let [_, _, h, w] = image.dims();
    let shape = pipe
        .model
        .latent_shape(n, h, w)
        .with_context(|| format!("init image {} is {w}x{h}", a.init_image.display()))?;
    let mut noise = SeededNoise::new(a.sampling.seed);
    let z0 = pipe.model.encode_image(repeat(image, n), &mut noise)?;
    let cond = pipe.model.text_conditioning(&vec![a.prompt.as_str(); n])?;
    let uncond = (a.scale != 1.0)
        .then(|| {
            pipe.model
                .text_conditioning(&vec![a.negative_prompt.as_deref().unwrap_or(""); n])
        })
        .transpose()?;
    let request = SamplingRequest {
        uncond,
        guidance_scale: a.scale,
        sampler: sampler_options(&pipe, &a.sampling),
        init: Some((z0, a.strength)),
        img2img_noising: if a.reference_noising {
            ldm::pipelines::Img2ImgNoising::Reference
        } else {
            ldm::pipelines::Img2ImgNoising::FirstStep
        },
        ..SamplingRequest::new(cond, shape)
    };
    if a.sampling.init_noise.is_some() {
        bail!("--init-noise does not apply to img2img (the start is the noised init image)");
    }
    let describe = format!(
        "{}\nNegative prompt: {}\nStrength: {}",
        a.prompt,
        a.negative_prompt.as_deref().unwrap_or(""),
        a.strength
    );
    run_batches(
        &pipe,
        &device,
        &a.sampling,
        vec![(request, describe)],
        &|z| pipe.model.decode_latents(z),
    )
}

pub fn inpaint(a: Inpaint) -> Result<()> {
    let (pipe, device) = load(&a.model)?;
    check_batch(&a.sampling)?;
    let n = a.sampling.n_samples;
    let image = output::load_image(&a.image, &device)?;
    let mask = output::load_mask(&a.mask, &device)?;
    let [_, _, h, w] = image.dims();
    if mask.dims()[2..] != [h, w] {
        bail!(
            "mask {} is {}x{}, image is {w}x{h}",
            a.mask.display(),
            mask.dims()[3],
            mask.dims()[2]
        );
    }
    pipe.model
        .latent_shape(n, h, w)
        .with_context(|| format!("image {} is {w}x{h}", a.image.display()))?;
    let prompts = a.prompt.as_ref().map(|p| vec![p.clone(); n]);
    let mut out = OutDir::new(&a.sampling.outdir)?;
    let text = format!(
        "{}\nInpainting: {}, mask {}\nSteps: {}, Sampler: {}, Seed: {}, Model hash: {}",
        a.prompt.as_deref().unwrap_or(""),
        a.image.display(),
        a.mask.display(),
        a.sampling.steps,
        a.sampling.sampler,
        a.sampling.seed,
        output::model_hash(&pipe.source)
    );
    let mut noise = SeededNoise::new(a.sampling.seed);
    let mut images = Vec::new();
    for _ in 0..a.sampling.n_iter {
        let g: Generated = pipe.model.inpaint(
            repeat(image.clone(), n),
            repeat(mask.clone(), n),
            prompts.as_deref(),
            a.scale,
            sampler_options(&pipe, &a.sampling),
            &mut noise,
            None,
        )?;
        for img in output::to_images(g.images) {
            let p = out.save_sample(&img, &text)?;
            eprintln!("wrote {}", p.display());
            images.push(img);
        }
    }
    let idx = out.take_batch_index();
    out.save_grid(&out.grid_path(idx), &images, n, &text)
}

pub fn upscale(a: Upscale) -> Result<()> {
    let (pipe, device) = load(&a.model)?;
    check_batch(&a.sampling)?;
    let low = output::load_image(&a.image, &device)?;
    let mut out = OutDir::new(&a.sampling.outdir)?;
    let mut noise = SeededNoise::new(a.sampling.seed);
    let text = format!(
        "Upscale: {}\nSteps: {}, Sampler: {}, Seed: {}, Model hash: {}",
        a.image.display(),
        a.sampling.steps,
        a.sampling.sampler,
        a.sampling.seed,
        output::model_hash(&pipe.source)
    );
    let mut images = Vec::new();
    for _ in 0..a.sampling.n_iter {
        let g = pipe.model.upscale(
            repeat(low.clone(), a.sampling.n_samples),
            sampler_options(&pipe, &a.sampling),
            &mut noise,
            None,
        )?;
        for img in output::to_images(g.images) {
            eprintln!("wrote {}", out.save_sample(&img, &text)?.display());
            images.push(img);
        }
    }
    let idx = out.take_batch_index();
    out.save_grid(&out.grid_path(idx), &images, a.sampling.n_samples, &text)
}

pub fn autoencode(a: Autoencode) -> Result<()> {
    let (pipe, device) = load(&a.model)?;
    let image = output::load_image(&a.input, &device)?;
    let [_, _, h, w] = image.dims();
    if h % pipe.model.downsample != 0 || w % pipe.model.downsample != 0 {
        bail!(
            "{} is {w}x{h}; the first stage needs multiples of {}",
            a.input.display(),
            pipe.model.downsample
        );
    }
    let z = pipe
        .model
        .encode_image(image, &mut SeededNoise::new(a.seed))?;
    let rec = pipe.model.decode_latents(z.clone());
    let mut out = OutDir::new(&a.outdir)?;
    let text = format!(
        "Autoencode: {}\nModel hash: {}",
        a.input.display(),
        output::model_hash(&pipe.source)
    );
    let img = output::to_images(rec).remove(0);
    eprintln!(
        "reconstruction: {}",
        out.save_sample(&img, &text)?.display()
    );
    if a.save_latents {
        let idx = out.take_batch_index();
        let p = out.latents_path(idx);
        output::write_npy(&p, z)?;
        eprintln!("latent: {}", p.display());
    }
    Ok(())
}

fn count(shapes: &[(String, Vec<usize>)], prefix: &str) -> usize {
    shapes
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn inspect(a: Inspect) -> Result<()> {
    let device = device(&a.device)?;
    if let Some(path) = &a.ckpt
        && path.is_dir()
    {
        let pipe = Pipeline::from_files(
            path,
            &PipelineOptions {
                allow_missing: true,
                ..Default::default()
            },
            &device,
        )?;
        print_model(&pipe.name, &pipe.model);
        for r in &pipe.reports {
            println!("{r}");
        }
        return Ok(());
    }
    let state_dict = a.ckpt.as_ref().map(StateDict::open).transpose()?;
    let spec = match (&a.config, &a.preset, &state_dict) {
        (Some(c), _, _) => LdmSpec::from_yaml_file(c)?,
        (None, Some(p), _) => LdmSpec::preset_named(p)?,
        (None, None, Some(sd)) => LdmSpec::detect(sd, &device)?,
        (None, None, None) => bail!("give --ckpt, --config or --preset"),
    };
    let model = spec.build_uninit(&device)?;
    print_model(&spec.name, &model);
    if let Some(sd) = state_dict {
        println!("checkpoint {}: {} tensors", sd.source().display(), sd.len());
        let shapes = model_shapes(&model);
        let mut missing = Vec::new();
        let mut mismatched = Vec::new();
        for (k, s) in &shapes {
            match sd.shape_of(k) {
                None => missing.push(k.clone()),
                Some(got) if &got != s => {
                    mismatched.push(format!("{k}: checkpoint {got:?}, model {s:?}"))
                }
                _ => {}
            }
        }
        let known: std::collections::BTreeSet<&str> =
            shapes.iter().map(|(k, _)| k.as_str()).collect();
        let unused: Vec<&str> = sd
            .keys()
            .filter(|k| {
                !known.contains(k)
                    && !ldm::io::KNOWN_BUFFERS.contains(k)
                    && !k.ends_with("position_ids")
            })
            .collect();
        let ema = unused
            .iter()
            .filter(|k| k.starts_with("model_ema."))
            .count();
        println!("missing: {}{}", missing.len(), preview(&missing));
        println!(
            "shape mismatches: {}{}",
            mismatched.len(),
            preview(&mismatched)
        );
        println!(
            "unused: {}{}{}",
            unused.len(),
            if ema > 0 {
                format!(" ({ema} EMA weights: model_ema.*, used with --use-ema)")
            } else {
                String::new()
            },
            preview(
                &unused
                    .iter()
                    .filter(|k| !k.starts_with("model_ema."))
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
            )
        );
    }
    Ok(())
}

fn preview(items: &[String]) -> String {
    if items.is_empty() {
        return String::new();
    }
    let shown: Vec<&str> = items.iter().take(10).map(String::as_str).collect();
    format!(
        ": {}{}",
        shown.join(", "),
        if items.len() > 10 {
            format!(", … ({} more)", items.len() - 10)
        } else {
            String::new()
        }
    )
}

fn print_model(name: &str, model: &ldm::pipelines::LatentDiffusion) {
    let shapes = model_shapes(model);
    let unet = count(&shapes, "model.diffusion_model.");
    let fs = count(&shapes, "first_stage_model.");
    let cs = count(&shapes, "cond_stage_model.");
    let (fs_name, cs_name) = (
        match model.first_stage {
            ldm::pipelines::FirstStage::Kl(_) => "VAE (AutoencoderKL)",
            ldm::pipelines::FirstStage::Vq(_) => "VQ autoencoder (VQModel)",
            ldm::pipelines::FirstStage::Identity => "none",
        },
        match model.cond_stage {
            ldm::pipelines::CondStage::Clip { .. } => "CLIP text encoder",
            ldm::pipelines::CondStage::Bert { .. } => "BERT text encoder",
            ldm::pipelines::CondStage::Class(_) => "class embedder",
            ldm::pipelines::CondStage::None => "none (unconditional)",
            ldm::pipelines::CondStage::Identity => "identity (low-res image, concat)",
            ldm::pipelines::CondStage::FirstStage => "first stage (masked image, concat)",
        },
    );
    println!("model: {name}");
    println!(
        "  UNet: {} parameters ({:?} conditioning)",
        thousands(unet),
        model.conditioning_key()
    );
    println!(
        "  {fs_name}: {} parameters (downsampling ×{})",
        thousands(fs),
        model.downsample
    );
    if cs > 0 {
        println!("  {cs_name}: {} parameters", thousands(cs));
    } else {
        println!("  conditioning: {cs_name}");
    }
    println!(
        "  total: {} parameters; scale_factor {}, {} timesteps, {:?} parameterization",
        thousands(unet + fs + cs),
        model.scale_factor,
        model.schedule.timesteps(),
        model.parameterization
    );
}
