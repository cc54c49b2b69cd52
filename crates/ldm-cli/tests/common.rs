//! Helpers for the CLI tests: materialise the reference models of `tests/fixtures/pipelines.safetensors`
//! (weights from the synthetic hash, never stored), run the `ldm` binary, read its outputs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ldm_tests::{Fixture, synthetic};
use serde_json::Value;

pub const FIXTURE: &str = "pipelines.safetensors";

pub fn fixture() -> Fixture {
    Fixture::open(FIXTURE)
}

/// A fresh temporary folder for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ldm-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn meta(fx: &Fixture, key: &str) -> Value {
    serde_json::from_str(&fx.meta_json(key)).unwrap_or_else(|e| panic!("{key}: {e}"))
}

/// (key, shape, values) of every spec entry: values(seeds[prefix], key − prefix, ...).
pub fn spec_tensors(spec: &Value, seeds: &Value) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    spec.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let key = e[0].as_str().unwrap().to_string();
            let shape: Vec<usize> = e[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let (offset, scale) = (e[2].as_f64().unwrap(), e[3].as_f64().unwrap());
            let (seed, local) = match seeds {
                Value::Object(m) => {
                    let (prefix, seed) = m
                        .iter()
                        .filter(|(p, _)| key.starts_with(p.as_str()))
                        .max_by_key(|(p, _)| p.len())
                        .unwrap_or_else(|| panic!("no seed for {key}"));
                    (seed.as_u64().unwrap(), key[prefix.len()..].to_string())
                }
                s => (s.as_u64().unwrap(), key.clone()),
            };
            let n = shape.iter().product();
            let values = synthetic::values(seed, &local, n, offset, scale);
            (key, shape, values)
        })
        .collect()
}

/// Writes float32 tensors as a `.safetensors` file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((k, s, _), b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Writes a float32 `.npy` `[n, C, h, w]`.
pub fn write_npy(path: &Path, shape: &[usize], data: &[f32]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}",
        dims.join(", ")
    );
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat(total.div_ceil(64) * 64 - total));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, out).unwrap();
}

/// Reads a float32 `.npy` (as written by `ldm --save-latents`).
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(header.contains("'<f4'"), "{header}");
    let shape: Vec<usize> = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data = bytes[10 + hlen..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (shape, data)
}

/// Runs `ldm` with `args`; returns the output (stdout/stderr captured).
pub fn ldm(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run ldm");
    eprintln!(
        "$ ldm {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Asserts a clean failure: exit code ≠ 0, an `error:` line containing `needle`, no panic.
pub fn assert_fails(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success");
    assert!(!stderr.contains("panicked"), "panicked:\n{stderr}");
    assert!(stderr.contains("error:"), "no error line:\n{stderr}");
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "error does not mention `{needle}`:\n{stderr}"
    );
}

pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "ldm failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Max |a − b| / max |b|.
pub fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut err = 0f64;
    let mut scale = 0f64;
    for (x, y) in a.iter().zip(b) {
        if !x.is_finite() {
            return f64::INFINITY;
        }
        err = err.max((*x as f64 - *y as f64).abs());
        scale = scale.max((*y as f64).abs());
    }
    err / scale.max(1e-12)
}

/// The reference image `[n, 3, H, W]` in [−1, 1] as 8-bit RGB per image, saved the way `ldm` saves.
pub fn reference_pixels(fx: &Fixture, key: &str) -> Vec<Vec<u8>> {
    let shape = fx.shape(key);
    let (n, h, w) = (shape[0], shape[2], shape[3]);
    let device = ldm_tests::device();
    let data: Vec<f32> = fx
        .float::<4>(key, &device)
        .into_data()
        .iter::<f32>()
        .collect();
    (0..n)
        .map(|i| {
            let mut px = Vec::with_capacity(h * w * 3);
            for y in 0..h {
                for x in 0..w {
                    for c in 0..3 {
                        let v = data[((i * 3 + c) * h + y) * w + x];
                        px.push((((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0) as u8);
                    }
                }
            }
            px
        })
        .collect()
}

/// RGB bytes of a PNG.
pub fn png_pixels(path: &Path) -> Vec<u8> {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
        .into_raw()
}

pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// The tiny CLIP text model folder (config.json + the CLIP vocabulary) the text cases point
/// `FrozenCLIPEmbedder.version` at.
pub fn write_clip_dir(dir: &Path, config_json: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json).unwrap();
    write_clip_vocab(dir);
}

pub fn write_clip_vocab(dir: &Path) {
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ldm/assets/tokenizers/clip");
    for (gz, name) in [
        ("vocab.json.gz", "vocab.json"),
        ("merges.txt.gz", "merges.txt"),
    ] {
        let bytes = std::fs::read(assets.join(gz)).unwrap();
        let mut out = Vec::new();
        use std::io::Read;
        flate2::read::GzDecoder::new(bytes.as_slice())
            .read_to_end(&mut out)
            .unwrap();
        std::fs::write(dir.join(name), out).unwrap();
    }
}
