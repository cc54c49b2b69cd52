//! CompVis YAML configs (`model.target` + `model.params`, as in `configs/latent-diffusion/*.yaml`,
//! `models/ldm/*/config.yaml` and SD v1's `v1-inference.yaml`) → [`LdmSpec`] → a loaded
//! [`LatentDiffusion`]. Built-in presets cover the published models, so a checkpoint alone is
//! enough when its layout is recognisable ([`LdmSpec::detect`]).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde_json::Value;

use super::{LoadOptions, LoadReport, StateDict, parameter_shapes};
use crate::conditioning::{BertEmbedderConfig, ClassEmbedder, ClipTextConfig, TextTokenizer};
use crate::error::{Error, Result};
use crate::models::autoencoder::{AttnType, AutoencoderKLConfig, DdConfig, VQModelConfig};
use crate::models::unet::UNetConfig;
use crate::pipelines::{CondStage, ConditioningKey, DiffusionWrapper, FirstStage, LatentDiffusion};
use crate::schedulers::{BetaSchedule, DiffusionSchedule, Parameterization};

/// The model classes (`target`s) this crate builds, per config slot.
pub const SUPPORTED_TARGETS: &[(&str, &str)] = &[
    ("model", "ldm.models.diffusion.ddpm.LatentDiffusion"),
    (
        "unet_config",
        "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    ),
    ("first_stage_config", "ldm.models.autoencoder.AutoencoderKL"),
    (
        "first_stage_config",
        "ldm.models.autoencoder.VQModelInterface",
    ),
    ("first_stage_config", "ldm.models.autoencoder.VQModel"),
    (
        "cond_stage_config",
        "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
    ),
    (
        "cond_stage_config",
        "ldm.modules.encoders.modules.BERTEmbedder",
    ),
    (
        "cond_stage_config",
        "ldm.modules.encoders.modules.ClassEmbedder",
    ),
    ("cond_stage_config", "torch.nn.Identity"),
    ("cond_stage_config", "__is_unconditional__"),
    ("cond_stage_config", "__is_first_stage__"),
];

/// The first stage of an [`LdmSpec`].
#[derive(Debug, Clone)]
pub enum FirstStageSpec {
    /// `AutoencoderKL`.
    Kl(AutoencoderKLConfig),
    /// `VQModelInterface` / `VQModel`.
    Vq(VQModelConfig),
}

/// The conditioning stage of an [`LdmSpec`].
#[derive(Debug, Clone)]
pub enum CondStageSpec {
    /// `__is_unconditional__`.
    Unconditional,
    /// `__is_first_stage__` (inpainting: the masked image through the first stage).
    FirstStage,
    /// `torch.nn.Identity` (super-resolution: the low-res image itself).
    Identity,
    /// `FrozenCLIPEmbedder`; `version` is the Hugging Face name or a local folder (with
    /// `config.json` and the tokenizer files).
    Clip {
        /// The text model.
        config: ClipTextConfig,
        /// `version` as written in the config.
        version: String,
    },
    /// `BERTEmbedder`.
    Bert(BertEmbedderConfig),
    /// `ClassEmbedder`.
    Class {
        /// Context width.
        embed_dim: usize,
        /// Number of labels (including an unconditional one, if any).
        n_classes: usize,
    },
}

/// Everything needed to build a latent diffusion model.
#[derive(Debug, Clone)]
pub struct LdmSpec {
    /// Preset name or config path (for messages).
    pub name: String,
    /// The denoiser.
    pub unet: UNetConfig,
    /// How conditioning reaches the UNet.
    pub conditioning_key: ConditioningKey,
    /// Image ↔ latent.
    pub first_stage: FirstStageSpec,
    /// The conditioning encoder.
    pub cond_stage: CondStageSpec,
    /// Latent scale (a `scale_factor` tensor in the checkpoint overrides it: `scale_by_std`).
    pub scale_factor: f64,
    /// Noise schedule kind.
    pub beta_schedule: BetaSchedule,
    /// Training timesteps.
    pub timesteps: usize,
    /// First β (or √β for `linear`).
    pub linear_start: f64,
    /// Last β.
    pub linear_end: f64,
    /// What the UNet predicts.
    pub parameterization: Parameterization,
    /// `use_ema` in the config.
    pub use_ema: bool,
    /// Training: the first stage's own checkpoint (`first_stage_config.params.ckpt_path`).
    pub first_stage_ckpt: Option<PathBuf>,
    /// Training: whether the conditioning encoder is trained (`cond_stage_trainable`).
    pub cond_stage_trainable: bool,
    /// Training: `scale_by_std` (scale_factor = 1/std of the first batch's latents).
    pub scale_by_std: bool,
    /// Training: `loss_type` (`l2` or `l1`).
    pub loss_type: String,
    /// Training: `base_learning_rate`.
    pub base_learning_rate: Option<f64>,
}

fn cfg_err(what: impl Into<String>) -> Error {
    Error::Config(what.into())
}

fn target_of<'a>(v: &'a Value, slot: &str) -> Result<&'a str> {
    match v {
        Value::String(s) => Ok(s.as_str()),
        Value::Object(o) => o
            .get("target")
            .and_then(Value::as_str)
            .ok_or_else(|| cfg_err(format!("`{slot}` has no `target`"))),
        _ => Err(cfg_err(format!("`{slot}` must be a mapping with `target`"))),
    }
}

fn unsupported(slot: &str, target: &str) -> Error {
    let list: Vec<&str> = SUPPORTED_TARGETS
        .iter()
        .filter(|(s, _)| *s == slot)
        .map(|(_, t)| *t)
        .collect();
    cfg_err(format!(
        "unsupported {slot} target `{target}`; supported: {}",
        list.join(", ")
    ))
}

struct Params<'a> {
    slot: &'a str,
    map: serde_json::Map<String, Value>,
}

impl<'a> Params<'a> {
    fn of(v: &Value, slot: &'a str) -> Self {
        let map = v
            .get("params")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        Self { slot, map }
    }
    fn get(&self, k: &str) -> Option<&Value> {
        self.map.get(k).filter(|v| !v.is_null())
    }
    fn f64_or(&self, k: &str, d: f64) -> Result<f64> {
        self.get(k).map_or(Ok(d), |v| {
            v.as_f64()
                .ok_or_else(|| cfg_err(format!("{}.{k} must be a number", self.slot)))
        })
    }
    fn usize_or(&self, k: &str, d: usize) -> Result<usize> {
        self.get(k).map_or(Ok(d), |v| as_usize(v, self.slot, k))
    }
    fn usize(&self, k: &str) -> Result<usize> {
        self.get(k)
            .ok_or_else(|| cfg_err(format!("{} is missing `{k}`", self.slot)))
            .and_then(|v| as_usize(v, self.slot, k))
    }
    fn bool_or(&self, k: &str, d: bool) -> Result<bool> {
        self.get(k).map_or(Ok(d), |v| {
            v.as_bool()
                .ok_or_else(|| cfg_err(format!("{}.{k} must be true or false", self.slot)))
        })
    }
    fn list(&self, k: &str) -> Result<Option<Vec<usize>>> {
        self.get(k)
            .map(|v| {
                v.as_array()
                    .ok_or_else(|| cfg_err(format!("{}.{k} must be a list", self.slot)))?
                    .iter()
                    .map(|x| as_usize(x, self.slot, k))
                    .collect()
            })
            .transpose()
    }
}

fn as_usize(v: &Value, slot: &str, k: &str) -> Result<usize> {
    v.as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| cfg_err(format!("{slot}.{k} must be a non-negative integer")))
}

/// `unet_config.params` → [`UNetConfig`].
fn unet_from(v: &Value) -> Result<UNetConfig> {
    let target = target_of(v, "unet_config")?;
    if !target.ends_with("openaimodel.UNetModel") {
        return Err(unsupported("unet_config", target));
    }
    let p = Params::of(v, "unet_config");
    let mut c = UNetConfig::new();
    for (k, x) in &p.map {
        if x.is_null() {
            continue;
        }
        let int = |x: &Value| {
            x.as_i64()
                .map(|n| n as isize)
                .ok_or_else(|| cfg_err(format!("unet_config.{k} must be an integer")))
        };
        c = match k.as_str() {
            "image_size" => c.with_image_size(p.usize(k)?),
            "in_channels" => c.with_in_channels(p.usize(k)?),
            "out_channels" => c.with_out_channels(p.usize(k)?),
            "model_channels" => c.with_model_channels(p.usize(k)?),
            "num_res_blocks" => c.with_num_res_blocks(p.usize(k)?),
            "attention_resolutions" => c.with_attention_resolutions(p.list(k)?.unwrap_or_default()),
            "channel_mult" => c.with_channel_mult(p.list(k)?.unwrap_or_default()),
            "dropout" => c.with_dropout(p.f64_or(k, 0.0)?),
            "conv_resample" => c.with_conv_resample(p.bool_or(k, true)?),
            "num_classes" => c.with_num_classes(Some(p.usize(k)?)),
            "num_heads" => c.with_num_heads(int(x)?),
            "num_head_channels" => c.with_num_head_channels(int(x)?),
            "num_heads_upsample" => c.with_num_heads_upsample(int(x)?),
            "use_scale_shift_norm" => c.with_use_scale_shift_norm(p.bool_or(k, false)?),
            "resblock_updown" => c.with_resblock_updown(p.bool_or(k, false)?),
            "use_new_attention_order" => c.with_use_new_attention_order(p.bool_or(k, false)?),
            "use_spatial_transformer" => c.with_use_spatial_transformer(p.bool_or(k, false)?),
            "transformer_depth" => c.with_transformer_depth(p.usize(k)?),
            "context_dim" => c.with_context_dim(Some(p.usize(k)?)),
            "legacy" => c.with_legacy(p.bool_or(k, true)?),
            "use_linear_in_transformer" => c.with_use_linear_in_transformer(p.bool_or(k, false)?),
            "dims" => {
                if p.usize(k)? != 2 {
                    return Err(cfg_err("unet_config.dims: only 2-D UNets are supported"));
                }
                c
            }
            "n_embed" => {
                return Err(cfg_err(
                    "unet_config.n_embed (codebook-index prediction) is not supported",
                ));
            }
            // Training/memory switches without effect on the computation.
            "use_checkpoint" | "use_fp16" => c,
            other => {
                return Err(cfg_err(format!("unknown unet_config parameter `{other}`")));
            }
        };
    }
    c.validate()?;
    Ok(c)
}

fn ddconfig_from(v: &Value, slot: &str) -> Result<DdConfig> {
    let p = Params {
        slot,
        map: v.as_object().cloned().unwrap_or_default(),
    };
    let mut c = DdConfig::new()
        .with_ch(p.usize("ch")?)
        .with_out_ch(p.usize_or("out_ch", 3)?)
        .with_num_res_blocks(p.usize("num_res_blocks")?)
        .with_dropout(p.f64_or("dropout", 0.0)?)
        .with_in_channels(p.usize_or("in_channels", 3)?)
        .with_resolution(p.usize_or("resolution", 256)?)
        .with_z_channels(p.usize("z_channels")?)
        .with_double_z(p.bool_or("double_z", true)?)
        // Not in CompVis' `Normalize` (always 32 groups); named as diffusers' `norm_num_groups`.
        .with_norm_groups(p.usize_or("norm_num_groups", 32)?);
    if let Some(m) = p.list("ch_mult")? {
        c = c.with_ch_mult(m);
    }
    c = c.with_attn_resolutions(p.list("attn_resolutions")?.unwrap_or_default());
    if let Some(a) = p.get("attn_type").and_then(Value::as_str) {
        c = c.with_attn_type(match a {
            "vanilla" => AttnType::Vanilla,
            "linear" => AttnType::Linear,
            "none" => AttnType::None,
            other => {
                return Err(cfg_err(format!(
                    "{slot}.attn_type `{other}` is not supported"
                )));
            }
        });
    }
    Ok(c)
}

fn first_stage_from(v: &Value) -> Result<FirstStageSpec> {
    let target = target_of(v, "first_stage_config")?;
    let p = Params::of(v, "first_stage_config");
    let dd = p
        .get("ddconfig")
        .ok_or_else(|| cfg_err("first_stage_config.params has no ddconfig"))?;
    let ddconfig = ddconfig_from(dd, "first_stage_config.params.ddconfig")?;
    if p.get("ckpt_path").is_some() {
        tracing::info!("first_stage_config.ckpt_path is ignored: weights come from the checkpoint");
    }
    let spec = match target.rsplit('.').next().unwrap_or("") {
        "AutoencoderKL" => {
            let c = AutoencoderKLConfig::new(ddconfig, p.usize("embed_dim")?);
            c.validate()?;
            FirstStageSpec::Kl(c)
        }
        "VQModelInterface" | "VQModel" => {
            if p.get("remap").is_some() {
                return Err(cfg_err(
                    "first_stage_config: codebook `remap` is not supported",
                ));
            }
            let c = VQModelConfig::new(ddconfig, p.usize("n_embed")?, p.usize("embed_dim")?);
            c.validate()?;
            FirstStageSpec::Vq(c)
        }
        _ => return Err(unsupported("first_stage_config", target)),
    };
    Ok(spec)
}

fn cond_stage_from(v: &Value, config_dir: Option<&Path>) -> Result<CondStageSpec> {
    let target = target_of(v, "cond_stage_config")?;
    let p = Params::of(v, "cond_stage_config");
    Ok(match target {
        "__is_unconditional__" => CondStageSpec::Unconditional,
        "__is_first_stage__" => CondStageSpec::FirstStage,
        "torch.nn.Identity" => CondStageSpec::Identity,
        t if t.ends_with("encoders.modules.FrozenCLIPEmbedder") => {
            let version = p
                .get("version")
                .and_then(Value::as_str)
                .unwrap_or("openai/clip-vit-large-patch14")
                .to_string();
            let config = match local_dir(&version, config_dir) {
                Some(dir) => {
                    let path = dir.join("config.json");
                    let text = std::fs::read_to_string(&path).map_err(|e| Error::Read {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                    ClipTextConfig::from_hf_json(&text)?
                }
                None if version.ends_with("clip-vit-large-patch14") => ClipTextConfig::vit_l_14(),
                None => {
                    return Err(cfg_err(format!(
                        "FrozenCLIPEmbedder version `{version}` is neither openai/clip-vit-large-patch14 \
                         nor a local folder with config.json"
                    )));
                }
            };
            CondStageSpec::Clip { config, version }
        }
        t if t.ends_with("encoders.modules.BERTEmbedder") => {
            let mut c = BertEmbedderConfig::new(p.usize("n_embed")?, p.usize("n_layer")?)
                .with_vocab_size(p.usize_or("vocab_size", 30522)?)
                .with_max_seq_len(p.usize_or("max_seq_len", 77)?);
            if !p.bool_or("use_tokenizer", true)? {
                return Err(cfg_err(
                    "BERTEmbedder with use_tokenizer: false is not supported",
                ));
            }
            c = c.with_heads(8).with_dim_head(64);
            CondStageSpec::Bert(c)
        }
        t if t.ends_with("encoders.modules.ClassEmbedder") => CondStageSpec::Class {
            embed_dim: p.usize("embed_dim")?,
            n_classes: p.usize_or("n_classes", 1000)?,
        },
        other => return Err(unsupported("cond_stage_config", other)),
    })
}

/// A CompVis first-stage training config (`configs/autoencoder/*.yaml`: `model.target`
/// `ldm.models.autoencoder.AutoencoderKL` / `VQModel`, `params.ddconfig`, `params.lossconfig`):
/// the model, the loss settings and `base_learning_rate`.
pub fn autoencoder_training_config(
    path: &Path,
) -> Result<(
    FirstStageSpec,
    crate::losses::PerceptualLossConfig,
    Option<f64>,
)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| cfg_err(format!("not valid YAML: {e}")))?;
    let root: Value = serde_json::to_value(yaml).map_err(|e| cfg_err(e.to_string()))?;
    let model = root
        .get("model")
        .ok_or_else(|| cfg_err("no top-level `model` section"))?;
    let spec = first_stage_from(model)?;
    let p = Params::of(model, "model");
    let loss = p
        .get("lossconfig")
        .ok_or_else(|| cfg_err("model.params has no lossconfig"))?;
    let target = target_of(loss, "lossconfig")?;
    if !(target.ends_with("LPIPSWithDiscriminator") || target.ends_with("VQLPIPSWithDiscriminator"))
    {
        return Err(cfg_err(format!(
            "unsupported lossconfig target `{target}`; supported: ldm.modules.losses.LPIPSWithDiscriminator, ldm.modules.losses.VQLPIPSWithDiscriminator"
        )));
    }
    let l = Params::of(loss, "lossconfig");
    let disc_loss = match l
        .get("disc_loss")
        .and_then(Value::as_str)
        .unwrap_or("hinge")
    {
        "hinge" => crate::losses::DiscLossKind::Hinge,
        "vanilla" => crate::losses::DiscLossKind::Vanilla,
        other => return Err(cfg_err(format!("unknown disc_loss `{other}`"))),
    };
    let cfg = crate::losses::PerceptualLossConfig::new(l.usize_or("disc_start", 0)?)
        .with_logvar_init(l.f64_or("logvar_init", 0.0)?)
        .with_kl_weight(l.f64_or("kl_weight", 1.0)?)
        .with_codebook_weight(l.f64_or("codebook_weight", 1.0)?)
        .with_disc_num_layers(l.usize_or("disc_num_layers", 3)?)
        .with_disc_in_channels(l.usize_or("disc_in_channels", 3)?)
        .with_disc_ndf(l.usize_or("disc_ndf", 64)?)
        .with_disc_factor(l.f64_or("disc_factor", 1.0)?)
        .with_disc_weight(l.f64_or("disc_weight", 1.0)?)
        .with_perceptual_weight(l.f64_or("perceptual_weight", 1.0)?)
        .with_use_actnorm(l.bool_or("use_actnorm", false)?)
        .with_disc_loss(disc_loss);
    Ok((
        spec,
        cfg,
        model.get("base_learning_rate").and_then(Value::as_f64),
    ))
}

/// `first_stage_config.params.ckpt_path`, resolved against the config's folder if relative.
fn first_stage_ckpt(v: &Value, config_dir: Option<&Path>) -> Option<PathBuf> {
    let p = v.get("params")?.get("ckpt_path")?.as_str()?;
    let path = PathBuf::from(p);
    if path.is_absolute() || path.exists() {
        return Some(path);
    }
    Some(config_dir.map_or(path.clone(), |d| d.join(&path)))
}

/// `version` as a local folder: absolute, relative to the working directory, or to the config.
fn local_dir(version: &str, config_dir: Option<&Path>) -> Option<PathBuf> {
    let p = PathBuf::from(version);
    if p.is_dir() {
        return Some(p);
    }
    config_dir.map(|d| d.join(version)).filter(|d| d.is_dir())
}

impl LdmSpec {
    /// Parses a CompVis YAML config.
    pub fn from_yaml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut spec = Self::from_yaml_str_in(&text, path.parent()).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })?;
        spec.name = path.display().to_string();
        Ok(spec)
    }

    /// Parses CompVis YAML text (`FrozenCLIPEmbedder.version` folders resolve from the working
    /// directory).
    pub fn from_yaml_str(text: &str) -> Result<Self> {
        Self::from_yaml_str_in(text, None)
    }

    fn from_yaml_str_in(text: &str, config_dir: Option<&Path>) -> Result<Self> {
        let yaml: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| cfg_err(format!("not valid YAML: {e}")))?;
        let root: Value = serde_json::to_value(yaml).map_err(|e| cfg_err(e.to_string()))?;
        let model = root
            .get("model")
            .ok_or_else(|| cfg_err("no top-level `model` section"))?;
        let target = target_of(model, "model")?;
        if !target.ends_with("ddpm.LatentDiffusion") {
            return Err(unsupported("model", target));
        }
        let p = Params::of(model, "model");
        let sub = |k: &str| {
            p.get(k)
                .ok_or_else(|| cfg_err(format!("model.params has no `{k}`")))
        };
        let unet = unet_from(sub("unet_config")?)?;
        let first_stage = first_stage_from(sub("first_stage_config")?)?;
        let cond_stage = cond_stage_from(sub("cond_stage_config")?, config_dir)?;
        let conditioning_key = match p.get("conditioning_key") {
            Some(Value::String(s)) => s.parse()?,
            Some(_) => return Err(cfg_err("model.params.conditioning_key must be a string")),
            // The reference: concat_mode → "concat", else "crossattn" (unless unconditional).
            None => match (p.bool_or("concat_mode", true)?, &cond_stage) {
                (_, CondStageSpec::Unconditional) => ConditioningKey::None,
                (true, _) if p.get("concat_mode").is_some() => ConditioningKey::Concat,
                _ => ConditioningKey::Crossattn,
            },
        };
        let beta_schedule = match p
            .get("beta_schedule")
            .and_then(Value::as_str)
            .unwrap_or("linear")
        {
            "linear" => BetaSchedule::Linear,
            "cosine" => BetaSchedule::Cosine {
                s: p.f64_or("cosine_s", 8e-3)?,
            },
            "sqrt_linear" => BetaSchedule::SqrtLinear,
            "sqrt" => BetaSchedule::Sqrt,
            other => return Err(cfg_err(format!("unknown beta_schedule `{other}`"))),
        };
        if p.get("given_betas").is_some() {
            return Err(cfg_err("model.params.given_betas is not supported"));
        }
        let parameterization = p
            .get("parameterization")
            .and_then(Value::as_str)
            .unwrap_or("eps")
            .parse()?;
        Ok(Self {
            name: "config".into(),
            unet,
            conditioning_key,
            first_stage,
            cond_stage,
            scale_factor: p.f64_or("scale_factor", 1.0)?,
            beta_schedule,
            timesteps: p.usize_or("timesteps", 1000)?,
            linear_start: p.f64_or("linear_start", 1e-4)?,
            linear_end: p.f64_or("linear_end", 2e-2)?,
            parameterization,
            use_ema: p.bool_or("use_ema", true)?,
            first_stage_ckpt: first_stage_ckpt(sub("first_stage_config")?, config_dir),
            cond_stage_trainable: p.bool_or("cond_stage_trainable", false)?,
            scale_by_std: p.bool_or("scale_by_std", false)?,
            loss_type: p
                .get("loss_type")
                .and_then(Value::as_str)
                .unwrap_or("l2")
                .to_string(),
            base_learning_rate: model.get("base_learning_rate").and_then(Value::as_f64),
        })
    }

    fn preset(
        name: &str,
        unet: UNetConfig,
        key: ConditioningKey,
        first_stage: FirstStageSpec,
        cond_stage: CondStageSpec,
        scale_factor: f64,
        linear: (f64, f64),
    ) -> Self {
        Self {
            name: name.into(),
            unet,
            conditioning_key: key,
            first_stage,
            cond_stage,
            scale_factor,
            beta_schedule: BetaSchedule::Linear,
            timesteps: 1000,
            linear_start: linear.0,
            linear_end: linear.1,
            parameterization: Parameterization::Eps,
            use_ema: false,
            first_stage_ckpt: None,
            cond_stage_trainable: false,
            scale_by_std: false,
            loss_type: "l2".into(),
            base_learning_rate: None,
        }
    }

    /// Stable Diffusion v1.x (`v1-inference.yaml`).
    pub fn sd_v1() -> Self {
        Self::preset(
            "sd-v1",
            UNetConfig::sd_v1(),
            ConditioningKey::Crossattn,
            FirstStageSpec::Kl(AutoencoderKLConfig::kl_f8()),
            CondStageSpec::Clip {
                config: ClipTextConfig::vit_l_14(),
                version: "openai/clip-vit-large-patch14".into(),
            },
            0.18215,
            (0.00085, 0.012),
        )
    }

    /// LDM text-to-image 1.4B (`txt2img-1p4B-eval.yaml`: BERT, KL-f8).
    pub fn ldm_txt2img_1p4b() -> Self {
        Self::preset(
            "ldm-txt2img-1p4B",
            UNetConfig::txt2img_1p4b(),
            ConditioningKey::Crossattn,
            FirstStageSpec::Kl(AutoencoderKLConfig::kl_f8()),
            CondStageSpec::Bert(BertEmbedderConfig::txt2img_1p4b()),
            0.18215,
            (0.00085, 0.012),
        )
    }

    /// Class-conditional ImageNet (`cin256-v2`: VQ-f4, 1001 classes with 1000 = unconditional).
    pub fn cin256_v2() -> Self {
        let mut s = Self::preset(
            "cin256-v2",
            UNetConfig::cin256_v2(),
            ConditioningKey::Crossattn,
            FirstStageSpec::Vq(VQModelConfig::vq_f4()),
            CondStageSpec::Class {
                embed_dim: 512,
                n_classes: 1001,
            },
            1.0,
            (0.0015, 0.0195),
        );
        s.use_ema = true;
        s
    }

    /// Unconditional CelebA-HQ 256 (`celebahq-ldm-vq-4`).
    pub fn celebahq_ldm_vq_4() -> Self {
        Self::preset(
            "celebahq-ldm-vq-4",
            UNetConfig::celebahq_ldm_vq_4(),
            ConditioningKey::None,
            FirstStageSpec::Vq(VQModelConfig::vq_f4()),
            CondStageSpec::Unconditional,
            1.0,
            (0.0015, 0.0195),
        )
    }

    /// Unconditional LSUN churches (`lsun_churches-ldm-kl-8`).
    pub fn lsun_churches_ldm_kl_8() -> Self {
        Self::preset(
            "lsun_churches-ldm-kl-8",
            UNetConfig::lsun_churches_ldm_kl_8(),
            ConditioningKey::None,
            FirstStageSpec::Kl(AutoencoderKLConfig::kl_f8()),
            CondStageSpec::Unconditional,
            0.22765929,
            (0.0015, 0.0155),
        )
    }

    /// 4x super-resolution (`bsr_sr`: VQ-f4, low-res image as concat conditioning).
    pub fn bsr_sr() -> Self {
        Self::preset(
            "bsr_sr",
            UNetConfig::bsr_sr(),
            ConditioningKey::Concat,
            FirstStageSpec::Vq(VQModelConfig::vq_f4_noattn()),
            CondStageSpec::Identity,
            1.0,
            (0.0015, 0.0155),
        )
    }

    /// Inpainting (`inpainting_big`: VQ-f4 without attention, masked image + mask as concat).
    pub fn inpainting_big() -> Self {
        Self::preset(
            "inpainting_big",
            UNetConfig::inpainting_big(),
            ConditioningKey::Concat,
            FirstStageSpec::Vq(VQModelConfig::vq_f4_noattn()),
            CondStageSpec::FirstStage,
            1.0,
            (0.0015, 0.0205),
        )
    }

    /// The built-in presets.
    pub fn presets() -> Vec<Self> {
        vec![
            Self::sd_v1(),
            Self::ldm_txt2img_1p4b(),
            Self::cin256_v2(),
            Self::celebahq_ldm_vq_4(),
            Self::lsun_churches_ldm_kl_8(),
            Self::bsr_sr(),
            Self::inpainting_big(),
        ]
    }

    /// A preset by name.
    pub fn preset_named(name: &str) -> Result<Self> {
        let all = Self::presets();
        let names: Vec<String> = all.iter().map(|s| s.name.clone()).collect();
        all.into_iter().find(|s| s.name == name).ok_or_else(|| {
            cfg_err(format!(
                "unknown preset `{name}`; known: {}",
                names.join(", ")
            ))
        })
    }

    /// The preset whose every parameter is in `state_dict` with the right shape.
    pub fn detect(state_dict: &StateDict, device: &Device) -> Result<Self> {
        let mut tried = Vec::new();
        for spec in Self::presets() {
            let model = spec.build_uninit(device)?;
            let ok = model_shapes(&model)
                .into_iter()
                .all(|(k, shape)| state_dict.shape_of(&k).is_some_and(|s| s == shape));
            if ok {
                tracing::info!("checkpoint layout recognised as preset `{}`", spec.name);
                return Ok(spec);
            }
            tried.push(spec.name);
        }
        Err(cfg_err(format!(
            "{}: the checkpoint matches none of the built-in presets ({}); pass its CompVis YAML with --config",
            state_dict.source().display(),
            tried.join(", ")
        )))
    }

    /// The latent downsampling factor of the first stage.
    pub fn downsample(&self) -> usize {
        match &self.first_stage {
            FirstStageSpec::Kl(c) => c.ddconfig.downsampling_factor(),
            FirstStageSpec::Vq(c) => c.ddconfig.downsampling_factor(),
        }
    }

    /// Builds the model with freshly initialised (lazy) parameters and the built-in tokenizers.
    pub fn build_uninit(&self, device: &Device) -> Result<LatentDiffusion> {
        self.build_with_tokenizer(device, None)
    }

    fn build_with_tokenizer(
        &self,
        device: &Device,
        tokenizer: Option<TextTokenizer>,
    ) -> Result<LatentDiffusion> {
        let unet = self.unet.init(device)?;
        let first_stage = match &self.first_stage {
            FirstStageSpec::Kl(c) => FirstStage::Kl(c.init(device)),
            FirstStageSpec::Vq(c) => FirstStage::Vq(c.init(device)),
        };
        let cond_stage = match &self.cond_stage {
            CondStageSpec::Unconditional => CondStage::None,
            CondStageSpec::FirstStage => CondStage::FirstStage,
            CondStageSpec::Identity => CondStage::Identity,
            CondStageSpec::Clip { config, .. } => CondStage::Clip {
                model: config.init(device),
                tokenizer: tokenizer.unwrap_or_else(TextTokenizer::clip_builtin),
            },
            CondStageSpec::Bert(c) => CondStage::Bert {
                model: c.init(device),
                // BERTEmbedder(max_seq_len=N) tokenizes to N ids.
                tokenizer: tokenizer
                    .unwrap_or_else(TextTokenizer::bert_builtin)
                    .with_max_length(c.max_seq_len),
            },
            CondStageSpec::Class {
                embed_dim,
                n_classes,
            } => {
                // cin256-v2 style: one class more than ImageNet's 1000 means "unconditional".
                let uc = (*n_classes == 1001).then_some(1000);
                CondStage::Class(
                    ClassEmbedder::new(*embed_dim, *n_classes, device).with_unconditional_label(uc),
                )
            }
        };
        Ok(LatentDiffusion {
            latent_channels: self.unet.out_channels,
            downsample: self.downsample(),
            model: DiffusionWrapper {
                unet,
                key: self.conditioning_key,
            },
            first_stage,
            cond_stage,
            scale_factor: self.scale_factor,
            schedule: DiffusionSchedule::new(
                self.beta_schedule,
                self.timesteps,
                self.linear_start,
                self.linear_end,
            )?,
            parameterization: self.parameterization,
        })
    }

    /// Builds the model and loads `state_dict` (a full CompVis/SD checkpoint) into it. `tokenizer`
    /// overrides the built-in one (and the one a local `FrozenCLIPEmbedder.version` folder holds).
    pub fn load(
        &self,
        state_dict: &StateDict,
        tokenizer: Option<TextTokenizer>,
        options: &CheckpointOptions,
        device: &Device,
    ) -> Result<(LatentDiffusion, Vec<LoadReport>)> {
        let mut sd = state_dict.clone();
        if options.use_ema {
            let n = sd.apply_ema()?;
            tracing::info!("--use-ema: {n} UNet tensors taken from model_ema.*");
        }
        let tokenizer = match (tokenizer, &self.cond_stage) {
            (Some(t), _) => Some(t),
            (None, CondStageSpec::Clip { version, .. }) => match local_dir(version, None) {
                Some(dir) if dir.join("vocab.json").is_file() => {
                    Some(TextTokenizer::clip_from_vocab_merges(
                        dir.join("vocab.json"),
                        dir.join("merges.txt"),
                    )?)
                }
                Some(dir) if dir.join("tokenizer.json").is_file() => {
                    Some(TextTokenizer::clip_from_file(dir.join("tokenizer.json"))?)
                }
                _ => None,
            },
            _ => None,
        };
        let mut model = self.build_with_tokenizer(device, tokenizer)?;
        let opts = LoadOptions {
            allow_missing: options.allow_missing,
        };
        let mut reports = vec![model.model.unet.load_weights_with(&sd, &opts)?];
        reports.push(match &mut model.first_stage {
            FirstStage::Kl(ae) => ae.load_weights_with(&sd, &opts)?,
            FirstStage::Vq(ae) => ae.load_weights_with(&sd, &opts)?,
            FirstStage::Identity => unreachable!("specs always have a first stage"),
        });
        match &mut model.cond_stage {
            CondStage::Clip { model: m, .. } => reports.push(m.load_weights_with(&sd, &opts)?),
            CondStage::Bert { model: m, .. } => reports.push(m.load_weights_with(&sd, &opts)?),
            CondStage::Class(m) => reports.push(m.load_weights_with(&sd, &opts)?),
            _ => {}
        }
        if let Some(t) = sd.get("scale_factor") {
            let v = tensor_scalar(t)?;
            if (v - model.scale_factor).abs() > 1e-9 {
                tracing::info!(
                    "scale_factor {v} from the checkpoint (scale_by_std) replaces the config's {}",
                    model.scale_factor
                );
            }
            model.scale_factor = v;
        }
        // Keys no component claimed: everything outside the component prefixes that isn't a
        // known training buffer.
        let claimed = |k: &str| {
            k.starts_with("model.diffusion_model.")
                || k.starts_with("first_stage_model.")
                || k.starts_with("cond_stage_model.")
                || k.starts_with("model_ema.")
                || KNOWN_BUFFERS.contains(&k)
        };
        let stray: Vec<String> = sd
            .keys()
            .filter(|k| !claimed(k))
            .map(String::from)
            .collect();
        if !stray.is_empty() {
            tracing::warn!(
                "{} checkpoint key(s) belong to no component: {}",
                stray.len(),
                stray.join(", ")
            );
        }
        Ok((model, reports))
    }
}

/// Schedule and bookkeeping buffers a CompVis `LatentDiffusion` checkpoint carries.
pub const KNOWN_BUFFERS: &[&str] = &[
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "scale_factor",
    "cond_ids",
    "lvlb_weights",
];

/// Options for loading a full checkpoint.
#[derive(Debug, Clone, Default)]
pub struct CheckpointOptions {
    /// Use the `model_ema.*` weights for the UNet.
    pub use_ema: bool,
    /// Leave missing parameters at their initial values (with a warning) instead of failing.
    pub allow_missing: bool,
}

pub(crate) fn tensor_scalar(t: &super::PackTensor) -> Result<f64> {
    use burn::tensor::DType;
    let bytes = t
        .to_bytes()
        .map_err(|e| cfg_err(format!("reading a scalar: {e}")))?;
    let b: &[u8] = &bytes;
    Ok(match t.dtype {
        DType::F32 if b.len() >= 4 => f32::from_le_bytes(b[..4].try_into().unwrap()) as f64,
        DType::F64 if b.len() >= 8 => f64::from_le_bytes(b[..8].try_into().unwrap()),
        DType::F16 if b.len() >= 2 => {
            burn::tensor::f16::from_le_bytes(b[..2].try_into().unwrap()).to_f64()
        }
        DType::BF16 if b.len() >= 2 => {
            burn::tensor::bf16::from_le_bytes(b[..2].try_into().unwrap()).to_f64()
        }
        other => {
            return Err(cfg_err(format!(
                "a scalar (scale_factor, ...) has unsupported dtype {other:?}"
            )));
        }
    })
}

/// Every parameter of a built model with its full checkpoint key and shape.
pub fn model_shapes(model: &LatentDiffusion) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = parameter_shapes(&model.model.unet)
        .into_iter()
        .map(|(k, s)| (format!("model.diffusion_model.{k}"), s))
        .collect();
    let fs = match &model.first_stage {
        FirstStage::Kl(ae) => parameter_shapes(ae),
        FirstStage::Vq(ae) => parameter_shapes(ae),
        FirstStage::Identity => vec![],
    };
    out.extend(
        fs.into_iter()
            .map(|(k, s)| (format!("first_stage_model.{k}"), s)),
    );
    let cs = match &model.cond_stage {
        CondStage::Clip { model, .. } => parameter_shapes(model)
            .into_iter()
            .map(|(k, s)| (format!("cond_stage_model.transformer.{k}"), s))
            .collect(),
        CondStage::Bert { model, .. } => parameter_shapes(model)
            .into_iter()
            .map(|(k, s)| (format!("cond_stage_model.transformer.{k}"), s))
            .collect(),
        CondStage::Class(m) => parameter_shapes(m)
            .into_iter()
            .map(|(k, s)| (format!("cond_stage_model.{k}"), s))
            .collect(),
        _ => vec![],
    };
    out.extend(cs);
    out
}
