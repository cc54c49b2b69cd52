//! `ldm train autoencoder` and `ldm train diffusion`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use ldm::io::{CheckpointOptions, FirstStageSpec, LdmSpec, StateDict, autoencoder_training_config};
use ldm::losses::PerceptualLoss;
use ldm::training::autoencoder::{
    AutoencoderTrainer, AutoencoderTrainingConfig, FirstStageNet, save_first_stage,
    train_autoencoder,
};
use ldm::training::data::{ImageFolder, ImageTransform};
use ldm::training::diffusion::{
    DiffusionTrainer, DiffusionTrainingConfig, save_compvis_checkpoint, train_diffusion,
};

/// The learning rate schedule after the warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LrScheduler {
    /// The peak learning rate to the end.
    Constant,
    /// A half cosine from the peak to 0 at the last step.
    Cosine,
}

/// What to train.
#[derive(Subcommand, Debug)]
pub enum Train {
    /// A first stage (KL or VQ autoencoder) with L1 (+ LPIPS) + PatchGAN (+ KL / codebook) losses.
    Autoencoder(TrainAe),
    /// A latent diffusion model (UNet, optionally its conditioning encoder) on a frozen first stage.
    Diffusion(TrainLdm),
}

/// Settings both trainers share.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Image folder (captions: sidecar .txt or metadata.jsonl; classes: sub-folders).
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: checkpoints, losses.csv, samples, metric logs.
    #[arg(long)]
    pub out: PathBuf,
    /// Image size after resize and crop.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Random crops (else center).
    #[arg(long)]
    pub random_crop: bool,
    /// Random horizontal flips.
    #[arg(long)]
    pub flip: bool,
    /// Batch size.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Epochs.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Steps per epoch (default: one pass over the data).
    #[arg(long)]
    pub steps_per_epoch: Option<usize>,
    /// Learning rate (default: the config's base_learning_rate × batch size, as CompVis' scale_lr).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Resume from the checkpoint of this epoch in --out (without a value: the last one).
    #[arg(long, num_args = 0..=1, default_missing_value = "last")]
    pub resume: Option<String>,
    /// Seed (data order, noise, initialisation of the run's random draws).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Device (cpu, wgpu, cuda:N, ...); several, comma-separated, train data-parallel.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `ldm train autoencoder`.
#[derive(Args, Debug)]
pub struct TrainAe {
    /// CompVis autoencoder config (model.target AutoencoderKL / VQModel with a lossconfig).
    #[arg(long)]
    pub config: PathBuf,
    /// torchvision VGG16 weights (`vgg16-397923af.pth`) for LPIPS; without them LPIPS is off.
    #[arg(long)]
    pub lpips_vgg: Option<PathBuf>,
    /// LPIPS `v0.1/vgg.pth` lin weights (from the `lpips` package).
    #[arg(long)]
    pub lpips_lin: Option<PathBuf>,
    /// Write input/reconstruction grids every N steps (0: never).
    #[arg(long, default_value_t = 0)]
    pub sample_every: usize,
    /// Fine-tune from these weights: a first stage (`first_stage.safetensors`, CompVis layout) or
    /// a full LDM checkpoint (its `first_stage_model.*`). The discriminator starts fresh, and
    /// disc_start counts from this run's first step.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

/// `ldm train diffusion`.
#[derive(Args, Debug)]
pub struct TrainLdm {
    /// CompVis LatentDiffusion config (the same YAML then samples the result).
    #[arg(long)]
    pub config: PathBuf,
    /// Fine-tune from a full CompVis/SD checkpoint.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// The first stage's checkpoint (else the config's first_stage_config.ckpt_path). With
    /// --init-from it replaces the checkpoint's first stage (and scale_by_std measures a new
    /// scale_factor): the UNet then adapts to the new latents.
    #[arg(long)]
    pub first_stage: Option<PathBuf>,
    /// Warm-up steps (linear from 1e-6 · lr).
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// The learning rate after the warm-up (diffusers' --lr_scheduler): constant (the reference)
    /// or a half cosine down to 0 at the run's last step.
    #[arg(long, value_enum, default_value_t = LrScheduler::Constant)]
    pub lr_scheduler: LrScheduler,
    /// Probability of dropping the caption / class (classifier-free guidance).
    #[arg(long, default_value_t = 0.1)]
    pub ucg: f64,
    /// EMA decay of the UNet (0: no EMA).
    #[arg(long, default_value_t = 0.9999)]
    pub ema_decay: f64,
    /// Offset noise (diffusers' --noise_offset): std of a per-sample, per-channel constant added
    /// to the training noise, so colour must come from the prompt (0: off, as the reference).
    #[arg(long, default_value_t = 0.0)]
    pub noise_offset: f64,
    /// Keep the frozen first stage's posterior of every image seen, in host memory, and skip the
    /// encoder when an image comes round again (kohya's --cache_latents; each step still draws
    /// a fresh sample). 6 KB per image for the demo's 64 px f4 model, 128 KB for SD at 512 px.
    #[arg(long)]
    pub cache_latents: bool,
    /// Min-SNR-γ loss weighting (diffusers' --snr_gamma; 5 is the paper's choice; off: the
    /// reference's plain mean)
    #[arg(long)]
    pub snr_gamma: Option<f64>,
    /// Draw the noisiest timesteps (the last --timestep-bias-portion of the schedule) this many
    /// times as often (diffusers' --timestep_bias_strategy later; 1: uniform, as the reference)
    #[arg(long, default_value_t = 1.0)]
    pub timestep_bias_multiplier: f64,
    /// The share of the schedule --timestep-bias-multiplier applies to
    #[arg(long, default_value_t = 0.25)]
    pub timestep_bias_portion: f64,
    /// Also train the conditioning encoder (default: the config's cond_stage_trainable).
    #[arg(long)]
    pub cond_trainable: bool,
    /// Gradient accumulation steps.
    #[arg(long, default_value_t = 1)]
    pub accumulate: usize,
    /// Write a DDIM sample grid (the first batch's captions, EMA weights) every N steps (0: never).
    #[arg(long, default_value_t = 0)]
    pub sample_every: usize,
    #[command(flatten)]
    pub common: Common,
}

fn folder(c: &Common) -> Result<ImageFolder> {
    Ok(ImageFolder::open(
        &c.data,
        ImageTransform {
            size: c.size,
            random_crop: c.random_crop,
            random_flip: c.flip,
        },
        c.seed,
    )?)
}

/// The devices of `--device`, and the first of them (where the model is built) seeded with
/// `--seed`: fresh weights come from the backend's RNG, so --seed reproduces a run.
fn devices(c: &Common) -> Result<(Vec<ldm::burn::tensor::Device>, ldm::burn::tensor::Device)> {
    let devs: Vec<_> = c
        .device
        .split(',')
        .map(|d| Ok(ldm::device::parse_device(d.trim())?))
        .collect::<Result<_>>()?;
    let first = devs[0].clone();
    first.seed(c.seed);
    Ok((devs, first))
}

/// `--resume [N]`: the epoch to resume from (`last`: the newest checkpoint in `out`).
fn resume_epoch(c: &Common) -> Result<Option<usize>> {
    match c.resume.as_deref() {
        None => Ok(None),
        Some("last") => {
            let dir = c.out.join("checkpoint");
            let last = std::fs::read_dir(&dir)
                .with_context(|| format!("--resume: no checkpoints in {}", dir.display()))?
                .filter_map(|e| {
                    let name = e.ok()?.file_name().to_string_lossy().into_owned();
                    name.strip_prefix("model-")?
                        .strip_suffix(".bpk")?
                        .parse::<usize>()
                        .ok()
                })
                .max();
            match last {
                Some(n) => Ok(Some(n)),
                None => bail!("--resume: no model-N.bpk checkpoint in {}", dir.display()),
            }
        }
        Some(n) => {
            Ok(Some(n.parse().with_context(|| {
                format!("--resume {n}: not an epoch number")
            })?))
        }
    }
}

pub fn run(cmd: Train) -> Result<()> {
    match cmd {
        Train::Autoencoder(a) => autoencoder(a),
        Train::Diffusion(a) => diffusion(a),
    }
}

fn autoencoder(a: TrainAe) -> Result<()> {
    let c = &a.common;
    let (devs, device) = devices(c)?;
    let (spec, mut loss_cfg, base_lr) = autoencoder_training_config(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let lpips_files = match (&a.lpips_vgg, &a.lpips_lin) {
        (Some(v), Some(l)) => Some((StateDict::open(v)?, StateDict::open(l)?)),
        (None, None) => None,
        _ => bail!("give both --lpips-vgg and --lpips-lin, or neither"),
    };
    if lpips_files.is_none() && loss_cfg.perceptual_weight > 0.0 {
        tracing::warn!(
            "no LPIPS weights (--lpips-vgg, --lpips-lin): the perceptual term is OFF (perceptual_weight {} -> 0)",
            loss_cfg.perceptual_weight
        );
        loss_cfg.perceptual_weight = 0.0;
    }
    let mut loss: PerceptualLoss = loss_cfg.init(&device);
    if let Some((vgg, lin)) = &lpips_files {
        let r = loss.perceptual_loss.load_weights(&[vgg, lin])?;
        tracing::info!("{r}");
    }
    let mut ae = match spec {
        FirstStageSpec::Kl(cfg) => FirstStageNet::Kl(cfg.init(&device)),
        FirstStageSpec::Vq(cfg) => FirstStageNet::Vq(cfg.init(&device)),
    };
    if let Some(p) = &a.init_from {
        let sd = StateDict::open(p).with_context(|| format!("--init-from {}", p.display()))?;
        match &mut ae {
            FirstStageNet::Kl(m) => m.load_weights(&sd)?,
            FirstStageNet::Vq(m) => m.load_weights(&sd)?,
        };
        eprintln!("fine-tuning the first stage of {}", p.display());
    }
    let lr = a
        .common
        .lr
        .unwrap_or(base_lr.unwrap_or(4.5e-6) * c.batch_size as f64);
    let data = folder(c)?;
    std::fs::create_dir_all(&c.out)?;
    let trainer = AutoencoderTrainer::new(ae, loss, &c.out, c.seed, a.sample_every);
    let cfg = AutoencoderTrainingConfig::new()
        .with_learning_rate(lr)
        .with_batch_size(c.batch_size)
        .with_epochs(c.epochs)
        .with_steps_per_epoch(c.steps_per_epoch)
        .with_seed(c.seed)
        .with_resume_epoch(resume_epoch(c)?);
    eprintln!(
        "training the autoencoder: lr {lr:.3e}, {} images, output {}",
        data.records.len(),
        c.out.display()
    );
    let run = train_autoencoder(trainer, data, &cfg, &c.out, &devs)?;
    let weights = c.out.join("first_stage.safetensors");
    if weights.exists() {
        std::fs::remove_file(&weights)?;
    }
    save_first_stage(&run.model, &weights)?;
    eprintln!(
        "{} steps{}; weights in {} (CompVis layout), checkpoints in {}, per-step losses in {}",
        run.steps,
        if run.interrupted {
            " (interrupted)"
        } else {
            ""
        },
        weights.display(),
        c.out.join("checkpoint").display(),
        c.out.join("losses.csv").display()
    );
    Ok(())
}

fn diffusion(a: TrainLdm) -> Result<()> {
    let c = &a.common;
    let (devs, device) = devices(c)?;
    let spec = LdmSpec::from_yaml_file(&a.config)?;
    let mut model = match &a.init_from {
        Some(init) => {
            let sd = StateDict::open(init)?;
            spec.load(&sd, None, &CheckpointOptions::default(), &device)?
                .0
        }
        None => spec.build_uninit(&device)?,
    };
    // A fine-tune keeps its checkpoint's first stage unless --first-stage replaces it.
    let fs = match &a.init_from {
        Some(_) => a.first_stage.clone(),
        None => a.first_stage.clone().or(spec.first_stage_ckpt.clone()),
    };
    match fs {
        Some(path) => {
            let sd = StateDict::open(&path)
                .with_context(|| format!("first stage {}", path.display()))?;
            // load_weights logs what it loaded.
            model.first_stage.load_weights(&sd)?;
        }
        None if a.init_from.is_none() => tracing::warn!(
            "no first-stage weights (--first-stage or first_stage_config.params.ckpt_path): the autoencoder is RANDOM"
        ),
        None => {}
    }
    let lr = a
        .common
        .lr
        .unwrap_or(spec.base_learning_rate.unwrap_or(1e-4) * c.batch_size as f64);
    let cfg = DiffusionTrainingConfig::new()
        .with_learning_rate(lr)
        .with_warmup_steps(a.warmup)
        .with_cosine_decay(a.lr_scheduler == LrScheduler::Cosine)
        .with_batch_size(c.batch_size)
        .with_grad_accumulation(a.accumulate)
        .with_epochs(c.epochs)
        .with_steps_per_epoch(c.steps_per_epoch)
        .with_uncond_prob(a.ucg)
        .with_ema_decay((a.ema_decay > 0.0).then_some(a.ema_decay))
        .with_noise_offset(a.noise_offset)
        .with_cache_latents(a.cache_latents)
        .with_snr_gamma(a.snr_gamma)
        .with_timestep_bias_multiplier(a.timestep_bias_multiplier)
        .with_timestep_bias_portion(a.timestep_bias_portion)
        .with_cond_trainable(a.cond_trainable || spec.cond_stage_trainable)
        .with_seed(c.seed)
        .with_resume_epoch(resume_epoch(c)?)
        .with_sample_every(a.sample_every)
        .with_sample_size(c.size);
    let data = folder(c)?;
    std::fs::create_dir_all(&c.out)?;
    // As the reference's `restarted_from_ckpt`: a fine-tune keeps its checkpoint's scale_factor
    // instead of measuring a new one on the first batch, unless --first-stage gave new latents.
    let scale_by_std = spec.scale_by_std && (a.init_from.is_none() || a.first_stage.is_some());
    if spec.scale_by_std && !scale_by_std {
        tracing::info!("scale_by_std: keeping the scale_factor of --init-from");
    }
    let trainer = DiffusionTrainer::new(model, &cfg, scale_by_std, &c.out)?
        .with_l1_loss(spec.loss_type == "l1");
    eprintln!(
        "training the diffusion model: lr {lr:.3e}, {} images, output {}",
        data.records.len(),
        c.out.display()
    );
    let run = train_diffusion(trainer, data, &cfg, &c.out, &devs)?;
    let ckpt = c.out.join("model.safetensors");
    if ckpt.exists() {
        std::fs::remove_file(&ckpt)?;
    }
    save_compvis_checkpoint(&run.model, &ckpt)?;
    let yaml = c.out.join("config.yaml");
    if a.config.canonicalize().ok() != yaml.canonicalize().ok() {
        std::fs::copy(&a.config, &yaml)?;
    }
    eprintln!(
        "{} steps{}; model (EMA weights when on) in {} — sample with: ldm txt2img --ckpt {} --config {} --prompt ...",
        run.steps,
        if run.interrupted {
            " (interrupted)"
        } else {
            ""
        },
        ckpt.display(),
        ckpt.display(),
        yaml.display()
    );
    Ok(())
}
