//! Latent diffusion training and fine-tuning (CompVis `LatentDiffusion.p_losses` /
//! `training_step`) in Burn's `Learner`: frozen first stage (`scale_factor`, or `scale_by_std` from
//! the first batch), frozen or trainable conditioning encoder with classifier-free-guidance
//! dropout (empty caption / null class), ε / x₀ / v targets with an l2 or l1 loss, AdamW with a
//! linear warm-up, EMA of the UNet with the reference's decay rule
//! (`min(decay, (1 + n)/(10 + n))`), and a CompVis-layout `.safetensors` checkpoint (EMA weights
//! written in) that `ldm txt2img` / `ldm sample` load with the training YAML.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use burn::config::Config;
use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn::train::{InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep};
use rand::RngExt;

use super::autoencoder::{FirstStageNet, trainable};
use super::data::{ImageBatch, ImageFolder};
use super::metrics::{ScalarMetric, Scalars};
use super::shared::{
    CsvLog, Loaders, MergeGrads, Tensors, export, loaders, randn, save_grid, step_rng, with_devices,
};
use crate::conditioning::{ClassEmbedder, ClipTextModel, TextTokenizer, TransformerWrapper};
use crate::error::{Error, Result};
use crate::models::autoencoder::DiagonalGaussianDistribution;
use crate::models::unet::UNetModel;
use crate::pipelines::{ConditioningKey, LatentDiffusion};
use crate::schedulers::Parameterization;

/// The conditioning encoder being used (and maybe trained).
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum CondNet {
    /// CLIP text encoder.
    Clip(ClipTextModel),
    /// LDM BERT.
    Bert(TransformerWrapper),
    /// Class embedder.
    Class(ClassEmbedder),
    /// Unconditional (a parameter-free placeholder).
    None(burn::nn::Identity),
}

#[derive(Debug, Clone)]
struct DiffState {
    step: Arc<AtomicUsize>,
    seed: u64,
    parameterization: Parameterization,
    l1: bool,
    uncond_prob: f64,
    noise_offset: f64,
    snr_gamma: Option<f64>,
    timestep_bias: (f64, f64),
    scale_factor: Arc<Mutex<f64>>,
    scale_by_std: bool,
    key: ConditioningKey,
    tokenizer: Option<Arc<TextTokenizer>>,
    null_class: Option<usize>,
    ema_decay: Option<f64>,
    ema: Arc<Mutex<Option<(UNetModel, usize)>>>,
    dir: PathBuf,
    csv: CsvLog,
    schedule: Arc<crate::schedulers::DiffusionSchedule>,
    downsample: usize,
    latent_channels: usize,
    sample_every: usize,
    sample_size: usize,
    sample_prompts: Arc<Mutex<Vec<String>>>,
    /// Batches per epoch (set by [`train_diffusion`]): the trainer state is saved at each epoch end.
    steps_per_epoch: usize,
    /// Items per epoch (set by [`train_diffusion`]): with the batch's place in the epoch, the key
    /// of a step's random draws.
    epoch_items: usize,
    /// The first stage's outputs by image ([`DiffusionTrainingConfig::cache_latents`]).
    latent_cache: Option<Arc<LatentCache>>,
}

/// What the frozen first stage made of each image seen so far, keyed by a hash of its pixels: a KL
/// posterior's mean and (clamped) log-variance, or a VQ model's pre-quantization latent. Each
/// step's posterior sample is still drawn afresh from the cached moments.
#[derive(Debug, Default)]
struct LatentCache {
    entries: Mutex<CacheEntries>,
    /// Images encoded, and images whose moments came from the cache.
    encoded: AtomicUsize,
    reused: AtomicUsize,
}

#[derive(Debug, Default)]
struct CacheEntries {
    /// `[C, H, W]` of one image's moments (set with the first).
    shape: Option<[usize; 3]>,
    /// The moments by pixel hash.
    by_hash: std::collections::HashMap<u64, Vec<f32>>,
}

impl LatentCache {
    /// One line for the log: how much encoding the cache saved and what it holds.
    fn summary(&self) -> String {
        let (encoded, reused) = (
            self.encoded.load(Ordering::Relaxed),
            self.reused.load(Ordering::Relaxed),
        );
        let entries = self.entries.lock().expect("lock");
        let floats: usize = entries.by_hash.values().map(Vec::len).sum();
        format!(
            "latent cache: {reused} of {} images reused, {encoded} encoded; {} images held ({:.1} MB)",
            encoded + reused,
            entries.by_hash.len(),
            floats as f64 * 4.0 / 1e6
        )
    }
}

/// A hash of one image's pixels (their f32 bits), the key of [`LatentCache`].
fn pixel_hash(pixels: &[f32]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    pixels.len().hash(&mut h);
    for p in pixels {
        p.to_bits().hash(&mut h);
    }
    h.finish()
}

/// UNet (+ conditioning encoder) training model with the frozen first stage.
#[derive(Module, Debug)]
pub struct DiffusionTrainer {
    /// The denoiser (trained).
    pub unet: UNetModel,
    /// The conditioning encoder (trained iff `cond_stage_trainable`).
    pub cond: CondNet,
    /// The first stage (frozen).
    pub first_stage: FirstStageNet,
    #[module(skip)]
    state: DiffState,
}

/// The training noise `ε ~ N(0, I)`, plus `offset · N(0, 1)` per sample and channel (constant
/// over space) when `offset > 0` (offset noise; see [`DiffusionTrainingConfig::noise_offset`]).
fn training_noise(
    [b, c, h, w]: [usize; 4],
    offset: f64,
    rng: &mut rand::rngs::StdRng,
    device: &Device,
) -> Tensor<4> {
    let noise = randn([b, c, h, w], rng, device);
    if offset > 0.0 {
        noise + randn([b, c, 1, 1], rng, device).mul_scalar(offset)
    } else {
        noise
    }
}

/// A training timestep in `0..n`: uniform, or with the last `portion` of the schedule drawn
/// `multiplier` times as often (`bias = (multiplier, portion)`; multiplier 1: uniform, with the
/// same draws as before the option existed).
fn sample_timestep(
    n: usize,
    (multiplier, portion): (f64, f64),
    rng: &mut rand::rngs::StdRng,
) -> usize {
    if multiplier == 1.0 {
        return rng.random_range(0..n);
    }
    let cut = n - ((portion * n as f64).round() as usize).clamp(1, n);
    let total = cut as f64 + multiplier * (n - cut) as f64;
    let u = rng.random::<f64>() * total;
    if u < cut as f64 {
        u as usize
    } else {
        (cut + ((u - cut as f64) / multiplier) as usize).min(n - 1)
    }
}

/// The min-SNR-γ weight of a sample at `alphas_cumprod = a` for the given target (diffusers'
/// `compute_snr` and its `--snr_gamma` weights).
fn min_snr_weight(a: f64, gamma: f64, parameterization: Parameterization) -> f64 {
    let snr = a / (1.0 - a);
    let clipped = snr.min(gamma);
    match parameterization {
        Parameterization::Eps => clipped / snr,
        Parameterization::V => clipped / (snr + 1.0),
        Parameterization::X0 => clipped,
    }
}

/// Settings of [`train_diffusion`].
#[derive(Config, Debug)]
pub struct DiffusionTrainingConfig {
    /// Peak learning rate (CompVis: `base_learning_rate · batch · GPUs · accumulation`).
    #[config(default = 1e-4)]
    pub learning_rate: f64,
    /// Linear warm-up steps from 1e-6 · lr (`LambdaLinearScheduler`).
    #[config(default = 0)]
    pub warmup_steps: usize,
    /// After the warm-up, decay the learning rate to 0 along a half cosine over the rest of the
    /// run (diffusers' `--lr_scheduler cosine`). Off: constant, as the reference.
    #[config(default = false)]
    pub cosine_decay: bool,
    /// AdamW weight decay (PyTorch's default).
    #[config(default = 0.01)]
    pub weight_decay: f64,
    /// Batch size.
    #[config(default = 4)]
    pub batch_size: usize,
    /// Gradient accumulation steps.
    #[config(default = 1)]
    pub grad_accumulation: usize,
    /// Epochs.
    #[config(default = 1)]
    pub epochs: usize,
    /// Steps per epoch (default: one pass over the data).
    pub steps_per_epoch: Option<usize>,
    /// Probability of dropping the conditioning (classifier-free guidance training).
    #[config(default = 0.1)]
    pub uncond_prob: f64,
    /// EMA decay of the UNet (None: no EMA).
    pub ema_decay: Option<f64>,
    /// Offset noise (diffusers' `noise_offset`, Guttenberg 2023): adds `offset · N(0, 1)` per
    /// sample and channel, constant over space, to the training noise. Without it the global
    /// mean of `x_t` still shows an image's mean colour at `t = T` (the schedule's terminal SNR
    /// is not zero), so the model reads colour from the noise instead of the prompt. 0: off (the
    /// reference).
    #[config(default = 0.0)]
    pub noise_offset: f64,
    /// Min-SNR-γ loss weighting (Hang et al. 2023; diffusers' `--snr_gamma`, 5 recommended): each
    /// sample's loss is weighted by `min(SNR, γ) / SNR` (ε), `min(SNR, γ) / (SNR + 1)` (v) or
    /// `min(SNR, γ)` (x₀), so that the easy low-noise timesteps stop dominating the gradient.
    /// None: off (the reference's plain mean).
    pub snr_gamma: Option<f64>,
    /// Timestep bias (diffusers' `--timestep_bias_strategy later`): timesteps in the last
    /// `timestep_bias_portion` of the schedule (the noisiest, where the layout is decided) are
    /// drawn this many times as often as the others. 1: uniform (the reference).
    #[config(default = 1.0)]
    pub timestep_bias_multiplier: f64,
    /// The biased share of the schedule, in (0, 1] (diffusers' `--timestep_bias_portion`).
    #[config(default = 0.25)]
    pub timestep_bias_portion: f64,
    /// Train the conditioning encoder too.
    #[config(default = false)]
    pub cond_trainable: bool,
    /// Seed of data order, timesteps, noise and dropout.
    #[config(default = 42)]
    pub seed: u64,
    /// Resume from this epoch's checkpoint in the output folder.
    pub resume_epoch: Option<usize>,
    /// Write a DDIM sample grid (EMA weights when on) every N steps (0: never).
    #[config(default = 0)]
    pub sample_every: usize,
    /// Side length of those samples in pixels.
    #[config(default = 256)]
    pub sample_size: usize,
    /// Keep the frozen first stage's output for every image seen (kohya's `--cache_latents`):
    /// from the second time an image comes round, the step skips the encoder. The posterior is
    /// cached, not a sample of it, so each step still draws a fresh latent. Costs host memory:
    /// `2 · z_channels · (size / f)²` floats per image (6 KB at 64 px, f4, z 3; 128 KB at 512 px,
    /// f8, z 4). Off: every step encodes its batch (the reference).
    #[config(default = false)]
    pub cache_latents: bool,
}

struct Ema<'a> {
    current: Vec<Tensor<1>>,
    i: usize,
    one_minus: f64,
    _p: std::marker::PhantomData<&'a ()>,
}

impl ModuleMapper for Ema<'_> {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let cur = self.current[self.i].clone();
        self.i += 1;
        let om = self.one_minus;
        p.map(move |shadow| {
            let dims = shadow.dims();
            let c: Tensor<D> = cur.reshape(dims);
            // shadow −= (1 − decay) · (shadow − param)
            shadow.clone() - (shadow - c).mul_scalar(om)
        })
    }
}

struct Collect(Vec<Tensor<1>>);

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        let t = p.val().inner();
        let n = t.shape().num_elements();
        self.0.push(t.reshape([n]));
    }
}

impl DiffusionTrainer {
    /// Splits a [`LatentDiffusion`] into the training model (UNet and conditioning encoder
    /// trainable as configured, first stage frozen).
    pub fn new(
        model: LatentDiffusion,
        config: &DiffusionTrainingConfig,
        scale_by_std: bool,
        dir: &Path,
    ) -> Result<Self> {
        use crate::pipelines::{CondStage, FirstStage};
        let (cond, tokenizer, null_class) = match model.cond_stage {
            CondStage::Clip { model, tokenizer } => {
                (CondNet::Clip(model), Some(Arc::new(tokenizer)), None)
            }
            CondStage::Bert { model, tokenizer } => {
                (CondNet::Bert(model), Some(Arc::new(tokenizer)), None)
            }
            CondStage::Class(e) => {
                let null = e.unconditional_label();
                (CondNet::Class(e), None, null)
            }
            CondStage::None => (CondNet::None(burn::nn::Identity::new()), None, None),
            CondStage::Identity | CondStage::FirstStage => {
                return Err(Error::Config(
                    "training concat-conditioned models (super-resolution, inpainting) is not supported yet".into(),
                ));
            }
        };
        if config.uncond_prob > 0.0 && matches!(cond, CondNet::Class(_)) && null_class.is_none() {
            tracing::warn!("the class embedder has no null class: conditioning dropout is off");
        }
        let first_stage = match model.first_stage {
            FirstStage::Kl(ae) => FirstStageNet::Kl(ae.no_grad()),
            FirstStage::Vq(ae) => FirstStageNet::Vq(ae.no_grad()),
            FirstStage::Identity => {
                return Err(Error::Config("pixel-space models are not supported".into()));
            }
        };
        let cond = if config.cond_trainable {
            cond
        } else {
            cond.no_grad()
        };
        Ok(Self {
            unet: model.model.unet,
            cond,
            first_stage,
            state: DiffState {
                step: Arc::new(AtomicUsize::new(0)),
                seed: config.seed,
                parameterization: model.parameterization,
                l1: false,
                uncond_prob: config.uncond_prob,
                noise_offset: config.noise_offset,
                snr_gamma: config.snr_gamma,
                timestep_bias: (
                    config.timestep_bias_multiplier,
                    config.timestep_bias_portion,
                ),
                scale_factor: Arc::new(Mutex::new(model.scale_factor)),
                scale_by_std,
                key: model.model.key,
                tokenizer,
                null_class,
                ema_decay: config.ema_decay,
                ema: Arc::new(Mutex::new(None)),
                dir: dir.to_path_buf(),
                csv: CsvLog::new(dir),
                schedule: Arc::new(model.schedule.clone()),
                downsample: model.downsample,
                latent_channels: model.latent_channels,
                sample_every: config.sample_every,
                sample_size: config.sample_size,
                sample_prompts: Arc::new(Mutex::new(Vec::new())),
                steps_per_epoch: 0,
                epoch_items: 0,
                latent_cache: config
                    .cache_latents
                    .then(|| Arc::new(LatentCache::default())),
            },
        })
    }

    /// The current weights (EMA UNet when on) as a sampling model.
    pub fn to_latent_diffusion(&self) -> LatentDiffusion {
        use crate::pipelines::{CondStage, DiffusionWrapper, FirstStage};
        let unet = self.ema_unet().unwrap_or_else(|| self.unet.clone().valid());
        let first_stage = match &self.first_stage {
            FirstStageNet::Kl(ae) => FirstStage::Kl(ae.clone().valid()),
            FirstStageNet::Vq(ae) => FirstStage::Vq(ae.clone().valid()),
        };
        let tok = || {
            self.state
                .tokenizer
                .as_ref()
                .map(|t| (**t).clone())
                .expect("text models carry a tokenizer")
        };
        let cond_stage = match &self.cond {
            CondNet::Clip(m) => CondStage::Clip {
                model: m.clone().valid(),
                tokenizer: tok(),
            },
            CondNet::Bert(m) => CondStage::Bert {
                model: m.clone().valid(),
                tokenizer: tok(),
            },
            CondNet::Class(e) => CondStage::Class(e.clone().valid()),
            CondNet::None(_) => CondStage::None,
        };
        LatentDiffusion {
            model: DiffusionWrapper {
                unet,
                key: self.state.key,
            },
            first_stage,
            cond_stage,
            scale_factor: self.scale_factor(),
            schedule: (*self.state.schedule).clone(),
            parameterization: self.state.parameterization,
            latent_channels: self.state.latent_channels,
            downsample: self.state.downsample,
        }
    }

    /// A DDIM grid (20 steps, guidance 3 when trained with dropout) for the first batch's captions /
    /// labels, written to `<dir>/samples/step-NNNNNNN.png`.
    fn write_samples(&self, step: usize) {
        let prompts = self.state.sample_prompts.lock().expect("lock").clone();
        let model = self.to_latent_diffusion();
        let size = self.state.sample_size;
        let scale = if self.state.uncond_prob > 0.0 {
            3.0
        } else {
            1.0
        };
        let sampler =
            crate::schedulers::SamplerOptions::new(crate::schedulers::SamplerKind::Ddim, 20);
        let mut noise = crate::schedulers::SeededNoise::new(self.state.seed);
        let result = match &model.cond_stage {
            crate::pipelines::CondStage::Clip { .. } | crate::pipelines::CondStage::Bert { .. } => {
                model.txt2img(&prompts, None, size, size, scale, sampler, &mut noise, None)
            }
            crate::pipelines::CondStage::Class(_) => {
                let labels: Vec<usize> = (0..prompts.len().max(1)).collect();
                model.sample_classes(
                    &labels,
                    self.state.null_class,
                    scale,
                    sampler,
                    &mut noise,
                    None,
                )
            }
            _ => model.sample_unconditional(prompts.len().max(1), sampler, &mut noise, None),
        };
        let out = match result {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!("sampling at step {step} failed: {e}");
                return;
            }
        };
        let n = out.images.dims()[0];
        save_grid(&self.state.dir, step, out.images, n);
    }

    /// Uses the l1 loss instead of l2 (`loss_type: l1`).
    pub fn with_l1_loss(mut self, l1: bool) -> Self {
        self.state.l1 = l1;
        self
    }

    /// The latent scale in use (after `scale_by_std`, if any).
    pub fn scale_factor(&self) -> f64 {
        *self.state.scale_factor.lock().expect("lock")
    }

    /// The EMA UNet, if EMA is on and a step was taken.
    pub fn ema_unet(&self) -> Option<UNetModel> {
        self.state
            .ema
            .lock()
            .expect("lock")
            .as_ref()
            .map(|(m, _)| m.clone())
    }

    fn rng(&self, step: usize, stream: u64) -> rand::rngs::StdRng {
        step_rng(self.state.seed, step, stream)
    }

    /// The key of a training batch's random draws (posterior sample, caption dropout, timesteps,
    /// noise): its epoch and its place in the epoch's order, so a run draws the same for the same
    /// batch however its devices interleave (the batch counter `step` alone would pair batches
    /// and draws in the order the devices happen to start their steps). The batch counter where
    /// the order is unknown.
    fn draw_key(&self, batch: &ImageBatch, step: usize) -> usize {
        let (per_epoch, items) = (self.state.steps_per_epoch, self.state.epoch_items);
        match batch.positions.first() {
            Some(&p) if per_epoch > 0 && items > 0 => (step / per_epoch) * items + p,
            _ => step,
        }
    }

    /// `scale_by_std`: `scale_factor` = 1 / std of the (unbiased) latents of `batch`, the epoch's
    /// first — as the reference measures it on its first training batch. Done before training
    /// starts, so every device's first step already uses it.
    fn measure_scale_factor(&self, batch: &ImageBatch) {
        let z = self.latents(batch.images.clone(), 0);
        let n = z.shape().num_elements();
        let all = z.reshape([n]);
        let s = all.var(0).sqrt().into_scalar::<f32>() as f64;
        *self.state.scale_factor.lock().expect("lock") = 1.0 / s;
        tracing::info!("scale_by_std: scale_factor = 1/std(z) = {}", 1.0 / s);
    }

    /// Unscaled latents of `x` (a posterior sample drawn with `key`), detached.
    fn latents(&self, x: Tensor<4>, key: usize) -> Tensor<4> {
        // The first stage is frozen: run it without autodiff (no graph, and the fast inference
        // paths apply), then bring the latents back as constants.
        let tracked = x.device().is_autodiff();
        let (first_stage, x) = if tracked {
            (self.first_stage.valid(), x.inner())
        } else {
            (self.first_stage.clone(), x)
        };
        let z = match (&first_stage, &self.state.latent_cache) {
            (_, Some(cache)) => {
                let moments = Self::cached_moments(&first_stage, x, cache);
                match &first_stage {
                    FirstStageNet::Kl(_) => DiagonalGaussianDistribution::new(moments)
                        .sample_with_rng(&mut self.rng(key, 1)),
                    FirstStageNet::Vq(_) => moments,
                }
            }
            (FirstStageNet::Kl(ae), None) => {
                let post = ae.encode(x);
                post.sample_with_rng(&mut self.rng(key, 1))
            }
            (FirstStageNet::Vq(ae), None) => ae.encode_to_prequant(x),
        };
        if tracked { Tensor::from_inner(z) } else { z }.detach()
    }

    /// The first stage's moments of `x` `[B, 3, H, W]`: `[B, 2C, h, w]` (KL: mean, then the
    /// clamped log-variance) or `[B, C, h, w]` (VQ: the pre-quantization latent), encoding only
    /// the images `cache` lacks and adding them to it.
    fn cached_moments(first_stage: &FirstStageNet, x: Tensor<4>, cache: &LatentCache) -> Tensor<4> {
        let device = x.device();
        let [b, c, h, w] = x.dims();
        let pixels = x
            .to_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 pixels");
        let keys: Vec<u64> = pixels.chunks_exact(c * h * w).map(pixel_hash).collect();
        let missing: Vec<usize> = {
            let entries = cache.entries.lock().expect("lock");
            (0..b)
                .filter(|&i| !entries.by_hash.contains_key(&keys[i]))
                .collect()
        };
        cache.encoded.fetch_add(missing.len(), Ordering::Relaxed);
        cache.reused.fetch_add(b - missing.len(), Ordering::Relaxed);
        if !missing.is_empty() {
            let x = if missing.len() == b {
                x
            } else {
                let rows: Vec<i64> = missing.iter().map(|&i| i as i64).collect();
                let n = rows.len();
                x.select(
                    0,
                    Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), &device),
                )
            };
            let moments = match first_stage {
                FirstStageNet::Kl(ae) => {
                    let post = ae.encode(x);
                    Tensor::cat(vec![post.mean, post.logvar], 1)
                }
                FirstStageNet::Vq(ae) => ae.encode_to_prequant(x),
            };
            let [_, mc, mh, mw] = moments.dims();
            let data = moments
                .into_data()
                .try_into_vec::<f32>()
                .expect("f32 moments");
            let mut entries = cache.entries.lock().expect("lock");
            entries.shape = Some([mc, mh, mw]);
            for (row, &i) in data.chunks_exact(mc * mh * mw).zip(&missing) {
                // The first encoding of an image stays (another device may have added it since).
                entries
                    .by_hash
                    .entry(keys[i])
                    .or_insert_with(|| row.to_vec());
            }
        }
        let entries = cache.entries.lock().expect("lock");
        let [mc, mh, mw] = entries.shape.expect("set when the first image was added");
        let mut all = Vec::with_capacity(b * mc * mh * mw);
        for k in &keys {
            all.extend_from_slice(&entries.by_hash[k]);
        }
        Tensor::from_data(TensorData::new(all, [b, mc, mh, mw]), &device)
    }

    /// Scaled latents of `x` (the diffusion model's space).
    fn encode(&self, x: Tensor<4>, key: usize) -> Tensor<4> {
        let sf = *self.state.scale_factor.lock().expect("lock");
        self.latents(x, key).mul_scalar(sf)
    }

    fn conditioning(
        &self,
        batch: &ImageBatch,
        key: usize,
        device: &Device,
    ) -> (Option<Tensor<3>>, Option<Tensor<1, Int>>) {
        let mut rng = self.rng(key, 2);
        let drop: Vec<bool> = (0..batch.captions.len())
            .map(|_| rng.random_bool(self.state.uncond_prob.clamp(0.0, 1.0)))
            .collect();
        match &self.cond {
            CondNet::Clip(_) | CondNet::Bert(_) => {
                let captions: Vec<&str> = batch
                    .captions
                    .iter()
                    .zip(&drop)
                    .map(|(c, d)| if *d { "" } else { c.as_str() })
                    .collect();
                let tok = self
                    .state
                    .tokenizer
                    .as_ref()
                    .expect("text models carry a tokenizer");
                let ids = tok
                    .encode_batch(&captions, device)
                    .expect("tokenizing captions");
                let ctx = match &self.cond {
                    CondNet::Clip(m) => m.forward(ids).last_hidden_state,
                    CondNet::Bert(m) => m.forward(ids),
                    _ => unreachable!(),
                };
                (Some(ctx), None)
            }
            CondNet::Class(e) => {
                let labels: Vec<i64> = batch
                    .labels
                    .iter()
                    .zip(&drop)
                    .map(|(l, d)| match (d, self.state.null_class) {
                        (true, Some(n)) => n as i64,
                        _ => l.unwrap_or(0) as i64,
                    })
                    .collect();
                let y = Tensor::<1, Int>::from_data(
                    TensorData::new(labels, [batch.labels.len()]),
                    device,
                );
                match self.state.key {
                    ConditioningKey::Adm => (None, Some(y)),
                    _ => (Some(e.forward(y)), None),
                }
            }
            CondNet::None(_) => (None, None),
        }
    }

    /// The denoising loss of a batch whose draws (timesteps, noise, dropout) come from the seed
    /// and `key`.
    fn loss(&self, batch: ImageBatch, key: usize) -> (Tensor<1>, Vec<(&'static str, f64)>) {
        let device = batch.images.device();
        let z = self.encode(batch.images.clone(), key);
        let [b, c, h, w] = z.dims();
        let mut rng = self.rng(key, 3);
        let n_t = self.state.schedule.alphas_cumprod.len();
        let t: Vec<usize> = (0..b)
            .map(|_| sample_timestep(n_t, self.state.timestep_bias, &mut rng))
            .collect();
        let noise = training_noise([b, c, h, w], self.state.noise_offset, &mut rng, &device);
        let acp: Vec<f64> = t
            .iter()
            .map(|&i| self.state.schedule.alphas_cumprod[i])
            .collect();
        // One value per sample from its ᾱ_t, broadcast over [c, h, w].
        let per_sample = |f: &dyn Fn(f64) -> f32| {
            let v: Vec<f32> = acp.iter().map(|&a| f(a)).collect();
            Tensor::<4>::from_data(TensorData::new(v, [b, 1, 1, 1]), &device)
        };
        let sa = per_sample(&|a| (a as f32).sqrt());
        let so = per_sample(&|a| (1.0 - a as f32).sqrt());
        let x_noisy = z.clone() * sa.clone() + noise.clone() * so.clone();
        let (context, y) = self.conditioning(&batch, key, &device);
        let tt = Tensor::<1>::from_data(
            TensorData::new(t.iter().map(|&v| v as f32).collect::<Vec<_>>(), [b]),
            &device,
        );
        let out = self.unet.forward(x_noisy, tt, context, y);
        let target = match self.state.parameterization {
            Parameterization::Eps => noise,
            Parameterization::X0 => z,
            Parameterization::V => noise * sa - z * so,
        };
        let diff = out - target;
        let err = if self.state.l1 {
            diff.abs()
        } else {
            diff.square()
        };
        let loss = match self.state.snr_gamma {
            None => err.mean(),
            Some(gamma) => {
                let p = self.state.parameterization;
                // Per-sample means weighted, then averaged: every sample has c·h·w elements.
                (err * per_sample(&|a| min_snr_weight(a, gamma, p) as f32)).mean()
            }
        };
        let mean_t = t.iter().sum::<usize>() as f64 / b as f64;
        let value = loss.clone().inner().into_scalar::<f32>() as f64;
        (loss, vec![("loss", value), ("t_mean", mean_t)])
    }

    fn update_ema(&self) {
        let Some(decay) = self.state.ema_decay else {
            return;
        };
        let mut guard = self.state.ema.lock().expect("lock");
        let mut cur = Collect(Vec::new());
        self.unet.visit(&mut cur);
        match guard.take() {
            None => {
                *guard = Some((self.unet.clone().valid(), 1));
            }
            Some((shadow, n)) => {
                let n = n + 1;
                let d = decay.min((1.0 + n as f64) / (10.0 + n as f64));
                let shadow = shadow.map(&mut Ema {
                    current: cur.0,
                    i: 0,
                    one_minus: 1.0 - d,
                    _p: std::marker::PhantomData,
                });
                *guard = Some((shadow, n));
            }
        }
    }
}

impl TrainStep for DiffusionTrainer {
    type Input = ImageBatch;
    type Output = Scalars;

    fn step(&self, batch: ImageBatch) -> TrainOutput<Scalars> {
        let step = self.state.step.fetch_add(1, Ordering::SeqCst);
        let b = batch.images.dims()[0];
        {
            let mut p = self.state.sample_prompts.lock().expect("lock");
            if p.is_empty() {
                *p = batch.captions.iter().take(4).cloned().collect();
            }
        }
        let key = self.draw_key(&batch, step);
        let (loss, values) = self.loss(batch, key);
        let mut grads = loss.backward();
        let mut gp = GradientsParams::from_module(&mut grads, &self.unet);
        if !matches!(self.cond, CondNet::None(_)) {
            let mut gc = GradientsParams::from_module(&mut grads, &self.cond);
            self.cond.visit(&mut MergeGrads {
                from: &mut gc,
                into: &mut gp,
            });
        }
        let scalars = Scalars { values, batch: b };
        self.state.csv.log(step, &scalars);
        TrainOutput {
            grads: gp,
            item: scalars,
        }
    }

    fn optimize(
        self,
        optim: &mut ModuleOptimizer,
        lr: ModuleLearningRate,
        grads: GradientsParams,
    ) -> Self {
        let m = optim.step(lr, self, grads);
        m.update_ema();
        let done = m.state.step.load(Ordering::SeqCst);
        let per_epoch = m.state.steps_per_epoch;
        if per_epoch > 0 && done.is_multiple_of(per_epoch) {
            let epoch = done / per_epoch;
            if let Err(e) = m.save_trainer_state(epoch) {
                tracing::error!("epoch {epoch}: could not save the trainer state: {e}");
            }
        }
        if m.state.sample_every > 0 && done.is_multiple_of(m.state.sample_every) {
            m.write_samples(done);
        }
        m
    }
}

impl InferenceStep for DiffusionTrainer {
    type Input = ImageBatch;
    type Output = Scalars;

    /// The denoising loss at fixed timesteps/noise (seeded by a constant "step").
    fn step(&self, batch: ImageBatch) -> Scalars {
        let b = batch.images.dims()[0];
        let (_, values) = self.loss(batch, usize::MAX / 2);
        Scalars {
            values: values.into_iter().filter(|(n, _)| *n == "loss").collect(),
            batch: b,
        }
    }
}

/// A learning rate that rises linearly from 1e-6·lr to lr over `warmup` steps, then stays, or
/// with `cosine_total = Some(n)` falls to 0 along a half cosine at optimizer step `n` (diffusers'
/// `get_cosine_schedule_with_warmup`).
#[derive(Clone, Debug)]
struct Warmup {
    lr: f64,
    warmup: usize,
    cosine_total: Option<usize>,
    step: usize,
}

impl Warmup {
    /// The learning rate of (1-based) optimizer step `step`.
    fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (1e-6 + (1.0 - 1e-6) * step as f64 / self.warmup as f64);
        }
        match self.cosine_total {
            Some(total) if total > self.warmup => {
                let progress = (step - self.warmup) as f64 / (total - self.warmup) as f64;
                self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
            }
            _ => self.lr,
        }
    }
}

impl burn::lr_scheduler::LrScheduler for Warmup {
    fn step(&mut self) -> burn::optim::LearningRate {
        self.step += 1;
        self.lr_at(self.step)
    }
    fn to_record(&self) -> burn::lr_scheduler::LrSchedulerRecord {
        burn::lr_scheduler::LrSchedulerRecord::new().with_scalar("step", self.step as u64)
    }
    fn load_record(&mut self, record: burn::lr_scheduler::LrSchedulerRecord) {
        if let Some(s) = record.scalar::<u64>("step") {
            self.step = s as usize;
        }
    }
}

/// What [`train_diffusion`] produced.
#[derive(Debug)]
pub struct DiffusionRun {
    /// The trained model.
    pub model: DiffusionTrainer,
    /// Global steps in total.
    pub steps: usize,
    /// Interrupted or failed.
    pub interrupted: bool,
}

/// Trains `model` on `data` with Burn's `Learner` (dashboard, checkpoints per epoch, `losses.csv`).
pub fn train_diffusion(
    model: DiffusionTrainer,
    data: ImageFolder,
    config: &DiffusionTrainingConfig,
    dir: &Path,
    devices: &[Device],
) -> Result<DiffusionRun> {
    if config.batch_size == 0 || config.epochs == 0 || config.grad_accumulation == 0 {
        return Err(Error::Config(
            "batch size, epochs and accumulation must be at least 1".into(),
        ));
    }
    if config
        .snr_gamma
        .is_some_and(|g| !(g > 0.0 && g.is_finite()))
    {
        return Err(Error::Config(
            "--snr-gamma must be a positive number".into(),
        ));
    }
    let (m, p) = (
        config.timestep_bias_multiplier,
        config.timestep_bias_portion,
    );
    if !(m > 0.0 && m.is_finite() && p > 0.0 && p <= 1.0) {
        return Err(Error::Config(format!(
            "timestep bias: the multiplier must be > 0 and the portion in (0, 1] (got {m}, {p})"
        )));
    }
    let Loaders {
        train,
        valid,
        steps,
        autodiff: ad,
    } = loaders(
        data,
        config.batch_size,
        config.steps_per_epoch,
        config.seed,
        devices,
        dir,
    )?;
    let mut model = model;
    model.state.steps_per_epoch = steps;
    model.state.epoch_items = train.num_items();
    model
        .state
        .step
        .store(config.resume_epoch.unwrap_or(0) * steps, Ordering::SeqCst);
    if let Some(epoch) = config.resume_epoch {
        model.load_trainer_state(epoch)?;
    } else if model.state.scale_by_std {
        // The epoch's first batch, from the training loader itself (same items, same draw key).
        let batch = train
            .iter()
            .next()
            .ok_or_else(|| Error::Config("the training data gives no batch".into()))?
            .map_err(|e| Error::Read {
                path: dir.to_path_buf(),
                message: format!("the first training batch: {e}"),
            })?;
        model.measure_scale_factor(&batch);
    }
    let mut model = model.to_device(&ad);
    model.unet = trainable(model.unet);
    if config.cond_trainable {
        model.cond = trainable(model.cond);
    }
    let optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(config.weight_decay as f32)
        .init();
    let mut training = SupervisedTraining::new(dir, train, valid)
        .metric_train_numeric(ScalarMetric::new("loss"))
        .metric_valid_numeric(ScalarMetric::new("loss"))
        .with_default_checkpointers()
        .num_epochs(config.epochs)
        .with_application_logger(None);
    if config.grad_accumulation > 1 {
        training = training.grads_accumulation(config.grad_accumulation);
    }
    if let Some(e) = config.resume_epoch {
        training = training.checkpoint(e);
    }
    let counter = model.state.step.clone();
    // Optimizer steps in the run: each one takes one batch per device, `accumulation` times.
    let updates = steps
        .div_ceil(devices.len().max(1))
        .div_ceil(config.grad_accumulation)
        * config.epochs;
    let scheduler = Warmup {
        lr: config.learning_rate,
        warmup: config.warmup_steps,
        cosine_total: config.cosine_decay.then_some(updates),
        step: 0,
    };
    let training = with_devices(training, devices);
    let _stop = super::shared::StopFile::watch(dir, training.interrupter());
    let result = training.launch(Learner::new(model, optim, scheduler));
    if let Some(cache) = &result.model.state.latent_cache {
        tracing::info!("{}", cache.summary());
    }
    Ok(DiffusionRun {
        steps: counter.load(Ordering::SeqCst),
        interrupted: result.interrupted.is_some(),
        model: result.model,
    })
}

/// Writes a CompVis-layout `.safetensors` (UNet under `model.diffusion_model.` — the EMA weights
/// when there are —, first stage under `first_stage_model.`, conditioning under
/// `cond_stage_model.`, and `scale_factor`), loadable with the training YAML.
pub fn save_compvis_checkpoint(model: &DiffusionTrainer, path: &Path) -> Result<()> {
    let io = |m: String| Error::Read {
        path: path.to_path_buf(),
        message: m,
    };
    let unet = model
        .ema_unet()
        .unwrap_or_else(|| model.unet.clone().valid());
    let mut tensors = Tensors::default();
    tensors.add("model.diffusion_model.", &export(&unet).map_err(&io)?, path)?;
    let first_stage = model.first_stage.export().map_err(&io)?;
    tensors.add("first_stage_model.", &first_stage, path)?;
    let cond_prefix = match &model.cond {
        CondNet::Clip(_) | CondNet::Bert(_) => "cond_stage_model.transformer.",
        _ => "cond_stage_model.",
    };
    let cond = match &model.cond {
        CondNet::Clip(m) => export(&m.clone().valid()),
        CondNet::Bert(m) => export(&m.clone().valid()),
        CondNet::Class(m) => export(&m.clone().valid()),
        CondNet::None(_) => Ok(Vec::new()),
    };
    tensors.add(cond_prefix, &cond.map_err(&io)?, path)?;
    tensors.scalar_f32("scale_factor", model.scale_factor() as f32);
    tensors.write(path)
}

/// `<out>/checkpoint/trainer-N.safetensors`: what Burn's epoch checkpoint (`model-N.bpk`, the
/// trained modules) does not hold.
fn trainer_state_path(dir: &Path, epoch: usize) -> PathBuf {
    dir.join("checkpoint")
        .join(format!("trainer-{epoch}.safetensors"))
}

impl DiffusionTrainer {
    /// Saves the state a resumed run needs beside Burn's checkpoint of `epoch`: the
    /// `scale_factor` (measured on step 0 under `scale_by_std`) and the EMA UNet with its update
    /// count — the reference keeps both as buffers of its Lightning checkpoint. The file for
    /// `epoch − 2` is removed (Burn's checkpointer keeps two epochs too).
    fn save_trainer_state(&self, epoch: usize) -> Result<()> {
        let path = trainer_state_path(&self.state.dir, epoch);
        let io = |path: &Path, e: std::io::Error| Error::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        let mut tensors = Tensors::default();
        tensors.scalar_f64("scale_factor", self.scale_factor());
        if let Some((ema, n)) = self.state.ema.lock().expect("lock").as_ref() {
            let bytes = export(ema).map_err(|message| Error::Read {
                path: path.clone(),
                message,
            })?;
            tensors.add("model_ema.", &bytes, &path)?;
            tensors.scalar_f64("ema_num_updates", *n as f64);
        }
        tensors.write(&path)?;
        if epoch > 2 {
            let old = trainer_state_path(&self.state.dir, epoch - 2);
            if old.exists() {
                std::fs::remove_file(&old).map_err(|e| io(&old, e))?;
            }
        }
        Ok(())
    }

    /// Restores what [`save_trainer_state`](Self::save_trainer_state) wrote for `epoch`. Without
    /// the file (a run from an older version), a `scale_by_std` run cannot resume (its latent
    /// scale is unknown: an error), and the EMA restarts from the resumed weights (a warning).
    fn load_trainer_state(&mut self, epoch: usize) -> Result<()> {
        let path = trainer_state_path(&self.state.dir, epoch);
        if !path.is_file() {
            if self.state.scale_by_std {
                return Err(Error::Config(format!(
                    "resuming epoch {epoch} of a scale_by_std model needs {} (the scale_factor measured on the first batch); \
                     checkpoints from older versions lack it: fine-tune from the run's model.safetensors with --init-from instead",
                    path.display()
                )));
            }
            if self.state.ema_decay.is_some() {
                tracing::warn!(
                    "{} is missing: the EMA restarts from the resumed weights",
                    path.display()
                );
            }
            return Ok(());
        }
        let sd = crate::io::StateDict::open(&path)?;
        let scalar = |key: &str| -> Result<Option<f64>> {
            sd.get(key).map(crate::io::tensor_scalar).transpose()
        };
        if let Some(sf) = scalar("scale_factor")? {
            *self.state.scale_factor.lock().expect("lock") = sf;
            tracing::info!("resumed scale_factor {sf}");
        }
        if let Some(n) = scalar("ema_num_updates")? {
            let mut ema = self.unet.clone();
            crate::io::load_into(
                &mut ema,
                &sd,
                "EMA UNet",
                "model_ema.",
                &crate::io::LoadOptions::default(),
            )?;
            tracing::info!("resumed the EMA UNet after {n} updates");
            *self.state.ema.lock().expect("lock") = Some((ema, n as usize));
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;

    /// diffusers' min-SNR weights (train_text_to_image.py: `compute_snr`, then
    /// `min(snr, γ) / snr` for ε and `/ (snr + 1)` for v), written out at known points.
    #[test]
    fn min_snr_weights_follow_diffusers() {
        use Parameterization::*;
        // snr = a / (1 - a): a = 0.5 → 1, a = 0.9 → 9, a = 0.01 → 1/99.
        let close = |x: f64, y: f64| assert!((x - y).abs() < 1e-12, "{x} vs {y}");
        close(min_snr_weight(0.5, 5.0, Eps), 1.0);
        close(min_snr_weight(0.9, 5.0, Eps), 5.0 / 9.0);
        close(min_snr_weight(0.9, 5.0, V), 5.0 / 10.0);
        close(
            min_snr_weight(0.01, 5.0, V),
            (1.0 / 99.0) / (1.0 / 99.0 + 1.0),
        );
        close(min_snr_weight(0.01, 5.0, Eps), 1.0);
        close(min_snr_weight(0.9, 5.0, X0), 5.0);
        close(min_snr_weight(0.5, 5.0, X0), 1.0);
    }

    /// diffusers' `get_cosine_schedule_with_warmup` (one half cycle) after our linear warm-up:
    /// the peak right after warm-up, half of it midway, 0 at the last step and after.
    #[test]
    fn cosine_decay_follows_diffusers() {
        let close = |x: f64, y: f64| assert!((x - y).abs() < 1e-12, "{x} vs {y}");
        let s = |cosine_total| Warmup {
            lr: 2.0,
            warmup: 10,
            cosine_total,
            step: 0,
        };
        let (constant, cosine) = (s(None), s(Some(110)));
        for step in 1..10 {
            close(cosine.lr_at(step), constant.lr_at(step));
        }
        close(constant.lr_at(5), 2.0 * (1e-6 + (1.0 - 1e-6) * 0.5));
        close(constant.lr_at(60), 2.0);
        close(cosine.lr_at(10), 2.0);
        close(cosine.lr_at(35), 1.0 + (std::f64::consts::PI / 4.0).cos());
        close(cosine.lr_at(60), 1.0);
        close(cosine.lr_at(110), 0.0);
        close(cosine.lr_at(500), 0.0);
    }

    /// Uniform without bias (the same draws as a plain `random_range`); with multiplier m on the
    /// last portion p, that part gets m·p / (1 − p + m·p) of the draws.
    #[test]
    fn timestep_bias_shifts_draws_to_the_noisy_end() {
        let mut a = step_rng(3, 0, 3);
        let mut b = step_rng(3, 0, 3);
        for _ in 0..100 {
            assert_eq!(
                sample_timestep(1000, (1.0, 0.25), &mut a),
                b.random_range(0..1000)
            );
        }
        let mut rng = step_rng(3, 1, 3);
        let n = 40_000;
        let draws: Vec<usize> = (0..n)
            .map(|_| sample_timestep(1000, (3.0, 0.5), &mut rng))
            .collect();
        assert!(draws.iter().all(|&t| t < 1000));
        let late = draws.iter().filter(|&&t| t >= 500).count() as f64 / n as f64;
        assert!((late - 0.75).abs() < 0.01, "share of t >= 500: {late}");
        let early = draws.iter().filter(|&&t| t < 250).count() as f64 / n as f64;
        assert!((early - 0.125).abs() < 0.01, "share of t < 250: {early}");
        assert!(draws.contains(&0) && draws.contains(&999));
    }

    /// Per-(sample, channel) spatial means of the training noise: their std is 1/√(h·w) for
    /// plain noise and ≈ `offset` with offset noise.
    fn spatial_mean_std(offset: f64) -> f64 {
        let device = Device::flex();
        let mut rng = step_rng(7, 0, 3);
        let noise = training_noise([64, 4, 16, 16], offset, &mut rng, &device);
        let means: Vec<f32> = noise
            .mean_dim(3)
            .mean_dim(2)
            .into_data()
            .try_to_vec()
            .unwrap();
        let n = means.len() as f64;
        let mu = means.iter().map(|&m| m as f64).sum::<f64>() / n;
        (means.iter().map(|&m| (m as f64 - mu).powi(2)).sum::<f64>() / n).sqrt()
    }

    #[test]
    fn offset_noise_shifts_each_channel_by_a_constant() {
        let plain = spatial_mean_std(0.0);
        assert!((plain - 1.0 / 16.0).abs() < 0.015, "plain noise: {plain}");
        let offset = spatial_mean_std(0.5);
        let expected = (0.25f64 + 1.0 / 256.0).sqrt();
        assert!(
            (offset - expected).abs() < 0.08,
            "offset noise: {offset} vs {expected}"
        );
    }
}
