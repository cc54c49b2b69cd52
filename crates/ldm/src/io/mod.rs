//! Reading weights: PyTorch `.ckpt`/`.pt`/`.pth` (zip pickles, Lightning `state_dict` inside or a
//! bare state dict; the pickle reader never executes code) and `.safetensors`, through `burn-store`.
//!
//! A [`StateDict`] holds a checkpoint's tensors by their PyTorch names (lazily: bytes are read when
//! applied). [`load_into`] applies the tensors under a prefix to a module and reports what happened:
//! a missing key is an error naming it, a shape mismatch names the key and both shapes, keys nobody
//! used are listed in the [`LoadReport`] (and logged). f16/bf16 tensors load into f32 parameters.

mod components;
mod compvis;
mod diffusers;

pub use diffusers::{
    DiffusersModel, DiffusersUnetLayout, load_diffusers_dir, unet_config_from_diffusers,
    unet_key_to_diffusers,
};

#[cfg(feature = "train")]
pub(crate) use compvis::tensor_scalar;
pub use compvis::{
    CheckpointOptions, CondStageSpec, FirstStageSpec, KNOWN_BUFFERS, LdmSpec, SUPPORTED_TARGETS,
    autoencoder_training_config, model_shapes,
};

pub use components::{
    COND_STAGE_PREFIX, FIRST_STAGE_PREFIX, UNET_PREFIX, load_clip_text_encoder_dir,
};

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::{
    ApplyError, FloatCastAdapter, ModuleAdapter, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter,
    PytorchStore, SafetensorsStore,
};
use burn::tensor::DType;

use crate::error::{Error, Result};

/// The checkpoint-side tensor type (`burn_pack::Tensor`).
pub type PackTensor = burn::store::burn_pack::Tensor;

/// The tensors of a checkpoint file, keyed by their PyTorch names.
#[derive(Clone)]
pub struct StateDict {
    tensors: BTreeMap<String, PackTensor>,
    source: PathBuf,
}

impl fmt::Debug for StateDict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateDict")
            .field("source", &self.source)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl StateDict {
    /// Opens a `.safetensors`, `.ckpt`, `.pt`, `.pth` or `.bin` file (by extension). For pickles, a
    /// Lightning checkpoint's `state_dict` entry is used when present, else the top-level dict.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let read_err = |message: String| Error::Read {
            path: path.to_path_buf(),
            message,
        };
        if !path.is_file() {
            return Err(read_err("no such file".into()));
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let tensors = match ext.as_str() {
            "safetensors" => {
                let mut store = SafetensorsStore::from_file(path);
                store
                    .get_all_tensors()
                    .map_err(|e| read_err(e.to_string()))?
                    .clone()
            }
            "ckpt" | "pt" | "pth" | "bin" => {
                let pickle = |top: Option<&str>| -> std::result::Result<BTreeMap<String, PackTensor>, String> {
                    let mut store = PytorchStore::from_file(path).map_indices_contiguous(false);
                    if let Some(top) = top {
                        store = store.with_top_level_key(top);
                    }
                    store.get_all_tensors().cloned().map_err(|e| e.to_string())
                };
                match pickle(Some("state_dict")) {
                    Ok(t) => t,
                    Err(first) => pickle(None).map_err(|bare| {
                        read_err(format!("not a readable PyTorch checkpoint ({first}; as a bare state dict: {bare})"))
                    })?,
                }
            }
            other => {
                return Err(read_err(format!(
                    "unsupported extension `.{other}` (expected .safetensors, .ckpt, .pt, .pth or .bin)"
                )));
            }
        };
        if tensors.is_empty() {
            return Err(read_err("the file holds no tensors".into()));
        }
        tracing::debug!(path = %path.display(), tensors = tensors.len(), "opened checkpoint");
        Ok(Self {
            tensors,
            source: path.to_path_buf(),
        })
    }

    /// Reads safetensors bytes held in memory (the built-in demo model); `source` names them in
    /// reports.
    pub fn from_safetensors_bytes(bytes: Vec<u8>, source: impl Into<PathBuf>) -> Result<Self> {
        let source = source.into();
        let mut store = SafetensorsStore::from_bytes(Some(bytes));
        let tensors = store
            .get_all_tensors()
            .map_err(|e| Error::Read {
                path: source.clone(),
                message: e.to_string(),
            })?
            .clone();
        Ok(Self { tensors, source })
    }

    /// Builds a state dict from tensors already in memory (e.g. for tests or converters).
    pub fn from_tensors(
        tensors: impl IntoIterator<Item = PackTensor>,
        source: impl Into<PathBuf>,
    ) -> Self {
        Self {
            tensors: tensors.into_iter().map(|t| (t.name.clone(), t)).collect(),
            source: source.into(),
        }
    }

    /// The file this came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// All keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// One tensor by key.
    pub fn get(&self, key: &str) -> Option<&PackTensor> {
        self.tensors.get(key)
    }

    /// Removes and returns one tensor.
    pub fn remove(&mut self, key: &str) -> Option<PackTensor> {
        self.tensors.remove(key)
    }

    /// The shape of one tensor.
    pub fn shape_of(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|t| t.shape.to_vec())
    }

    /// Inserts (or replaces) a tensor under its name.
    pub fn insert(&mut self, tensor: PackTensor) {
        self.tensors.insert(tensor.name.clone(), tensor);
    }

    /// Replaces every UNet weight `model.diffusion_model.X` by its EMA copy, stored by CompVis'
    /// `LitEma` as `model_ema.` + `diffusion_model.X` with the dots removed. Returns how many were
    /// replaced; an error if the checkpoint has no EMA weights or lacks some.
    pub fn apply_ema(&mut self) -> Result<usize> {
        let unet: Vec<String> = self
            .keys()
            .filter(|k| k.starts_with("model.diffusion_model."))
            .map(String::from)
            .collect();
        if !self.has_prefix("model_ema.") {
            return Err(Error::Config(format!(
                "{}: --use-ema, but the checkpoint has no model_ema.* weights (pruned/EMA-only files already hold them in model.diffusion_model.*)",
                self.source.display()
            )));
        }
        let mut missing = Vec::new();
        let mut n = 0;
        for key in unet {
            let ema_key = format!("model_ema.{}", key["model.".len()..].replace('.', ""));
            match self.tensors.get(&ema_key).cloned() {
                Some(mut t) => {
                    t.name = key.clone();
                    self.tensors.insert(key, t);
                    n += 1;
                }
                None => missing.push(ema_key),
            }
        }
        if !missing.is_empty() {
            return Err(Error::MissingKeys {
                component: "UNet EMA weights".into(),
                keys: missing,
            });
        }
        Ok(n)
    }

    /// True when some key starts with `prefix`.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.tensors
            .range(prefix.to_string()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix))
    }

    /// The first of `candidates` that prefixes some key, or `""` (bare keys).
    pub fn detect_prefix<'a>(&self, candidates: &[&'a str]) -> &'a str {
        candidates
            .iter()
            .copied()
            .find(|p| self.has_prefix(p))
            .unwrap_or("")
    }

    /// The tensors under `prefix`, renamed without it.
    fn under_prefix(&self, prefix: &str) -> Vec<PackTensor> {
        self.tensors
            .iter()
            .filter_map(|(k, t)| {
                k.strip_prefix(prefix).map(|rest| {
                    let mut t = t.clone();
                    t.name = rest.to_string();
                    t
                })
            })
            .collect()
    }
}

/// What loading a component did.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Which part of the model.
    pub component: String,
    /// The key prefix that was used (`""` for bare keys).
    pub prefix: String,
    /// Number of tensors applied.
    pub applied: usize,
    /// Keys under the prefix that no parameter used (full checkpoint names).
    pub unused: Vec<String>,
    /// Parameters left at their initial value (only with `allow_missing`).
    pub missing: Vec<String>,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: loaded {} tensors", self.component, self.applied)?;
        if !self.prefix.is_empty() {
            write!(f, " from `{}*`", self.prefix)?;
        }
        if !self.unused.is_empty() {
            write!(
                f,
                "; {} unused key(s): {}",
                self.unused.len(),
                self.unused.join(", ")
            )?;
        }
        if !self.missing.is_empty() {
            write!(
                f,
                "; {} MISSING key(s) left at random init: {}",
                self.missing.len(),
                self.missing.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Options of [`load_into`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Tolerate missing keys (they stay at their random init and are listed in the report, with a
    /// warning). Off by default: a silently random layer is how ports produce garbage.
    pub allow_missing: bool,
}

/// Applies the tensors of `state_dict` under `prefix` to `module` (PyTorch layout: Linear weights
/// are transposed, norm `weight/bias` become `gamma/beta`, floats are cast to f32).
pub fn load_into<M: Module>(
    module: &mut M,
    state_dict: &StateDict,
    component: &str,
    prefix: &str,
    options: &LoadOptions,
) -> Result<LoadReport> {
    let tensors = state_dict.under_prefix(prefix);
    let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(DType::F32));
    let result = module.apply(tensors, None, Some(Box::new(adapter)), true);

    if !result.errors.is_empty() {
        let mismatches = result
            .errors
            .iter()
            .map(|e| match e {
                ApplyError::ShapeMismatch {
                    path,
                    expected,
                    found,
                } => format!(
                    "`{prefix}{path}`: checkpoint has {:?}, model expects {:?}",
                    found.as_slice(),
                    expected.as_slice()
                ),
                other => format!("{prefix}{other}"),
            })
            .collect();
        return Err(Error::Mismatch {
            component: component.to_string(),
            mismatches,
        });
    }

    let (skipped, missing): (Vec<String>, Vec<String>) = result
        .missing
        .iter()
        .map(|(path, stack)| format!("{prefix}{}", torch_name(path, stack)))
        .partition(|k| is_unused_by_inference(k));
    if !skipped.is_empty() {
        tracing::info!(
            component,
            "{} absent from the checkpoint: the BERT embedder never uses its language-model head",
            skipped.join(", ")
        );
    }
    if !missing.is_empty() && !options.allow_missing {
        return Err(Error::MissingKeys {
            component: component.to_string(),
            keys: missing,
        });
    }
    let unused: Vec<String> = result
        .unused
        .iter()
        .map(|k| format!("{prefix}{k}"))
        .collect();
    let report = LoadReport {
        component: component.to_string(),
        prefix: prefix.to_string(),
        applied: result.applied.len(),
        unused,
        missing,
    };
    if !report.unused.is_empty() {
        tracing::warn!(component, unused = ?report.unused, "checkpoint keys not used by the model");
    }
    if !report.missing.is_empty() {
        tracing::warn!(component, missing = ?report.missing, "parameters missing from the checkpoint keep their random init");
    }
    tracing::info!("{report}");
    Ok(report)
}

/// Parameters a checkpoint may leave out because no forward pass reads them: the language-model
/// head (`to_logits`) of LDM's BERT `TransformerWrapper`, which the embedder never calls (the
/// built-in demo model ships without it).
pub fn is_unused_by_inference(key: &str) -> bool {
    key.ends_with("to_logits.weight") || key.ends_with("to_logits.bias")
}

/// Every parameter of `module` as `(PyTorch state-dict key, PyTorch shape)`, without materialising
/// lazy parameters: Linear weights are reported `[out, in]`, norm `gamma/beta` as `weight/bias`,
/// enum levels are skipped. Used to compare a preset's key set with a checkpoint's.
pub fn parameter_shapes<M: Module>(module: &M) -> Vec<(String, Vec<usize>)> {
    struct Shapes {
        stack: Vec<(String, String)>,
        out: Vec<(String, Vec<usize>)>,
    }
    impl burn::module::ModuleVisitor for Shapes {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.stack
                .push((name.to_string(), container_type.to_string()));
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(
            &mut self,
            param: &burn::module::Param<burn::tensor::Tensor<D>>,
        ) {
            let mut shape = param.lazy_shape().to_vec();
            let names: Vec<&str> = self
                .stack
                .iter()
                .filter(|(_, c)| !c.starts_with("Enum:"))
                .map(|(n, _)| n.as_str())
                .collect();
            let container = self.stack.last().map(|(_, c)| c.as_str()).unwrap_or("");
            let mut key = names.join(".");
            if container == "Struct:Linear" && key.ends_with(".weight") && shape.len() == 2 {
                shape.swap(0, 1);
            }
            key = torch_name(&key, container);
            self.out.push((key, shape));
        }
    }
    let mut v = Shapes {
        stack: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

/// Maps a Burn parameter path back to the PyTorch key (norm `gamma/beta` → `weight/bias`).
fn torch_name(path: &str, container_stack: &str) -> String {
    let last_container = container_stack.rsplit('.').next().unwrap_or("");
    let is_norm = ["GroupNorm", "LayerNorm", "BatchNorm", "RmsNorm"]
        .iter()
        .any(|n| last_container.ends_with(n));
    if is_norm {
        if let Some(stem) = path.strip_suffix(".gamma") {
            return format!("{stem}.weight");
        }
        if let Some(stem) = path.strip_suffix(".beta") {
            return format!("{stem}.bias");
        }
    }
    path.to_string()
}
