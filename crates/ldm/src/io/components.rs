//! `load_weights` for each model, with the CompVis key prefixes.

use super::{LoadOptions, LoadReport, StateDict, load_into};
use crate::Result;
use crate::conditioning::{ClassEmbedder, ClipTextModel, TransformerWrapper};
use crate::models::autoencoder::{AutoencoderKL, VQModel};
use crate::models::unet::UNetModel;

/// Key prefix of the first stage inside a full LDM/SD checkpoint.
pub const FIRST_STAGE_PREFIX: &str = "first_stage_model.";
/// Key prefix of the UNet inside a full LDM/SD checkpoint.
pub const UNET_PREFIX: &str = "model.diffusion_model.";

impl UNetModel {
    /// Loads CompVis-layout weights: keys under `model.diffusion_model.` or bare (`input_blocks.*`, ...).
    pub fn load_weights(&mut self, state_dict: &StateDict) -> Result<LoadReport> {
        self.load_weights_with(state_dict, &LoadOptions::default())
    }

    /// [`load_weights`](Self::load_weights) with options.
    pub fn load_weights_with(
        &mut self,
        state_dict: &StateDict,
        options: &LoadOptions,
    ) -> Result<LoadReport> {
        let prefix = state_dict.detect_prefix(&[UNET_PREFIX]);
        load_into(self, state_dict, "UNet", prefix, options)
    }
}

impl AutoencoderKL {
    /// Loads CompVis-layout weights: keys under `first_stage_model.` (full LDM/SD checkpoints) or
    /// bare (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`).
    pub fn load_weights(&mut self, state_dict: &StateDict) -> Result<LoadReport> {
        self.load_weights_with(state_dict, &LoadOptions::default())
    }

    /// [`load_weights`](Self::load_weights) with options.
    pub fn load_weights_with(
        &mut self,
        state_dict: &StateDict,
        options: &LoadOptions,
    ) -> Result<LoadReport> {
        let prefix = state_dict.detect_prefix(&[FIRST_STAGE_PREFIX]);
        load_into(
            self,
            state_dict,
            "first stage (AutoencoderKL)",
            prefix,
            options,
        )
    }
}

impl VQModel {
    /// Loads CompVis-layout weights (under `first_stage_model.` or bare), codebook included.
    pub fn load_weights(&mut self, state_dict: &StateDict) -> Result<LoadReport> {
        self.load_weights_with(state_dict, &LoadOptions::default())
    }

    /// [`load_weights`](Self::load_weights) with options.
    pub fn load_weights_with(
        &mut self,
        state_dict: &StateDict,
        options: &LoadOptions,
    ) -> Result<LoadReport> {
        let prefix = state_dict.detect_prefix(&[FIRST_STAGE_PREFIX]);
        load_into(self, state_dict, "first stage (VQModel)", prefix, options)
    }
}

/// Key prefix of the conditioning encoder inside a full LDM/SD checkpoint.
pub const COND_STAGE_PREFIX: &str = "cond_stage_model.";

fn drop_position_ids(mut report: LoadReport) -> LoadReport {
    // HF CLIP checkpoints carry an `embeddings.position_ids` buffer (int or float): accepted, ignored.
    report
        .unused
        .retain(|k| !k.ends_with("embeddings.position_ids"));
    report
}

impl ClipTextModel {
    /// Loads `CLIPTextModel` weights: SD v1 layout (`cond_stage_model.transformer.text_model.*`) or a
    /// diffusers / HF `text_encoder` file (`text_model.*`).
    pub fn load_weights(&mut self, state_dict: &StateDict) -> Result<LoadReport> {
        self.load_weights_with(state_dict, &LoadOptions::default())
    }

    /// [`load_weights`](Self::load_weights) with options.
    pub fn load_weights_with(
        &mut self,
        state_dict: &StateDict,
        options: &LoadOptions,
    ) -> Result<LoadReport> {
        let prefix =
            state_dict.detect_prefix(&["cond_stage_model.transformer.text_model.", "text_model."]);
        let prefix = prefix.strip_suffix("text_model.").unwrap_or(prefix);
        load_into(self, state_dict, "CLIP text encoder", prefix, options).map(drop_position_ids)
    }
}

impl TransformerWrapper {
    /// Loads LDM `BERTEmbedder` weights (`cond_stage_model.transformer.*` or bare `token_emb.*`, ...).
    pub fn load_weights(&mut self, state_dict: &StateDict) -> Result<LoadReport> {
        self.load_weights_with(state_dict, &LoadOptions::default())
    }

    /// [`load_weights`](Self::load_weights) with options.
    pub fn load_weights_with(
        &mut self,
        state_dict: &StateDict,
        options: &LoadOptions,
    ) -> Result<LoadReport> {
        let prefix = state_dict.detect_prefix(&["cond_stage_model.transformer."]);
        load_into(self, state_dict, "BERT text encoder", prefix, options)
    }
}

impl ClassEmbedder {
    /// Loads `cond_stage_model.embedding.weight` (or bare `embedding.weight`).
    pub fn load_weights(&mut self, state_dict: &StateDict) -> Result<LoadReport> {
        self.load_weights_with(state_dict, &LoadOptions::default())
    }

    /// [`load_weights`](Self::load_weights) with options.
    pub fn load_weights_with(
        &mut self,
        state_dict: &StateDict,
        options: &LoadOptions,
    ) -> Result<LoadReport> {
        let prefix = state_dict.detect_prefix(&[COND_STAGE_PREFIX]);
        load_into(self, state_dict, "class embedder", prefix, options)
    }
}

/// Loads a diffusers / Hugging Face `text_encoder/` folder: `config.json` plus `model.safetensors`
/// (or `pytorch_model.bin`).
pub fn load_clip_text_encoder_dir(
    dir: impl AsRef<std::path::Path>,
    device: &burn::tensor::Device,
) -> Result<(ClipTextModel, LoadReport)> {
    let dir = dir.as_ref();
    let read_err = |path: &std::path::Path, m: String| crate::Error::Read {
        path: path.to_path_buf(),
        message: m,
    };
    let config_path = dir.join("config.json");
    let json =
        std::fs::read_to_string(&config_path).map_err(|e| read_err(&config_path, e.to_string()))?;
    let config = crate::conditioning::ClipTextConfig::from_hf_json(&json)?;
    let weights = ["model.safetensors", "pytorch_model.bin"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            read_err(
                dir,
                "no model.safetensors or pytorch_model.bin in the text encoder folder".into(),
            )
        })?;
    let mut model = config.init(device);
    let report = model.load_weights(&StateDict::open(weights)?)?;
    Ok((model, report))
}
