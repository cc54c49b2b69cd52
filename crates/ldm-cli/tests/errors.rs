//! Bad input gets a clear error and a non-zero exit code — never a panic — and nothing in
//! `--outdir` is overwritten.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A text-conditioned tiny model (BERT + VQ) as `.safetensors` + YAML.
fn model(dir: &Path) -> (PathBuf, PathBuf) {
    let fx = fixture();
    let tensors = spec_tensors(&meta(&fx, "vq_bert.weights"), &meta(&fx, "vq_bert.seeds"));
    let ckpt = dir.join("model.safetensors");
    write_safetensors(&ckpt, &tensors);
    let yaml = dir.join("config.yaml");
    std::fs::write(&yaml, fx.meta_json("vq_bert.yaml")).unwrap();
    (ckpt, yaml)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Runs `txt2img` with extra args into `outdir`.
fn txt2img(ckpt: &Path, yaml: &Path, outdir: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "txt2img".to_string(),
        "--prompt".into(),
        "a red circle".into(),
        "--ckpt".into(),
        s(ckpt),
        "--config".into(),
        s(yaml),
        "--steps".into(),
        "2".into(),
        "--outdir".into(),
        s(outdir),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ldm(&args)
}

#[test]
fn bad_inputs_fail_cleanly_and_never_touch_existing_outputs() {
    let dir = temp_dir("errors");
    let (ckpt, yaml) = model(&dir);
    let outdir = dir.join("out");
    std::fs::create_dir_all(outdir.join("samples")).unwrap();
    let marker = b"not really a png, but the user's file".to_vec();
    std::fs::write(outdir.join("samples/00000.png"), &marker).unwrap();
    std::fs::write(outdir.join("grid-0000.png"), &marker).unwrap();

    // Truncated checkpoints (.safetensors and .ckpt).
    let bytes = std::fs::read(&ckpt).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&txt2img(&truncated, &yaml, &outdir, &[]), "cannot read");
    let ck = dir.join("model.ckpt");
    let fx = fixture();
    ldm_tests::ckpt::write_torch_checkpoint(
        &ck,
        &spec_tensors(&meta(&fx, "vq_bert.weights"), &meta(&fx, "vq_bert.seeds")),
        true,
    )
    .unwrap();
    let ck_bytes = std::fs::read(&ck).unwrap();
    let truncated_ckpt = dir.join("truncated.ckpt");
    std::fs::write(&truncated_ckpt, &ck_bytes[..ck_bytes.len() / 3]).unwrap();
    assert_fails(
        &txt2img(&truncated_ckpt, &yaml, &outdir, &[]),
        "cannot read",
    );
    std::fs::write(dir.join("empty.ckpt"), b"").unwrap();
    assert_fails(
        &txt2img(&dir.join("empty.ckpt"), &yaml, &outdir, &[]),
        "cannot read",
    );

    // Wrong YAML targets: the error lists what is supported.
    let text = std::fs::read_to_string(&yaml).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        text.replace(
            "ldm.models.diffusion.ddpm.LatentDiffusion",
            "ldm.models.diffusion.ddpm.DDPM",
        ),
    )
    .unwrap();
    assert_fails(
        &txt2img(&ckpt, &bad, &outdir, &[]),
        "supported: ldm.models.diffusion.ddpm.LatentDiffusion",
    );
    std::fs::write(
        &bad,
        text.replace(
            "ldm.modules.encoders.modules.BERTEmbedder",
            "ldm.modules.encoders.modules.SpatialRescaler",
        ),
    )
    .unwrap();
    assert_fails(&txt2img(&ckpt, &bad, &outdir, &[]), "FrozenCLIPEmbedder");
    std::fs::write(&bad, "model: [unbalanced").unwrap();
    assert_fails(&txt2img(&ckpt, &bad, &outdir, &[]), "YAML");

    // Missing tokenizer.
    assert_fails(
        &txt2img(
            &ckpt,
            &yaml,
            &outdir,
            &["--tokenizer", "/nonexistent/vocab.txt"],
        ),
        "tokenizer",
    );

    // Sizes that are not multiples of the model's factor (VQ f2 × UNet 2 = 4).
    assert_fails(
        &txt2img(&ckpt, &yaml, &outdir, &["-H", "34", "-W", "32"]),
        "multiples of 4",
    );
    let img = dir.join("odd.png");
    image::RgbImage::new(30, 30).save(&img).unwrap();
    let out = ldm(&[
        "img2img",
        "--init-image",
        &s(&img),
        "--prompt",
        "x",
        "--ckpt",
        &s(&ckpt),
        "--config",
        &s(&yaml),
        "--steps",
        "2",
        "--outdir",
        &s(&outdir),
    ]);
    assert_fails(&out, "30x30");
    let out = ldm(&[
        "img2img",
        "--init-image",
        &s(&dir.join("missing.png")),
        "--prompt",
        "x",
        "--ckpt",
        &s(&ckpt),
        "--config",
        &s(&yaml),
        "--outdir",
        &s(&outdir),
    ]);
    assert_fails(&out, "cannot read image");

    // Initial noise of the wrong shape.
    let x = dir.join("x.npy");
    write_npy(&x, &[1, 3, 8, 8], &[0.0; 192]);
    assert_fails(
        &txt2img(&ckpt, &yaml, &outdir, &["--init-noise", &s(&x)]),
        "x_T has shape",
    );

    // A checkpoint missing a parameter: fatal unless --allow-missing.
    let mut tensors = spec_tensors(&meta(&fx, "vq_bert.weights"), &meta(&fx, "vq_bert.seeds"));
    tensors.retain(|(k, _, _)| k != "model.diffusion_model.out.2.weight");
    let partial = dir.join("partial.safetensors");
    write_safetensors(&partial, &tensors);
    assert_fails(
        &txt2img(&partial, &yaml, &outdir, &[]),
        "model.diffusion_model.out.2.weight",
    );

    // Unknown sampler / device.
    assert_fails(
        &txt2img(&ckpt, &yaml, &outdir, &["--sampler", "heun"]),
        "ddim, plms",
    );
    assert_fails(
        &txt2img(&ckpt, &yaml, &outdir, &["--device", "tpu"]),
        "unknown device",
    );

    // Nothing was written or overwritten by the failures.
    let mut files: Vec<String> = walk(&outdir);
    files.sort();
    assert_eq!(files, vec!["grid-0000.png", "samples/00000.png"]);
    assert_eq!(
        std::fs::read(outdir.join("samples/00000.png")).unwrap(),
        marker
    );

    // With --allow-missing the partial checkpoint runs (random out.2, logged) and the new files
    // take the next free numbers.
    let out = txt2img(&partial, &yaml, &outdir, &["--allow-missing"]);
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("out.2.weight"));
    assert_eq!(
        std::fs::read(outdir.join("samples/00000.png")).unwrap(),
        marker
    );
    assert_eq!(std::fs::read(outdir.join("grid-0000.png")).unwrap(), marker);
    assert!(outdir.join("samples/00001.png").is_file());
    assert!(outdir.join("grid-0001.png").is_file());

    // A prompt over 77 tokens is truncated with a logged warning (the reference truncates silently).
    let long = vec!["word"; 100].join(" ");
    let out = ldm(&[
        "txt2img",
        "--prompt",
        &long,
        "--ckpt",
        &s(&ckpt),
        "--config",
        &s(&yaml),
        "--steps",
        "1",
        "--outdir",
        &s(&outdir),
    ]);
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("longer than 77 tokens"));
    std::fs::remove_dir_all(&dir).ok();
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            for f in walk(&p) {
                out.push(format!("{}/{f}", p.file_name().unwrap().to_string_lossy()));
            }
        } else {
            out.push(p.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    out
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        "txt2img",
        "sample",
        "img2img",
        "inpaint",
        "upscale",
        "autoencode",
        "inspect",
        "bench",
        "data",
        "eval",
    ] {
        let out = ldm(&[sub, "--help"]);
        assert_ok(&out);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage: ldm"),
            "{sub}"
        );
    }
    let out = ldm(&["inspect", "--preset", "sd-v1"]);
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    for n in ["859,520,964", "83,653,863", "123,060,480"] {
        assert!(text.contains(n), "{n} not in {text}");
    }
}

/// img2img, inpaint (mask blending with a text model), autoencode and inspect run end to end on a
/// tiny model and write what they promise (their numerics are covered by the sampler parity tests).
#[test]
fn image_subcommands_run_end_to_end() {
    let dir = temp_dir("image-cmds");
    let (ckpt, yaml) = model(&dir);
    let img = dir.join("in.png");
    let mut rgb = image::RgbImage::new(32, 32);
    for (x, y, p) in rgb.enumerate_pixels_mut() {
        *p = image::Rgb([(x * 8) as u8, (y * 8) as u8, 128]);
    }
    rgb.save(&img).unwrap();
    let mask = dir.join("mask.png");
    let mut m = image::GrayImage::new(32, 32);
    for (x, _, p) in m.enumerate_pixels_mut() {
        *p = image::Luma([if x >= 16 { 255 } else { 0 }]);
    }
    m.save(&mask).unwrap();
    let common = ["--ckpt", &s(&ckpt), "--config", &s(&yaml)].map(String::from);
    let run = |args: &[&str], out: &str| {
        let outdir = dir.join(out);
        let mut a: Vec<String> = args.iter().map(|x| x.to_string()).collect();
        a.extend(common.iter().cloned());
        a.extend(["--outdir".to_string(), s(&outdir)]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        assert_ok(&ldm(&a));
        outdir
    };
    let o = run(
        &[
            "img2img",
            "--init-image",
            &s(&img),
            "--prompt",
            "a red circle",
            "--strength",
            "0.5",
            "--steps",
            "4",
            "--n-samples",
            "2",
        ],
        "i2i",
    );
    assert!(o.join("samples/00001.png").is_file() && o.join("grid-0000.png").is_file());
    let o = run(
        &[
            "inpaint",
            "--image",
            &s(&img),
            "--mask",
            &s(&mask),
            "--prompt",
            "a red circle",
            "--steps",
            "3",
        ],
        "inp",
    );
    // Outside the mask the input is pasted back (up to the reference's truncating 8-bit
    // conversion, which can lose 1 level), inside it is repainted.
    let got = image::open(o.join("samples/00000.png")).unwrap().to_rgb8();
    let mut changed = 0;
    for y in 0..32 {
        for x in 0..32 {
            let d = got
                .get_pixel(x, y)
                .0
                .iter()
                .zip(rgb.get_pixel(x, y).0)
                .map(|(a, b)| (*a as i32 - b as i32).abs())
                .max()
                .unwrap();
            if x < 16 {
                assert!(d <= 1, "pixel {x},{y} changed by {d}");
            } else if d > 8 {
                changed += 1;
            }
        }
    }
    assert!(changed > 100, "only {changed} masked pixels changed");
    let o = run(&["autoencode", "--input", &s(&img), "--save-latents"], "ae");
    assert!(o.join("samples/00000.png").is_file());
    let (shape, _) = read_npy(&o.join("latents-0000.npy"));
    assert_eq!(shape, vec![1, 3, 16, 16]);
    let out = ldm(&["inspect", "--ckpt", &s(&ckpt), "--config", &s(&yaml)]);
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("BERT text encoder") && text.contains("missing: 0"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
