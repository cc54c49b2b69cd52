//! [`Pipeline`]: a [`LatentDiffusion`] loaded from files, with the sampler defaults its source implies.

use std::path::{Path, PathBuf};

use burn::tensor::Device;

use super::LatentDiffusion;
use crate::conditioning::TextTokenizer;
use crate::error::{Error, Result};
use crate::io::{
    CheckpointOptions, LdmSpec, LoadOptions, LoadReport, StateDict, load_diffusers_dir,
};
use crate::schedulers::{SamplerKind, SamplerOptions, TimestepSpacing};

/// How to interpret the model files.
#[derive(Debug, Clone, Default)]
pub struct PipelineOptions {
    /// A CompVis YAML config (else a built-in preset is chosen from the checkpoint's layout).
    pub config: Option<PathBuf>,
    /// A built-in preset by name (`sd-v1`, `cin256-v2`, ...), instead of detection.
    pub preset: Option<String>,
    /// A tokenizer file (`tokenizer.json`, CLIP `vocab.json` with `merges.txt` beside it, or a
    /// BERT `vocab.txt`); default: the built-in one.
    pub tokenizer: Option<PathBuf>,
    /// Use the `model_ema.*` UNet weights of a training checkpoint.
    pub use_ema: bool,
    /// Keep going when parameters are missing (they stay random; logged).
    pub allow_missing: bool,
    /// Compute precision of the UNet (see [`LatentDiffusion::with_precision`]).
    pub precision: crate::device::Precision,
}

/// A loaded model and where it came from.
#[derive(Debug)]
pub struct Pipeline {
    /// The model.
    pub model: LatentDiffusion,
    /// Preset or config name.
    pub name: String,
    /// The model file or folder.
    pub source: PathBuf,
    /// Timestep spacing for DPM-Solver++ / Euler (diffusers folders: their scheduler config;
    /// CompVis checkpoints: `leading` with offset 1, as SD v1 was released).
    pub spacing: TimestepSpacing,
    /// `steps_offset` for `leading` spacing.
    pub steps_offset: usize,
    /// One load report per component.
    pub reports: Vec<LoadReport>,
}

impl Pipeline {
    /// Loads a CompVis/SD checkpoint (`.ckpt`, `.safetensors`) or a diffusers folder.
    ///
    /// ```no_run
    /// use ldm::pipelines::{Pipeline, PipelineOptions};
    /// use ldm::schedulers::{SamplerKind, SeededNoise};
    ///
    /// # fn main() -> ldm::Result<()> {
    /// let device = ldm::device::parse_device("cpu")?;
    /// let pipe = Pipeline::from_files("v1-5-pruned-emaonly.safetensors", &PipelineOptions::default(), &device)?;
    /// let out = pipe.model.txt2img(
    ///     &["a photograph of an astronaut riding a horse"], None, 512, 512, 7.5,
    ///     pipe.sampler(SamplerKind::Ddim, 50), &mut SeededNoise::new(42), None,
    /// )?;
    /// let (width, height, rgb) = &out.to_rgb8()[0];
    /// # Ok(()) }
    /// ```
    pub fn from_files(
        path: impl AsRef<Path>,
        options: &PipelineOptions,
        device: &Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            if options.config.is_some() || options.preset.is_some() {
                return Err(Error::Config(
                    "a diffusers folder carries its own configs; drop --config/--preset".into(),
                ));
            }
            let m = load_diffusers_dir(
                path,
                device,
                &LoadOptions {
                    allow_missing: options.allow_missing,
                },
            )?;
            return Ok(Self {
                model: m.model.with_precision(options.precision)?,
                name: format!("diffusers:{}", path.display()),
                source: path.to_path_buf(),
                spacing: m.spacing,
                steps_offset: m.steps_offset,
                reports: m.reports,
            });
        }
        let sd = StateDict::open(path)?;
        let spec = match (&options.config, &options.preset) {
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "give either a config or a preset, not both".into(),
                ));
            }
            (Some(c), None) => LdmSpec::from_yaml_file(c)?,
            (None, Some(p)) => LdmSpec::preset_named(p)?,
            (None, None) => LdmSpec::detect(&sd, device)?,
        };
        let name = spec.name.clone();
        Self::from_spec(&spec, &sd, name, path.to_path_buf(), options, device)
    }

    /// A CompVis-layout model from its spec and weights (the tokenizer, EMA, missing-key and
    /// precision options applied); CompVis sampling defaults (leading spacing, offset 1).
    fn from_spec(
        spec: &LdmSpec,
        sd: &StateDict,
        name: String,
        source: PathBuf,
        options: &PipelineOptions,
        device: &Device,
    ) -> Result<Self> {
        let tokenizer = options
            .tokenizer
            .as_deref()
            .map(load_tokenizer)
            .transpose()?;
        let (model, reports) = spec.load(
            sd,
            tokenizer,
            &CheckpointOptions {
                use_ema: options.use_ema,
                allow_missing: options.allow_missing,
            },
            device,
        )?;
        Ok(Self {
            model: model.with_precision(options.precision)?,
            name,
            source,
            spacing: TimestepSpacing::Leading,
            steps_offset: 1,
            reports,
        })
    }

    /// The built-in demo model ([`crate::demo`]): a text-to-image LDM for 64x64 shapes, with the
    /// built-in BERT tokenizer. `options.config`/`preset` must be unset; `precision` applies.
    pub fn demo(options: &PipelineOptions, device: &Device) -> Result<Self> {
        if options.config.is_some() || options.preset.is_some() {
            return Err(Error::Config(
                "the built-in demo model has its own config; --config/--preset need --ckpt".into(),
            ));
        }
        let sd = crate::demo::state_dict()?;
        let spec = LdmSpec::from_yaml_str(crate::demo::CONFIG_YAML)?;
        let source = sd.source().to_path_buf();
        Self::from_spec(
            &spec,
            &sd,
            crate::demo::NAME.into(),
            source,
            options,
            device,
        )
    }

    /// Sampler options with this model's spacing defaults.
    pub fn sampler(&self, kind: SamplerKind, steps: usize) -> SamplerOptions {
        SamplerOptions {
            spacing: self.spacing,
            steps_offset: self.steps_offset,
            ..SamplerOptions::new(kind, steps)
        }
    }
}

/// A tokenizer from a file: `tokenizer.json` (CLIP or BERT by its model type), CLIP `vocab.json`
/// (with `merges.txt` beside it) or BERT `vocab.txt`; `.gz` accepted.
pub fn load_tokenizer(path: &Path) -> Result<TextTokenizer> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .trim_end_matches(".gz")
        .to_string();
    if !path.is_file() {
        return Err(Error::Read {
            path: path.to_path_buf(),
            message: "tokenizer file not found".into(),
        });
    }
    if name.ends_with(".txt") {
        return TextTokenizer::bert_from_vocab(path);
    }
    if name == "vocab.json" {
        let gz = path.extension().is_some_and(|e| e == "gz");
        let merges = path.with_file_name(if gz { "merges.txt.gz" } else { "merges.txt" });
        return TextTokenizer::clip_from_vocab_merges(path, merges);
    }
    // tokenizer.json: WordPiece → BERT, BPE → CLIP.
    TextTokenizer::bert_from_file(path)
        .ok()
        .filter(|t| {
            t.encode("a")
                .map(|e| e.ids.first() == Some(&101))
                .unwrap_or(false)
        })
        .map_or_else(|| TextTokenizer::clip_from_file(path), Ok)
}
