//! First-stage training (CompVis `AutoencoderKL` / `VQModel` `training_step` with
//! `LPIPSWithDiscriminator` / `VQLPIPSWithDiscriminator`) in Burn's `Learner`: the autoencoder and
//! the PatchGAN are one module; each step backpropagates the generator surrogate (autoencoder
//! gradients) and, from `disc_start` on, the discriminator loss on detached inputs (discriminator
//! gradients), merged into one `GradientsParams`. Adam(β = 0.5, 0.9, ε = 1e-8) for both, as the
//! reference's two optimizers. Per-step scalars go to the dashboard and to `<dir>/losses.csv`;
//! input/reconstruction grids to `<dir>/samples/` every `sample_every` steps; checkpoints per epoch.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use burn::config::Config;
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::Dataset;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use burn::train::{InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep};
use rand::SeedableRng;

use super::data::{ImageBatch, ImageBatcher, ImageFolder, ImageItem};
use super::metrics::{ScalarMetric, Scalars};
use crate::error::{Error, Result};
use crate::losses::{LastLayer, PerceptualLoss};
use crate::models::autoencoder::{AutoencoderKL, VQModel};

/// The autoencoder being trained.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum FirstStageNet {
    /// KL-regularised.
    Kl(AutoencoderKL),
    /// Vector-quantised.
    Vq(VQModel),
}

#[derive(Debug, Clone)]
struct TrainerState {
    step: Arc<AtomicUsize>,
    seed: u64,
    sample_every: usize,
    dir: PathBuf,
    csv: Arc<Mutex<Option<std::fs::File>>>,
}

/// Autoencoder + loss (LPIPS frozen, discriminator trained), as one Learner model.
#[derive(Module, Debug)]
pub struct AutoencoderTrainer {
    /// The autoencoder.
    pub ae: FirstStageNet,
    /// The loss with its discriminator.
    pub loss: PerceptualLoss,
    #[module(skip)]
    state: TrainerState,
}

/// Moves the gradients of visited parameters from one set to another.
struct MergeGrads<'a> {
    from: &'a mut GradientsParams,
    into: &'a mut GradientsParams,
}

impl ModuleVisitor for MergeGrads<'_> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        if let Some(g) = self.from.remove::<D>(p.id) {
            self.into.register::<D>(p.id, g);
        }
    }
}

/// PSNR (dB) of reconstructions in [−1, 1] against inputs, on the [0, 1] scale.
fn psnr(x: &Tensor<4>, recon: &Tensor<4>) -> f64 {
    let mse = ((recon.clone().clamp(-1.0, 1.0) - x.clone()).div_scalar(2.0))
        .square()
        .mean()
        .into_scalar::<f32>() as f64;
    10.0 * (1.0 / mse.max(1e-12)).log10()
}

impl AutoencoderTrainer {
    /// Wraps `ae` and `loss` for training; LPIPS is frozen. `dir` receives `losses.csv` and samples.
    pub fn new(
        ae: FirstStageNet,
        loss: PerceptualLoss,
        dir: &Path,
        seed: u64,
        sample_every: usize,
    ) -> Self {
        let mut loss = loss;
        loss.perceptual_loss = loss.perceptual_loss.no_grad();
        Self {
            ae,
            loss,
            state: TrainerState {
                step: Arc::new(AtomicUsize::new(0)),
                seed,
                sample_every,
                dir: dir.to_path_buf(),
                csv: Arc::new(Mutex::new(None)),
            },
        }
    }

    /// The global step the next training step will have.
    pub fn global_step(&self) -> usize {
        self.state.step.load(Ordering::SeqCst)
    }

    /// Sets the global step (resuming).
    pub fn set_global_step(&self, step: usize) {
        self.state.step.store(step, Ordering::SeqCst);
    }

    /// Unit Gaussian noise for the posterior sample of `step`: the same on every run with the same
    /// seed (so a resumed run continues exactly).
    fn posterior_noise(&self, step: usize, shape: [usize; 4], device: &Device) -> Tensor<4> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.state.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        Tensor::from_data(
            TensorData::random::<f32, _, _>(shape, Distribution::Normal(0.0, 1.0), &mut rng),
            device,
        )
    }

    fn log_csv(&self, step: usize, s: &Scalars) {
        let mut guard = self.state.csv.lock().expect("csv lock");
        if guard.is_none() {
            let path = self.state.dir.join("losses.csv");
            let new = !path.exists();
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
            {
                if new {
                    let names: Vec<&str> = s.values.iter().map(|(n, _)| *n).collect();
                    let _ = writeln!(f, "step,{}", names.join(","));
                }
                *guard = Some(f);
            }
        }
        if let Some(f) = guard.as_mut() {
            let vals: Vec<String> = s.values.iter().map(|(_, v)| format!("{v:.6e}")).collect();
            let _ = writeln!(f, "{step},{}", vals.join(","));
        }
    }

    fn save_samples(&self, step: usize, x: &Tensor<4>, recon: &Tensor<4>) {
        let dir = self.state.dir.join("samples");
        if std::fs::create_dir_all(&dir).is_err() {
            return;
        }
        let grid = Tensor::cat(
            vec![x.clone().inner(), recon.clone().inner().clamp(-1.0, 1.0)],
            0,
        );
        let images = crate::pipelines::images_to_rgb8(grid);
        let (w, h) = (images[0].0, images[0].1);
        let n = images.len() / 2;
        let mut canvas = image::RgbImage::new((w * n) as u32, (h * 2) as u32);
        for (i, (_, _, px)) in images.iter().enumerate() {
            let (ox, oy) = ((i % n) * w, (i / n) * h);
            for y in 0..h {
                for xx in 0..w {
                    let k = (y * w + xx) * 3;
                    canvas.put_pixel(
                        (ox + xx) as u32,
                        (oy + y) as u32,
                        image::Rgb([px[k], px[k + 1], px[k + 2]]),
                    );
                }
            }
        }
        let path = dir.join(format!("step-{step:07}.png"));
        if let Err(e) = canvas.save(&path) {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
    }
}

impl TrainStep for AutoencoderTrainer {
    type Input = ImageBatch;
    type Output = Scalars;

    fn step(&self, batch: ImageBatch) -> TrainOutput<Scalars> {
        let step = self.state.step.fetch_add(1, Ordering::SeqCst);
        let x = batch.images;

        let device = x.device();
        let b = x.dims()[0];
        let (mut grads, mut values, recon) = match &self.ae {
            FirstStageNet::Kl(ae) => {
                let posterior = ae.encode(x.clone());
                let noise = self.posterior_noise(step, posterior.mean.dims(), &device);
                let z = posterior.sample_with_noise(noise);
                let (h, recon) = ae.decoder.forward_parts(ae.post_quant_conv.forward(z));
                let last = LastLayer {
                    input: h,
                    conv: &ae.decoder.conv_out,
                };
                let g = self
                    .loss
                    .generator_kl(x.clone(), recon.clone(), &posterior, &last, step);
                let mut gg = g.surrogate.backward();
                (GradientsParams::from_module(&mut gg, ae), g.log.0, recon)
            }
            FirstStageNet::Vq(ae) => {
                let q = ae.encode(x.clone());
                let (h, recon) = ae
                    .decoder
                    .forward_parts(ae.post_quant_conv.forward(q.quantized));
                let last = LastLayer {
                    input: h,
                    conv: &ae.decoder.conv_out,
                };
                let g = self
                    .loss
                    .generator_vq(x.clone(), recon.clone(), q.loss, &last, step);
                let mut gg = g.surrogate.backward();
                (GradientsParams::from_module(&mut gg, ae), g.log.0, recon)
            }
        };
        // The discriminator learns from disc_start on (before, its loss is 0 · d_loss).
        let (d_loss, dlog) = self.loss.discriminator_step(x.clone(), recon.clone(), step);
        if dlog.get("disc_loss").unwrap_or(0.0) != 0.0 || self.loss_active(step) {
            let mut dg = d_loss.backward();
            let mut gd = GradientsParams::from_module(&mut dg, &self.loss.discriminator);
            self.loss.discriminator.visit(&mut MergeGrads {
                from: &mut gd,
                into: &mut grads,
            });
        }
        values.extend(dlog.0);
        values.push(("psnr", psnr(&x, &recon)));
        if self.state.sample_every > 0 && step % self.state.sample_every == 0 {
            self.save_samples(step, &x, &recon);
        }
        let scalars = Scalars { values, batch: b };
        self.log_csv(step, &scalars);
        TrainOutput {
            grads,
            item: scalars,
        }
    }
}

impl AutoencoderTrainer {
    fn loss_active(&self, step: usize) -> bool {
        crate::losses::adopt_weight(1.0, step, self.loss_disc_start(), 0.0) > 0.0
    }

    fn loss_disc_start(&self) -> usize {
        self.loss.disc_start()
    }
}

impl InferenceStep for AutoencoderTrainer {
    type Input = ImageBatch;
    type Output = Scalars;

    /// Validation: deterministic reconstruction (posterior mode / quantised), L1 + LPIPS, PSNR.
    fn step(&self, batch: ImageBatch) -> Scalars {
        let x = batch.images;
        let b = x.dims()[0];
        let recon = match &self.ae {
            FirstStageNet::Kl(ae) => ae.decode(ae.encode(x.clone()).mode()),
            FirstStageNet::Vq(ae) => ae.decode(ae.encode(x.clone()).quantized),
        };
        let l1 = (x.clone() - recon.clone())
            .abs()
            .mean()
            .into_scalar::<f32>() as f64;
        let p = self
            .loss
            .perceptual_loss
            .forward(x.clone(), recon.clone())
            .mean()
            .into_scalar::<f32>() as f64;
        Scalars {
            values: vec![("rec_loss", l1 + p), ("psnr", psnr(&x, &recon))],
            batch: b,
        }
    }
}

/// Marks every float parameter of `m` as a trainable leaf (on an autodiff device).
pub fn trainable<M: Module>(m: M) -> M {
    struct RequireGrad;
    impl burn::module::ModuleMapper for RequireGrad {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
            p.map(|t| {
                let t = t.detach();
                let t = if t.is_autodiff() { t } else { t.autodiff() };
                t.require_grad()
            })
        }
    }
    m.map(&mut RequireGrad)
}

/// A dataset repeated and permuted (fixed seed) to a given number of items per epoch.
struct Epoch<D> {
    inner: D,
    order: Vec<usize>,
}

impl<D: Dataset<ImageItem>> Dataset<ImageItem> for Epoch<D> {
    fn get(
        &self,
        index: usize,
    ) -> std::result::Result<ImageItem, burn::data::dataset::DatasetError> {
        self.inner.get(self.order[index])
    }
    fn len(&self) -> usize {
        self.order.len()
    }
}

/// Settings of [`train_autoencoder`].
#[derive(Config, Debug)]
pub struct AutoencoderTrainingConfig {
    /// Learning rate (CompVis: `base_learning_rate · batch · GPUs · accumulation`, 4.5e-6 · batch).
    #[config(default = 4.5e-6)]
    pub learning_rate: f64,
    /// Batch size.
    #[config(default = 4)]
    pub batch_size: usize,
    /// Epochs.
    #[config(default = 1)]
    pub epochs: usize,
    /// Steps per epoch (default: one pass over the data).
    pub steps_per_epoch: Option<usize>,
    /// Write an input/reconstruction grid every N steps (0: never).
    #[config(default = 0)]
    pub sample_every: usize,
    /// Seed of the data order, posterior samples and initialisation.
    #[config(default = 42)]
    pub seed: u64,
    /// Resume from this epoch's checkpoint in the output folder.
    pub resume_epoch: Option<usize>,
}

/// Writes the trained autoencoder as a CompVis-layout `.safetensors` (`first_stage_model.*` keys),
/// which `ldm train diffusion --first-stage` and `ldm autoencode` read.
pub fn save_first_stage(model: &AutoencoderTrainer, path: &Path) -> Result<()> {
    let io = |m: String| Error::Read {
        path: path.to_path_buf(),
        message: m,
    };
    let bytes = match &model.ae {
        FirstStageNet::Kl(ae) => super::diffusion::export(&ae.clone().valid()),
        FirstStageNet::Vq(ae) => super::diffusion::export(&ae.clone().valid()),
    }
    .map_err(&io)?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| io(e.to_string()))?;
    let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (format!("first_stage_model.{k}"), v))
        .collect();
    safetensors::serialize_to_file(tensors, None, path).map_err(|e| io(e.to_string()))
}

/// What a training run produced.
#[derive(Debug)]
pub struct TrainingRun {
    /// The trained autoencoder + loss.
    pub model: AutoencoderTrainer,
    /// Global steps done in total (including resumed ones).
    pub steps: usize,
    /// Whether the run was interrupted (dashboard `q`) or failed.
    pub interrupted: bool,
}

/// Trains `model` on `data` with Burn's `Learner` (TUI dashboard when stdout is a terminal, plain
/// progress lines otherwise), writing checkpoints, `losses.csv` and samples under `dir`.
pub fn train_autoencoder(
    model: AutoencoderTrainer,
    data: ImageFolder,
    config: &AutoencoderTrainingConfig,
    dir: &Path,
    devices: &[Device],
) -> Result<TrainingRun> {
    if config.batch_size == 0 || config.epochs == 0 {
        return Err(Error::Config(
            "batch size and epochs must be at least 1".into(),
        ));
    }
    let device = devices
        .first()
        .ok_or_else(|| Error::Config("no training device given".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::Read {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let n = data.len();
    let steps = config
        .steps_per_epoch
        .unwrap_or_else(|| (n / config.batch_size).max(1));
    // A fixed permutation repeated to fill the epoch (the same order every epoch, so a resumed
    // run sees exactly the batches an uninterrupted one would).
    let mut perm: Vec<usize> = (0..n).collect();
    {
        use rand::seq::SliceRandom;
        perm.shuffle(&mut rand::rngs::StdRng::seed_from_u64(config.seed));
    }
    let order: Vec<usize> = (0..steps * config.batch_size)
        .map(|i| perm[i % n])
        .collect();
    let valid_order: Vec<usize> = (0..n.min(config.batch_size)).collect();
    let train = Epoch {
        inner: data.clone(),
        order,
    };
    let valid = Epoch {
        inner: data,
        order: valid_order,
    };
    let ad = device.clone().autodiff();
    let dl_train = DataLoaderBuilder::new(ImageBatcher)
        .batch_size(config.batch_size)
        .set_device(ad.clone())
        .build(train);
    let dl_valid = DataLoaderBuilder::new(ImageBatcher)
        .batch_size(config.batch_size)
        .set_device(device.clone())
        .build(valid);
    let start_step = config.resume_epoch.unwrap_or(0) * steps;
    model.set_global_step(start_step);
    let mut model = model.to_device(&ad);
    // Parameters created on a plain device become trainable leaves on the autodiff device (LPIPS
    // stays frozen).
    model.ae = trainable(model.ae);
    model.loss.discriminator = trainable(model.loss.discriminator);

    let optim = AdamConfig::new()
        .with_beta_1(0.5)
        .with_beta_2(0.9)
        .with_epsilon(1e-8)
        .init();
    let mut training = SupervisedTraining::new(dir, dl_train, dl_valid)
        .metric_train_numeric(ScalarMetric::new("total_loss"))
        .metric_train_numeric(ScalarMetric::new("rec_loss"))
        .metric_train_numeric(ScalarMetric::new("nll_loss"))
        .metric_train_numeric(ScalarMetric::new("g_loss"))
        .metric_train_numeric(ScalarMetric::new("disc_loss"))
        .metric_train_numeric(ScalarMetric::new("d_weight"))
        .metric_train_numeric(ScalarMetric::new("psnr"))
        .metric_valid_numeric(ScalarMetric::new("rec_loss"))
        .metric_valid_numeric(ScalarMetric::new("psnr"))
        .with_default_checkpointers()
        .num_epochs(config.epochs)
        .with_application_logger(None);
    training = match &model.ae {
        FirstStageNet::Kl(_) => training.metric_train_numeric(ScalarMetric::new("kl_loss")),
        FirstStageNet::Vq(_) => training.metric_train_numeric(ScalarMetric::new("quant_loss")),
    };
    if let Some(epoch) = config.resume_epoch {
        training = training.checkpoint(epoch);
    }
    let step_counter = model.state.step.clone();
    if devices.len() > 1 {
        // Data-parallel over several devices; the optimizer runs on the first.
        training = training.with_training_strategy(
            burn::train::ExecutionStrategy::MultiDevice(
                devices.iter().map(|d| d.clone().autodiff()).collect(),
                burn::train::MultiDeviceOptim::OptimMainDevice,
            )
            .into(),
        );
    }
    let result = training.launch(Learner::new(model, optim, config.learning_rate));
    Ok(TrainingRun {
        steps: step_counter.load(Ordering::SeqCst),
        interrupted: result.interrupted.is_some(),
        model: result.model,
    })
}
