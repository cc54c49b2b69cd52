//! The built-in demo model: `ldm txt2img` with no `--ckpt` draws what the prompt says (scored by the
//! shapes classifier), `ldm data shapes` writes a dataset the classifier reads back exactly, and
//! `ldm eval shapes` runs.

mod common;

use std::path::Path;
use std::process::Command;

use common::temp_dir;
use ldm::demo::shapes::{self, classify, held_out, parse_caption};

fn ldm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ldm"))
}

fn read_rgb(path: &Path) -> (usize, usize, Vec<u8>) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    (img.width() as usize, img.height() as usize, img.into_raw())
}

#[test]
fn txt2img_without_ckpt_uses_the_built_in_demo_model() {
    assert!(
        ldm::demo::weights().is_some(),
        "the repository ships crates/ldm/assets/demo/model.safetensors; this build lacks it"
    );
    // The README's first command, twice: a 64x64 PNG from the trained weights (not random ones:
    // the loader fails on any missing key), the same bytes for the same seed, the model named in
    // the PNG's parameters. How well the images follow their prompts is `ldm eval shapes`' job.
    let dir = temp_dir("demo-txt2img");
    let prompt = "a large red circle on a blue background";
    for _ in 0..2 {
        let out = ldm()
            .args(["txt2img", "--prompt", prompt, "--steps", "20", "--outdir"])
            .arg(&dir)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("built-in demo model"), "{err}");
    }
    let a = std::fs::read(dir.join("samples/00000.png")).unwrap();
    let b = std::fs::read(dir.join("samples/00001.png")).unwrap();
    assert_eq!(a, b, "same seed, different images");
    let (w, h, rgb) = read_rgb(&dir.join("samples/00000.png"));
    assert_eq!((w, h), (shapes::SIZE, shapes::SIZE));
    let spread = rgb.iter().max().unwrap() - rgb.iter().min().unwrap();
    assert!(spread > 64, "a flat image: the weights did not load");
    let text = String::from_utf8_lossy(&a);
    assert!(text.contains(ldm::demo::NAME) && text.contains(prompt));
    // Without --scale the demo model samples at its own guidance scale, not SD's 7.5.
    let scale = format!("CFG scale: {},", ldm::demo::GUIDANCE_SCALE);
    assert!(
        text.contains(&scale),
        "`{scale}` not in the PNG's parameters"
    );
}

#[test]
fn demo_model_rejects_a_config_without_ckpt() {
    let out = ldm()
        .args([
            "txt2img",
            "--prompt",
            "a small red circle on a white background",
            "--preset",
            "sd-v1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("need --ckpt") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn data_shapes_writes_captioned_images_the_classifier_reads_back() {
    let dir = temp_dir("demo-data");
    let out = ldm()
        .args([
            "data", "shapes", "--n", "12", "--seed", "5", "--split", "held-out", "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let held = held_out();
    for i in 0..12 {
        let caption = std::fs::read_to_string(dir.join(format!("{i:05}.txt"))).unwrap();
        let (combo, size) = parse_caption(&caption).unwrap();
        assert!(held.contains(&combo), "{caption} is not held out");
        let (w, h, rgb) = read_rgb(&dir.join(format!("{i:05}.png")));
        let got = classify(&rgb, w, h);
        assert_eq!(
            (got.color, got.background, got.shape, got.size),
            (
                Some(combo.color),
                combo.background,
                Some(combo.shape),
                Some(size)
            ),
            "{caption}"
        );
    }
    // Same seed, same bytes.
    let again = temp_dir("demo-data-again");
    let out = ldm()
        .args([
            "data", "shapes", "--n", "3", "--seed", "5", "--split", "held-out", "--out",
        ])
        .arg(&again)
        .output()
        .unwrap();
    assert!(out.status.success());
    for i in 0..3 {
        let name = format!("{i:05}.png");
        assert_eq!(
            std::fs::read(dir.join(&name)).unwrap(),
            std::fs::read(again.join(&name)).unwrap()
        );
    }
    let bad = ldm()
        .args(["data", "shapes", "--n", "1", "--split", "nope", "--out"])
        .arg(&again)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--split nope"));
}

#[test]
fn eval_shapes_scores_held_out_and_seen_prompts() {
    let dir = temp_dir("demo-eval");
    let stdout = eval_json(
        ldm()
            .args([
                "eval",
                "shapes",
                "--per-prompt",
                "1",
                "--seen",
                "2",
                "--steps",
                "10",
                "--json",
            ])
            .arg("--outdir")
            .arg(&dir),
    );
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["held_out"]["n"], 34);
    assert_eq!(v["seen"]["n"], 4);
    for group in ["held_out", "seen"] {
        for k in ["color", "background", "shape", "size", "all"] {
            let p = v[group][k].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&p), "{group}.{k} = {p}");
        }
    }
    assert!(dir.join("held-out.png").is_file() && dir.join("seen.png").is_file());
}

#[test]
fn eval_shapes_reconstruct_scores_the_first_stage() {
    let stdout = eval_json(ldm().args([
        "eval",
        "shapes",
        "--reconstruct",
        "--per-prompt",
        "1",
        "--seen",
        "2",
        "--json",
    ]));
    assert!(stdout.contains("first-stage reconstructions"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["held_out"]["n"], 34);
    assert_eq!(v["seen"]["n"], 4);
    // Flat backgrounds survive any working autoencoder (the shipped one keeps all of them): a
    // wrong pixel layout or scaling on the way in or out would not.
    let bg = v["held_out"]["background"].as_f64().unwrap();
    assert!(
        bg >= 90.0,
        "background kept in {bg}% of reconstructions\n{stdout}"
    );
}

/// `--first-stage` swaps the autoencoder the reconstructions go through: the built-in one with every
/// weight zeroed decodes each image to one flat grey (no background survives), and a file that lacks
/// the encoder's keys is an error naming them, not a half-random model.
#[test]
fn eval_shapes_reconstruct_scores_a_given_first_stage() {
    use safetensors::{SafeTensors, tensor::TensorView};
    let dir = temp_dir("demo-first-stage");
    let shipped = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ldm/assets/demo/model.safetensors"
    );
    let bytes = std::fs::read(shipped).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let first_stage: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n.starts_with("first_stage_model."))
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), vec![0u8; v.data().len()]))
        .collect();
    assert!(
        first_stage.len() > 20,
        "{} first-stage tensors",
        first_stage.len()
    );
    let write = |name: &str, keep: &dyn Fn(&str) -> bool| {
        let views: Vec<(String, TensorView<'_>)> = first_stage
            .iter()
            .filter(|(n, ..)| keep(n))
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let path = dir.join(name);
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
        path
    };
    let eval = |fs: &Path| {
        let mut c = ldm();
        c.args(["eval", "shapes", "--reconstruct", "--per-prompt", "1"])
            .args(["--seen", "2", "--json", "--first-stage"])
            .arg(fs);
        c
    };

    let zeroed = write("zeroed.safetensors", &|_| true);
    let stdout = eval_json(&mut eval(&zeroed));
    assert!(stdout.contains("zeroed.safetensors"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let bg = v["held_out"]["background"].as_f64().unwrap();
    assert!(
        bg <= 50.0,
        "background kept in {bg}% through a zeroed autoencoder\n{stdout}"
    );

    let decoder_only = write("decoder.safetensors", &|n| !n.contains(".encoder."));
    let out = eval(&decoder_only).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("missing"),
        "{stderr}"
    );
    assert!(stderr.contains("encoder.conv_in.weight"), "{stderr}");
}

/// Runs an `ldm eval` command, asserting success; its stdout.
fn eval_json(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
