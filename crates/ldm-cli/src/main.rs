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

/// mimalloc, set by [`keep_freed_memory`] to hold freed pages for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Freed tensor buffers stay with the process for reuse instead of going back to the OS (the
/// resident size no longer shrinks after a peak, and peaks measured about 10% higher). glibc's malloc and
/// mimalloc's default purging hand large buffers back soon after they are freed, and the next
/// step's tensors then fault in freshly zeroed pages: measured on a 2-core machine, a quarter of an
/// SD UNet training step went to the kernel's page clearing (`ldm bench --workload unet-train-32`:
/// 15.2 s with glibc, 9.8 s with this, peak 7.6 GiB → 8.4 GiB; `unet-32` 3.7 s, 2.9 s). `MIMALLOC_PURGE_DELAY` still
/// overrides it.
fn keep_freed_memory() {
    // `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (libmimalloc-sys names the options
    // around it, 14 and 16, but not this one); its default, 10 ms in mimalloc 2 and 1000 ms in
    // mimalloc 3, is checked before setting. 1000 ms is not enough: a training step is longer.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: reading and setting a mimalloc option by index; no pointers involved.
    unsafe {
        if matches!(
            libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
            10 | 1000
        ) {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
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
