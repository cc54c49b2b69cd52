//! Encode an image to the latent space of a first-stage autoencoder and decode it back.
//!
//! ```text
//! cargo run --release --example autoencode -- --ckpt v1-5-pruned-emaonly.safetensors --input in.png --output out.png
//! cargo run --release --example autoencode --features wgpu -- --device wgpu ...
//! ```
//! Without `--ckpt` it runs a randomly initialised kl-f8 (a smoke run that says so).

use anyhow::{Result, bail};
use clap::Parser;
use ldm::io::StateDict;
use ldm::models::autoencoder::AutoencoderKLConfig;

#[derive(Parser)]
#[command(about = "Round-trip an image through a KL first stage (CompVis layout weights)")]
struct Args {
    /// Checkpoint holding the first stage (`.ckpt` or `.safetensors`, CompVis/SD layout).
    #[arg(long)]
    ckpt: Option<String>,
    /// Preset: kl-f4, kl-f8 (SD v1), kl-f16, kl-f32.
    #[arg(long, default_value = "kl-f8")]
    preset: String,
    /// Input image (its sides must be multiples of the downsampling factor).
    #[arg(long)]
    input: Option<String>,
    /// Where to write the reconstruction.
    #[arg(long, default_value = "reconstruction.png")]
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
    let cfg = match args.preset.as_str() {
        "kl-f4" => AutoencoderKLConfig::kl_f4(),
        "kl-f8" => AutoencoderKLConfig::kl_f8(),
        "kl-f16" => AutoencoderKLConfig::kl_f16(),
        "kl-f32" => AutoencoderKLConfig::kl_f32(),
        other => bail!("unknown preset `{other}` (kl-f4, kl-f8, kl-f16, kl-f32)"),
    };
    let f = cfg.ddconfig.downsampling_factor();
    let mut vae = cfg.init(&device);
    match &args.ckpt {
        Some(path) => println!("{}", vae.load_weights(&StateDict::open(path)?)?),
        None => eprintln!("no --ckpt: using RANDOM weights (smoke run only)"),
    }
    let x = match &args.input {
        Some(path) => ldm_examples::load_image(path, &device)?,
        None => {
            eprintln!("no --input: using a synthetic 64x64 gradient");
            let ramp = burn::tensor::Tensor::<1, burn::tensor::Int>::arange(0..64, &device).float()
                / 32.0
                - 1.0;
            ramp.clone().reshape([1, 1, 1, 64]).expand([1, 3, 64, 64])
        }
    };
    let [_, _, h, w] = x.dims();
    if h % f != 0 || w % f != 0 {
        bail!("image is {w}x{h}; both sides must be multiples of {f} for this first stage");
    }
    let start = std::time::Instant::now();
    let posterior = vae.encode(x);
    println!("latent {:?}", posterior.mean.dims());
    let recon = vae.decode(posterior.mode());
    ldm_examples::save_image(recon, &args.output)?;
    println!("wrote {} in {:.2?}", args.output, start.elapsed());
    Ok(())
}
