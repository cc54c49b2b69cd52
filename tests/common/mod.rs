//! Helpers for the parity tests: fixture access, the test device, and tolerance checks.
//!
//! The device defaults to Flex; set `LDM_TEST_DEVICE` (e.g. `wgpu:cpu` with `--features wgpu`) to
//! run the same suite on another backend.

pub mod ckpt;
pub mod synthetic;

use std::collections::HashMap;
use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

/// Path of a committed fixture.
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Path of a file the library ships (`crates/ldm/assets/...`, e.g. the embedded vocabularies).
pub fn asset_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/ldm/assets")
        .join(name)
}

/// The device the tests run on (`LDM_TEST_DEVICE`, default `cpu` = Flex).
pub fn device() -> Device {
    let spec = std::env::var("LDM_TEST_DEVICE").unwrap_or_else(|_| "cpu".to_string());
    ldm::device::parse_device(&spec).unwrap_or_else(|e| panic!("LDM_TEST_DEVICE={spec}: {e}"))
}

/// A fixture tensor: its shape, and its values as f32 and (for integer tensors) i64.
type FixtureTensor = (Vec<usize>, Vec<f32>, Vec<i64>);

/// A fixture file's tensors (as f32 / i64 host data) and metadata.
pub struct Fixture {
    pub name: String,
    tensors: HashMap<String, FixtureTensor>,
    pub metadata: HashMap<String, String>,
}

impl Fixture {
    pub fn open(name: &str) -> Self {
        let path = fixture_path(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("safetensors header");
        let metadata = meta.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        let mut tensors = HashMap::new();
        for (key, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let data = view.data();
            let (f, i) = match view.dtype() {
                Dtype::F32 => (
                    data.chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                    vec![],
                ),
                Dtype::F16 => (
                    data.chunks_exact(2)
                        .map(|b| half_to_f32(u16::from_le_bytes(b.try_into().unwrap())))
                        .collect(),
                    vec![],
                ),
                Dtype::I64 => (
                    vec![],
                    data.chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                ),
                other => panic!("{key}: unsupported dtype {other:?}"),
            };
            tensors.insert(key, (shape, f, i));
        }
        Self {
            name: name.to_string(),
            tensors,
            metadata,
        }
    }

    fn entry(&self, key: &str) -> &(Vec<usize>, Vec<f32>, Vec<i64>) {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor `{key}`", self.name))
    }

    pub fn shape(&self, key: &str) -> Vec<usize> {
        self.entry(key).0.clone()
    }

    pub fn float<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D> {
        let (shape, data, _) = self.entry(key);
        assert_eq!(shape.len(), D, "{key}: rank {} != {D}", shape.len());
        Tensor::from_data(TensorData::new(data.clone(), shape.clone()), device)
    }

    pub fn int<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D, Int> {
        let (shape, _, data) = self.entry(key);
        assert_eq!(shape.len(), D, "{key}: rank {} != {D}", shape.len());
        Tensor::from_data(TensorData::new(data.clone(), shape.clone()), device)
    }

    pub fn ints(&self, key: &str) -> Vec<i64> {
        self.entry(key).2.clone()
    }

    pub fn meta_json(&self, key: &str) -> String {
        self.metadata
            .get(key)
            .unwrap_or_else(|| panic!("{}: no metadata `{key}`", self.name))
            .clone()
    }
}

fn half_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as i32;
    let mant = (h & 0x3ff) as u32;
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // subnormal: normalise
            let mut e = -1i32;
            let mut m = m;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            let m = m & 0x3ff;
            sign | (((e + 1 + 127 - 15) as u32) << 23) | (m << 13)
        }
        (31, 0) => sign | 0x7f80_0000,
        (31, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | (((e - 15 + 127) as u32) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Max |a - b| relative to max |b|.
pub fn relative_error<const D: usize>(actual: Tensor<D>, expected: Tensor<D>) -> f64 {
    assert_eq!(actual.dims(), expected.dims(), "shape mismatch");
    let a: Vec<f32> = actual.into_data().iter::<f32>().collect();
    let b: Vec<f32> = expected.into_data().iter::<f32>().collect();
    let mut max_err = 0f64;
    let mut scale = 0f64;
    for (x, y) in a.iter().zip(&b) {
        if !x.is_finite() {
            return f64::INFINITY;
        }
        max_err = max_err.max((*x as f64 - *y as f64).abs());
        scale = scale.max((*y as f64).abs());
    }
    max_err / scale.max(1e-12)
}

/// The parity bar: max abs error ≤ `tol` × max |expected|.
pub const TOL: f64 = 1e-4;

/// Asserts parity within [`TOL`], printing the error either way.
#[track_caller]
pub fn assert_close<const D: usize>(what: &str, actual: Tensor<D>, expected: Tensor<D>) {
    assert_close_tol(what, actual, expected, TOL)
}

/// Asserts parity within `tol`.
#[track_caller]
pub fn assert_close_tol<const D: usize>(
    what: &str,
    actual: Tensor<D>,
    expected: Tensor<D>,
    tol: f64,
) {
    let err = relative_error(actual, expected);
    eprintln!("{what}: max abs err / max |ref| = {err:.3e}");
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.0e}");
}

/// Checks the parameter gradients of `module` against the reference's `{case}.grad_keys` (PyTorch
/// names, in `named_parameters` order), `{case}.grad_norms` and `{case}.grad_sums`: each norm within
/// TOL of the reference norm (floored at 1e-3 of the largest), each sum within √n times that.
/// Parameters the reference does not list must have no gradient (e.g. BERT's unused `to_logits`
/// head). Prints the worst error as a fraction of its budget.
pub fn assert_param_grads<M: burn::module::Module>(
    fx: &Fixture,
    case: &str,
    module: &M,
    grads: &burn::tensor::Gradients,
) {
    struct Grads<'a> {
        grads: &'a burn::tensor::Gradients,
        out: Vec<Option<(f32, f32)>>,
    }
    impl burn::module::ModuleVisitor for Grads<'_> {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<D>>) {
            let g = p.val().grad(self.grads);
            self.out.push(g.map(|g| {
                (
                    g.clone().square().sum().sqrt().into_scalar::<f32>(),
                    g.sum().into_scalar::<f32>(),
                )
            }));
        }
    }
    // Our parameters in visiting order, named as PyTorch names them.
    let params = ldm::io::parameter_shapes(module);
    let mut ours = Grads {
        grads,
        out: Vec::new(),
    };
    module.visit(&mut ours);
    assert_eq!(params.len(), ours.out.len());
    let ref_keys: Vec<String> =
        serde_json::from_str(&fx.meta_json(&format!("{case}.grad_keys"))).unwrap();
    let cpu = device();
    let read = |k: &str| {
        fx.float::<1>(&format!("{case}.{k}"), &cpu)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let (norms, sums) = (read("grad_norms"), read("grad_sums"));
    let largest = norms.iter().cloned().fold(0.0f32, f32::max) as f64;
    let (mut worst, mut matched) = (0.0f64, 0);
    for ((key, shape), g) in params.iter().zip(&ours.out) {
        let Some(j) = ref_keys.iter().position(|k| k == key) else {
            assert!(
                g.is_none(),
                "{key}: has a gradient but the reference lists none"
            );
            continue;
        };
        let (norm, sum) = g.unwrap_or_else(|| panic!("{key}: no gradient"));
        matched += 1;
        let budget = TOL * (norms[j] as f64).max(1e-3 * largest);
        let n = shape.iter().product::<usize>() as f64;
        let (dn, ds) = ((norm - norms[j]).abs() as f64, (sum - sums[j]).abs() as f64);
        worst = worst.max(dn / budget).max(ds / (budget * n.sqrt()));
        assert!(
            dn <= budget && ds <= budget * n.sqrt(),
            "{key}: grad norm {norm} vs {}, sum {sum} vs {}",
            norms[j],
            sums[j]
        );
    }
    assert_eq!(
        matched,
        ref_keys.len(),
        "{case}: reference parameters without a match"
    );
    eprintln!("{case}: {matched} parameter gradients, worst error {worst:.3} of the budget");
}
