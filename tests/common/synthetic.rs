//! Deterministic fixture weights, bit-identical to `xtask/fixtures/synthetic.py`.
//!
//! Large fixtures don't store their weights: each parameter is `offset + scale · (2u − 1)` with
//! `u = (splitmix64(fnv1a64(key) ^ seed + i · φ) >> 40) / 2^24`, computed in f64 then rounded to f32.
//! The fixture's metadata lists `[key, shape, offset, scale]` for every parameter.

use burn::store::burn_pack::{Bytes, DType, Tensor as PackTensor};
use ldm::io::StateDict;

use crate::Fixture;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// FNV-1a, 64 bit.
pub fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64 finaliser.
pub fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` uniforms in [0, 1) for `key` under `seed`.
pub fn uniform(seed: u64, key: &str, n: usize) -> Vec<f64> {
    let base = fnv1a64(key) ^ seed;
    (0..n as u64)
        .map(|i| {
            (splitmix64(base.wrapping_add(i.wrapping_mul(GOLDEN))) >> 40) as f64
                / (1u64 << 24) as f64
        })
        .collect()
}

/// The values of one parameter.
pub fn values(seed: u64, key: &str, n: usize, offset: f64, scale: f64) -> Vec<f32> {
    uniform(seed, key, n)
        .into_iter()
        .map(|u| (offset + scale * (2.0 * u - 1.0)) as f32)
        .collect()
}

/// Builds the state dict of fixture case `case` (metadata `CASE.weights`, `CASE.seed`), every key
/// prefixed with `prefix` (e.g. `model.diffusion_model.` to exercise prefix detection).
pub fn state_dict(fx: &Fixture, case: &str, prefix: &str) -> StateDict {
    let spec: serde_json::Value =
        serde_json::from_str(&fx.meta_json(&format!("{case}.weights"))).unwrap();
    let seed: u64 = fx
        .meta_json(&format!("{case}.seed"))
        .trim()
        .parse()
        .unwrap();
    let tensors = spec.as_array().unwrap().iter().map(|entry| {
        let key = entry[0].as_str().unwrap();
        let shape: Vec<usize> = entry[1]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let (offset, scale) = (entry[2].as_f64().unwrap(), entry[3].as_f64().unwrap());
        let n = shape.iter().product();
        let data = values(seed, key, n, offset, scale);
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        PackTensor::new(
            format!("{prefix}{key}"),
            DType::F32,
            shape,
            None,
            Bytes::from_bytes_vec(bytes),
        )
    });
    StateDict::from_tensors(tensors, format!("{}:{case}", fx.name))
}
