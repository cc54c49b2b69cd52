//! `ldm`: generate images with latent diffusion models (CompVis LDM / Stable Diffusion v1) from
//! CompVis checkpoints + YAML, single-file SD checkpoints or diffusers folders.

mod bench;
mod commands;
mod demo;
mod output;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Latent diffusion on Burn: txt2img, img2img, inpainting, super-resolution, sampling.
#[derive(Parser)]
#[command(name = "ldm", version, about, long_about = None)]
struct Cli {
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Text to image (text-conditioned models: SD v1, LDM txt2img).
    Txt2img(commands::Txt2Img),
    /// Unconditional or class-conditional sampling.
    Sample(commands::Sample),
    /// Image to image: noise an init image and denoise it under a prompt.
    Img2img(commands::Img2Img),
    /// Inpainting: repaint the white part of a mask.
    Inpaint(commands::Inpaint),
    /// Super-resolution with an LDM-SR model (4x for bsr_sr).
    Upscale(commands::Upscale),
    /// Round trip through the first stage: image → latent → image.
    Autoencode(commands::Autoencode),
    /// Components, parameter counts and the key report of a checkpoint or preset.
    Inspect(commands::Inspect),
    /// Train a first stage or a latent diffusion model (Burn's Learner and its dashboard).
    #[command(subcommand)]
    Train(train::Train),
    /// Write a procedural dataset (the demo model's "shapes").
    #[command(subcommand)]
    Data(demo::Data),
    /// Score a model against its prompts (the demo model's "shapes" classifier).
    #[command(subcommand)]
    Eval(demo::Eval),
    /// Time the SD-v1 workloads (UNet step, VAE decode, CLIP, txt2img) with random weights.
    Bench(bench::Bench),
}

/// Which model to load and where to run it.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Checkpoint: CompVis/SD `.ckpt` or `.safetensors`, or a diffusers folder (default: the
    /// built-in demo model, 64x64 shapes: "a large red circle on a blue background").
    #[arg(long)]
    pub ckpt: Option<PathBuf>,
    /// CompVis YAML config (default: recognise the checkpoint's layout among the built-in presets).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Built-in preset instead of a config (sd-v1, ldm-txt2img-1p4B, cin256-v2, celebahq-ldm-vq-4,
    /// lsun_churches-ldm-kl-8, bsr_sr, inpainting_big).
    #[arg(long)]
    pub preset: Option<String>,
    /// Tokenizer file (tokenizer.json, CLIP vocab.json + merges.txt, BERT vocab.txt); default: built in.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Use the EMA weights (`model_ema.*`) of a training checkpoint.
    #[arg(long)]
    pub use_ema: bool,
    /// Continue when the checkpoint lacks parameters (they stay random; logged).
    #[arg(long)]
    pub allow_missing: bool,
    /// Device: cpu, ndarray, wgpu[:cpu|:N], vulkan, cuda[:N] (the backend must be compiled in).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// UNet precision: f32, f16, bf16 (norm statistics and softmax stay f32; the text encoder,
    /// autoencoder and sampler run in f32). Needs backend support (CUDA, wgpu with shader-f16; Flex: f16).
    #[arg(long, default_value = "f32")]
    pub precision: ldm::device::Precision,
}

/// mimalloc, kept from handing freed buffers back to the OS (`ldm::alloc`).
#[global_allocator]
static GLOBAL: ldm::alloc::MiMalloc = ldm::alloc::MiMalloc;

fn main() -> ExitCode {
    ldm::alloc::keep_freed_memory();
    let cli = Cli::parse();
    let level = if cli.quiet {
        "warn"
    } else {
        match cli.verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| format!("warn,ldm={level},ldm_cli={level}").into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::Txt2img(a) => commands::txt2img(a),
        Command::Sample(a) => commands::sample(a),
        Command::Img2img(a) => commands::img2img(a),
        Command::Inpaint(a) => commands::inpaint(a),
        Command::Upscale(a) => commands::upscale(a),
        Command::Autoencode(a) => commands::autoencode(a),
        Command::Inspect(a) => commands::inspect(a),
        Command::Train(t) => train::run(t),
        Command::Data(d) => demo::data(d),
        Command::Eval(e) => demo::eval(e),
        Command::Bench(b) => bench::run(b),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
