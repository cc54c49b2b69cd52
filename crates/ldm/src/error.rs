//! Error type shared by the crate.

use std::path::PathBuf;

/// Result alias with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in this crate, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested backend was not compiled in.
    #[error("backend `{backend}` is not compiled in; rebuild with `--features {feature}`")]
    BackendNotCompiled {
        /// What the user asked for.
        backend: String,
        /// The cargo feature that enables it.
        feature: &'static str,
    },
    /// A device string that names no known backend.
    #[error(
        "unknown device `{0}`; expected one of: cpu, flex, ndarray, wgpu[:cpu|:N], vulkan[:cpu|:N], cuda[:N]"
    )]
    UnknownDevice(String),
    /// A file could not be read.
    #[error("cannot read `{path}`: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A checkpoint lacks tensors the model needs.
    #[error("{component}: {} missing key(s) in the checkpoint: {}", keys.len(), preview(keys))]
    MissingKeys {
        /// Which model part was being loaded.
        component: String,
        /// The missing keys, in checkpoint naming.
        keys: Vec<String>,
    },
    /// Tensors whose shapes (or dtype kinds) differ from the model's.
    #[error("{component}: {} tensor(s) do not fit the model: {}", mismatches.len(), preview(mismatches))]
    Mismatch {
        /// Which model part was being loaded.
        component: String,
        /// One line per tensor, naming key and both shapes.
        mismatches: Vec<String>,
    },
    /// A tensor argument had the wrong shape.
    #[error("{what}: expected shape {expected}, got {got:?}")]
    Shape {
        /// Which argument.
        what: String,
        /// Human-readable expectation.
        expected: String,
        /// The shape that was passed.
        got: Vec<usize>,
    },
    /// An invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An invalid input value (NaN in a latent, a size that is not a multiple of 8, ...).
    #[error("invalid input: {0}")]
    Input(String),
}

fn preview(items: &[String]) -> String {
    const MAX: usize = 20;
    let mut s = items
        .iter()
        .take(MAX)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > MAX {
        s.push_str(&format!(", ... ({} more)", items.len() - MAX));
    }
    s
}
