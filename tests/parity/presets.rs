//! Every preset builds exactly the reference's parameter set: keys and shapes are compared with the
//! state-dict key lists computed from the reference constructors (`tests/fixtures/keys/*.tsv.gz`),
//! without allocating any weight.

use std::collections::BTreeMap;
use std::io::Read;

use burn::module::Module;
use ldm::io::parameter_shapes;
use ldm::models::autoencoder::{AutoencoderKLConfig, VQModelConfig};
use ldm::models::unet::UNetConfig;
use ldm_tests::{device, fixture_path};

fn reference_keys(name: &str, prefix: &str) -> BTreeMap<String, Vec<usize>> {
    let mut text = String::new();
    let file = std::fs::File::open(fixture_path(&format!("keys/{name}.tsv.gz"))).unwrap();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|l| {
            let (k, shape) = l.split_once('\t').unwrap();
            let dims = shape
                .trim_matches(['[', ']'])
                .split(',')
                .filter(|s| !s.trim().is_empty());
            (
                k.to_string(),
                dims.map(|d| d.trim().parse().unwrap()).collect(),
            )
        })
        .collect()
}

fn assert_same_keys<M: Module>(what: &str, module: &M, expected: BTreeMap<String, Vec<usize>>) {
    let ours: BTreeMap<String, Vec<usize>> = parameter_shapes(module).into_iter().collect();
    let missing: Vec<_> = expected.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: missing {missing:?}\nextra {extra:?}"
    );
    for (k, shape) in &expected {
        assert_eq!(&ours[k], shape, "{what}: shape of {k}");
    }
    eprintln!("{what}: {} keys match", expected.len());
}

fn unet(name: &str, cfg: UNetConfig) {
    let model = cfg.init(&device()).unwrap();
    assert_same_keys(name, &model, reference_keys(name, "model.diffusion_model."));
}

#[test]
fn unet_presets_match_reference_key_lists() {
    unet("sd_v1-inference", UNetConfig::sd_v1());
    unet("ldm_txt2img-1p4B", UNetConfig::txt2img_1p4b());
    unet("cin-ldm-vq-f8", UNetConfig::cin_ldm_vq_f8());
    unet("cin256-v2", UNetConfig::cin256_v2());
    unet("celebahq-ldm-vq-4", UNetConfig::celebahq_ldm_vq_4());
    unet(
        "lsun_churches-ldm-kl-8",
        UNetConfig::lsun_churches_ldm_kl_8(),
    );
    unet("bsr_sr", UNetConfig::bsr_sr());
    unet("inpainting_big", UNetConfig::inpainting_big());
    unet(
        "layout2img-openimages256",
        UNetConfig::layout2img_openimages256(),
    );
    unet("semantic_synthesis256", UNetConfig::semantic_synthesis256());
    unet("text2img256", UNetConfig::text2img256());
}

#[test]
fn first_stage_presets_match_reference_key_lists() {
    let kl = |name: &str| {
        let model = AutoencoderKLConfig::kl_f8().init(&device());
        assert_same_keys(name, &model, reference_keys(name, "first_stage_model."));
    };
    kl("sd_v1-inference");
    kl("ldm_txt2img-1p4B");
    kl("lsun_churches-ldm-kl-8");
    let vq = |name: &str, cfg: VQModelConfig| {
        let model = cfg.init(&device());
        assert_same_keys(name, &model, reference_keys(name, "first_stage_model."));
    };
    vq("cin-ldm-vq-f8", VQModelConfig::vq_f8());
    for name in [
        "bsr_sr",
        "celebahq-ldm-vq-4",
        "cin256-v2",
        "layout2img-openimages256",
        "semantic_synthesis256",
        "text2img256",
    ] {
        vq(name, VQModelConfig::vq_f4());
    }
    vq("inpainting_big", VQModelConfig::vq_f4_noattn());
}

#[test]
fn sd_v1_unet_parameter_count() {
    // 859,520,964 (reference), counted from lazy parameters: nothing is allocated.
    let model = UNetConfig::sd_v1().init(&device()).unwrap();
    assert_eq!(model.num_params(), 859_520_964);
}
