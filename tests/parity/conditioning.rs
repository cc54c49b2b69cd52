//! Tokenizers vs Hugging Face (`CLIPTokenizer` with ftfy, `BertTokenizerFast`) on the real
//! vocabularies, and the text / class encoders vs `transformers.CLIPTextModel` and CompVis
//! `x_transformer` / `ClassEmbedder` (synthetic weights, see `ldm_tests::synthetic`).

use burn::module::Module;
use burn::tensor::Int;
use ldm::conditioning::{
    BertEmbedderConfig, ClassEmbedder, ClipActivation, ClipTextConfig, TextTokenizer,
    TransformerWrapper,
};
use ldm::io::parameter_shapes;
use ldm_tests::synthetic;
use ldm_tests::{
    Fixture, TOL, assert_close, assert_param_grads, asset_path, device, fixture_path,
    relative_error,
};

const FILE: &str = "conditioning.safetensors";

fn prompts(fx: &Fixture) -> Vec<String> {
    serde_json::from_str(&fx.meta_json("prompts")).unwrap()
}

fn clip_tokenizers() -> Vec<(&'static str, TextTokenizer)> {
    let dir = fixture_path("tokenizers/clip");
    let assets = asset_path("tokenizers/clip");
    vec![
        (
            "tokenizer.json",
            TextTokenizer::clip_from_file(dir.join("tokenizer.json.gz")).unwrap(),
        ),
        (
            "vocab.json + merges.txt",
            TextTokenizer::clip_from_vocab_merges(
                assets.join("vocab.json.gz"),
                assets.join("merges.txt.gz"),
            )
            .unwrap(),
        ),
    ]
}

fn bert_tokenizers() -> Vec<(&'static str, TextTokenizer)> {
    let dir = fixture_path("tokenizers/bert");
    vec![
        (
            "tokenizer.json",
            TextTokenizer::bert_from_file(dir.join("tokenizer.json.gz")).unwrap(),
        ),
        (
            "vocab.txt",
            TextTokenizer::bert_from_vocab(asset_path("tokenizers/bert/vocab.txt.gz")).unwrap(),
        ),
    ]
}

#[test]
fn clip_known_prompt() {
    let expected = [49406u32, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407];
    for (how, tok) in clip_tokenizers() {
        let t = tok
            .encode("a photograph of an astronaut riding a horse")
            .unwrap();
        assert_eq!(&t.ids[..10], &expected, "{how}");
        assert!(
            t.ids[10..].iter().all(|&i| i == 49407),
            "{how}: padded with EOS"
        );
        assert_eq!(t.dropped, 0);
    }
}

fn check_ids(fx: &Fixture, key: &str, len_key: &str, tok: &TextTokenizer, how: &str) {
    let prompts = prompts(fx);
    assert!(prompts.len() >= 30);
    let expected = fx.ints(key);
    let lengths = fx.ints(len_key);
    let mut mismatches = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let t = tok.encode(p).unwrap();
        let want: Vec<u32> = expected[i * 77..(i + 1) * 77]
            .iter()
            .map(|&v| v as u32)
            .collect();
        if t.ids != want {
            mismatches.push(format!("{p:?}\n  ours {:?}\n  ref  {:?}", t.ids, want));
        }
        assert_eq!(
            t.dropped,
            (lengths[i] as usize).saturating_sub(77),
            "{how}: dropped count for {p:?}"
        );
    }
    assert!(
        mismatches.is_empty(),
        "{how}: {} of {} prompts differ:\n{}",
        mismatches.len(),
        prompts.len(),
        mismatches.join("\n")
    );
}

#[test]
fn clip_ids_match_reference_tokenizer() {
    let fx = Fixture::open(FILE);
    for (how, tok) in clip_tokenizers() {
        check_ids(&fx, "clip.ids", "clip.untruncated_len", &tok, how);
    }
}

#[test]
fn bert_ids_match_reference_tokenizer() {
    let fx = Fixture::open(FILE);
    for (how, tok) in bert_tokenizers() {
        check_ids(&fx, "bert.ids", "bert.untruncated_len", &tok, how);
    }
}

/// `BERTEmbedder(max_seq_len=N)` tokenizes with `max_length=N`: Hugging Face keeps `[CLS]`, the first
/// N-2 tokens and `[SEP]` of a longer prompt and pads a shorter one, so the reference's N ids follow from
/// its 77 (untruncated length L: the first N ids when L ≤ N, else the first N-1 and `[SEP]`).
#[test]
fn bert_ids_at_a_shorter_max_length() {
    let fx = Fixture::open(FILE);
    let expected = fx.ints("bert.ids");
    let lengths = fx.ints("bert.untruncated_len");
    let prompts = prompts(&fx);
    // The reference's `[SEP]`: the last id of a prompt that fits in 77.
    let fits = (0..prompts.len())
        .find(|&i| lengths[i] <= 77)
        .expect("a prompt under 77 tokens");
    let sep = expected[fits * 77 + lengths[fits] as usize - 1] as u32;
    for (how, tok) in bert_tokenizers() {
        for n in [16, 8] {
            let tok = tok.clone().with_max_length(n);
            assert_eq!(tok.max_length(), n);
            let mut truncated = 0;
            for (i, p) in prompts.iter().enumerate() {
                let ref77 = &expected[i * 77..(i + 1) * 77];
                let len = lengths[i] as usize;
                let mut want: Vec<u32> = ref77[..n].iter().map(|&v| v as u32).collect();
                if len > n {
                    want[n - 1] = sep;
                    truncated += 1;
                }
                let t = tok.encode(p).unwrap();
                assert_eq!(t.ids, want, "{how}, max_length {n}: {p:?}");
                assert_eq!(t.dropped, len.saturating_sub(n), "{how}: {p:?}");
            }
            assert!(truncated > 0, "some prompt is longer than {n} tokens");
        }
        let batch = tok
            .clone()
            .with_max_length(16)
            .encode_batch(&["a large red circle on a blue background", ""], &device())
            .unwrap();
        assert_eq!(batch.dims(), [2, 16]);
    }
}

#[test]
fn long_prompts_are_truncated_with_a_count_not_an_error() {
    let (_, tok) = clip_tokenizers().remove(0);
    let long = "a very long prompt ".repeat(40);
    let t = tok.encode(&long).unwrap();
    assert_eq!(t.ids.len(), 77);
    assert_eq!(t.ids[0], 49406);
    assert_eq!(t.ids[76], 49407, "EOS kept at the end");
    assert_eq!(t.dropped, 4 * 40 + 2 - 77);
    let batch = tok
        .encode_batch(&[long.as_str(), "short"], &device())
        .unwrap();
    assert_eq!(batch.dims(), [2, 77]);
}

#[test]
fn missing_or_broken_tokenizer_files_are_errors() {
    assert!(TextTokenizer::clip_from_file(fixture_path("tokenizers/clip/absent.json")).is_err());
    assert!(TextTokenizer::clip_from_file(fixture_path("ae_kl.safetensors")).is_err());
    // a BERT vocabulary is not a CLIP tokenizer
    assert!(
        TextTokenizer::clip_from_file(fixture_path("tokenizers/bert/tokenizer.json.gz")).is_err()
    );
}

fn clip_config(fx: &Fixture, case: &str) -> ClipTextConfig {
    ClipTextConfig::from_hf_json(&fx.meta_json(&format!("{case}.config"))).unwrap()
}

fn check_clip(case: &str) {
    let device = device();
    let fx = Fixture::open(FILE);
    let mut model = clip_config(&fx, case).init(&device);
    // SD v1 layout: `cond_stage_model.transformer.text_model.*`, plus the int buffer old checkpoints carry.
    let sd = synthetic::state_dict(&fx, case, "cond_stage_model.transformer.");
    let report = model.load_weights(&sd).unwrap();
    assert!(report.unused.is_empty(), "{report}");
    let out = model
        .try_forward(fx.int::<2>(&format!("{case}.ids"), &device))
        .unwrap();
    assert_close(
        &format!("{case} last_hidden_state"),
        out.last_hidden_state,
        fx.float(&format!("{case}.last_hidden_state"), &device),
    );
    assert_close(
        &format!("{case} penultimate"),
        out.penultimate,
        fx.float(&format!("{case}.penultimate"), &device),
    );
}

#[test]
fn clip_text_model_quick_gelu() {
    check_clip("clip_tiny");
}

#[test]
fn clip_text_model_gelu() {
    check_clip("clip_tiny_gelu");
}

/// The perturbation the issue names: the wrong activation (plain GELU for quick_gelu) must fail.
#[test]
fn clip_wrong_activation_is_caught() {
    let device = device();
    let fx = Fixture::open(FILE);
    let mut model = clip_config(&fx, "clip_tiny")
        .with_hidden_act(ClipActivation::Gelu)
        .init(&device);
    model
        .load_weights(&synthetic::state_dict(&fx, "clip_tiny", ""))
        .unwrap();
    let out = model.forward(fx.int::<2>("clip_tiny.ids", &device));
    let err = relative_error(
        out.last_hidden_state,
        fx.float("clip_tiny.last_hidden_state", &device),
    );
    assert!(
        err > 10.0 * TOL,
        "gelu instead of quick_gelu went unnoticed ({err:.2e})"
    );
}

#[test]
fn clip_position_ids_buffer_is_accepted_and_ignored() {
    use burn::store::burn_pack::{Bytes, DType, Tensor as PackTensor};
    let device = device();
    let fx = Fixture::open(FILE);
    let base = synthetic::state_dict(&fx, "clip_tiny", "");
    let ids: Vec<u8> = (0..77i64).flat_map(|i| i.to_le_bytes()).collect();
    let extra = PackTensor::new(
        "text_model.embeddings.position_ids".into(),
        DType::I64,
        vec![1, 77],
        None,
        Bytes::from_bytes_vec(ids),
    );
    let tensors = base
        .keys()
        .map(|k| base.get(k).unwrap().clone())
        .chain(std::iter::once(extra));
    let sd = ldm::io::StateDict::from_tensors(tensors, "with position_ids");
    let mut model = clip_config(&fx, "clip_tiny").init(&device);
    let report = model.load_weights(&sd).unwrap();
    assert!(report.unused.is_empty(), "{report}");
}

/// The fixture's BERTEmbedder transformer for `case` with its synthetic weights (CompVis key
/// prefix `prefix`); every checkpoint key must be used and every parameter loaded.
fn bert_model(
    fx: &Fixture,
    case: &str,
    prefix: &str,
    device: &burn::tensor::Device,
) -> TransformerWrapper {
    let cfg: serde_json::Value =
        serde_json::from_str(&fx.meta_json(&format!("{case}.config"))).unwrap();
    let u = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let mut model = BertEmbedderConfig::new(u("dim"), u("depth"))
        .with_vocab_size(u("num_tokens"))
        .with_max_seq_len(u("max_seq_len"))
        .with_heads(u("heads"))
        .with_dim_head(u("dim_head"))
        .init(device);
    let report = model
        .load_weights(&synthetic::state_dict(fx, case, prefix))
        .unwrap();
    assert!(
        report.unused.is_empty() && report.missing.is_empty(),
        "{report}"
    );
    model
}

#[test]
fn bert_embedder_transformer() {
    let device = device();
    let fx = Fixture::open(FILE);
    let model = bert_model(&fx, "bert_tiny", "cond_stage_model.transformer.", &device);
    let out = model
        .try_forward(fx.int::<2>("bert_tiny.ids", &device))
        .unwrap();
    assert_close("BERTEmbedder", out, fx.float("bert_tiny.out", &device));
}

/// Training: BERTEmbedder's backward pass (embeddings, attention, feed-forward, LayerNorms)
/// matches the reference's autograd, parameter by parameter; the unused `to_logits` head gets no
/// gradient on either side.
#[test]
fn bert_embedder_gradients_match_reference() {
    let ad = device().autodiff();
    let fx = Fixture::open(FILE);
    let model = bert_model(&fx, "bert_grad", "", &ad);
    let out = model
        .try_forward(fx.int::<2>("bert_grad.ids", &ad))
        .unwrap();
    let grads = (out * fx.float::<3>("bert_grad.w", &ad)).sum().backward();
    assert_param_grads(&fx, "bert_grad", &model, &grads);
}

#[test]
fn class_embedder() {
    let device = device();
    let fx = Fixture::open(FILE);
    let mut model = ClassEmbedder::new(16, 10, &device);
    model
        .load_weights(&synthetic::state_dict(
            &fx,
            "class_emb",
            "cond_stage_model.",
        ))
        .unwrap();
    let labels = fx.int::<1>("class_emb.labels", &device);
    assert_close(
        "ClassEmbedder",
        model.try_forward(labels).unwrap(),
        fx.float("class_emb.out", &device),
    );
    let bad = burn::tensor::Tensor::<1, Int>::from_ints([3, 10], &device);
    assert!(model.try_forward(bad).is_err(), "label 10 of 10 classes");
    assert!(
        model.unconditional(2).is_err(),
        "no unconditional label declared"
    );
    let model = model.with_unconditional_label(Some(9));
    let uc = model.unconditional(2).unwrap();
    let nine = model.forward(burn::tensor::Tensor::<1, Int>::from_ints([9, 9], &device));
    assert_eq!(relative_error(uc, nine), 0.0);
}

#[test]
fn text_encoder_parameter_counts() {
    let device = device();
    assert_eq!(
        ClipTextConfig::vit_l_14().init(&device).num_params(),
        123_060_480
    );
    assert_eq!(
        BertEmbedderConfig::txt2img_1p4b()
            .init(&device)
            .num_params(),
        581_994_042
    );
}

#[test]
fn bert_1p4b_preset_matches_reference_key_list() {
    use std::io::Read;
    let mut text = String::new();
    let file = std::fs::File::open(fixture_path("keys/ldm_txt2img-1p4B.tsv.gz")).unwrap();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap();
    let expected: std::collections::BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("cond_stage_model.transformer."))
        .map(|l| {
            let (k, s) = l.split_once('\t').unwrap();
            (k.to_string(), s.to_string())
        })
        .collect();
    assert_eq!(expected.len(), 422);
    let model = BertEmbedderConfig::txt2img_1p4b().init(&device());
    let ours: std::collections::BTreeMap<String, String> = parameter_shapes(&model)
        .into_iter()
        .map(|(k, s)| (k, format!("{s:?}")))
        .collect();
    assert_eq!(ours, expected);
}

#[test]
fn diffusers_text_encoder_folder() {
    use safetensors::tensor::TensorView;
    let device = device();
    let fx = Fixture::open(FILE);
    let sd = synthetic::state_dict(&fx, "clip_tiny", "");
    let dir = std::env::temp_dir().join(format!("ldm-text-encoder-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), fx.meta_json("clip_tiny.config")).unwrap();
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = sd
        .keys()
        .map(|k| {
            let t = sd.get(k).unwrap().clone();
            (
                k.to_string(),
                t.shape.to_vec(),
                t.into_bytes().unwrap().to_vec(),
            )
        })
        .collect();
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(k, shape, data)| {
            (
                k.clone(),
                TensorView::new(safetensors::Dtype::F32, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let (model, report) = ldm::io::load_clip_text_encoder_dir(&dir, &device).unwrap();
    assert!(report.unused.is_empty());
    let out = model.forward(fx.int::<2>("clip_tiny.ids", &device));
    assert_close(
        "diffusers text_encoder/",
        out.last_hidden_state,
        fx.float("clip_tiny.last_hidden_state", &device),
    );
    assert!(ldm::io::load_clip_text_encoder_dir(dir.join("nope"), &device).is_err());
}
