//! Text to image in a few lines of library code.
//!
//! ```text
//! cargo run --release --example txt2img -- --ckpt v1-5-pruned-emaonly.safetensors --prompt "a photograph of an astronaut riding a horse"
//! cargo run --release --example txt2img --features wgpu -- --device wgpu --ckpt ...
//! cargo run --release --example txt2img --features cuda -- --device cuda:0 --ckpt ...
//! ```
//! `--ckpt` takes a CompVis/SD checkpoint (`.ckpt`, `.safetensors`; layout recognised, or give
//! `--config`) or a diffusers folder. Without `--ckpt` it runs a tiny randomly initialised
//! text-to-image LDM (CLIP tokenizer and encoder, UNet with cross-attention, KL autoencoder) through
//! the whole pipeline and says so: the picture is noise, the plumbing is real.

use anyhow::Result;
use clap::Parser;
use ldm::io::LdmSpec;
use ldm::pipelines::{Pipeline, PipelineOptions};
use ldm::schedulers::{SamplerKind, SeededNoise};

#[derive(Parser)]
#[command(about = "Generate an image from a prompt with a latent diffusion model")]
struct Args {
    /// CompVis/SD checkpoint or diffusers folder.
    #[arg(long)]
    ckpt: Option<String>,
    /// CompVis YAML config (optional when the checkpoint's layout is recognised).
    #[arg(long)]
    config: Option<String>,
    #[arg(long, default_value = "a painting of a lighthouse at dusk")]
    prompt: String,
    /// ddim, plms, ddpm, dpm++2m, euler, euler-a
    #[arg(long, default_value = "dpm++2m")]
    sampler: SamplerKind,
    #[arg(long, default_value_t = 25)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    scale: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Image size (default: the model's native size).
    #[arg(long)]
    size: Option<usize>,
    #[arg(long, default_value = "txt2img.png")]
    output: String,
    /// cpu | ndarray | wgpu[:cpu|:N] | vulkan | cuda[:N]
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// A tiny text-to-image LDM in the CompVis schema (random weights).
const TINY: &str = r#"
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params: {linear_start: 0.00085, linear_end: 0.012, timesteps: 1000, conditioning_key: crossattn, scale_factor: 0.18215,
    unet_config: {target: ldm.modules.diffusionmodules.openaimodel.UNetModel, params: {image_size: 16, in_channels: 4,
      out_channels: 4, model_channels: 32, attention_resolutions: [2], num_res_blocks: 1, channel_mult: [1, 2],
      num_heads: 2, use_spatial_transformer: true, context_dim: 768, legacy: false}},
    first_stage_config: {target: ldm.models.autoencoder.AutoencoderKL, params: {embed_dim: 4, ddconfig: {double_z: true,
      z_channels: 4, resolution: 64, in_channels: 3, out_ch: 3, ch: 32, ch_mult: [1, 2, 4], num_res_blocks: 1,
      attn_resolutions: [], dropout: 0.0}}},
    cond_stage_config: {target: ldm.modules.encoders.modules.FrozenCLIPEmbedder}}
"#;

fn main() -> Result<()> {
    let args = Args::parse();
    let device = ldm::device::parse_device(&args.device)?;
    let start = std::time::Instant::now();
    let (model, spacing) = match &args.ckpt {
        Some(path) => {
            let options = PipelineOptions {
                config: args.config.clone().map(Into::into),
                ..Default::default()
            };
            let pipe = Pipeline::from_files(path, &options, &device)?;
            let sampler = pipe.sampler(args.sampler, args.steps);
            (pipe.model, sampler)
        }
        None => {
            eprintln!(
                "no --ckpt: a tiny model with RANDOM weights (the image is noise; the pipeline is real)"
            );
            let model = LdmSpec::from_yaml_str(TINY)?.build_uninit(&device)?;
            let sampler = ldm::schedulers::SamplerOptions::new(args.sampler, args.steps);
            (model, sampler)
        }
    };
    let size = args
        .size
        .unwrap_or(model.model.unet.image_size() * model.downsample);
    let out = model.txt2img(
        &[args.prompt.as_str()],
        None,
        size,
        size,
        args.scale,
        spacing,
        &mut SeededNoise::new(args.seed),
        None,
    )?;
    let (w, h, rgb) = out.to_rgb8().remove(0);
    image::RgbImage::from_raw(w as u32, h as u32, rgb)
        .expect("buffer size")
        .save(&args.output)?;
    println!("wrote {} ({w}x{h}) in {:.1?}", args.output, start.elapsed());
    Ok(())
}
