//! Files the CLI writes: numbered samples that never overwrite, grids, PNG `parameters` metadata,
//! `.npy` latents; and the files it reads (images, masks, `.npy` noise).

use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ldm::burn::tensor::{Device, Tensor, TensorData};
use sha2::{Digest, Sha256};

/// Output folder layout: `<outdir>/samples/NNNNN.png`, `<outdir>/grid-NNNN.png`,
/// `<outdir>/latents-NNNN.npy`; numbering continues after existing files.
pub struct OutDir {
    pub root: PathBuf,
    next_sample: usize,
    next_grid: usize,
}

fn next_free(dir: &Path, prefix: &str, suffix: &str) -> Result<usize> {
    let mut next = 0;
    if dir.is_dir() {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix(prefix)
                .and_then(|r| r.strip_suffix(suffix))
                .and_then(|n| n.parse::<usize>().ok())
            {
                next = next.max(n + 1);
            }
        }
    }
    Ok(next)
}

impl OutDir {
    pub fn new(root: &Path) -> Result<Self> {
        let samples = root.join("samples");
        let next_sample = next_free(&samples, "", ".png")?;
        let next_grid = next_free(root, "grid-", ".png")?.max(next_free(root, "latents-", ".npy")?);
        Ok(Self {
            root: root.to_path_buf(),
            next_sample,
            next_grid,
        })
    }

    /// Creates the folders (only once there is something to write).
    fn ensure(&self) -> Result<()> {
        std::fs::create_dir_all(self.root.join("samples"))
            .with_context(|| format!("cannot create {}", self.root.display()))
    }

    pub fn save_sample(&mut self, img: &RgbImage, text: &str) -> Result<PathBuf> {
        self.ensure()?;
        let path = self
            .root
            .join("samples")
            .join(format!("{:05}.png", self.next_sample));
        self.next_sample += 1;
        write_png(&path, img, text)?;
        Ok(path)
    }

    /// The index of the next grid / latents file (shared so they pair up).
    pub fn take_batch_index(&mut self) -> usize {
        let i = self.next_grid;
        self.next_grid += 1;
        i
    }

    pub fn grid_path(&self, i: usize) -> PathBuf {
        self.root.join(format!("grid-{i:04}.png"))
    }

    pub fn latents_path(&self, i: usize) -> PathBuf {
        self.root.join(format!("latents-{i:04}.npy"))
    }

    pub fn save_grid(
        &mut self,
        path: &Path,
        images: &[RgbImage],
        cols: usize,
        text: &str,
    ) -> Result<()> {
        self.ensure()?;
        write_png(path, &grid(images, cols), text)
    }
}

/// Width, height, RGB bytes.
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Tiles images (all the same size) with `cols` per row, 2 px white padding as torchvision's
/// `make_grid` uses by default between tiles.
pub fn grid(images: &[RgbImage], cols: usize) -> RgbImage {
    let Some(first) = images.first() else {
        // No images: the padding alone, so callers never index an empty list.
        return RgbImage {
            width: 2,
            height: 2,
            data: vec![255; 12],
        };
    };
    let (w, h) = (first.width, first.height);
    let cols = cols.max(1).min(images.len());
    let rows = images.len().div_ceil(cols);
    let pad = 2;
    let (gw, gh) = (cols * (w + pad) + pad, rows * (h + pad) + pad);
    let mut data = vec![255u8; gw * gh * 3];
    for (i, img) in images.iter().enumerate() {
        let (r, c) = (i / cols, i % cols);
        let (ox, oy) = (pad + c * (w + pad), pad + r * (h + pad));
        for y in 0..h {
            let src = &img.data[y * w * 3..(y + 1) * w * 3];
            let start = ((oy + y) * gw + ox) * 3;
            data[start..start + w * 3].copy_from_slice(src);
        }
    }
    RgbImage {
        width: gw,
        height: gh,
        data,
    }
}

/// Writes a PNG with a `parameters` tEXt chunk (the key image tools read generation settings from).
pub fn write_png(path: &Path, img: &RgbImage, text: &str) -> Result<()> {
    if path.exists() {
        bail!("refusing to overwrite {}", path.display());
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), img.width as u32, img.height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    if !text.is_empty() {
        enc.add_text_chunk("parameters".into(), text.into())?;
    }
    let mut w = enc.write_header()?;
    w.write_image_data(&img.data)?;
    w.finish()?;
    Ok(())
}

/// Reads an image as `[1, 3, H, W]` in [−1, 1] (`2 · (v / 255) − 1`, as the reference scripts).
pub fn load_image(path: &Path, device: &Device) -> Result<Tensor<4>> {
    let img = image::open(path)
        .with_context(|| format!("cannot read image {}", path.display()))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img
        .into_raw()
        .into_iter()
        .map(|v| 2.0 * (v as f32 / 255.0) - 1.0)
        .collect();
    Ok(Tensor::<4>::from_data(
        TensorData::new(data, [1, h as usize, w as usize, 3]),
        device,
    )
    .permute([0, 3, 1, 2]))
}

/// Reads a mask as `[1, 1, H, W]` in [0, 1] (luma; white = repaint).
pub fn load_mask(path: &Path, device: &Device) -> Result<Tensor<4>> {
    let img = image::open(path)
        .with_context(|| format!("cannot read mask {}", path.display()))?
        .to_luma8();
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img
        .into_raw()
        .into_iter()
        .map(|v| v as f32 / 255.0)
        .collect();
    Ok(Tensor::<4>::from_data(
        TensorData::new(data, [1, 1, h as usize, w as usize]),
        device,
    ))
}

/// `[B, 3, H, W]` in [−1, 1] → 8-bit images (`255 · clamp((x+1)/2)`, truncated).
pub fn to_images(x: Tensor<4>) -> Vec<RgbImage> {
    ldm::pipelines::images_to_rgb8(x)
        .into_iter()
        .map(|(width, height, data)| RgbImage {
            width,
            height,
            data,
        })
        .collect()
}

/// Writes a float32 C-order `.npy`.
pub fn write_npy(path: &Path, x: Tensor<4>) -> Result<()> {
    if path.exists() {
        bail!("refusing to overwrite {}", path.display());
    }
    let shape = x.dims();
    let data: Vec<f32> = x.into_data().convert::<f32>().iter::<f32>().collect();
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}",
        dims.join(", ")
    );
    // magic(6) + version(2) + len(2) + header + '\n', padded to a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat(total.div_ceil(64) * 64 - total));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a float32 (or float64) little-endian C-order `.npy` of rank 4.
pub fn read_npy(path: &Path, device: &Device) -> Result<Tensor<4>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .read_to_end(&mut bytes)?;
    let bad = |m: &str| anyhow::anyhow!("{}: not a supported .npy file ({m})", path.display());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("no NUMPY magic"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes(bytes[8..12].try_into()?) as usize, 12),
        _ => return Err(bad("unknown version")),
    };
    let header = std::str::from_utf8(
        bytes
            .get(start..start + hlen)
            .ok_or_else(|| bad("truncated header"))?,
    )?;
    let descr = if header.contains("'<f4'") {
        4
    } else if header.contains("'<f8'") {
        8
    } else {
        return Err(bad("dtype must be float32 or float64 little-endian"));
    };
    if header.contains("'fortran_order': True") {
        return Err(bad("Fortran order"));
    }
    let shape_str = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let shape: Vec<usize> = shape_str
        .trim_start_matches([' ', '('])
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad("shape"))?;
    let shape: [usize; 4] = shape
        .try_into()
        .map_err(|s: Vec<usize>| bad(&format!("rank {} instead of 4 ([n, C, h, w])", s.len())))?;
    let n: usize = shape.iter().product();
    let body = &bytes[start + hlen..];
    if body.len() != n * descr {
        return Err(bad(&format!(
            "{} data bytes for shape {shape:?}",
            body.len()
        )));
    }
    let data: Vec<f32> = if descr == 4 {
        body.chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    } else {
        body.chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect()
    };
    if data.iter().any(|v| !v.is_finite()) {
        return Err(anyhow::anyhow!(
            "{}: contains NaN or infinite values",
            path.display()
        ));
    }
    Ok(Tensor::from_data(TensorData::new(data, shape), device))
}

/// [`model_hash`] of weights held in memory.
pub fn bytes_hash(bytes: &[u8]) -> String {
    let buf = if bytes.len() > 0x110000 {
        &bytes[0x100000..0x110000]
    } else {
        bytes
    };
    Sha256::digest(buf)
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Short model hash for metadata: sha256 of 64 KiB at offset 1 MiB (the whole file if smaller;
/// A1111's legacy "Model hash"), first 8 hex digits; folders hash their UNet weights file.
pub fn model_hash(path: &Path) -> String {
    let file = if path.is_dir() {
        [
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.bin",
        ]
        .iter()
        .map(|f| path.join(f))
        .find(|p| p.is_file())
    } else {
        Some(path.to_path_buf())
    };
    let Some(file) = file else {
        return "unknown".into();
    };
    let hash = || -> std::io::Result<String> {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::File::open(&file)?;
        let len = f.metadata()?.len();
        let mut buf = Vec::new();
        if len > 0x110000 {
            f.seek(SeekFrom::Start(0x100000))?;
            buf.resize(0x10000, 0);
            f.read_exact(&mut buf)?;
        } else {
            f.read_to_end(&mut buf)?;
        }
        Ok(bytes_hash(&buf))
    };
    hash().unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_of_no_images_is_blank_not_a_panic() {
        let g = grid(&[], 4);
        assert_eq!((g.width, g.height, g.data.len()), (2, 2, 12));
        let img = RgbImage {
            width: 3,
            height: 2,
            data: vec![7; 18],
        };
        let g = grid(&[img], 4);
        assert_eq!((g.width, g.height), (3 + 4, 2 + 4));
    }
}
