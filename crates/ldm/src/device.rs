//! Turning a user string (`cpu`, `ndarray`, `wgpu`, `vulkan:cpu`, `cuda:0`, ...) into a Burn
//! [`Device`], with an error naming the cargo feature when that backend was not compiled in.
//!
//! | string | backend | cargo feature |
//! |---|---|---|
//! | `cpu`, `flex` | Flex (pure-Rust CPU, the default) | `flex` |
//! | `ndarray` | NdArray (deprecated by Burn, kept for comparison) | `ndarray` |
//! | `wgpu`, `wgpu:cpu`, `wgpu:N` | wgpu (Vulkan/Metal/DX12 picked at run time); `:cpu` = a software adapter such as lavapipe, `:N` = discrete GPU N | `wgpu` |
//! | `vulkan`, `vulkan:cpu`, `vulkan:N` | wgpu pinned to Vulkan | `vulkan` |
//! | `cuda`, `cuda:N` | CUDA | `cuda` |
//!
//! Training code asks for `device.autodiff()`.

use crate::error::{Error, Result};
use burn::tensor::Device;

/// Parses a device string; see the module docs for the accepted forms.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let (name, arg) = match spec.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (spec.as_str(), None),
    };
    let index = |arg: Option<&str>| -> Result<usize> {
        match arg {
            None | Some("") => Ok(0),
            Some(a) => a.parse().map_err(|_| Error::UnknownDevice(spec.clone())),
        }
    };
    match name {
        "cpu" | "flex" => {
            if arg.is_some() {
                return Err(Error::UnknownDevice(spec.clone()));
            }
            flex()
        }
        "ndarray" => ndarray(),
        "wgpu" => wgpu(arg, &spec),
        "vulkan" => vulkan(arg, &spec),
        "cuda" => cuda(index(arg)?),
        _ => Err(Error::UnknownDevice(spec.clone())),
    }
}

/// The device used when the user gives none: the first compiled-in backend in the order
/// CUDA, Vulkan, wgpu, Flex, NdArray.
#[allow(unreachable_code)]
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    return Device::cuda(0);
    #[cfg(feature = "vulkan")]
    return Device::vulkan(burn::tensor::DeviceKind::DefaultDevice);
    #[cfg(feature = "wgpu")]
    return Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    #[cfg(feature = "flex")]
    return Device::flex();
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)]
    return Device::ndarray();
    panic!("ldm was built without any backend feature (flex, ndarray, wgpu, vulkan, cuda)")
}

fn flex() -> Result<Device> {
    #[cfg(feature = "flex")]
    return Ok(Device::flex());
    #[allow(unreachable_code)]
    Err(Error::BackendNotCompiled {
        backend: "cpu (flex)".into(),
        feature: "flex",
    })
}

fn ndarray() -> Result<Device> {
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)]
    return Ok(Device::ndarray());
    #[allow(unreachable_code)]
    Err(Error::BackendNotCompiled {
        backend: "ndarray".into(),
        feature: "ndarray",
    })
}

#[cfg(any(feature = "wgpu", feature = "vulkan"))]
fn device_kind(arg: Option<&str>, spec: &str) -> Result<burn::tensor::DeviceKind> {
    use burn::tensor::DeviceKind;
    Ok(match arg {
        None | Some("") | Some("default") => DeviceKind::DefaultDevice,
        Some("cpu") => DeviceKind::Cpu,
        Some("integrated") => DeviceKind::IntegratedGpu(0),
        Some(n) => {
            DeviceKind::DiscreteGpu(n.parse().map_err(|_| Error::UnknownDevice(spec.into()))?)
        }
    })
}

#[allow(unused_variables)]
fn wgpu(arg: Option<&str>, spec: &str) -> Result<Device> {
    #[cfg(feature = "wgpu")]
    return Ok(Device::wgpu(device_kind(arg, spec)?));
    #[allow(unreachable_code)]
    Err(Error::BackendNotCompiled {
        backend: "wgpu".into(),
        feature: "wgpu",
    })
}

#[allow(unused_variables)]
fn vulkan(arg: Option<&str>, spec: &str) -> Result<Device> {
    #[cfg(feature = "vulkan")]
    return Ok(Device::vulkan(device_kind(arg, spec)?));
    #[allow(unreachable_code)]
    Err(Error::BackendNotCompiled {
        backend: "vulkan".into(),
        feature: "vulkan",
    })
}

#[allow(unused_variables)]
fn cuda(index: usize) -> Result<Device> {
    #[cfg(feature = "cuda")]
    return Ok(Device::cuda(index));
    #[allow(unreachable_code)]
    Err(Error::BackendNotCompiled {
        backend: "cuda".into(),
        feature: "cuda",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_device_is_an_error() {
        assert!(matches!(parse_device("tpu"), Err(Error::UnknownDevice(_))));
        assert!(matches!(
            parse_device("cuda:x"),
            Err(Error::UnknownDevice(_)) | Err(Error::BackendNotCompiled { .. })
        ));
    }

    #[cfg(feature = "flex")]
    #[test]
    fn cpu_is_flex() {
        assert!(parse_device("cpu").is_ok());
        assert!(parse_device("FLEX").is_ok());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn missing_backend_names_the_feature() {
        let err = parse_device("cuda:0").unwrap_err();
        assert!(err.to_string().contains("--features cuda"), "{err}");
    }
}

/// Compute precision of the denoiser (`--precision`). Norm statistics and attention softmax stay in
/// f32 whatever the setting; the text encoder, the first stage and the sampler arithmetic run in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Full precision.
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl Precision {
    /// The tensor dtype.
    pub fn dtype(self) -> burn::tensor::FloatDType {
        match self {
            Self::F32 => burn::tensor::FloatDType::F32,
            Self::F16 => burn::tensor::FloatDType::F16,
            Self::Bf16 => burn::tensor::FloatDType::BF16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" | "full" => Ok(Self::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(Error::Config(format!(
                "unknown precision `{other}` (expected f32, f16 or bf16)"
            ))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

/// Casts every float parameter of a module to `dtype` (keeping trainability on autodiff devices).
pub fn cast_module<M: burn::module::Module>(module: M, dtype: burn::tensor::FloatDType) -> M {
    struct Cast(burn::tensor::FloatDType);
    impl burn::module::ModuleMapper for Cast {
        fn map_float<const D: usize>(
            &mut self,
            p: burn::module::Param<burn::tensor::Tensor<D>>,
        ) -> burn::module::Param<burn::tensor::Tensor<D>> {
            let rg = p.is_require_grad();
            let dt = self.0;
            p.map(move |t| {
                let t = t.cast(dt).detach();
                if rg && t.is_autodiff() {
                    t.require_grad()
                } else {
                    t
                }
            })
        }
    }
    module.map(&mut Cast(dtype))
}
