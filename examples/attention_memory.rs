//! Peak memory of one SD-v1-size attention layer at a 64x64 latent (4096 tokens, batch 2 as with
//! classifier-free guidance, 8 heads x 40), fused vs sliced. The full score matrix would be
//! 2 x 8 x 4096 x 4096 floats = 1 GiB.
//!
//! ```text
//! cargo run --release --example attention_memory -- fused
//! cargo run --release --example attention_memory -- sliced 512
//! ```
//! Prints the process' peak resident set (Linux `VmHWM`); run each mode in its own process.

use anyhow::{Result, bail};
use burn::tensor::module::attention_fallback;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, Tensor};
use ldm::models::attention::CrossAttention;
use ldm::nn::attention::AttentionMode;

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// mimalloc, kept from handing freed buffers back to the OS (`ldm::alloc`).
#[global_allocator]
static GLOBAL: ldm::alloc::MiMalloc = ldm::alloc::MiMalloc;

fn main() -> Result<()> {
    ldm::alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let device = ldm::device::parse_device(args.get(2).map(String::as_str).unwrap_or("cpu"))?;
    device.seed(0);
    if args.first().map(String::as_str) == Some("naive") {
        // Burn's decomposed attention (matmul + softmax + matmul): materialises the scores.
        let q = Tensor::<4>::random([2, 8, 4096, 40], Distribution::Normal(0.0, 1.0), &device);
        let (k, v) = (q.clone().flip([2]), q.clone().mul_scalar(0.5));
        let before = peak_rss_mib().unwrap_or(f64::NAN);
        let y = attention_fallback(q, k, v, None, None, AttentionModuleOptions::default());
        let sum = y.sum().into_scalar::<f32>();
        println!(
            "mode naive (scores materialised): checksum {sum:.4}, peak RSS before {before:.0} MiB, after {:.0} MiB",
            peak_rss_mib().unwrap_or(f64::NAN)
        );
        return Ok(());
    }
    let mode = match args.first().map(String::as_str) {
        Some("fused") | None => AttentionMode::Fused,
        Some("sliced") => {
            AttentionMode::Sliced(args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(512))
        }
        Some("auto") => AttentionMode::auto(),
        Some(other) => bail!("unknown mode `{other}` (naive, fused, sliced [N], auto)"),
    };
    let mut attn = CrossAttention::new(320, None, 8, 40, 0.0, &device);
    attn.attention_mode = mode;
    let x = Tensor::<3>::random([2, 4096, 320], Distribution::Normal(0.0, 1.0), &device);
    let before = peak_rss_mib().unwrap_or(f64::NAN);
    let start = std::time::Instant::now();
    let y = attn.forward(x, None);
    let sum = y.sum().into_scalar::<f32>();
    println!(
        "mode {mode:?}: {:.2?}, checksum {sum:.4}, peak RSS before {before:.0} MiB, after {:.0} MiB",
        start.elapsed(),
        peak_rss_mib().unwrap_or(f64::NAN)
    );
    Ok(())
}
