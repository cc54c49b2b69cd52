//! `ldm data shapes` and `ldm eval shapes`: the demo model's dataset and its prompt-adherence score.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use ldm::burn::tensor::{Tensor, TensorData};
use ldm::demo::shapes::{
    self, COLORS, Combo, SIZE, SizeClass, SplitMix64, classify, held_out, training_combos,
};
use ldm::io::StateDict;
use ldm::pipelines::SamplingRequest;
use ldm::schedulers::{SamplerKind, SeededNoise};

use crate::ModelArgs;
use crate::commands::{load, native_size};
use crate::output::{self, RgbImage};

/// Datasets.
#[derive(Subcommand, Debug)]
pub enum Data {
    /// 64x64 images of one coloured shape on a plain background, with captions
    /// ("a large red circle on a blue background"); 10% of the colour/shape/background
    /// combinations are held out of the training split.
    Shapes(DataShapes),
}

/// `ldm data shapes`.
#[derive(Args, Debug)]
pub struct DataShapes {
    /// Output folder (PNG images with .txt caption sidecars, the trainer's image-folder format).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 10_000)]
    pub n: usize,
    /// Seed (the dataset is a pure function of it).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Which combinations: train (held-out ones excluded), held-out, all.
    #[arg(long, default_value = "train")]
    pub split: String,
}

/// Evaluations.
#[derive(Subcommand, Debug)]
pub enum Eval {
    /// Generate held-out and seen shape prompts and score colour, background, shape and size with a
    /// deterministic classifier (background = border colour, shape from the fill ratio).
    Shapes(EvalShapes),
}

/// `ldm eval shapes`.
#[derive(Args, Debug)]
pub struct EvalShapes {
    /// Images per prompt (each held-out combination is prompted at both sizes).
    #[arg(long, default_value_t = 2)]
    pub per_prompt: usize,
    /// How many seen (training) combinations to score besides the held-out ones.
    #[arg(long, default_value_t = 17)]
    pub seen: usize,
    /// Sampler (default: as `ldm txt2img`).
    #[arg(long, default_value = "ddim")]
    pub sampler: SamplerKind,
    /// Sampling steps (default: as `ldm txt2img`).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// DDIM η.
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Guidance scale (default: the demo model's, as `ldm txt2img` uses it).
    #[arg(long, default_value_t = ldm::demo::GUIDANCE_SCALE)]
    pub scale: f64,
    /// Guidance rescale φ in [0, 1] (default: as `ldm txt2img`).
    #[arg(long, default_value_t = 0.0)]
    pub guidance_rescale: f64,
    /// Images per sampling batch.
    #[arg(long, default_value_t = 34)]
    pub batch: usize,
    /// Seed of the noise.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Write the generated images as grids here (one per group, captions in the PNG text).
    #[arg(long)]
    pub outdir: Option<PathBuf>,
    /// Also print the scores as one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Score the first stage instead of the diffusion model: for each prompt, draw its shape as
    /// `ldm data shapes` does (random placement from --seed), encode and decode it with the
    /// autoencoder, and classify the reconstruction. The result bounds what sampled images can
    /// score.
    #[arg(long)]
    pub reconstruct: bool,
    /// With --reconstruct: score this first stage (`first_stage.safetensors` from `ldm train
    /// autoencoder`) instead of the checkpoint's, e.g. before training a diffusion model on it.
    #[arg(long, requires = "reconstruct")]
    pub first_stage: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn data(d: Data) -> Result<()> {
    let Data::Shapes(a) = d;
    let combos = match a.split.as_str() {
        "train" => training_combos(),
        "held-out" => held_out(),
        "all" => Combo::all(),
        other => bail!("--split {other}: expected train, held-out or all"),
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let width = a.n.saturating_sub(1).max(1).to_string().len().max(5);
    let t = Instant::now();
    for i in 0..a.n {
        let spec = shapes::sample_spec(&combos, a.seed, i as u64);
        let rgb = shapes::render(&spec);
        let stem = a.out.join(format!("{i:0width$}"));
        image::RgbImage::from_raw(SIZE as u32, SIZE as u32, rgb)
            .expect("render gives SIZE·SIZE·3 bytes")
            .save(stem.with_extension("png"))
            .with_context(|| format!("writing {}", stem.display()))?;
        std::fs::write(stem.with_extension("txt"), spec.caption())?;
    }
    eprintln!(
        "{} images ({} split: {} combinations) in {} ({:.1}s)",
        a.n,
        a.split,
        combos.len(),
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Scores of one group of prompts.
#[derive(Default, Debug, Clone, Copy)]
struct Score {
    n: usize,
    color: usize,
    background: usize,
    shape: usize,
    size: usize,
    all: usize,
}

impl Score {
    /// Colour, background, shape, size and all-correct rates, in percent.
    fn percents(&self) -> [f64; 5] {
        [self.color, self.background, self.shape, self.size, self.all]
            .map(|k| 100.0 * k as f64 / self.n.max(1) as f64)
    }
    fn json(&self) -> String {
        let [c, b, sh, si, all] = self.percents();
        format!(
            "{{\"n\":{},\"color\":{c:.2},\"background\":{b:.2},\"shape\":{sh:.2},\"size\":{si:.2},\"all\":{all:.2}}}",
            self.n
        )
    }
}

pub fn eval(e: Eval) -> Result<()> {
    let Eval::Shapes(a) = e;
    if a.per_prompt == 0 || a.batch == 0 {
        bail!("--per-prompt and --batch must be at least 1");
    }
    let (mut pipe, device) = load(&a.model)?;
    if let Some(path) = &a.first_stage {
        let sd =
            StateDict::open(path).with_context(|| format!("first stage {}", path.display()))?;
        // load_weights logs what it loaded.
        pipe.model.first_stage.load_weights(&sd)?;
    }
    let size = native_size(&pipe);
    if size != SIZE {
        tracing::warn!(
            "the model's native size is {size}, the shapes are {SIZE}: sampling at {SIZE}"
        );
    }
    // Held-out combinations, and an evenly spread, fixed subset of the training ones.
    let held = held_out();
    let train = training_combos();
    let mut rng = SplitMix64::new(0xE7A1);
    let mut seen = train.clone();
    for i in (1..seen.len()).rev() {
        seen.swap(i, rng.below(i + 1));
    }
    seen.truncate(a.seen.min(train.len()));
    let mut prompts: Vec<(usize, Combo, SizeClass)> = Vec::new();
    for (group, combos) in [(0, &held), (1, &seen)] {
        for c in combos.iter() {
            for s in SizeClass::ALL {
                for _ in 0..a.per_prompt {
                    prompts.push((group, *c, s));
                }
            }
        }
    }
    let mut noise = SeededNoise::new(a.seed);
    let mut placement = SplitMix64::new(a.seed);
    let mut scores = [Score::default(); 2];
    let mut images: [Vec<RgbImage>; 2] = Default::default();
    let mut captions: [Vec<String>; 2] = Default::default();
    let t = Instant::now();
    let pb = indicatif::ProgressBar::new(prompts.len() as u64);
    for chunk in prompts.chunks(a.batch) {
        let text: Vec<String> = chunk.iter().map(|(_, c, s)| c.caption(*s)).collect();
        // Reconstructions of rendered shapes, or samples from the prompts.
        let z = if a.reconstruct {
            let mut pixels: Vec<f32> = Vec::with_capacity(chunk.len() * SIZE * SIZE * 3);
            for (_, combo, size) in chunk {
                let spec = shapes::spec_for(*combo, *size, &mut placement);
                pixels.extend(
                    shapes::render(&spec)
                        .into_iter()
                        .map(|v| 2.0 * (v as f32 / 255.0) - 1.0),
                );
            }
            let x = Tensor::<4>::from_data(
                TensorData::new(pixels, [chunk.len(), SIZE, SIZE, 3]),
                &device,
            )
            .permute([0, 3, 1, 2]);
            pipe.model.encode_image(x, &mut noise)?
        } else {
            let cond = pipe.model.text_conditioning(&text)?;
            let uncond = (a.scale != 1.0)
                .then(|| {
                    pipe.model
                        .text_conditioning(&vec![String::new(); text.len()])
                })
                .transpose()?;
            let mut sampler = pipe.sampler(a.sampler, a.steps);
            sampler.eta = a.eta;
            let request = SamplingRequest {
                uncond,
                guidance_scale: a.scale,
                guidance_rescale: a.guidance_rescale,
                sampler,
                ..SamplingRequest::new(cond, pipe.model.latent_shape(text.len(), SIZE, SIZE)?)
            };
            pipe.model.sample_latents(&request, &mut noise, None)?
        };
        let batch = output::to_images(pipe.model.decode_latents(z));
        score_batch(chunk, batch, text, &mut scores, &mut images, &mut captions);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "ldm eval shapes — {} ({}), {}, seed {}, {} images in {secs:.1}s",
        pipe.name,
        pipe.source.display(),
        if let Some(fs) = &a.first_stage {
            format!("reconstructions of rendered shapes by {}", fs.display())
        } else if a.reconstruct {
            "first-stage reconstructions of rendered shapes".to_string()
        } else {
            format!("{} {} steps, scale {}", a.sampler, a.steps, a.scale)
        },
        a.seed,
        prompts.len()
    );
    println!(
        "{:<38} {:>6} {:>8} {:>11} {:>8} {:>8} {:>17}",
        "prompts", "images", "colour", "background", "shape", "size", "prompt adherence"
    );
    let names = [
        format!("held-out ({} combinations x 2 sizes)", held.len()),
        format!("seen ({} combinations x 2 sizes)", seen.len()),
    ];
    for (name, s) in names.iter().zip(&scores) {
        let [c, b, sh, si, all] = s.percents();
        println!(
            "{name:<38} {:>6} {c:>7.1}% {b:>10.1}% {sh:>7.1}% {si:>7.1}% {all:>16.1}%",
            s.n
        );
    }
    if let Some(dir) = &a.outdir {
        std::fs::create_dir_all(dir)?;
        for (g, name) in ["held-out", "seen"].iter().enumerate() {
            if images[g].is_empty() {
                continue; // `--seen 0`: no grid to write
            }
            let path = dir.join(format!("{name}.png"));
            output::write_png(
                &path,
                &output::grid(&images[g], 2 * a.per_prompt),
                &captions[g].join(" | "),
            )?;
            println!(
                "{name} grid (rows: one combination at small then large): {}",
                path.display()
            );
        }
    }
    if a.json {
        println!(
            "{{\"held_out\":{},\"seen\":{},\"seconds\":{secs:.1}}}",
            scores[0].json(),
            scores[1].json()
        );
    }
    Ok(())
}

/// Classify a batch of images against their prompts, adding to the group scores and keeping the
/// images for the grids.
fn score_batch(
    chunk: &[(usize, Combo, SizeClass)],
    batch: Vec<RgbImage>,
    text: Vec<String>,
    scores: &mut [Score; 2],
    images: &mut [Vec<RgbImage>; 2],
    captions: &mut [Vec<String>; 2],
) {
    for ((group, combo, size), (img, caption)) in chunk.iter().zip(batch.into_iter().zip(text)) {
        let got = classify(&img.data, img.width, img.height);
        let sc = &mut scores[*group];
        sc.n += 1;
        let ok_color = got.color == Some(combo.color);
        let ok_bg = got.background == combo.background;
        let ok_shape = got.shape == Some(combo.shape);
        let ok_size = got.size == Some(*size);
        sc.color += ok_color as usize;
        sc.background += ok_bg as usize;
        sc.shape += ok_shape as usize;
        sc.size += ok_size as usize;
        sc.all += (ok_color && ok_bg && ok_shape && ok_size) as usize;
        tracing::debug!(
            "{caption}: background {}, colour {:?}, shape {:?}, size {:?} (fill {:.2}, area {})",
            COLORS[got.background].0,
            got.color.map(|c| COLORS[c].0),
            got.shape.map(|s| s.name()),
            got.size.map(|s| s.name()),
            got.fill_ratio,
            got.area
        );
        images[*group].push(img);
        captions[*group].push(caption);
    }
}
