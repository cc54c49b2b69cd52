//! Text to image in a few lines of library code.
//!
//! ```text
//! cargo run --release --example txt2img -- --ckpt v1-5-pruned-emaonly.safetensors --prompt "a photograph of an astronaut riding a horse"
//! cargo run --release --example txt2img --features wgpu -- --device wgpu --ckpt ...
//! cargo run --release --example txt2img --features cuda -- --device cuda:0 --ckpt ...
//! ```
//! `--ckpt` takes a CompVis/SD checkpoint (`.ckpt`, `.safetensors`; layout recognised, or give
//! `--config`) or a diffusers folder. Without `--ckpt` it runs the built-in demo model (64x64
//! shapes, trained by this project: `cargo xtask train-demo`), e.g. `--prompt "a small green
//! triangle on a white background"`.

use anyhow::Result;
use clap::Parser;
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
    /// Default: "a large red circle on a blue background" (the demo model's kind of prompt).
    #[arg(long)]
    prompt: Option<String>,
    /// ddim, plms, ddpm, dpm++2m, euler, euler-a
    #[arg(long, default_value = "ddim")]
    sampler: SamplerKind,
    #[arg(long, default_value_t = 50)]
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

/// mimalloc, kept from handing freed buffers back to the OS (`ldm::alloc`).
#[global_allocator]
static GLOBAL: ldm::alloc::MiMalloc = ldm::alloc::MiMalloc;

fn main() -> Result<()> {
    ldm::alloc::keep_freed_memory();
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
            eprintln!("no --ckpt: the built-in demo model (64x64 shapes)");
            let pipe = Pipeline::demo(&PipelineOptions::default(), &device)?;
            let sampler = pipe.sampler(args.sampler, args.steps);
            (pipe.model, sampler)
        }
    };
    let size = args
        .size
        .unwrap_or(model.model.unet.image_size() * model.downsample);
    let out = model.txt2img(
        &[args
            .prompt
            .as_deref()
            .unwrap_or("a large red circle on a blue background")],
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
