//! Image-folder datasets for training: images (png, jpg, webp, bmp) under a root folder, captions
//! from a sidecar `.txt` next to each image or a diffusers-style `metadata.jsonl`
//! (`{"file_name": ..., "text": ...}`), class labels from the first-level sub-folder names.
//! Images are resized (shorter side to `size`, triangle filter), cropped (center or random) and
//! optionally flipped, then scaled to [−1, 1]. Unreadable images are skipped with a warning and
//! counted — at scan time (header check) and, should one still fail to decode, at load time (the
//! next readable image takes its place).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{RngExt, SeedableRng};

use crate::error::{Error, Result};

const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp"];

/// One training image and its annotations.
#[derive(Debug, Clone)]
pub struct ImageRecord {
    /// The file.
    pub path: PathBuf,
    /// Its caption, if any.
    pub caption: Option<String>,
    /// Its class (index into [`ImageFolder::classes`]), if the folder has class sub-folders.
    pub label: Option<usize>,
}

/// How images become tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageTransform {
    /// Output side length.
    pub size: usize,
    /// Random crop (else center crop).
    pub random_crop: bool,
    /// Random horizontal flip with probability ½.
    pub random_flip: bool,
}

/// A scanned image folder.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// The readable images, sorted by path.
    pub records: Vec<ImageRecord>,
    /// Class names (sorted sub-folder names; empty without sub-folders).
    pub classes: Vec<String>,
    /// Files skipped as unreadable during the scan.
    pub skipped_at_scan: usize,
    transform: ImageTransform,
    seed: u64,
    failures: Arc<AtomicUsize>,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

impl ImageFolder {
    /// Scans `root`.
    pub fn open(root: impl AsRef<Path>, transform: ImageTransform, seed: u64) -> Result<Self> {
        let root = root.as_ref();
        let read_err = |m: String| Error::Read {
            path: root.to_path_buf(),
            message: m,
        };
        if !root.is_dir() {
            return Err(read_err("not a folder".into()));
        }
        let mut files = Vec::new();
        walk(root, &mut files).map_err(|e| read_err(e.to_string()))?;
        files.sort();
        // metadata.jsonl (diffusers' imagefolder convention)
        let mut meta: HashMap<PathBuf, String> = HashMap::new();
        let jsonl = root.join("metadata.jsonl");
        if jsonl.is_file() {
            let text = std::fs::read_to_string(&jsonl).map_err(|e| read_err(e.to_string()))?;
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Read {
                    path: jsonl.clone(),
                    message: format!("line {}: {e}", i + 1),
                })?;
                if let (Some(f), Some(t)) = (v["file_name"].as_str(), v["text"].as_str()) {
                    meta.insert(root.join(f), t.to_string());
                }
            }
        }
        // Classes: first-level sub-folders holding images.
        let class_of = |p: &Path| -> Option<String> {
            let rel = p.strip_prefix(root).ok()?;
            let mut comps = rel.components();
            let first = comps.next()?;
            comps.next()?; // a file directly in root has no class
            Some(first.as_os_str().to_string_lossy().into_owned())
        };
        let mut classes: Vec<String> = files.iter().filter_map(|p| class_of(p)).collect();
        classes.sort();
        classes.dedup();
        let mut records = Vec::new();
        let mut skipped = 0;
        for path in files {
            if let Err(e) = image::ImageReader::open(&path)
                .and_then(|r| r.with_guessed_format())
                .map_err(|e| e.to_string())
                .and_then(|r| r.into_dimensions().map_err(|e| e.to_string()))
            {
                tracing::warn!("skipping unreadable image {}: {e}", path.display());
                skipped += 1;
                continue;
            }
            let caption = meta.get(&path).cloned().or_else(|| {
                std::fs::read_to_string(path.with_extension("txt"))
                    .ok()
                    .map(|s| s.trim().to_string())
            });
            let label = class_of(&path).and_then(|c| classes.iter().position(|x| *x == c));
            records.push(ImageRecord {
                path,
                caption,
                label,
            });
        }
        if records.is_empty() {
            return Err(read_err(format!(
                "no readable images ({skipped} unreadable; extensions: {})",
                EXTENSIONS.join(", ")
            )));
        }
        if skipped > 0 {
            tracing::warn!(
                "{skipped} unreadable image(s) skipped in {}",
                root.display()
            );
        }
        tracing::info!(
            "{}: {} images, {} captioned, {} classes",
            root.display(),
            records.len(),
            records.iter().filter(|r| r.caption.is_some()).count(),
            classes.len()
        );
        Ok(Self {
            records,
            classes,
            skipped_at_scan: skipped,
            transform,
            seed,
            failures: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Images that failed to decode while training (each replaced by the next readable one).
    pub fn load_failures(&self) -> usize {
        self.failures.load(Ordering::Relaxed)
    }

    /// Decodes and transforms one image to CHW floats in [−1, 1].
    pub fn load(&self, index: usize) -> std::result::Result<Vec<f32>, String> {
        let r = &self.records[index];
        let img = image::open(&r.path).map_err(|e| e.to_string())?.to_rgb8();
        let t = self.transform;
        let (w, h) = img.dimensions();
        let scale = t.size as f64 / w.min(h) as f64;
        let (nw, nh) = (
            ((w as f64 * scale).round() as u32).max(t.size as u32),
            ((h as f64 * scale).round() as u32).max(t.size as u32),
        );
        let img = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
        // Per-item RNG: an image gets the same crop and flip every time it is drawn in a run (for
        // a given seed), which keeps resumed runs exact and bounds `--cache-latents` to one entry
        // per image; unlike torchvision's per-draw transforms, it does not vary between passes.
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let (x0, y0) = if t.random_crop {
            (
                rng.random_range(0..=nw - t.size as u32),
                rng.random_range(0..=nh - t.size as u32),
            )
        } else {
            ((nw - t.size as u32) / 2, (nh - t.size as u32) / 2)
        };
        let flip = t.random_flip && rng.random_bool(0.5);
        let s = t.size;
        let mut out = vec![0f32; 3 * s * s];
        for y in 0..s {
            for x in 0..s {
                let sx = if flip { s - 1 - x } else { x };
                let p = img.get_pixel(x0 + sx as u32, y0 + y as u32);
                for c in 0..3 {
                    out[(c * s + y) * s + x] = 2.0 * (p[c] as f32 / 255.0) - 1.0;
                }
            }
        }
        Ok(out)
    }
}

/// A decoded training example.
#[derive(Debug, Clone)]
pub struct ImageItem {
    /// CHW pixels in [−1, 1].
    pub pixels: Vec<f32>,
    /// Side length.
    pub size: usize,
    /// Caption (empty string when none).
    pub caption: String,
    /// Class label, if any.
    pub label: Option<usize>,
    /// Where the item sits in what was read: its index in the folder, or its place in a training
    /// epoch's order (which keys the step's random draws, whichever device trains on it).
    pub position: usize,
}

impl Dataset<ImageItem> for ImageFolder {
    fn get(
        &self,
        index: usize,
    ) -> std::result::Result<ImageItem, burn::data::dataset::DatasetError> {
        let n = self.records.len();
        for k in 0..n {
            let i = (index + k) % n;
            match self.load(i) {
                Ok(pixels) => {
                    let r = &self.records[i];
                    return Ok(ImageItem {
                        pixels,
                        size: self.transform.size,
                        caption: r.caption.clone().unwrap_or_default(),
                        label: r.label,
                        position: index,
                    });
                }
                Err(e) => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("skipping {}: {e}", self.records[i].path.display());
                }
            }
        }
        Err(burn::data::dataset::DatasetError::new(
            std::io::Error::other("no image of the dataset could be decoded"),
        ))
    }

    fn len(&self) -> usize {
        self.records.len()
    }
}

/// A batch of images `[B, 3, S, S]` with captions and labels.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    /// Pixels in [−1, 1].
    pub images: Tensor<4>,
    /// Captions (empty strings for none).
    pub captions: Vec<String>,
    /// Labels (`None` when the folder has no classes).
    pub labels: Vec<Option<usize>>,
    /// The items' [`ImageItem::position`]s.
    pub positions: Vec<usize>,
}

/// Stacks [`ImageItem`]s.
#[derive(Debug, Clone, Default)]
pub struct ImageBatcher;

impl Batcher<ImageItem, ImageBatch> for ImageBatcher {
    fn batch(&self, items: Vec<ImageItem>, device: &Device) -> ImageBatch {
        let s = items[0].size;
        let n = items.len();
        let mut data = Vec::with_capacity(n * 3 * s * s);
        for it in &items {
            data.extend_from_slice(&it.pixels);
        }
        ImageBatch {
            images: Tensor::from_data(TensorData::new(data, [n, 3, s, s]), device),
            captions: items.iter().map(|i| i.caption.clone()).collect(),
            labels: items.iter().map(|i| i.label).collect(),
            positions: items.iter().map(|i| i.position).collect(),
        }
    }
}
