//! First-stage training (CompVis `AutoencoderKL` / `VQModel` `training_step` with
//! `LPIPSWithDiscriminator` / `VQLPIPSWithDiscriminator`) in Burn's `Learner`: the autoencoder and
//! the PatchGAN are one module; each step backpropagates the generator surrogate (autoencoder
//! gradients) and, from `disc_start` on, the discriminator loss on detached inputs (discriminator
//! gradients), merged into one `GradientsParams`. Adam(β = 0.5, 0.9, ε = 1e-8) for both, as the
//! reference's two optimizers. Per-step scalars go to the dashboard and to `<dir>/losses.csv`;
//! input/reconstruction grids to `<dir>/samples/` every `sample_every` steps; checkpoints per epoch.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::data::{ImageBatch, ImageFolder};
use super::metrics::{ScalarMetric, Scalars};
use super::shared::{
    CsvLog, Loaders, MergeGrads, Tensors, export, loaders, randn, save_grid, step_rng, with_devices,
};
use crate::error::{Error, Result};
use crate::losses::{LastLayer, PerceptualLoss};
use crate::models::autoencoder::{AutoencoderKL, VQModel};
use burn::config::Config;
use burn::module::{Module, Param};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use burn::train::{InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep};

/// The autoencoder being trained.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum FirstStageNet {
    /// KL-regularised.
    Kl(AutoencoderKL),
    /// Vector-quantised.
    Vq(VQModel),
}

impl FirstStageNet {
    /// The inference weights as safetensors bytes (PyTorch names, no prefix).
    pub(crate) fn export(&self) -> std::result::Result<Vec<u8>, String> {
        match self {
            Self::Kl(ae) => export(&ae.clone().valid()),
            Self::Vq(ae) => export(&ae.clone().valid()),
        }
    }
}

#[derive(Debug, Clone)]
struct TrainerState {
    step: Arc<AtomicUsize>,
    seed: u64,
    sample_every: usize,
    dir: PathBuf,
    csv: CsvLog,
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
                csv: CsvLog::new(dir),
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
        // Stream 0: the seed's own sequence for this step.
        randn(shape, &mut step_rng(self.state.seed, step, 0), device)
    }

    /// Inputs (top row) over reconstructions (bottom row).
    fn save_samples(&self, step: usize, x: &Tensor<4>, recon: &Tensor<4>) {
        let grid = Tensor::cat(
            vec![x.clone().inner(), recon.clone().inner().clamp(-1.0, 1.0)],
            0,
        );
        save_grid(&self.state.dir, step, grid, x.dims()[0]);
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
        if step >= self.loss.disc_start() {
            let mut dg = d_loss.backward();
            let mut gd = GradientsParams::from_module(&mut dg, &self.loss.discriminator);
            self.loss.discriminator.visit(&mut MergeGrads {
                from: &mut gd,
                into: &mut grads,
            });
        }
        values.extend(dlog.0);
        values.push(("psnr", psnr(&x, &recon)));
        if self.state.sample_every > 0 && step.is_multiple_of(self.state.sample_every) {
            self.save_samples(step, &x, &recon);
        }
        let scalars = Scalars { values, batch: b };
        self.state.csv.log(step, &scalars);
        TrainOutput {
            grads,
            item: scalars,
        }
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
    let bytes = model.ae.export().map_err(|message| Error::Read {
        path: path.to_path_buf(),
        message,
    })?;
    let mut tensors = Tensors::default();
    tensors.add("first_stage_model.", &bytes, path)?;
    tensors.write(path)
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
    let mut training = SupervisedTraining::new(dir, train, valid)
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
    let training = with_devices(training, devices);
    let _stop = super::shared::StopFile::watch(dir, training.interrupter());
    let result = training.launch(Learner::new(model, optim, config.learning_rate));
    Ok(TrainingRun {
        steps: step_counter.load(Ordering::SeqCst),
        interrupted: result.interrupted.is_some(),
        model: result.model,
    })
}
