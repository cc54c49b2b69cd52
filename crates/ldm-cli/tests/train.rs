//! `ldm train` end to end on tiny configs: the first stage and a text-conditioned LDM train (loss
//! going down), and the checkpoint `ldm train diffusion` writes samples with `ldm txt2img`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

const AE_YAML: &str = r#"
model:
  base_learning_rate: 1.0e-3
  target: ldm.models.autoencoder.AutoencoderKL
  params:
    embed_dim: 4
    lossconfig:
      target: ldm.modules.losses.LPIPSWithDiscriminator
      params: {disc_start: 6, kl_weight: 1.0e-06, disc_weight: 0.5, disc_num_layers: 2, disc_ndf: 16}
    ddconfig: {double_z: true, z_channels: 4, resolution: 32, in_channels: 3, out_ch: 3, ch: 32,
               ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}
"#;

const LDM_YAML: &str = r#"
model:
  base_learning_rate: 5.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.012
    timesteps: 1000
    cond_stage_key: caption
    conditioning_key: crossattn
    scale_factor: 0.5
    cond_stage_trainable: true
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {image_size: 16, in_channels: 4, out_channels: 4, model_channels: 32, attention_resolutions: [2],
               num_res_blocks: 1, channel_mult: [1, 2], num_heads: 2, use_spatial_transformer: true,
               context_dim: 32}
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig: {double_z: true, z_channels: 4, resolution: 32, in_channels: 3, out_ch: 3, ch: 32,
                   ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}
        lossconfig: {target: torch.nn.Identity}
    cond_stage_config:
      target: ldm.modules.encoders.modules.BERTEmbedder
      params: {n_embed: 32, n_layer: 1}
"#;

fn shapes(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let colors = [
        ([220u8, 40, 40], "red"),
        ([40, 200, 60], "green"),
        ([40, 60, 220], "blue"),
        ([230, 220, 40], "yellow"),
    ];
    for i in 0..n {
        let (fg, name) = colors[i % 4];
        let (bg, bname) = colors[(i + 2) % 4];
        let (x0, y0) = (4 + (i * 3) % 10, 5 + (i * 5) % 9);
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            let inside = (x as usize) >= x0
                && (x as usize) < x0 + 14
                && (y as usize) >= y0
                && (y as usize) < y0 + 14;
            image::Rgb(if inside { fg } else { bg })
        });
        img.save(dir.join(format!("{i:03}.png"))).unwrap();
        std::fs::write(
            dir.join(format!("{i:03}.txt")),
            format!("a {name} square on a {bname} background"),
        )
        .unwrap();
    }
}

fn csv_column(path: &Path, name: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let i = header.iter().position(|h| *h == name).unwrap();
    lines
        .map(|l| l.split(',').nth(i).unwrap().parse().unwrap())
        .collect()
}

/// The `scale_factor` a checkpoint written by `ldm train diffusion` holds.
fn scale_factor(ckpt: &Path) -> f32 {
    let bytes = std::fs::read(ckpt).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let sf = st.tensor("scale_factor").unwrap();
    f32::from_le_bytes(sf.data()[..4].try_into().unwrap())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `ldm train WHAT --config YAML --data DATA --out OUT --size 32 EXTRA..` (every run here trains
/// on the 32-px squares of [`shapes`]).
fn ldm_train(what: &str, yaml: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let (yaml, data, out) = (s(yaml), s(data), s(out));
    let mut args = vec![
        "train", what, "--config", &yaml, "--data", &data, "--out", &out, "--size", "32",
    ];
    args.extend_from_slice(extra);
    ldm(&args)
}

#[test]
fn train_autoencoder_cli_runs_with_the_plain_renderer() {
    let dir = temp_dir("train-ae");
    shapes(&dir.join("data"), 8);
    let yaml = dir.join("ae.yaml");
    std::fs::write(&yaml, AE_YAML).unwrap();
    let out = dir.join("run");
    let o = ldm_train(
        "autoencoder",
        &yaml,
        &dir.join("data"),
        &out,
        &[
            "--batch-size",
            "2",
            "--steps-per-epoch",
            "10",
            "--sample-every",
            "5",
        ],
    );
    assert_ok(&o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("perceptual term is OFF"),
        "LPIPS-off warning missing"
    );
    let disc = csv_column(&out.join("losses.csv"), "disc_loss");
    assert_eq!(disc.len(), 10);
    assert!(
        disc[..6].iter().all(|d| *d == 0.0) && disc[6..].iter().all(|d| *d > 0.0),
        "{disc:?}"
    );
    assert!(out.join("samples/step-0000005.png").is_file());
    assert!(std::fs::read_dir(out.join("checkpoint")).unwrap().count() > 0);
    // The exported weights are a CompVis first stage: `ldm autoencode` can use them via a config.
    assert!(out.join("first_stage.safetensors").is_file());
    // Fine-tuning: --init-from those weights starts at the trained reconstruction loss, not at a
    // fresh network's (same seed, so the same first batch and the same fresh init otherwise).
    let fine_tune = |out: &Path, init: Option<&Path>| {
        let mut args = vec![
            "train".to_string(),
            "autoencoder".into(),
            "--config".into(),
            s(&yaml),
            "--data".into(),
            s(&dir.join("data")),
            "--out".into(),
            s(out),
            "--size".into(),
            "32".into(),
            "--batch-size".into(),
            "2".into(),
            "--steps-per-epoch".into(),
            "2".into(),
        ];
        if let Some(init) = init {
            args.extend(["--init-from".into(), s(init)]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ldm(&args)
    };
    let o = fine_tune(
        &dir.join("tuned"),
        Some(&out.join("first_stage.safetensors")),
    );
    assert_ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("fine-tuning the first stage"));
    let o = fine_tune(&dir.join("fresh"), None);
    assert_ok(&o);
    let tuned = csv_column(&dir.join("tuned/losses.csv"), "rec_loss")[0];
    let fresh = csv_column(&dir.join("fresh/losses.csv"), "rec_loss")[0];
    eprintln!("first reconstruction loss: fine-tune {tuned:.4}, fresh {fresh:.4}");
    assert!(
        tuned < fresh,
        "--init-from did not start from the trained weights: {tuned} vs fresh {fresh}"
    );
    // A missing file is an error that names the flag.
    let o = fine_tune(&dir.join("missing"), Some(&dir.join("nope.safetensors")));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--init-from"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn train_diffusion_then_sample_the_checkpoint() {
    let dir = temp_dir("train-ldm");
    shapes(&dir.join("data"), 8);
    let yaml = dir.join("ldm.yaml");
    std::fs::write(&yaml, LDM_YAML).unwrap();
    let out = dir.join("run");
    let o = ldm_train(
        "diffusion",
        &yaml,
        &dir.join("data"),
        &out,
        &[
            "--batch-size",
            "4",
            "--steps-per-epoch",
            "30",
            "--lr",
            "1e-3",
            "--ema-decay",
            "0.99",
            "--sample-every",
            "15",
        ],
    );
    assert_ok(&o);
    let loss = csv_column(&out.join("losses.csv"), "loss");
    assert_eq!(loss.len(), 30);
    assert!(
        out.join("samples/step-0000015.png").is_file()
            && out.join("samples/step-0000030.png").is_file()
    );
    let (first, last) = (
        loss[..10].iter().sum::<f64>() / 10.0,
        loss[20..].iter().sum::<f64>() / 10.0,
    );
    eprintln!("denoising loss: first 10 steps {first:.4}, last 10 steps {last:.4}");
    assert!(
        last < first,
        "denoising loss did not go down: {first} -> {last}"
    );
    // The written checkpoint + YAML sample with the ordinary command.
    let samples = dir.join("samples");
    let o = ldm(&[
        "txt2img",
        "--ckpt",
        &s(&out.join("model.safetensors")),
        "--config",
        &s(&out.join("config.yaml")),
        "--prompt",
        "a red square on a blue background",
        "-H",
        "32",
        "-W",
        "32",
        "--steps",
        "5",
        "--outdir",
        &s(&samples),
    ]);
    assert_ok(&o);
    // A checkpoint samples at txt2img's default guidance (SD's 7.5; only the built-in demo model
    // has its own).
    let png = std::fs::read(samples.join("samples/00000.png")).unwrap();
    assert!(String::from_utf8_lossy(&png).contains("CFG scale: 7.5,"));
    // Fine-tuning: --init-from the trained checkpoint continues from its weights (the first
    // loss is already at the trained level, not back at the random one).
    // With `scale_by_std` on, a fine-tune keeps the checkpoint's scale_factor (the reference's
    // `restarted_from_ckpt`) instead of measuring 1/std(z) on its first batch.
    let by_std = dir.join("ldm-by-std.yaml");
    std::fs::write(
        &by_std,
        LDM_YAML.replace(
            "scale_factor: 0.5",
            "scale_factor: 1.0\n    scale_by_std: true",
        ),
    )
    .unwrap();
    // A fine-tune of the trained checkpoint on the scale_by_std config: `steps` steps, `extra` flags.
    let fine_tune = |run: &Path, steps: &str, extra: &[&str]| {
        let mut args = vec![
            "train".to_string(),
            "diffusion".into(),
            "--config".into(),
            s(&by_std),
            "--data".into(),
            s(&dir.join("data")),
            "--out".into(),
            s(run),
            "--init-from".into(),
            s(&out.join("model.safetensors")),
            "--size".into(),
            "32".into(),
            "--batch-size".into(),
            "4".into(),
            "--steps-per-epoch".into(),
            steps.into(),
            "--ema-decay".into(),
            "0".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_ok(&ldm(&args));
    };
    let out2 = dir.join("finetune");
    fine_tune(&out2, "5", &["--lr", "1e-4"]);
    let tuned = csv_column(&out2.join("losses.csv"), "loss");
    let tuned_mean = tuned.iter().sum::<f64>() / tuned.len() as f64;
    eprintln!("fine-tuning loss over 5 steps: {tuned_mean:.4} (fresh start: {first:.4})");
    assert!(
        tuned_mean < first,
        "fine-tuning did not start from the trained weights"
    );
    let sf = scale_factor(&out2.join("model.safetensors"));
    assert_eq!(
        sf, 0.5,
        "the fine-tune replaced the checkpoint's scale_factor"
    );
    // --first-stage with --init-from swaps in another first stage, and scale_by_std measures the
    // scale of its latents. A copy of the checkpoint's own first stage whose quant_conv gives
    // twice the mean and twice the std (log-variance + ln 4) encodes every image to exactly
    // twice the latent: the measured scale_factor halves.
    let scaled = dir.join("first-stage-x2.safetensors");
    {
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for (name, view) in st.tensors() {
            let Some(key) = name.strip_prefix("first_stage_model.") else {
                continue;
            };
            let mut v: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            // quant_conv: 1x1, 2·4 output channels (mean, then log-variance), 8 inputs.
            if key == "quant_conv.weight" {
                v[..4 * 8].iter_mut().for_each(|w| *w *= 2.0);
            }
            if key == "quant_conv.bias" {
                v[..4].iter_mut().for_each(|b| *b *= 2.0);
                v[4..].iter_mut().for_each(|b| *b += 4f32.ln());
            }
            tensors.push((key.to_string(), view.shape().to_vec(), v));
        }
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((k, shape, _), b)| {
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                        .unwrap();
                (k.clone(), view)
            })
            .collect();
        safetensors::serialize_to_file(views, None, &scaled).unwrap();
    }
    let measured = |first_stage: &Path, name: &str| {
        let run = dir.join(name);
        fine_tune(&run, "1", &["--first-stage", &s(first_stage)]);
        scale_factor(&run.join("model.safetensors"))
    };
    let own = measured(&out.join("model.safetensors"), "own-first-stage");
    let doubled = measured(&scaled, "doubled-first-stage");
    eprintln!("measured scale_factor: own first stage {own}, doubled latents {doubled}");
    assert!(own != 0.5, "--first-stage did not re-measure the scale");
    assert!(
        (doubled / own - 0.5).abs() < 1e-3,
        "--first-stage was not the first stage trained on: {own} vs {doubled}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A `scale_by_std` run with EMA, resumed from its epoch-1 checkpoint, continues exactly as the
/// uninterrupted run: the same losses (the measured scale_factor comes back, not the config's)
/// and the same EMA weights at the end. A resume without the trainer state of that epoch (a
/// checkpoint from an older version) is refused with an explanation instead of training on
/// latents at the wrong scale.
#[test]
fn train_diffusion_resumes_exactly() {
    let dir = temp_dir("resume-ldm");
    shapes(&dir.join("data"), 8);
    let yaml = dir.join("ldm-by-std.yaml");
    std::fs::write(
        &yaml,
        LDM_YAML.replace(
            "scale_factor: 0.5",
            "scale_factor: 1.0\n    scale_by_std: true",
        ),
    )
    .unwrap();
    let train = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "--batch-size",
            "4",
            "--epochs",
            "2",
            "--steps-per-epoch",
            "4",
            "--lr",
            "1e-3",
            "--ema-decay",
            "0.9",
        ];
        args.extend_from_slice(extra);
        ldm_train("diffusion", &yaml, &dir.join("data"), out, &args)
    };
    let a = dir.join("a");
    assert_ok(&train(&a, &[]));
    assert!(a.join("checkpoint/trainer-2.safetensors").is_file());
    // B: epoch 1's checkpoint of A (Burn's files and the trainer state), then epoch 2 again.
    let b = dir.join("b");
    let copy_epoch_1 = |to: &Path, with_state: bool| {
        std::fs::create_dir_all(to.join("checkpoint")).unwrap();
        for f in std::fs::read_dir(a.join("checkpoint")).unwrap() {
            let p = f.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.contains("-1.") && (with_state || !name.starts_with("trainer")) {
                std::fs::copy(&p, to.join("checkpoint").join(&name)).unwrap();
            }
        }
    };
    copy_epoch_1(&b, true);
    assert_ok(&train(&b, &["--resume", "1"]));
    let (la, lb) = (
        csv_column(&a.join("losses.csv"), "loss"),
        csv_column(&b.join("losses.csv"), "loss"),
    );
    assert_eq!((la.len(), lb.len()), (8, 4));
    for (i, (x, y)) in la[4..].iter().zip(&lb).enumerate() {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs().max(1e-6),
            "step {}: resumed loss {y} vs uninterrupted {x}",
            i + 4
        );
    }
    let (fa, fb) = (
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap(),
    );
    let (ta, tb) = (
        safetensors::SafeTensors::deserialize(&fa).unwrap(),
        safetensors::SafeTensors::deserialize(&fb).unwrap(),
    );
    let floats = |v: safetensors::tensor::TensorView<'_>| -> Vec<f32> {
        v.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let mut compared = 0;
    for (k, va) in ta.tensors() {
        if !k.starts_with("model.diffusion_model.") && k != "scale_factor" {
            continue;
        }
        let (x, y) = (floats(va), floats(tb.tensor(&k).unwrap()));
        let scale = x.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let err = x
            .iter()
            .zip(&y)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(err <= 1e-4 * scale, "{k}: resumed EMA differs by {err}");
        compared += 1;
    }
    assert!(compared > 10, "compared only {compared} tensors");
    // Without the trainer state the resume is refused (clear error, no training at scale 1).
    let c = dir.join("c");
    copy_epoch_1(&c, false);
    assert_fails(&train(&c, &["--resume", "1"]), "scale_by_std");
    assert!(!c.join("losses.csv").exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// `--seed` reproduces a run from scratch: fresh weights (autoencoder, discriminator, UNet, BERT)
/// come from the seeded backend RNG, and each diffusion batch's draws are keyed by its place in
/// the epoch, not by which of two devices starts its step first; so two runs with one seed write
/// the same weights and another seed does not. (Before, the initial weights were unseeded: two
/// first stages of the demo recipe started from different weights and ended up to 1.1 apart.)
#[test]
fn the_same_seed_trains_the_same_weights() {
    let dir = temp_dir("seed");
    shapes(&dir.join("data"), 8);
    let (ae_yaml, ldm_yaml) = (dir.join("ae.yaml"), dir.join("ldm.yaml"));
    std::fs::write(&ae_yaml, AE_YAML).unwrap();
    // scale_by_std: measured on the first batch, before either device's first step.
    let by_std = LDM_YAML.replace(
        "scale_factor: 0.5",
        "scale_factor: 1.0\n    scale_by_std: true",
    );
    std::fs::write(&ldm_yaml, by_std).unwrap();
    let data = dir.join("data");
    // 8 steps: the discriminator (from step 6) takes part too.
    let train = |what: &str, yaml: &Path, name: &str, seed: &str, device: &str| {
        let out = dir.join(name);
        assert_ok(&ldm_train(
            what,
            yaml,
            &data,
            &out,
            &[
                "--batch-size",
                "2",
                "--steps-per-epoch",
                "8",
                "--seed",
                seed,
                "--device",
                device,
            ],
        ));
        out
    };
    let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    for (what, yaml, file, device) in [
        ("autoencoder", &ae_yaml, "first_stage.safetensors", "cpu"),
        ("diffusion", &ldm_yaml, "model.safetensors", "cpu,cpu"),
    ] {
        let a = read(train(what, yaml, &format!("{what}-a"), "5", device).join(file));
        let b = read(train(what, yaml, &format!("{what}-b"), "5", device).join(file));
        let c = read(train(what, yaml, &format!("{what}-c"), "6", device).join(file));
        assert!(
            a == b,
            "train {what}: two runs with --seed 5 wrote different weights"
        );
        assert!(
            a != c,
            "train {what}: --seed 5 and --seed 6 wrote the same weights"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `--cache-latents` keeps each image's first-stage posterior and skips the encoder when the image
/// comes round again, and trains as without it: each step still draws its latent from the same
/// posterior with the same key, so the losses match step by step (the first epoch's exactly, the
/// later ones to float noise: the cached moments were computed in another batch), and the log
/// says how many encodings the cache saved.
#[test]
fn cached_latents_train_as_uncached_ones() {
    let dir = temp_dir("cache-latents");
    shapes(&dir.join("data"), 8);
    let yaml = dir.join("ldm.yaml");
    std::fs::write(&yaml, LDM_YAML).unwrap();
    let train = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        let mut args = vec![
            "--flip",
            "--batch-size",
            "4",
            "--epochs",
            "3",
            "--steps-per-epoch",
            "2",
            "--lr",
            "1e-3",
            "--seed",
            "3",
        ];
        args.extend_from_slice(extra);
        let o = ldm_train("diffusion", &yaml, &dir.join("data"), &out, &args);
        assert_ok(&o);
        (
            csv_column(&out.join("losses.csv"), "loss"),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (plain, plain_log) = train("plain", &[]);
    let (cached, log) = train("cached", &["--cache-latents"]);
    assert_eq!((plain.len(), cached.len()), (6, 6));
    for (i, (x, y)) in plain.iter().zip(&cached).enumerate() {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs().max(1e-6),
            "step {i}: loss {y} with --cache-latents, {x} without"
        );
    }
    assert_eq!(
        plain[..2],
        cached[..2],
        "the first epoch encodes every image as before"
    );
    // 3 epochs of the same 8 images: 8 encoded, 16 reused (the validation pass adds its own).
    assert!(
        log.contains("latent cache: ") && log.contains(" encoded; 8 images held"),
        "{log}"
    );
    let reused: usize = log
        .split("latent cache: ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {log}"));
    assert!(reused >= 16, "{reused} images reused: {log}");
    assert!(!plain_log.contains("latent cache"), "{plain_log}");
    std::fs::remove_dir_all(&dir).ok();
}
