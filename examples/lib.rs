//! Helpers shared by the examples: image files <-> tensors in [-1, 1].

use anyhow::{Context, Result};
use burn::tensor::{Device, Tensor, TensorData};

/// Reads an RGB image as `[1, 3, H, W]` in [-1, 1].
pub fn load_image(path: &str, device: &Device) -> Result<Tensor<4>> {
    let img = image::open(path)
        .with_context(|| format!("cannot read image `{path}`"))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img
        .into_raw()
        .into_iter()
        .map(|v| v as f32 / 127.5 - 1.0)
        .collect();
    let t = Tensor::<4>::from_data(
        TensorData::new(data, [1, h as usize, w as usize, 3]),
        device,
    );
    Ok(t.permute([0, 3, 1, 2]))
}

/// Writes `[1, 3, H, W]` in [-1, 1] as PNG, as the reference saves pixels:
/// `clamp((x + 1) / 2, 0, 1) * 255`, truncated to u8.
pub fn save_image(x: Tensor<4>, path: &str) -> Result<()> {
    let [_, _, h, w] = x.dims();
    let x = ((x + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0;
    let data: Vec<f32> = x.permute([0, 2, 3, 1]).into_data().iter::<f32>().collect();
    let bytes: Vec<u8> = data.into_iter().map(|v| v as u8).collect();
    image::RgbImage::from_raw(w as u32, h as u32, bytes)
        .context("image buffer size")?
        .save(path)
        .with_context(|| format!("cannot write `{path}`"))?;
    Ok(())
}
