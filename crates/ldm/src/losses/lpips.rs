//! LPIPS (Zhang et al. 2018) with a VGG16 backbone, as taming's `LPIPS` (the perceptual term of
//! CompVis' first-stage losses): scaling layer, VGG16 `relu1_2 … relu5_3`, channel-unit
//! normalisation, squared difference, 1x1 `lin` layers, spatial average, sum over layers.
//! Differentiable with respect to its inputs; meant to be frozen.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Dropout, DropoutConfig, PaddingConfig2d, Relu};
use burn::tensor::{Device, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::io::{LoadOptions, LoadReport, PackTensor, StateDict, load_into};

/// Indices of the convolutions in torchvision's `vgg16().features`.
pub const VGG16_CONV_INDICES: [usize; 13] = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28];
/// Output channels of the 13 convolutions.
const VGG16_CHANNELS: [usize; 13] = [
    64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
];
/// Convolutions per slice (`relu1_2`, `relu2_2`, `relu3_3`, `relu4_3`, `relu5_3`).
const SLICES: [usize; 5] = [2, 2, 3, 3, 3];
/// Channels of the five LPIPS features.
pub const LPIPS_CHANNELS: [usize; 5] = [64, 128, 256, 512, 512];

/// The VGG16 convolutional trunk (`features[0..30]`), returning the five LPIPS feature maps.
#[derive(Module, Debug)]
pub struct Vgg16Features {
    /// The 13 3x3 convolutions, in order.
    pub convs: Vec<Conv2d>,
    relu: Relu,
    pool: MaxPool2d,
}

impl Vgg16Features {
    /// Builds the trunk (random init; load torchvision weights with [`Lpips::load_weights`]).
    pub fn new(device: &Device) -> Self {
        let mut c_in = 3;
        let convs = VGG16_CHANNELS
            .iter()
            .map(|&c| {
                let conv = Conv2dConfig::new([c_in, c], [3, 3])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init(device);
                c_in = c;
                conv
            })
            .collect();
        Self {
            convs,
            relu: Relu::new(),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
        }
    }

    /// `[B, 3, H, W]` → the five ReLU outputs.
    pub fn forward(&self, x: Tensor<4>) -> Vec<Tensor<4>> {
        let mut out = Vec::with_capacity(5);
        let mut h = x;
        let mut i = 0;
        for (s, &n) in SLICES.iter().enumerate() {
            if s > 0 {
                h = self.pool.forward(h);
            }
            for _ in 0..n {
                h = self.relu.forward(self.convs[i].forward(h));
                i += 1;
            }
            out.push(h.clone());
        }
        out
    }
}

/// taming `NetLinLayer`: dropout then a bias-free 1x1 conv to one channel (`linN.model.1.weight`).
#[derive(Module, Debug)]
pub struct NetLinLayer {
    /// `(Dropout, Conv2d)` as `nn.Sequential`.
    pub model: (Dropout, Conv2d),
}

/// LPIPS with a VGG16 trunk (`net`) and five `lin` layers.
#[derive(Module, Debug)]
pub struct Lpips {
    /// The trunk.
    pub net: Vgg16Features,
    /// `lin0` … `lin4`.
    pub lin0: NetLinLayer,
    /// See `lin0`.
    pub lin1: NetLinLayer,
    /// See `lin0`.
    pub lin2: NetLinLayer,
    /// See `lin0`.
    pub lin3: NetLinLayer,
    /// See `lin0`.
    pub lin4: NetLinLayer,
}

/// `x / (‖x‖₂ over channels + 1e-10)`.
fn normalize_tensor(x: Tensor<4>) -> Tensor<4> {
    let norm = x.clone().square().sum_dim(1).sqrt();
    x / norm.add_scalar(1e-10)
}

impl Lpips {
    /// Builds LPIPS (random weights: load them with [`load_weights`](Self::load_weights)).
    pub fn new(device: &Device) -> Self {
        let lin = |c: usize| NetLinLayer {
            model: (
                // Frozen LPIPS runs in eval mode: dropout off (the reference calls `.eval()` on it).
                DropoutConfig::new(0.0).init(),
                Conv2dConfig::new([c, 1], [1, 1])
                    .with_bias(false)
                    .init(device),
            ),
        };
        Self {
            net: Vgg16Features::new(device),
            lin0: lin(64),
            lin1: lin(128),
            lin2: lin(256),
            lin3: lin(512),
            lin4: lin(512),
        }
    }

    fn lins(&self) -> [&NetLinLayer; 5] {
        [&self.lin0, &self.lin1, &self.lin2, &self.lin3, &self.lin4]
    }

    /// The scaling layer: `(x − shift) / scale` with the reference's ImageNet-derived constants.
    fn scale(x: Tensor<4>) -> Tensor<4> {
        let device = x.device();
        let shift = Tensor::<4>::from_data(
            TensorData::new(vec![-0.030f32, -0.088, -0.188], [1, 3, 1, 1]),
            &device,
        );
        let scale = Tensor::<4>::from_data(
            TensorData::new(vec![0.458f32, 0.448, 0.450], [1, 3, 1, 1]),
            &device,
        );
        (x - shift) / scale
    }

    /// Perceptual distance of images `[B, 3, H, W]` in [−1, 1] → `[B, 1, 1, 1]`.
    pub fn forward(&self, input: Tensor<4>, target: Tensor<4>) -> Tensor<4> {
        let f0 = self.net.forward(Self::scale(input));
        let f1 = self.net.forward(Self::scale(target));
        let mut total: Option<Tensor<4>> = None;
        for ((a, b), lin) in f0.into_iter().zip(f1).zip(self.lins()) {
            let diff = (normalize_tensor(a) - normalize_tensor(b)).square();
            let res = lin
                .model
                .1
                .forward(lin.model.0.forward(diff))
                .mean_dim(2)
                .mean_dim(3);
            total = Some(match total {
                None => res,
                Some(t) => t + res,
            });
        }
        total.expect("five layers")
    }

    /// Loads weights from local files, renaming to this module's keys:
    /// taming `LPIPS` state dicts (`net.sliceK.I.*`, `linN.model.1.weight`), the `lpips` package's
    /// `v0.1/vgg.pth` (`linN.model.1.weight`) and torchvision's `vgg16` (`features.I.*`) — any mix,
    /// one after the other. Every parameter must end up loaded.
    pub fn load_weights(&mut self, files: &[&StateDict]) -> Result<LoadReport> {
        let mut tensors: Vec<PackTensor> = Vec::new();
        let mut unused = Vec::new();
        for sd in files {
            for key in sd.keys() {
                let renamed = rename_key(key);
                match renamed {
                    Some(name) => {
                        let mut t = sd.get(key).expect("listed").clone();
                        t.name = name;
                        tensors.push(t);
                    }
                    None => unused.push(key.to_string()),
                }
            }
        }
        if tensors.is_empty() {
            return Err(Error::Config(
                "no LPIPS / VGG16 weights found in the given files".into(),
            ));
        }
        let merged = StateDict::from_tensors(tensors, files[0].source().to_path_buf());
        let mut report = load_into(self, &merged, "LPIPS", "", &LoadOptions::default())?;
        report.unused.extend(
            unused
                .into_iter()
                .filter(|k| !k.starts_with("scaling_layer.")),
        );
        Ok(report)
    }
}

/// A reference key → our key (`None`: not an LPIPS parameter).
fn rename_key(key: &str) -> Option<String> {
    let conv_ordinal = |idx: usize| VGG16_CONV_INDICES.iter().position(|&i| i == idx);
    if let Some(rest) = key.strip_prefix("net.slice") {
        // net.slice{K}.{I}.{weight|bias}
        let mut parts = rest.splitn(3, '.');
        let (_k, i, p) = (parts.next()?, parts.next()?, parts.next()?);
        return Some(format!("net.convs.{}.{p}", conv_ordinal(i.parse().ok()?)?));
    }
    if let Some(rest) = key.strip_prefix("features.") {
        let mut parts = rest.splitn(2, '.');
        let (i, p) = (parts.next()?, parts.next()?);
        return Some(format!("net.convs.{}.{p}", conv_ordinal(i.parse().ok()?)?));
    }
    if key.starts_with("lin") && key.ends_with(".model.1.weight") {
        return Some(key.to_string());
    }
    None
}
