//! Pieces both trainers use: the per-step CSV log, step-keyed RNGs, the fixed-order epoch
//! datasets and loaders, gradient merging, multi-device set-up, sample grids, and the export of
//! modules in PyTorch layout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::Dataset;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use burn::train::{LearnerModel, SupervisedTraining};
use rand::SeedableRng;

use super::data::{ImageBatch, ImageBatcher, ImageFolder, ImageItem};
use super::metrics::Scalars;
use crate::error::{Error, Result};

/// `<dir>/losses.csv`: a header from the first step's scalar names, then one line per step
/// (appended, so a resumed run continues the file).
#[derive(Debug, Clone)]
pub(crate) struct CsvLog {
    dir: PathBuf,
    file: Arc<Mutex<Option<std::fs::File>>>,
}

impl CsvLog {
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            file: Arc::new(Mutex::new(None)),
        }
    }

    pub(crate) fn log(&self, step: usize, s: &Scalars) {
        let mut guard = self.file.lock().expect("csv lock");
        if guard.is_none() {
            let path = self.dir.join("losses.csv");
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
}

/// The RNG of one purpose (`stream`) at one global step: the same on every run with the same
/// seed, so a resumed run continues exactly.
pub(crate) fn step_rng(seed: u64, step: usize, stream: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(
        seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03),
    )
}

/// Moves the gradients of visited parameters from one set to another.
pub(crate) struct MergeGrads<'a> {
    pub(crate) from: &'a mut GradientsParams,
    pub(crate) into: &'a mut GradientsParams,
}

impl ModuleVisitor for MergeGrads<'_> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        if let Some(g) = self.from.remove::<D>(p.id) {
            self.into.register::<D>(p.id, g);
        }
    }
}

/// A dataset read in a given order (repeats allowed).
struct Epoch<D> {
    inner: D,
    order: Vec<usize>,
}

impl<D: Dataset<ImageItem>> Dataset<ImageItem> for Epoch<D> {
    fn get(
        &self,
        index: usize,
    ) -> std::result::Result<ImageItem, burn::data::dataset::DatasetError> {
        let mut item = self.inner.get(self.order[index])?;
        item.position = index;
        Ok(item)
    }
    fn len(&self) -> usize {
        self.order.len()
    }
}

/// The data side of a training run.
pub(crate) struct Loaders {
    pub(crate) train: Arc<dyn DataLoader<ImageBatch>>,
    pub(crate) valid: Arc<dyn DataLoader<ImageBatch>>,
    /// Steps per epoch.
    pub(crate) steps: usize,
    /// The autodiff version of the first device.
    pub(crate) autodiff: Device,
}

/// Creates `dir` and the loaders: training batches on the autodiff version of the first device,
/// in a fixed permutation (seeded) repeated to `steps_per_epoch · batch` items — the same order
/// every epoch, so a resumed run sees exactly the batches an uninterrupted one would; validation
/// on the first `batch` images.
pub(crate) fn loaders(
    data: ImageFolder,
    batch: usize,
    steps_per_epoch: Option<usize>,
    seed: u64,
    devices: &[Device],
    dir: &Path,
) -> Result<Loaders> {
    let device = devices
        .first()
        .ok_or_else(|| Error::Config("no training device given".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::Read {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let n = data.len();
    let steps = steps_per_epoch.unwrap_or_else(|| (n / batch).max(1));
    let mut perm: Vec<usize> = (0..n).collect();
    {
        use rand::seq::SliceRandom;
        perm.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    }
    let order: Vec<usize> = (0..steps * batch).map(|i| perm[i % n]).collect();
    let autodiff = device.clone().autodiff();
    let train = DataLoaderBuilder::new(ImageBatcher)
        .batch_size(batch)
        .set_device(autodiff.clone())
        .build(Epoch {
            inner: data.clone(),
            order,
        });
    let valid = DataLoaderBuilder::new(ImageBatcher)
        .batch_size(batch)
        .set_device(device.clone())
        .build(Epoch {
            inner: data,
            order: (0..n.min(batch)).collect(),
        });
    Ok(Loaders {
        train,
        valid,
        steps,
        autodiff,
    })
}

/// Unit Gaussian noise of `shape` drawn from a host RNG (the same seed gives the same noise on
/// every backend, so resumed runs continue exactly).
pub(crate) fn randn<const D: usize>(
    shape: [usize; D],
    rng: &mut rand::rngs::StdRng,
    device: &Device,
) -> Tensor<D> {
    Tensor::from_data(
        TensorData::random::<f32, _, _>(shape, Distribution::Normal(0.0, 1.0), rng),
        device,
    )
}

/// Ends a run early, as the dashboard's `q` does (the weights are still written), when a file
/// named `STOP` appears in the run's output folder: the way to stop a headless (`nohup`, CI) run.
/// A `STOP` left over from an earlier run is removed first. The watcher stops with the guard.
pub(crate) struct StopFile {
    done: Arc<AtomicBool>,
}

impl StopFile {
    /// Watches `<dir>/STOP` (every second) and stops `interrupter` when it appears.
    pub(crate) fn watch(dir: &Path, interrupter: burn::train::Interrupter) -> Self {
        let path = dir.join("STOP");
        if path.exists() {
            tracing::warn!("removing a stale {}", path.display());
            let _ = std::fs::remove_file(&path);
        }
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                if path.exists() {
                    tracing::info!("{} found: ending the run after this step", path.display());
                    interrupter.stop(Some("STOP file"));
                    let _ = std::fs::remove_file(&path);
                    break;
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        });
        Self { done }
    }
}

impl Drop for StopFile {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// Data-parallel over several devices (the optimizer runs on the first); unchanged for one.
pub(crate) fn with_devices<M: LearnerModel>(
    training: SupervisedTraining<M>,
    devices: &[Device],
) -> SupervisedTraining<M> {
    if devices.len() < 2 {
        return training;
    }
    training.with_training_strategy(
        burn::train::ExecutionStrategy::MultiDevice(
            devices.iter().map(|d| d.clone().autodiff()).collect(),
            burn::train::MultiDeviceOptim::OptimMainDevice,
        )
        .into(),
    )
}

/// Writes images (`[B, 3, H, W]` in [−1, 1]) as one PNG grid with `cols` per row to
/// `<dir>/samples/step-NNNNNNN.png`; failures are logged, training goes on.
pub(crate) fn save_grid(dir: &Path, step: usize, images: Tensor<4>, cols: usize) {
    let images = crate::pipelines::images_to_rgb8(images);
    let (w, h) = (images[0].0, images[0].1);
    let rows = images.len().div_ceil(cols);
    let mut canvas = image::RgbImage::new((w * cols) as u32, (h * rows) as u32);
    for (i, (_, _, px)) in images.iter().enumerate() {
        let (ox, oy) = ((i % cols) * w, (i / cols) * h);
        for y in 0..h {
            for x in 0..w {
                let k = (y * w + x) * 3;
                canvas.put_pixel(
                    (ox + x) as u32,
                    (oy + y) as u32,
                    image::Rgb([px[k], px[k + 1], px[k + 2]]),
                );
            }
        }
    }
    let dir = dir.join("samples");
    let path = dir.join(format!("step-{step:07}.png"));
    if let Err(e) = std::fs::create_dir_all(&dir)
        .map_err(|e| e.to_string())
        .and_then(|_| canvas.save(&path).map_err(|e| e.to_string()))
    {
        tracing::warn!("cannot write {}: {e}", path.display());
    }
}

/// A module's parameters as PyTorch-layout safetensors bytes (enum variants skipped, so keys are
/// the CompVis ones).
pub(crate) fn export<M: Module>(m: &M) -> std::result::Result<Vec<u8>, String> {
    use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
    let mut store = SafetensorsStore::from_bytes(None)
        .with_to_adapter(BurnToPyTorchAdapter)
        .skip_enum_variants(true);
    m.save_into(&mut store).map_err(|e| e.to_string())?;
    store.get_bytes().map_err(|e| e.to_string())
}

/// Named tensors gathered from several exported modules, written as one `.safetensors`.
#[derive(Default)]
pub(crate) struct Tensors(Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>);

impl Tensors {
    /// Adds the tensors of an exported module (safetensors bytes; empty: none) under `prefix`.
    pub(crate) fn add(&mut self, prefix: &str, bytes: &[u8], path: &Path) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        for (k, v) in st.tensors() {
            self.0.push((
                format!("{prefix}{k}"),
                v.dtype(),
                v.shape().to_vec(),
                v.data().to_vec(),
            ));
        }
        Ok(())
    }

    pub(crate) fn scalar_f32(&mut self, name: &str, v: f32) {
        let bytes = v.to_le_bytes().to_vec();
        self.0
            .push((name.into(), safetensors::Dtype::F32, vec![], bytes));
    }

    pub(crate) fn scalar_f64(&mut self, name: &str, v: f64) {
        let bytes = v.to_le_bytes().to_vec();
        self.0
            .push((name.into(), safetensors::Dtype::F64, vec![], bytes));
    }

    pub(crate) fn write(&self, path: &Path) -> Result<()> {
        let io = |m: String| Error::Read {
            path: path.to_path_buf(),
            message: m,
        };
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = self
            .0
            .iter()
            .map(|(k, d, s, b)| {
                Ok((
                    k.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b)
                        .map_err(|e| io(e.to_string()))?,
                ))
            })
            .collect::<Result<_>>()?;
        safetensors::serialize_to_file(views, None, path).map_err(|e| io(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::StopFile;
    use burn::train::Interrupter;

    #[test]
    fn stop_file_interrupts_and_a_stale_one_is_removed() {
        let dir = std::env::temp_dir().join(format!("ldm-stop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A STOP left from an earlier run must not end the new one.
        std::fs::write(dir.join("STOP"), b"").unwrap();
        let interrupter = Interrupter::new();
        let guard = StopFile::watch(&dir, interrupter.clone());
        assert!(!dir.join("STOP").exists());
        std::thread::sleep(std::time::Duration::from_millis(1500));
        assert!(!interrupter.should_stop());
        std::fs::write(dir.join("STOP"), b"").unwrap();
        let t = std::time::Instant::now();
        while !interrupter.should_stop() && t.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(interrupter.should_stop());
        drop(guard);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
