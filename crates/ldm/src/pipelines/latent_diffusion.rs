//! `LatentDiffusion`: first stage + conditioning encoder + denoiser + schedule, and the pipelines
//! built on them.

use burn::tensor::{Int, Tensor, TensorData};

use super::guidance::{Conditioning, ConditioningKey, DiffusionModel, DiffusionWrapper, Guided};
use crate::conditioning::{ClassEmbedder, ClipTextModel, TextTokenizer, TransformerWrapper};
use crate::error::{Error, Result};
use crate::io::{LoadReport, StateDict};
use crate::models::autoencoder::{AutoencoderKL, VQModel};
use crate::schedulers::{
    DiffusionSchedule, Inpainting, NoiseKind, NoiseSource, Parameterization, SampleOptions,
    SamplerOptions, StepInfo, sample,
};

/// The first stage (image ↔ latent).
#[derive(Debug)]
pub enum FirstStage {
    /// KL autoencoder; encoding draws from the posterior (as `get_first_stage_encoding`).
    Kl(AutoencoderKL),
    /// VQ autoencoder (`VQModelInterface`): encoding gives the pre-quantisation latent, decoding
    /// quantises first.
    Vq(VQModel),
    /// Pixel space (no autoencoder).
    Identity,
}

impl FirstStage {
    /// `[B, 3, H, W]` in [−1, 1] → unscaled latent.
    pub fn encode(&self, image: Tensor<4>, noise: &mut dyn NoiseSource) -> Result<Tensor<4>> {
        Ok(match self {
            Self::Kl(ae) => {
                let posterior = ae.encode(image);
                let z = noise.noise(
                    NoiseKind::Posterior,
                    0,
                    posterior.mean.dims(),
                    &posterior.mean.device(),
                )?;
                posterior.sample_with_noise(z)
            }
            Self::Vq(ae) => ae.encode_to_prequant(image),
            Self::Identity => image,
        })
    }

    /// Unscaled latent → image (≈ [−1, 1]).
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        match self {
            Self::Kl(ae) => ae.decode(z),
            Self::Vq(ae) => ae.decode_latent(z, false),
            Self::Identity => z,
        }
    }

    /// Replaces the autoencoder's weights (keys under `first_stage_model.` or bare, as
    /// `ldm train autoencoder` writes them); an error for a pixel-space model.
    pub fn load_weights(&mut self, state_dict: &StateDict) -> Result<LoadReport> {
        match self {
            Self::Kl(ae) => ae.load_weights(state_dict),
            Self::Vq(ae) => ae.load_weights(state_dict),
            Self::Identity => Err(Error::Config(
                "a pixel-space model has no first stage to load weights into".into(),
            )),
        }
    }
}

/// The conditioning encoder (`cond_stage_model`).
#[derive(Debug)]
pub enum CondStage {
    /// Unconditional model.
    None,
    /// SD v1 `FrozenCLIPEmbedder`: CLIP ViT-L/14 text encoder, last hidden state.
    Clip {
        /// The encoder.
        model: ClipTextModel,
        /// Its tokenizer.
        tokenizer: TextTokenizer,
    },
    /// LDM `BERTEmbedder`: BERT tokenizer + trainable transformer.
    Bert {
        /// The transformer.
        model: TransformerWrapper,
        /// Its tokenizer.
        tokenizer: TextTokenizer,
    },
    /// `ClassEmbedder` (class labels → cross-attention context).
    Class(ClassEmbedder),
    /// The conditioning image itself (super-resolution: the low-res image, `torch.nn.Identity`).
    Identity,
    /// The first stage encodes the conditioning image (`__is_first_stage__`: inpainting models).
    FirstStage,
}

/// How img2img noises the init latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Img2ImgNoising {
    /// To the noise level of the first step that runs (correct; diffusers does the same).
    #[default]
    FirstStep,
    /// As CompVis `scripts/img2img.py`: `stochastic_encode(x0, t_enc)` noises one DDIM step *more*
    /// than the first step `decode` runs (index `t_enc` vs `t_enc − 1`). For reproducing old outputs.
    Reference,
}

/// What to sample: everything except the model.
#[derive(Debug, Clone)]
pub struct SamplingRequest {
    /// Conditioning of the batch.
    pub cond: Conditioning,
    /// Unconditional conditioning for classifier-free guidance (None: no guidance).
    pub uncond: Option<Conditioning>,
    /// Guidance scale s (1: the unconditional pass is skipped).
    pub guidance_scale: f64,
    /// Guidance rescale φ in [0, 1] (0: off, as the reference; see [`Guided`]).
    pub guidance_rescale: f64,
    /// Sampler and its settings.
    pub sampler: SamplerOptions,
    /// Latent shape `[B, C, h, w]`.
    pub shape: [usize; 4],
    /// Unit-variance x_T (else drawn from the noise source); scaled by the sampler's init σ.
    pub x_t: Option<Tensor<4>>,
    /// img2img: the scaled init latent and the strength in (0, 1].
    pub init: Option<(Tensor<4>, f64)>,
    /// How img2img noises the init latent.
    pub img2img_noising: Img2ImgNoising,
    /// Mask blending (inpainting with any model).
    pub inpainting: Option<Inpainting>,
}

impl SamplingRequest {
    /// A plain request: `cond`, no guidance, the default sampler.
    pub fn new(cond: Conditioning, shape: [usize; 4]) -> Self {
        Self {
            cond,
            uncond: None,
            guidance_scale: 1.0,
            guidance_rescale: 0.0,
            sampler: SamplerOptions::default(),
            shape,
            x_t: None,
            init: None,
            img2img_noising: Img2ImgNoising::default(),
            inpainting: None,
        }
    }
}

/// Generated images and the latents they were decoded from.
#[derive(Debug, Clone)]
pub struct Generated {
    /// `[B, 3, H, W]`, clamped to [−1, 1].
    pub images: Tensor<4>,
    /// The final latents `[B, C, h, w]` (scaled, before decoding).
    pub latents: Tensor<4>,
}

impl Generated {
    /// 8-bit RGB pixels per image (`[H·W·3]`, row-major), as the reference saves them:
    /// `255 · clamp((x + 1)/2, 0, 1)` truncated.
    pub fn to_rgb8(&self) -> Vec<(usize, usize, Vec<u8>)> {
        images_to_rgb8(self.images.clone())
    }
}

/// `[B, 3, H, W]` in [−1, 1] → 8-bit RGB per image (`255 · clamp((x+1)/2)` truncated, as the
/// reference scripts).
pub fn images_to_rgb8(images: Tensor<4>) -> Vec<(usize, usize, Vec<u8>)> {
    let [b, _, h, w] = images.dims();
    let hwc = images
        .add_scalar(1.0)
        .div_scalar(2.0)
        .clamp(0.0, 1.0)
        .mul_scalar(255.0)
        .permute([0, 2, 3, 1]);
    let data: Vec<f32> = hwc
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 data");
    data.chunks(h * w * 3)
        .take(b)
        .map(|c| (w, h, c.iter().map(|v| *v as u8).collect()))
        .collect()
}

/// A latent diffusion model (CompVis `LatentDiffusion`).
#[derive(Debug)]
pub struct LatentDiffusion {
    /// The UNet and its conditioning routing.
    pub model: DiffusionWrapper,
    /// Image ↔ latent.
    pub first_stage: FirstStage,
    /// Conditioning encoder.
    pub cond_stage: CondStage,
    /// Latents are `scale_factor ·` the first stage's.
    pub scale_factor: f64,
    /// The training noise schedule.
    pub schedule: DiffusionSchedule,
    /// What the UNet predicts.
    pub parameterization: Parameterization,
    /// Latent channels (the UNet's `out_channels`).
    pub latent_channels: usize,
    /// Spatial downsampling factor of the first stage (1 in pixel space).
    pub downsample: usize,
}

impl LatentDiffusion {
    /// The device the UNet lives on.
    pub fn device(&self) -> burn::tensor::Device {
        use burn::module::Module;
        self.model.unet.devices()[0].clone()
    }

    /// Runs the UNet in `precision` (its weights are cast; norm statistics and attention softmax
    /// stay f32, as do the text encoder, the first stage and the sampler). Errors if the device
    /// does not support the dtype.
    pub fn with_precision(mut self, precision: crate::device::Precision) -> Result<Self> {
        let dtype = precision.dtype();
        let device = self.device();
        if !device.supports_dtype(burn::tensor::DType::from(dtype)) {
            return Err(Error::Config(format!(
                "precision {precision} is not supported by this device/backend"
            )));
        }
        let unet = self.model.unet;
        self.model.unet = crate::device::cast_module(unet, dtype);
        Ok(self)
    }

    /// The conditioning key.
    pub fn conditioning_key(&self) -> ConditioningKey {
        self.model.key
    }

    /// Latent shape for `batch` images of `height` × `width` pixels.
    pub fn latent_shape(&self, batch: usize, height: usize, width: usize) -> Result<[usize; 4]> {
        let multiple = self.downsample * self.model.unet.spatial_multiple();
        if height == 0
            || width == 0
            || !height.is_multiple_of(multiple)
            || !width.is_multiple_of(multiple)
        {
            return Err(Error::Input(format!(
                "height and width must be positive multiples of {multiple} for this model \
                 (first stage factor {} × UNet downsampling {}), got {height}x{width}",
                self.downsample,
                self.model.unet.spatial_multiple()
            )));
        }
        if batch == 0 {
            return Err(Error::Input("batch size must be at least 1".into()));
        }
        Ok([
            batch,
            self.latent_channels,
            height / self.downsample,
            width / self.downsample,
        ])
    }

    /// `get_first_stage_encoding(encode_first_stage(image))`: `[B, 3, H, W]` in [−1, 1] → scaled latent.
    pub fn encode_image(&self, image: Tensor<4>, noise: &mut dyn NoiseSource) -> Result<Tensor<4>> {
        check_image(&image, "image")?;
        Ok(self
            .first_stage
            .encode(image, noise)?
            .mul_scalar(self.scale_factor))
    }

    /// `decode_first_stage`: scaled latent → image in [−1, 1] (clamped).
    pub fn decode_latents(&self, z: Tensor<4>) -> Tensor<4> {
        self.first_stage
            .decode(z.div_scalar(self.scale_factor))
            .clamp(-1.0, 1.0)
    }

    /// Text conditioning (`get_learned_conditioning(prompts)`), routed as cross-attention context.
    pub fn text_conditioning(&self, prompts: &[impl AsRef<str>]) -> Result<Conditioning> {
        let device = self.device();
        let context = match &self.cond_stage {
            CondStage::Clip { model, tokenizer } => {
                model
                    .try_forward(tokenizer.encode_batch(prompts, &device)?)?
                    .last_hidden_state
            }
            CondStage::Bert { model, tokenizer } => {
                model.try_forward(tokenizer.encode_batch(prompts, &device)?)?
            }
            other => {
                return Err(Error::Config(format!(
                    "this model is not text-conditioned (conditioning stage: {})",
                    cond_stage_name(other)
                )));
            }
        };
        Ok(Conditioning::context(context))
    }

    /// Class conditioning for `labels` (cross-attention context from the `ClassEmbedder`, or
    /// labels for an `adm` UNet).
    pub fn class_conditioning(&self, labels: &[usize]) -> Result<Conditioning> {
        let device = self.device();
        let y = Tensor::<1, Int>::from_data(
            TensorData::new(
                labels.iter().map(|&l| l as i64).collect::<Vec<_>>(),
                [labels.len()],
            ),
            &device,
        );
        match (&self.cond_stage, self.model.key) {
            (CondStage::Class(embedder), _) => Ok(Conditioning::context(embedder.try_forward(y)?)),
            (_, ConditioningKey::Adm) => Ok(Conditioning::labels(y)),
            (other, _) => Err(Error::Config(format!(
                "this model is not class-conditioned (conditioning stage: {})",
                cond_stage_name(other)
            ))),
        }
    }

    /// Runs a sampler as described by `request` and returns the final (scaled) latents.
    pub fn sample_latents(
        &self,
        request: &SamplingRequest,
        noise: &mut dyn NoiseSource,
        callback: Option<&mut dyn FnMut(StepInfo<'_>)>,
    ) -> Result<Tensor<4>> {
        run_request(
            &self.model,
            &self.schedule,
            self.parameterization,
            request,
            &self.device(),
            noise,
            callback,
        )
    }

    /// Text-to-image: one image per prompt, guided away from `negative_prompt` (or the empty
    /// prompt) with `guidance_scale`.
    ///
    /// ```
    /// # fn main() -> ldm::Result<()> {
    /// use ldm::io::LdmSpec;
    /// use ldm::schedulers::{SamplerKind, SamplerOptions, SeededNoise};
    ///
    /// let device = ldm::device::parse_device("cpu")?;
    /// // A real model: `ldm::pipelines::Pipeline::from_files("sd-v1-5.safetensors", ..)?.model`.
    /// // Here a tiny one with random weights, built from a CompVis YAML.
    /// let model = LdmSpec::from_yaml_str(r#"
    /// model:
    ///   target: ldm.models.diffusion.ddpm.LatentDiffusion
    ///   params: {conditioning_key: crossattn, scale_factor: 0.18215, linear_start: 0.00085, linear_end: 0.012,
    ///     unet_config: {target: ldm.modules.diffusionmodules.openaimodel.UNetModel, params: {image_size: 8,
    ///       in_channels: 4, out_channels: 4, model_channels: 32, attention_resolutions: [1], num_res_blocks: 1,
    ///       channel_mult: [1], num_heads: 1, use_spatial_transformer: true, context_dim: 64}},
    ///     first_stage_config: {target: ldm.models.autoencoder.AutoencoderKL, params: {embed_dim: 4,
    ///       ddconfig: {double_z: true, z_channels: 4, ch: 32, ch_mult: [1, 1], num_res_blocks: 1, attn_resolutions: []}}},
    ///     cond_stage_config: {target: ldm.modules.encoders.modules.BERTEmbedder, params: {n_embed: 64, n_layer: 1}}}
    /// "#)?.build_uninit(&device)?;
    ///
    /// let out = model.txt2img(
    ///     &["a red circle on a blue background"],
    ///     None,                                        // negative prompt
    ///     16, 16, 7.5,                                 // height, width, guidance scale
    ///     SamplerOptions::new(SamplerKind::Ddim, 5),
    ///     &mut SeededNoise::new(42),
    ///     None,                                        // per-step callback
    /// )?;
    /// let (w, h, rgb) = &out.to_rgb8()[0];
    /// assert_eq!((*w, *h, rgb.len()), (16, 16, 16 * 16 * 3));
    /// # Ok(()) }
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn txt2img(
        &self,
        prompts: &[impl AsRef<str>],
        negative_prompt: Option<&str>,
        height: usize,
        width: usize,
        guidance_scale: f64,
        sampler: SamplerOptions,
        noise: &mut dyn NoiseSource,
        callback: Option<&mut dyn FnMut(StepInfo<'_>)>,
    ) -> Result<Generated> {
        let shape = self.latent_shape(prompts.len(), height, width)?;
        let cond = self.text_conditioning(prompts)?;
        let uncond = if guidance_scale != 1.0 {
            let neg = negative_prompt.unwrap_or("");
            Some(self.text_conditioning(&vec![neg; prompts.len()])?)
        } else {
            None
        };
        let request = SamplingRequest {
            uncond,
            guidance_scale,
            sampler,
            ..SamplingRequest::new(cond, shape)
        };
        self.generate(&request, noise, callback)
    }

    /// Samples with `request` and decodes.
    pub fn generate(
        &self,
        request: &SamplingRequest,
        noise: &mut dyn NoiseSource,
        callback: Option<&mut dyn FnMut(StepInfo<'_>)>,
    ) -> Result<Generated> {
        let latents = self.sample_latents(request, noise, callback)?;
        Ok(Generated {
            images: self.decode_latents(latents.clone()),
            latents,
        })
    }

    /// Class-conditional sampling (one image per label), guided away from `uncond_label` if given.
    pub fn sample_classes(
        &self,
        labels: &[usize],
        uncond_label: Option<usize>,
        guidance_scale: f64,
        sampler: SamplerOptions,
        noise: &mut dyn NoiseSource,
        callback: Option<&mut dyn FnMut(StepInfo<'_>)>,
    ) -> Result<Generated> {
        let shape = self.default_shape(labels.len())?;
        let cond = self.class_conditioning(labels)?;
        let uncond = match uncond_label {
            Some(u) if guidance_scale != 1.0 => {
                Some(self.class_conditioning(&vec![u; labels.len()])?)
            }
            _ => None,
        };
        let request = SamplingRequest {
            uncond,
            guidance_scale,
            sampler,
            ..SamplingRequest::new(cond, shape)
        };
        self.generate(&request, noise, callback)
    }

    /// Unconditional sampling of `n` images at the model's native size.
    pub fn sample_unconditional(
        &self,
        n: usize,
        sampler: SamplerOptions,
        noise: &mut dyn NoiseSource,
        callback: Option<&mut dyn FnMut(StepInfo<'_>)>,
    ) -> Result<Generated> {
        let shape = self.default_shape(n)?;
        let request = SamplingRequest {
            sampler,
            ..SamplingRequest::new(Conditioning::none(), shape)
        };
        self.generate(&request, noise, callback)
    }

    /// img2img: encode `image` `[B, 3, H, W]` in [−1, 1], noise it for `strength` and denoise under the
    /// prompts (one per image). The noise level is that of the first step that runs; see
    /// [`Img2ImgNoising`] for the reference's off-by-one.
    #[allow(clippy::too_many_arguments)]
    pub fn img2img(
        &self,
        image: Tensor<4>,
        prompts: &[impl AsRef<str>],
        negative_prompt: Option<&str>,
        strength: f64,
        guidance_scale: f64,
        sampler: SamplerOptions,
        noise: &mut dyn NoiseSource,
        callback: Option<&mut dyn FnMut(StepInfo<'_>)>,
    ) -> Result<Generated> {
        let [b, _, h, w] = image.dims();
        if prompts.len() != b {
            return Err(Error::Input(format!(
                "{} prompt(s) for {b} image(s)",
                prompts.len()
            )));
        }
        let shape = self.latent_shape(b, h, w)?;
        let z0 = self.encode_image(image, noise)?;
        let cond = self.text_conditioning(prompts)?;
        let uncond = if guidance_scale != 1.0 {
            Some(self.text_conditioning(&vec![negative_prompt.unwrap_or(""); b])?)
        } else {
            None
        };
        let request = SamplingRequest {
            uncond,
            guidance_scale,
            sampler,
            init: Some((z0, strength)),
            ..SamplingRequest::new(cond, shape)
        };
        self.generate(&request, noise, callback)
    }

    /// Inpainting: repaint where `mask` `[B, 1, H, W]` is 1 (≥ 0.5), keep `image` elsewhere.
    ///
    /// For concat-conditioned inpainting models (LDM `inpainting_big`) the input is built as
    /// `scripts/inpaint.py` does: the first-stage encoding of the masked image and the mask
    /// (both mapped to [−1, 1]) concatenated to the latent. For any other model the latent is
    /// blended with the noised known region before every step (`DDIMSampler.sample(mask, x0)`).
    /// Text prompts apply to text-conditioned models. The result is pasted back into `image`
    /// outside the mask.
    #[allow(clippy::too_many_arguments)]
    pub fn inpaint(
        &self,
        image: Tensor<4>,
        mask: Tensor<4>,
        prompts: Option<&[String]>,
        guidance_scale: f64,
        sampler: SamplerOptions,
        noise: &mut dyn NoiseSource,
        callback: Option<&mut dyn FnMut(StepInfo<'_>)>,
    ) -> Result<Generated> {
        check_image(&image, "image")?;
        let [b, _, h, w] = image.dims();
        if mask.dims() != [b, 1, h, w] {
            return Err(Error::Shape {
                what: "inpainting mask".into(),
                expected: format!("[{b}, 1, {h}, {w}]"),
                got: mask.dims().to_vec(),
            });
        }
        let mask = mask.greater_equal_elem(0.5).float();
        let shape = self.latent_shape(b, h, w)?;
        let (lh, lw) = (shape[2], shape[3]);
        let request = if matches!(self.cond_stage, CondStage::FirstStage) {
            // scripts/inpaint.py: masked_image = (1 − m)·image in [0, 1]; everything ·2 − 1.
            let image01 = image.clone().add_scalar(1.0).div_scalar(2.0);
            let masked = (image01 * mask.clone().neg().add_scalar(1.0))
                .mul_scalar(2.0)
                .sub_scalar(1.0);
            let c = self.first_stage.encode(masked, noise)?;
            let cc = resize_nearest(mask.clone().mul_scalar(2.0).sub_scalar(1.0), lh, lw);
            SamplingRequest {
                sampler,
                ..SamplingRequest::new(Conditioning::concat(Tensor::cat(vec![c, cc], 1)), shape)
            }
        } else {
            let z0 = self.encode_image(image.clone(), noise)?;
            let keep = resize_nearest(mask.clone(), lh, lw).neg().add_scalar(1.0);
            let (cond, uncond) = match prompts {
                Some(p) => (
                    self.text_conditioning(p)?,
                    if guidance_scale != 1.0 {
                        Some(self.text_conditioning(&vec![""; b])?)
                    } else {
                        None
                    },
                ),
                None => (Conditioning::none(), None),
            };
            SamplingRequest {
                uncond,
                guidance_scale,
                sampler,
                inpainting: Some(Inpainting { mask: keep, x0: z0 }),
                ..SamplingRequest::new(cond, shape)
            }
        };
        let latents = self.sample_latents(&request, noise, callback)?;
        let predicted = self.decode_latents(latents.clone());
        // Paste: (1 − m)·image + m·predicted.
        let images = image * mask.clone().neg().add_scalar(1.0) + predicted * mask;
        Ok(Generated { images, latents })
    }

    /// Super-resolution (LDM `bsr_sr`): the low-resolution image `[B, 3, h, w]` in [−1, 1] is the
    /// concat conditioning of a latent of the same size; the output is `downsample`× larger.
    pub fn upscale(
        &self,
        low_res: Tensor<4>,
        sampler: SamplerOptions,
        noise: &mut dyn NoiseSource,
        callback: Option<&mut dyn FnMut(StepInfo<'_>)>,
    ) -> Result<Generated> {
        check_image(&low_res, "low-resolution image")?;
        if !matches!(self.cond_stage, CondStage::Identity)
            || self.model.key != ConditioningKey::Concat
        {
            return Err(Error::Config(
                "upscaling needs a super-resolution model (concat conditioning on the low-res image)"
                    .into(),
            ));
        }
        let [b, _, h, w] = low_res.dims();
        let shape = self.latent_shape(b, h * self.downsample, w * self.downsample)?;
        let request = SamplingRequest {
            sampler,
            ..SamplingRequest::new(Conditioning::concat(low_res), shape)
        };
        self.generate(&request, noise, callback)
    }

    /// `[n, C, image_size, image_size]` at the UNet's nominal latent size.
    fn default_shape(&self, n: usize) -> Result<[usize; 4]> {
        let s = self.model.unet.image_size();
        self.latent_shape(n, s * self.downsample, s * self.downsample)
    }
}

fn cond_stage_name(c: &CondStage) -> &'static str {
    match c {
        CondStage::None => "none",
        CondStage::Clip { .. } => "CLIP text",
        CondStage::Bert { .. } => "BERT text",
        CondStage::Class(_) => "class",
        CondStage::Identity => "identity (image)",
        CondStage::FirstStage => "first stage (image)",
    }
}

/// Rejects images with a wrong channel count or NaN/inf values.
fn check_image(image: &Tensor<4>, what: &str) -> Result<()> {
    let d = image.dims();
    if d[1] != 3 {
        return Err(Error::Shape {
            what: what.into(),
            expected: "[B, 3, H, W]".into(),
            got: d.to_vec(),
        });
    }
    if !image.clone().sum().into_scalar::<f32>().is_finite() {
        return Err(Error::Input(format!(
            "{what} contains NaN or infinite values"
        )));
    }
    Ok(())
}

/// Nearest-neighbour resize (`F.interpolate(mode="nearest")`: source index ⌊i·in/out⌋).
fn resize_nearest(x: Tensor<4>, h: usize, w: usize) -> Tensor<4> {
    let [_, _, ih, iw] = x.dims();
    if (ih, iw) == (h, w) {
        return x;
    }
    let device = x.device();
    let rows: Vec<i64> = (0..h).map(|i| (i * ih / h) as i64).collect();
    let cols: Vec<i64> = (0..w).map(|j| (j * iw / w) as i64).collect();
    let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [h]), &device);
    let cols = Tensor::<1, Int>::from_data(TensorData::new(cols, [w]), &device);
    x.select(2, rows).select(3, cols)
}

/// Runs the sampler of `request` on any [`DiffusionModel`] trained on `schedule`: x_T (supplied or
/// drawn), or the img2img start from an init latent, classifier-free guidance, mask blending.
/// Returns the final latents. [`LatentDiffusion::sample_latents`] is this on its UNet.
pub fn run_request(
    model: &dyn DiffusionModel,
    schedule: &DiffusionSchedule,
    parameterization: Parameterization,
    request: &SamplingRequest,
    device: &burn::tensor::Device,
    noise: &mut dyn NoiseSource,
    callback: Option<&mut dyn FnMut(StepInfo<'_>)>,
) -> Result<Tensor<4>> {
    let shape = request.shape;
    if let Some(b) = request.cond.batch()
        && b != shape[0]
    {
        return Err(Error::Shape {
            what: "conditioning batch".into(),
            expected: format!("{}", shape[0]),
            got: vec![b],
        });
    }
    let mut scheduler = request.sampler.build(schedule, parameterization)?;
    let n = scheduler.num_steps();
    let (x, start) = match &request.init {
        None => {
            let x_t = match &request.x_t {
                Some(x) => {
                    if x.dims() != shape {
                        return Err(Error::Shape {
                            what: "initial noise x_T".into(),
                            expected: format!("{shape:?}"),
                            got: x.dims().to_vec(),
                        });
                    }
                    x.clone()
                }
                None => noise.noise(NoiseKind::Initial, 0, shape, device)?,
            };
            (x_t.mul_scalar(scheduler.init_noise_sigma()), 0)
        }
        Some((z0, strength)) => {
            if !(*strength > 0.0 && *strength <= 1.0) {
                return Err(Error::Input(format!(
                    "strength must be in (0, 1], got {strength}"
                )));
            }
            if z0.dims() != shape {
                return Err(Error::Shape {
                    what: "init latent".into(),
                    expected: format!("{shape:?}"),
                    got: z0.dims().to_vec(),
                });
            }
            // The reference's t_enc = int(strength · S) steps are run.
            let t_enc = (strength * n as f64) as usize;
            if t_enc == 0 {
                return Err(Error::Input(format!(
                    "strength {strength} with {n} steps runs no step; raise strength or steps"
                )));
            }
            let start = n - t_enc;
            let noise_index = match request.img2img_noising {
                Img2ImgNoising::FirstStep => start,
                Img2ImgNoising::Reference => start.saturating_sub(1),
            };
            let z = noise.noise(NoiseKind::Encode, 0, shape, device)?;
            (scheduler.add_noise(z0.clone(), z, noise_index), start)
        }
    };
    let mut denoiser = Guided::new(
        model,
        request.cond.clone(),
        request.uncond.clone(),
        request.guidance_scale,
    )?
    .with_rescale(request.guidance_rescale)?;
    tracing::info!(
        sampler = scheduler.name(),
        steps = n - start,
        scale = request.guidance_scale,
        rescale = request.guidance_rescale,
        ?shape,
        "sampling"
    );
    sample(
        scheduler.as_mut(),
        &mut denoiser,
        x,
        noise,
        SampleOptions {
            start,
            inpainting: request.inpainting.clone(),
            callback,
        },
    )
}
