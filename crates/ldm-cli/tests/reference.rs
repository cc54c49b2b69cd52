//! `ldm` against the reference pipelines (`xtask/fixtures/gen_pipelines.py`): tiny models in the
//! CompVis checkpoint layout with their CompVis YAML (KL and VQ first stages; unconditional, class,
//! CLIP text and BERT text conditioning), sampled by CompVis `DDIMSampler`/`PLMSSampler` from a fixed
//! x_T; and a tiny diffusers folder sampled by diffusers' `StableDiffusionPipeline` (DDIM, Euler,
//! DPM-Solver++). `ldm` runs with `--init-noise` and `--save-latents`; latents must agree within 1e-3
//! relative and the saved PNGs within PSNR ≥ 40 dB.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// Materialises a CompVis case: checkpoint (`.ckpt` or `.safetensors`), YAML, x_T; returns
/// (folder, checkpoint, yaml, x_T path).
fn compvis_case(case: &str, ckpt_ext: &str) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let fx = fixture();
    let dir = temp_dir(case);
    let mut tensors = spec_tensors(
        &meta(&fx, &format!("{case}.weights")),
        &meta(&fx, &format!("{case}.seeds")),
    );
    // The schedule buffers a real checkpoint carries (their values are not read).
    for entry in meta(&fx, &format!("{case}.other_keys")).as_array().unwrap() {
        let shape: Vec<usize> = entry[1]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let n = shape.iter().product();
        tensors.push((entry[0].as_str().unwrap().to_string(), shape, vec![0.0; n]));
    }
    let ckpt = dir.join(format!("model.{ckpt_ext}"));
    match ckpt_ext {
        "ckpt" => ldm_tests::ckpt::write_torch_checkpoint(&ckpt, &tensors, true).unwrap(),
        _ => write_safetensors(&ckpt, &tensors),
    }
    let mut yaml = fx.meta_json(&format!("{case}.yaml"));
    if fx.metadata.contains_key(&format!("{case}.clip_config")) {
        // The tiny CLIP lives in a local folder, as FrozenCLIPEmbedder(version=<folder>) reads it.
        let clip = dir.join("clip");
        write_clip_dir(&clip, &fx.meta_json(&format!("{case}.clip_config")));
        let target = "target: ldm.modules.encoders.modules.FrozenCLIPEmbedder";
        assert!(yaml.contains(target));
        yaml = yaml.replace(
            target,
            &format!(
                "{target}\n      params:\n        version: {}",
                clip.display()
            ),
        );
    }
    let yaml_path = dir.join("config.yaml");
    std::fs::write(&yaml_path, yaml).unwrap();
    let x_t = dir.join("x_T.npy");
    let device = ldm_tests::device();
    let key = format!("{case}.x_T");
    let data: Vec<f32> = fx
        .float::<4>(&key, &device)
        .into_data()
        .iter::<f32>()
        .collect();
    write_npy(&x_t, &fx.shape(&key), &data);
    (dir, ckpt, yaml_path, x_t)
}

/// Compares `<outdir>/latents-0000.npy` and `samples/*.png` with the reference `CASE.SAMPLER.*`.
fn check_outputs(fx: &ldm_tests::Fixture, outdir: &Path, key: &str) {
    let (shape, latents) = read_npy(&outdir.join("latents-0000.npy"));
    let device = ldm_tests::device();
    let want: Vec<f32> = fx
        .float::<4>(&format!("{key}.latents"), &device)
        .into_data()
        .iter::<f32>()
        .collect();
    assert_eq!(
        shape,
        fx.shape(&format!("{key}.latents")),
        "{key}: latent shape"
    );
    let err = relative_error(&latents, &want);
    eprintln!("{key}: latents relative error {err:.3e}");
    assert!(err <= 1e-3, "{key}: latents differ by {err:.3e} relative");
    let reference = reference_pixels(fx, &format!("{key}.images"));
    for (i, want) in reference.iter().enumerate() {
        let got = png_pixels(&outdir.join(format!("samples/{i:05}.png")));
        let p = psnr(&got, want);
        eprintln!("{key}: image {i} PSNR {p:.1} dB");
        assert!(p >= 40.0, "{key}: image {i} PSNR {p:.1} dB < 40");
    }
    assert!(outdir.join("grid-0000.png").is_file(), "no grid");
}

fn run_compvis(case: &str, ckpt_ext: &str) {
    let fx = fixture();
    let (dir, ckpt, yaml, x_t) = compvis_case(case, ckpt_ext);
    let request = meta(&fx, &format!("{case}.request"));
    let n = request["n"].as_u64().unwrap().to_string();
    let steps = request["steps"].as_u64().unwrap().to_string();
    let scale = request["scale"].as_f64().unwrap().to_string();
    for sampler in ["ddim", "plms"] {
        let outdir = dir.join(format!("out-{sampler}"));
        let mut args: Vec<String> = Vec::new();
        match request["kind"].as_str().unwrap() {
            "text" => {
                let prompts: Vec<&str> = request["prompts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_str().unwrap())
                    .collect();
                let file = dir.join("prompts.txt");
                std::fs::write(&file, prompts.join("\n")).unwrap();
                args.extend([
                    "txt2img".into(),
                    "--from-file".into(),
                    file.display().to_string(),
                ]);
                args.extend([
                    "-H".into(),
                    request["height"].to_string(),
                    "-W".into(),
                    request["width"].to_string(),
                ]);
            }
            "class" => {
                args.push("sample".into());
                for l in request["labels"].as_array().unwrap() {
                    args.extend(["--class-label".into(), l.to_string()]);
                }
                args.extend(["--uc-class".into(), request["uc_label"].to_string()]);
            }
            "unconditional" => args.push("sample".into()),
            other => panic!("{other}"),
        }
        args.extend(
            [
                "--ckpt",
                &ckpt.display().to_string(),
                "--config",
                &yaml.display().to_string(),
                "--sampler",
                sampler,
                "--steps",
                &steps,
                "--scale",
                &scale,
                "--n-samples",
                &n,
                "--init-noise",
                &x_t.display().to_string(),
                "--save-latents",
                "--outdir",
                &outdir.display().to_string(),
            ]
            .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_ok(&ldm(&args));
        check_outputs(&fx, &outdir, &format!("{case}.{sampler}"));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn kl_clip_text_to_image_matches_compvis() {
    run_compvis("kl_clip", "safetensors");
}

#[test]
fn vq_unconditional_matches_compvis() {
    run_compvis("vq_uncond", "ckpt");
}

#[test]
fn kl_class_conditional_matches_compvis() {
    run_compvis("kl_class", "ckpt");
}

#[test]
fn vq_bert_text_to_image_matches_compvis() {
    run_compvis("vq_bert", "safetensors");
}

/// Writes the diffusers folder of the fixture.
fn diffusers_folder(dir: &Path) {
    let fx = fixture();
    let seeds = meta(&fx, "diffusers.seeds");
    std::fs::write(
        dir.join("model_index.json"),
        fx.meta_json("diffusers.model_index"),
    )
    .unwrap();
    for (comp, file) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ] {
        let d = dir.join(comp);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("config.json"),
            fx.meta_json(&format!("diffusers.{comp}.config")),
        )
        .unwrap();
        let tensors = spec_tensors(
            &meta(&fx, &format!("diffusers.{comp}.weights")),
            &seeds[comp],
        );
        write_safetensors(&d.join(file), &tensors);
    }
    let tk = dir.join("tokenizer");
    std::fs::create_dir_all(&tk).unwrap();
    write_clip_vocab(&tk);
    std::fs::write(
        tk.join("tokenizer_config.json"),
        fx.meta_json("diffusers.tokenizer.tokenizer_config"),
    )
    .unwrap();
    std::fs::write(
        tk.join("special_tokens_map.json"),
        fx.meta_json("diffusers.tokenizer.special_tokens_map"),
    )
    .unwrap();
    let sc = dir.join("scheduler");
    std::fs::create_dir_all(&sc).unwrap();
    std::fs::write(
        sc.join("scheduler_config.json"),
        fx.meta_json("diffusers.scheduler.config"),
    )
    .unwrap();
}

#[test]
fn diffusers_folder_matches_diffusers_pipeline() {
    let fx = fixture();
    let dir = temp_dir("diffusers");
    let model = dir.join("tiny-sd");
    std::fs::create_dir_all(&model).unwrap();
    diffusers_folder(&model);
    let request = meta(&fx, "diffusers_sd.request");
    let prompts: Vec<&str> = request["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let file = dir.join("prompts.txt");
    std::fs::write(&file, prompts.join("\n")).unwrap();
    let x_t = dir.join("x_T.npy");
    let device = ldm_tests::device();
    let data: Vec<f32> = fx
        .float::<4>("diffusers_sd.x_T", &device)
        .into_data()
        .iter::<f32>()
        .collect();
    write_npy(&x_t, &fx.shape("diffusers_sd.x_T"), &data);
    for (ours, theirs) in [
        ("ddim", "ddim"),
        ("euler", "euler"),
        ("dpm++2m", "dpmpp_2m"),
    ] {
        let outdir = dir.join(format!("out-{theirs}"));
        let out = ldm(&[
            "txt2img",
            "--ckpt",
            &model.display().to_string(),
            "--from-file",
            &file.display().to_string(),
            "-H",
            "32",
            "-W",
            "32",
            "--sampler",
            ours,
            "--steps",
            "10",
            "--scale",
            &request["guidance_scale"].to_string(),
            "--n-samples",
            "2",
            "--init-noise",
            &x_t.display().to_string(),
            "--save-latents",
            "--outdir",
            &outdir.display().to_string(),
        ]);
        assert_ok(&out);
        check_outputs(&fx, &outdir, &format!("diffusers_sd.{theirs}"));
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The PNGs carry the generation settings in a `parameters` text chunk.
#[test]
fn samples_carry_parameters_metadata_and_numbering_continues() {
    let (dir, ckpt, yaml, x_t) = compvis_case("vq_uncond", "safetensors");
    let outdir = dir.join("out");
    let run = || {
        ldm(&[
            "sample",
            "--ckpt",
            &ckpt.display().to_string(),
            "--config",
            &yaml.display().to_string(),
            "--steps",
            "3",
            "--n-samples",
            "2",
            "--seed",
            "7",
            "--init-noise",
            &x_t.display().to_string(),
            "--save-latents",
            "--outdir",
            &outdir.display().to_string(),
        ])
    };
    assert_ok(&run());
    // A file the user already had stays untouched; numbering continues after it.
    let before = std::fs::read(outdir.join("samples/00001.png")).unwrap();
    assert_ok(&run());
    assert_eq!(
        std::fs::read(outdir.join("samples/00001.png")).unwrap(),
        before
    );
    for f in [
        "samples/00002.png",
        "samples/00003.png",
        "grid-0001.png",
        "latents-0001.npy",
    ] {
        assert!(outdir.join(f).is_file(), "{f} missing");
    }
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(outdir.join("samples/00000.png")).unwrap(),
    ));
    let reader = decoder.read_info().unwrap();
    let text: Vec<(String, String)> = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    let (_, params) = text
        .iter()
        .find(|(k, _)| k == "parameters")
        .expect("parameters chunk");
    for needle in [
        "Steps: 3",
        "Sampler: ddim",
        "Seed: 7",
        "Size: 32x32",
        "Model hash: ",
    ] {
        assert!(params.contains(needle), "`{needle}` not in {params:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
