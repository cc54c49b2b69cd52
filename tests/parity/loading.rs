//! Checkpoint loading rules: missing keys are fatal and named, extra keys are reported, shape
//! mismatches name the key and both shapes, broken files are clear errors.

use std::collections::HashMap;

use ldm::Error;
use ldm::io::StateDict;
use ldm::models::autoencoder::{AutoencoderKLConfig, DdConfig};
use ldm_tests::{Fixture, device, fixture_path, synthetic};
use safetensors::tensor::TensorView;

fn kl_config() -> AutoencoderKLConfig {
    AutoencoderKLConfig::new(
        DdConfig::new()
            .with_ch(32)
            .with_ch_mult(vec![1, 2])
            .with_num_res_blocks(1)
            .with_attn_resolutions(vec![8])
            .with_resolution(16)
            .with_z_channels(4),
        4,
    )
}

/// Writes the KL fixture's (synthetic, see `ldm_tests::synthetic`) weights under
/// `first_stage_model.` as a safetensors file, with `edit` applied to the key → view map.
fn edited_copy(
    name: &str,
    edit: impl FnOnce(&mut HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> std::path::PathBuf {
    let fx = Fixture::open("ae_kl.safetensors");
    let spec: serde_json::Value = serde_json::from_str(&fx.meta_json("kl.weights")).unwrap();
    let seed: u64 = fx.meta_json("kl.seed").trim().parse().unwrap();
    let mut map: HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = spec
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            let key = entry[0].as_str().unwrap();
            let shape: Vec<usize> = entry[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let n = shape.iter().product();
            let (offset, scale) = (entry[2].as_f64().unwrap(), entry[3].as_f64().unwrap());
            let bytes: Vec<u8> = synthetic::values(seed, key, n, offset, scale)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            (
                format!("first_stage_model.{key}"),
                (safetensors::Dtype::F32, shape, bytes),
            )
        })
        .collect();
    edit(&mut map);
    let views: Vec<(String, TensorView)> = map
        .iter()
        .map(|(k, (dt, shape, data))| {
            (
                k.clone(),
                TensorView::new(*dt, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("ldm-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

#[test]
fn missing_key_is_an_error_naming_it() {
    let key = "first_stage_model.decoder.mid.attn_1.k.weight";
    let path = edited_copy("missing.safetensors", |m| {
        assert!(m.remove(key).is_some());
    });
    let mut model = kl_config().init(&device());
    let err = model
        .load_weights(&StateDict::open(&path).unwrap())
        .unwrap_err();
    eprintln!("{err}");
    match &err {
        Error::MissingKeys { keys, .. } => assert_eq!(keys, &vec![key.to_string()]),
        other => panic!("expected MissingKeys, got {other}"),
    }
    assert!(err.to_string().contains(key));
}

#[test]
fn missing_groupnorm_weight_is_named_in_pytorch_terms() {
    let key = "first_stage_model.encoder.norm_out.weight";
    let path = edited_copy("missing_norm.safetensors", |m| {
        assert!(m.remove(key).is_some());
    });
    let mut model = kl_config().init(&device());
    let err = model
        .load_weights(&StateDict::open(&path).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains(key), "{err}");
}

#[test]
fn extra_key_loads_and_is_reported() {
    let extra = "first_stage_model.decoder.some_new_layer.weight";
    let path = edited_copy("extra.safetensors", |m| {
        m.insert(
            extra.into(),
            (safetensors::Dtype::F32, vec![2], vec![0u8; 8]),
        );
        // keys of other components are not this component's business
        m.insert(
            "model.diffusion_model.out.2.bias".into(),
            (safetensors::Dtype::F32, vec![1], vec![0u8; 4]),
        );
    });
    let mut model = kl_config().init(&device());
    let report = model
        .load_weights(&StateDict::open(&path).unwrap())
        .unwrap();
    eprintln!("{report}");
    assert_eq!(report.unused, vec![extra.to_string()]);
    assert!(report.to_string().contains(extra));
    assert!(report.missing.is_empty());
}

#[test]
fn shape_mismatch_names_key_and_shapes() {
    let key = "first_stage_model.post_quant_conv.weight";
    let path = edited_copy("mismatch.safetensors", |m| {
        let e = m.get_mut(key).unwrap();
        e.1 = vec![4, 2, 1, 2]; // same element count, other shape
    });
    let mut model = kl_config().init(&device());
    let err = model
        .load_weights(&StateDict::open(&path).unwrap())
        .unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, Error::Mismatch { .. }));
    assert!(
        msg.contains(key) && msg.contains("[4, 2, 1, 2]") && msg.contains("[4, 4, 1, 1]"),
        "{msg}"
    );
}

#[test]
fn bare_keys_load_too() {
    let path = edited_copy("bare.safetensors", |m| {
        let entries: Vec<_> = m.drain().collect();
        for (k, v) in entries {
            m.insert(k.trim_start_matches("first_stage_model.").to_string(), v);
        }
    });
    let mut model = kl_config().init(&device());
    let report = model
        .load_weights(&StateDict::open(&path).unwrap())
        .unwrap();
    assert_eq!(report.prefix, "");
    assert!(report.unused.is_empty());
}

#[test]
fn truncated_and_foreign_files_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("ldm-tests-trunc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (src, name) in [
        ("ae_kl.safetensors", "t.safetensors"),
        ("ae_vq.ckpt", "t.ckpt"),
    ] {
        let bytes = std::fs::read(fixture_path(src)).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = StateDict::open(&path).unwrap_err();
        eprintln!("{err}");
        assert!(matches!(err, Error::Read { .. }), "{err}");
        assert!(err.to_string().contains(name));
    }
    let junk = dir.join("junk.ckpt");
    std::fs::write(&junk, b"this is not a checkpoint").unwrap();
    assert!(matches!(StateDict::open(&junk), Err(Error::Read { .. })));
    assert!(matches!(
        StateDict::open(dir.join("absent.safetensors")),
        Err(Error::Read { .. })
    ));
    assert!(matches!(
        StateDict::open(fixture_path("../Cargo.toml")),
        Err(Error::Read { .. })
    ));
}

#[test]
fn sd_v1_vae_preset_parameter_count() {
    // 83,653,863 = encoder + decoder + quant_conv + post_quant_conv of SD v1 (reference count).
    // Counted from the (lazy) module without materialising the weights.
    let model = AutoencoderKLConfig::kl_f8().init(&device());
    assert_eq!(burn::module::Module::num_params(&model), 83_653_863);
}

/// The test-side `.ckpt` writer round-trips through our reader (Lightning-wrapped and bare).
#[test]
fn torch_checkpoint_writer_round_trips() {
    let dir = std::env::temp_dir().join(format!("ldm-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tensors = vec![
        (
            "a.weight".to_string(),
            vec![2, 3],
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        ),
        ("b".to_string(), vec![4], vec![-1.0, 0.5, 0.25, 8.0]),
    ];
    for lightning in [true, false] {
        let path = dir.join(format!("t{lightning}.ckpt"));
        ldm_tests::ckpt::write_torch_checkpoint(&path, &tensors, lightning).unwrap();
        let sd = ldm::io::StateDict::open(&path).unwrap();
        assert_eq!(sd.len(), 2);
        assert_eq!(sd.shape_of("a.weight"), Some(vec![2, 3]));
        let bytes = sd.get("b").unwrap().to_bytes().unwrap();
        let vals: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(vals, vec![-1.0, 0.5, 0.25, 8.0]);
    }
    std::fs::remove_dir_all(&dir).ok();
}
