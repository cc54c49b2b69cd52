//! Project tasks: `cargo xtask <task>`.
//!
//! - `fixtures`: regenerate the parity fixtures in `tests/fixtures/` from the reference code
//!   (needs python3 with torch, numpy, safetensors, einops, pytorch-lightning, pillow, and
//!   checkouts of the reference repositories; see README.md).
//! - `ci`: run what `.ci/run` runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const GENERATORS: &[&str] = &[
    "gen_autoencoder.py",
    "gen_unet.py",
    "gen_conditioning.py",
    "gen_schedules.py",
    "gen_samplers.py",
    "gen_diffusers.py",
    "gen_pipelines.py",
    "gen_losses.py",
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("fixtures") => fixtures(&args[1..]),
        Some("ci") => run(Command::new("bash").arg(root().join(".ci/run"))),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n\
                 tasks:\n  fixtures [NAME..]  regenerate tests/fixtures from the reference (NAME: autoencoder, unet, conditioning, schedules, samplers, diffusers, pipelines, losses;\n                     tokenizer data: python3 xtask/fixtures/build_tokenizers.py, see its docstring)\n  \
                 ci                 run .ci/run\n\n\
                 fixtures needs LDM_REFERENCE and TAMING_REFERENCE (and SD2_REFERENCE for the UNet) pointing to\n\
                 checkouts of CompVis/latent-diffusion, CompVis/taming-transformers, Stability-AI/stablediffusion;\n\
                 `diffusers` needs diffusers 0.35.2 (pip install \"diffusers==0.35.2\" \"huggingface-hub<1\")."
            );
            if args.is_empty() {
                Ok(())
            } else {
                bail!("unknown task `{}`", args[0])
            }
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn fixtures(names: &[String]) -> Result<()> {
    let root = root();
    let out = root.join("tests/fixtures");
    for generator in GENERATORS {
        let stem = generator.trim_start_matches("gen_").trim_end_matches(".py");
        if !names.is_empty() && !names.iter().any(|n| n == stem) {
            continue;
        }
        let script = root.join("xtask/fixtures").join(generator);
        eprintln!("running {}", script.display());
        run(Command::new("python3").arg(&script).arg(&out))?;
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
