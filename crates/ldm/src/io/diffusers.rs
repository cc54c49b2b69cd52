//! diffusers folders (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`): configs to our
//! configs, and diffusers weight names to the CompVis names our modules use (the inverse of
//! diffusers' `convert_diffusers_to_original_stable_diffusion.py` mapping, generalised to any
//! number of levels and layers per block).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde_json::Value;

use super::{LoadOptions, LoadReport, PackTensor, StateDict, parameter_shapes};
use crate::conditioning::{ClipTextConfig, TextTokenizer};
use crate::error::{Error, Result};
use crate::models::autoencoder::{AutoencoderKLConfig, DdConfig};
use crate::models::unet::{UNetConfig, UNetModel};
use crate::pipelines::{CondStage, ConditioningKey, DiffusionWrapper, FirstStage, LatentDiffusion};
use crate::schedulers::{BetaSchedule, DiffusionSchedule, Parameterization, TimestepSpacing};

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Read {
        path: path.to_path_buf(),
        message: format!("invalid JSON: {e}"),
    })
}

fn cfg(path: &Path, m: impl std::fmt::Display) -> Error {
    Error::Config(format!("{}: {m}", path.display()))
}

fn weights_file(dir: &Path, stems: &[&str]) -> Result<PathBuf> {
    let mut tried = Vec::new();
    for stem in stems {
        for ext in ["safetensors", "bin"] {
            for variant in ["", ".fp16"] {
                let p = dir.join(format!("{stem}{variant}.{ext}"));
                if p.is_file() {
                    return Ok(p);
                }
                tried.push(p.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
    }
    Err(Error::Read {
        path: dir.to_path_buf(),
        message: format!("no weights file (looked for {})", tried.join(", ")),
    })
}

/// The UNet layout a diffusers `UNet2DConditionModel` config describes.
#[derive(Debug, Clone)]
pub struct DiffusersUnetLayout {
    /// Levels (`len(block_out_channels)`).
    pub levels: usize,
    /// `layers_per_block`.
    pub layers: usize,
    /// Cross-attention at each level.
    pub attention: Vec<bool>,
}

/// `unet/config.json` → our [`UNetConfig`] and the block layout for the key mapping.
pub fn unet_config_from_diffusers(path: &Path) -> Result<(UNetConfig, DiffusersUnetLayout)> {
    let v = read_json(path)?;
    let e = |m: &str| cfg(path, m);
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    let uz = |k: &str| -> Result<usize> {
        get(k)
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .ok_or_else(|| e(&format!("`{k}` must be a non-negative integer")))
    };
    let list = |k: &str| -> Result<Vec<Value>> {
        get(k)
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| e(&format!("`{k}` must be a list")))
    };
    let boc: Vec<usize> = list("block_out_channels")?
        .iter()
        .map(|x| x.as_u64().map(|n| n as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| e("block_out_channels must be integers"))?;
    let c0 = *boc
        .first()
        .ok_or_else(|| e("block_out_channels is empty"))?;
    if boc.iter().any(|c| c % c0 != 0) {
        return Err(e("block_out_channels must be multiples of the first"));
    }
    let down: Vec<String> = list("down_block_types")?
        .iter()
        .map(|x| x.as_str().unwrap_or("").to_string())
        .collect();
    let up: Vec<String> = list("up_block_types")?
        .iter()
        .map(|x| x.as_str().unwrap_or("").to_string())
        .collect();
    if down.len() != boc.len() || up.len() != boc.len() {
        return Err(e(
            "down/up block types must have one entry per block_out_channels",
        ));
    }
    let attention: Vec<bool> = down
        .iter()
        .map(|t| match t.as_str() {
            "CrossAttnDownBlock2D" => Ok(true),
            "DownBlock2D" => Ok(false),
            other => Err(e(&format!("unsupported down block `{other}`"))),
        })
        .collect::<Result<_>>()?;
    for (i, t) in up.iter().enumerate() {
        let want = if attention[boc.len() - 1 - i] {
            "CrossAttnUpBlock2D"
        } else {
            "UpBlock2D"
        };
        if t != want {
            return Err(e(&format!(
                "up block {i} is `{t}`, expected `{want}` (mirror of the down blocks)"
            )));
        }
    }
    if let Some(m) = get("mid_block_type").and_then(Value::as_str)
        && m != "UNetMidBlock2DCrossAttn"
    {
        return Err(e(&format!("unsupported mid block `{m}`")));
    }
    let check = |k: &str, ok: &dyn Fn(&Value) -> bool, what: &str| -> Result<()> {
        match get(k) {
            Some(x) if !ok(x) => Err(e(&format!("`{k}` = {x} is not supported ({what})"))),
            _ => Ok(()),
        }
    };
    check(
        "flip_sin_to_cos",
        &|x| x.as_bool() == Some(true),
        "needs true",
    )?;
    check("freq_shift", &|x| x.as_f64() == Some(0.0), "needs 0")?;
    check("norm_num_groups", &|x| x.as_u64() == Some(32), "needs 32")?;
    check("act_fn", &|x| x.as_str() == Some("silu"), "needs silu")?;
    check("class_embed_type", &|_| false, "not supported")?;
    check("addition_embed_type", &|_| false, "not supported")?;
    check(
        "only_cross_attention",
        &|x| x.as_bool() == Some(false),
        "needs false",
    )?;
    check(
        "dual_cross_attention",
        &|x| x.as_bool() == Some(false),
        "needs false",
    )?;
    check(
        "time_embedding_type",
        &|x| x.as_str() == Some("positional"),
        "needs positional",
    )?;
    check("conv_in_kernel", &|x| x.as_u64() == Some(3), "needs 3")?;
    check("conv_out_kernel", &|x| x.as_u64() == Some(3), "needs 3")?;
    // Heads: diffusers' SD-v1 configs call the head count `attention_head_dim`.
    let heads_v = get("num_attention_heads")
        .or_else(|| get("attention_head_dim"))
        .ok_or_else(|| e("no attention_head_dim / num_attention_heads"))?;
    let heads: Vec<usize> = match heads_v {
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|n| n as usize)
            .collect(),
        x => vec![
            x.as_u64()
                .ok_or_else(|| e("attention_head_dim must be an integer"))?
                as usize;
            boc.len()
        ],
    };
    if heads.len() != boc.len() || heads.contains(&0) {
        return Err(e("attention_head_dim must give one head count per block"));
    }
    let mut c = UNetConfig::new()
        .with_image_size(uz("sample_size").unwrap_or(64))
        .with_in_channels(uz("in_channels")?)
        .with_out_channels(uz("out_channels")?)
        .with_model_channels(c0)
        .with_channel_mult(boc.iter().map(|b| b / c0).collect())
        .with_num_res_blocks(uz("layers_per_block")?)
        .with_attention_resolutions(
            attention
                .iter()
                .enumerate()
                .filter(|(_, a)| **a)
                .map(|(i, _)| 1 << i)
                .collect(),
        )
        .with_use_spatial_transformer(true)
        .with_context_dim(Some(uz("cross_attention_dim")?))
        .with_legacy(false)
        .with_transformer_depth(uz("transformer_layers_per_block").unwrap_or(1))
        .with_use_linear_in_transformer(
            get("use_linear_projection")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        )
        .with_use_scale_shift_norm(
            get("resnet_time_scale_shift").and_then(Value::as_str) == Some("scale_shift"),
        )
        .with_num_classes(
            get("num_class_embeds")
                .and_then(Value::as_u64)
                .map(|n| n as usize),
        );
    if heads.iter().all(|h| *h == heads[0]) {
        c = c.with_num_heads(heads[0] as isize);
    } else {
        let per_head: Vec<usize> = boc.iter().zip(&heads).map(|(b, h)| b / h).collect();
        if per_head.iter().any(|p| *p != per_head[0]) {
            return Err(e(
                "per-block head counts that are neither constant nor constant-width",
            ));
        }
        c = c.with_num_head_channels(per_head[0] as isize);
    }
    c.validate()?;
    let layout = DiffusersUnetLayout {
        levels: boc.len(),
        layers: c.num_res_blocks,
        attention,
    };
    Ok((c, layout))
}

/// (CompVis prefix, diffusers prefix, is a ResBlock) pairs of a UNet layout.
fn unet_prefixes(l: &DiffusersUnetLayout) -> Vec<(String, String, bool)> {
    let (n, levels) = (l.layers, l.levels);
    let mut v = vec![
        (
            "time_embed.0.".into(),
            "time_embedding.linear_1.".into(),
            false,
        ),
        (
            "time_embed.2.".into(),
            "time_embedding.linear_2.".into(),
            false,
        ),
        ("input_blocks.0.0.".into(), "conv_in.".into(), false),
        ("out.0.".into(), "conv_norm_out.".into(), false),
        ("out.2.".into(), "conv_out.".into(), false),
        ("label_emb.".into(), "class_embedding.".into(), false),
        (
            "middle_block.0.".into(),
            "mid_block.resnets.0.".into(),
            true,
        ),
        (
            "middle_block.1.".into(),
            "mid_block.attentions.0.".into(),
            false,
        ),
        (
            "middle_block.2.".into(),
            "mid_block.resnets.1.".into(),
            true,
        ),
    ];
    for i in 0..levels {
        for j in 0..n {
            let b = (n + 1) * i + j + 1;
            v.push((
                format!("input_blocks.{b}.0."),
                format!("down_blocks.{i}.resnets.{j}."),
                true,
            ));
            if l.attention[i] {
                v.push((
                    format!("input_blocks.{b}.1."),
                    format!("down_blocks.{i}.attentions.{j}."),
                    false,
                ));
            }
        }
        if i + 1 < levels {
            v.push((
                format!("input_blocks.{}.0.op.", (n + 1) * (i + 1)),
                format!("down_blocks.{i}.downsamplers.0.conv."),
                false,
            ));
        }
        // up_blocks.i is CompVis level levels−1−i, output blocks (n+1)·i …
        let attn = l.attention[levels - 1 - i];
        for j in 0..=n {
            let b = (n + 1) * i + j;
            v.push((
                format!("output_blocks.{b}.0."),
                format!("up_blocks.{i}.resnets.{j}."),
                true,
            ));
            if attn {
                v.push((
                    format!("output_blocks.{b}.1."),
                    format!("up_blocks.{i}.attentions.{j}."),
                    false,
                ));
            }
        }
        if i + 1 < levels {
            let b = (n + 1) * i + n;
            v.push((
                format!("output_blocks.{b}.{}.", if attn { 2 } else { 1 }),
                format!("up_blocks.{i}.upsamplers.0."),
                false,
            ));
        }
    }
    v
}

const RESNET_NAMES: &[(&str, &str)] = &[
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
];

/// The diffusers name of a CompVis UNet key (without `model.diffusion_model.`).
pub fn unet_key_to_diffusers(key: &str, layout: &DiffusersUnetLayout) -> Option<String> {
    let prefixes = unet_prefixes(layout);
    let (cv, df, resnet) = prefixes
        .iter()
        .filter(|(cv, _, _)| key.starts_with(cv.as_str()))
        .max_by_key(|(cv, _, _)| cv.len())?;
    let mut rest = key[cv.len()..].to_string();
    if *resnet {
        for (a, b) in RESNET_NAMES {
            if let Some(r) = rest.strip_prefix(a) {
                rest = format!("{b}{r}");
                break;
            }
        }
    }
    Some(format!("{df}{rest}"))
}

/// The diffusers name(s) of a CompVis first-stage key (newer and older attention names).
fn vae_key_to_diffusers(key: &str, levels: usize) -> Vec<String> {
    let mut k = key.to_string();
    let swaps: [(&str, &str); 3] = [
        ("nin_shortcut.", "conv_shortcut."),
        ("norm_out.", "conv_norm_out."),
        ("mid.attn_1.", "mid_block.attentions.0."),
    ];
    for (a, b) in swaps {
        k = k.replace(a, b);
    }
    for i in 0..2 {
        k = k.replace(
            &format!("mid.block_{}.", i + 1),
            &format!("mid_block.resnets.{i}."),
        );
    }
    for i in 0..levels {
        k = k.replace(
            &format!("encoder.down.{i}.block."),
            &format!("encoder.down_blocks.{i}.resnets."),
        );
        k = k.replace(
            &format!("encoder.down.{i}.downsample."),
            &format!("encoder.down_blocks.{i}.downsamplers.0."),
        );
        let u = levels - 1 - i;
        k = k.replace(
            &format!("decoder.up.{i}.block."),
            &format!("decoder.up_blocks.{u}.resnets."),
        );
        k = k.replace(
            &format!("decoder.up.{i}.upsample."),
            &format!("decoder.up_blocks.{u}.upsamplers.0."),
        );
    }
    if let Some(pos) = k.find("mid_block.attentions.0.") {
        let (head, tail) = k.split_at(pos + "mid_block.attentions.0.".len());
        let names: &[(&str, &[&str])] = &[
            ("norm.", &["group_norm."]),
            ("q.", &["to_q.", "query."]),
            ("k.", &["to_k.", "key."]),
            ("v.", &["to_v.", "value."]),
            ("proj_out.", &["to_out.0.", "proj_attn."]),
        ];
        for (cv, dfs) in names {
            if let Some(r) = tail.strip_prefix(cv) {
                return dfs.iter().map(|d| format!("{head}{d}{r}")).collect();
            }
        }
    }
    vec![k]
}

/// Renames `source` (diffusers names) to the CompVis names of `wanted` (key, shape) under `prefix`,
/// reshaping `[C, C]` attention projections to the `[C, C, 1, 1]` convs where needed. Returns the
/// renamed state dict and the diffusers keys nothing used.
fn rename(
    source: &StateDict,
    wanted: &[(String, Vec<usize>)],
    prefix: &str,
    map: impl Fn(&str) -> Vec<String>,
) -> (StateDict, Vec<String>) {
    let mut used = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (key, shape) in wanted {
        for cand in map(key) {
            if let Some(t) = source.get(&cand) {
                let mut t: PackTensor = t.clone();
                t.name = format!("{prefix}{key}");
                let numel = |s: &[usize]| s.iter().product::<usize>();
                if t.shape.to_vec() != *shape && numel(&t.shape.to_vec()) == numel(shape) {
                    t.shape = shape.clone().into();
                }
                used.insert(cand);
                out.push(t);
                break;
            }
        }
    }
    let unused = source
        .keys()
        .filter(|k| !used.contains(*k))
        .map(String::from)
        .collect();
    (
        StateDict::from_tensors(out, source.source().to_path_buf()),
        unused,
    )
}

/// What [`load_diffusers_dir`] produced.
pub struct DiffusersModel {
    /// The model.
    pub model: LatentDiffusion,
    /// The scheduler config's timestep spacing (for DPM-Solver++ / Euler).
    pub spacing: TimestepSpacing,
    /// The scheduler config's `steps_offset`.
    pub steps_offset: usize,
    /// One report per component.
    pub reports: Vec<LoadReport>,
}

/// Loads a diffusers Stable Diffusion folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
/// `tokenizer/`, `scheduler/`).
pub fn load_diffusers_dir(
    dir: impl AsRef<Path>,
    device: &Device,
    options: &LoadOptions,
) -> Result<DiffusersModel> {
    let dir = dir.as_ref();
    if !dir.join("unet").is_dir() {
        return Err(Error::Read {
            path: dir.to_path_buf(),
            message: "not a diffusers folder (no unet/ subfolder)".into(),
        });
    }
    // UNet.
    let (unet_cfg, layout) = unet_config_from_diffusers(&dir.join("unet/config.json"))?;
    let mut unet: UNetModel = unet_cfg.init(device)?;
    let unet_sd = StateDict::open(weights_file(
        &dir.join("unet"),
        &["diffusion_pytorch_model"],
    )?)?;
    let (renamed, unused) = rename(&unet_sd, &parameter_shapes(&unet), "", |k| {
        unet_key_to_diffusers(k, &layout).into_iter().collect()
    });
    let mut unet_report = unet.load_weights_with(&renamed, options)?;
    unet_report.unused = unused;
    // VAE.
    let vae_path = dir.join("vae/config.json");
    let vae_json = read_json(&vae_path)?;
    let vg = |k: &str| vae_json.get(k).filter(|x| !x.is_null());
    let boc: Vec<usize> = vg("block_out_channels")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|n| n as usize)
                .collect()
        })
        .ok_or_else(|| cfg(&vae_path, "block_out_channels missing"))?;
    let c0 = *boc
        .first()
        .ok_or_else(|| cfg(&vae_path, "block_out_channels is empty"))?;
    let vu = |k: &str, d: usize| vg(k).and_then(Value::as_u64).map_or(d, |n| n as usize);
    let latent = vu("latent_channels", 4);
    let dd = DdConfig::new()
        .with_ch(c0)
        .with_ch_mult(boc.iter().map(|b| b / c0).collect())
        .with_num_res_blocks(vu("layers_per_block", 2))
        .with_in_channels(vu("in_channels", 3))
        .with_out_ch(vu("out_channels", 3))
        .with_resolution(vu("sample_size", 512))
        .with_z_channels(latent)
        .with_double_z(true)
        .with_norm_groups(vu("norm_num_groups", 32))
        .with_attn_resolutions(vec![]);
    let vae_cfg = AutoencoderKLConfig::new(dd, latent);
    vae_cfg.validate()?;
    let mut vae = vae_cfg.init(device);
    let vae_sd = StateDict::open(weights_file(
        &dir.join("vae"),
        &["diffusion_pytorch_model"],
    )?)?;
    let levels = boc.len();
    let (renamed, unused) = rename(&vae_sd, &parameter_shapes(&vae), "", |k| {
        vae_key_to_diffusers(k, levels)
    });
    let mut vae_report = vae.load_weights_with(&renamed, options)?;
    vae_report.unused = unused;
    let scale_factor = vg("scaling_factor")
        .and_then(Value::as_f64)
        .unwrap_or(0.18215);
    // Text encoder and tokenizer.
    let te = dir.join("text_encoder");
    let clip_cfg = ClipTextConfig::from_hf_json(
        &std::fs::read_to_string(te.join("config.json")).map_err(|e| Error::Read {
            path: te.join("config.json"),
            message: e.to_string(),
        })?,
    )?;
    let mut clip = clip_cfg.init(device);
    let clip_report = clip.load_weights_with(
        &StateDict::open(weights_file(&te, &["model", "pytorch_model"])?)?,
        options,
    )?;
    let tk = dir.join("tokenizer");
    let tokenizer = if tk.join("vocab.json").is_file() {
        TextTokenizer::clip_from_vocab_merges(tk.join("vocab.json"), tk.join("merges.txt"))?
    } else if tk.join("tokenizer.json").is_file() {
        TextTokenizer::clip_from_file(tk.join("tokenizer.json"))?
    } else {
        return Err(Error::Read {
            path: tk,
            message: "no tokenizer (vocab.json + merges.txt, or tokenizer.json)".into(),
        });
    };
    // Scheduler.
    let sched_path = dir.join("scheduler/scheduler_config.json");
    let sched = if sched_path.is_file() {
        read_json(&sched_path)?
    } else {
        tracing::warn!(
            "{}: missing; assuming SD v1's schedule",
            sched_path.display()
        );
        serde_json::json!({})
    };
    let sf = |k: &str, d: f64| sched.get(k).and_then(Value::as_f64).unwrap_or(d);
    let beta_schedule = match sched
        .get("beta_schedule")
        .and_then(Value::as_str)
        .unwrap_or("scaled_linear")
    {
        "scaled_linear" => BetaSchedule::Linear,
        "linear" => BetaSchedule::SqrtLinear,
        "squaredcos_cap_v2" => BetaSchedule::Cosine { s: 0.008 },
        other => {
            return Err(cfg(
                &sched_path,
                format!("unsupported beta_schedule `{other}`"),
            ));
        }
    };
    let schedule = DiffusionSchedule::new(
        beta_schedule,
        sf("num_train_timesteps", 1000.0) as usize,
        sf("beta_start", 0.00085),
        sf("beta_end", 0.012),
    )?;
    let parameterization: Parameterization = sched
        .get("prediction_type")
        .and_then(Value::as_str)
        .unwrap_or("epsilon")
        .parse()?;
    let spacing = sched
        .get("timestep_spacing")
        .and_then(Value::as_str)
        .map(str::parse)
        .transpose()?
        .unwrap_or(TimestepSpacing::Leading);
    let steps_offset = sf("steps_offset", 1.0) as usize;
    let downsample = vae_cfg.ddconfig.downsampling_factor();
    let model = LatentDiffusion {
        latent_channels: unet_cfg.out_channels,
        model: DiffusionWrapper {
            unet,
            key: ConditioningKey::Crossattn,
        },
        first_stage: FirstStage::Kl(vae),
        cond_stage: CondStage::Clip {
            model: clip,
            tokenizer,
        },
        scale_factor,
        schedule,
        parameterization,
        downsample,
    };
    let reports = vec![unet_report, vae_report, clip_report];
    for r in &reports {
        if !r.unused.is_empty() {
            tracing::warn!(
                "{}: {} unused key(s): {}",
                r.component,
                r.unused.len(),
                r.unused.join(", ")
            );
        }
    }
    Ok(DiffusersModel {
        model,
        spacing,
        steps_offset,
        reports,
    })
}
