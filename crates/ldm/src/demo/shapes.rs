//! The procedural "shapes" dataset the demo model is trained on, and the deterministic classifier
//! that scores generated images against their prompts (`ldm data shapes`, `ldm eval shapes`).
//!
//! Each image is `SIZE`x`SIZE` RGB: one filled shape (circle, square or upward triangle) of one
//! colour on a plain background of another, anti-aliased by 4x4 supersampling, with the caption
//! `a {size} {color} {shape} on a {background} background`. Shapes of one size class have equal area
//! whatever their kind, so the classifier can tell size from area and kind from the fill ratio of the
//! bounding box (square 1, circle π/4, triangle 1/2). A fixed tenth of the (color, shape, background)
//! combinations ([`held_out`]) never appears in training data: generating them is compositional
//! generalisation, which `ldm eval shapes` measures.
//!
//! Positions jitter by at most [`JITTER`] pixels around the centre (see there for why so little).
//!
//! Everything is a function of (seed, index) through SplitMix64, so a dataset is identical on every
//! machine (the placement rule changed once, when [`JITTER`] came in).

/// Image side in pixels.
pub const SIZE: usize = 64;

/// The eight colours (for both shapes and backgrounds), by name and sRGB value.
pub const COLORS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 50]),
    ("blue", [30, 60, 220]),
    ("yellow", [240, 220, 30]),
    ("white", [245, 245, 245]),
    ("black", [15, 15, 15]),
    ("purple", [140, 40, 180]),
    ("orange", [250, 130, 0]),
];

/// Shape kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

/// Size classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SizeClass {
    Small,
    Large,
}

impl SizeClass {
    pub const ALL: [SizeClass; 2] = [SizeClass::Small, SizeClass::Large];
    pub fn name(self) -> &'static str {
        match self {
            SizeClass::Small => "small",
            SizeClass::Large => "large",
        }
    }
    /// Range of the equal-area radius r (the shape's area is π r²).
    fn radius_range(self) -> (f64, f64) {
        match self {
            SizeClass::Small => (7.0, 10.0),
            SizeClass::Large => (14.0, 17.5),
        }
    }
}

/// A (colour, shape, background) combination; colours index [`COLORS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Combo {
    pub color: usize,
    pub shape: Shape,
    pub background: usize,
}

impl Combo {
    /// All 8·3·7 = 168 combinations (colour ≠ background), in a fixed order.
    pub fn all() -> Vec<Combo> {
        let mut v = Vec::new();
        for color in 0..COLORS.len() {
            for shape in Shape::ALL {
                for background in 0..COLORS.len() {
                    if background != color {
                        v.push(Combo {
                            color,
                            shape,
                            background,
                        });
                    }
                }
            }
        }
        v
    }

    /// The caption of this combination at a size.
    pub fn caption(&self, size: SizeClass) -> String {
        format!(
            "a {} {} {} on a {} background",
            size.name(),
            COLORS[self.color].0,
            self.shape.name(),
            COLORS[self.background].0
        )
    }
}

/// One image's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShapeSpec {
    pub combo: Combo,
    pub size: SizeClass,
    /// Equal-area radius in pixels.
    pub radius: f64,
    /// Centre of the shape's bounding box, in pixels.
    pub center: (f64, f64),
}

impl ShapeSpec {
    pub fn caption(&self) -> String {
        self.combo.caption(self.size)
    }
}

/// SplitMix64: a tiny PRNG whose output is fixed forever (unlike `rand`'s `StdRng`).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n
    }
}

/// The held-out combinations: a fixed 10% (17 of 168), chosen once by a seeded shuffle so that every
/// colour, shape and background still appears in training.
pub fn held_out() -> Vec<Combo> {
    let mut all = Combo::all();
    let mut rng = SplitMix64::new(0x05EE_D0F5_A9E5);
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i + 1));
    }
    let n = (all.len() as f64 * 0.1).round() as usize;
    all.truncate(n);
    all
}

/// The combinations training data is drawn from.
pub fn training_combos() -> Vec<Combo> {
    let held = held_out();
    Combo::all()
        .into_iter()
        .filter(|c| !held.contains(c))
        .collect()
}

/// Half-extents (x, y) of the shape's bounding box for an equal-area radius r.
fn half_extent(shape: Shape, r: f64) -> (f64, f64) {
    match shape {
        Shape::Circle => (r, r),
        // side s with s² = π r²
        Shape::Square => {
            let s = r * std::f64::consts::PI.sqrt();
            (s / 2.0, s / 2.0)
        }
        // equilateral, side s with (√3/4) s² = π r²; height (√3/2) s
        Shape::Triangle => {
            let s = r * (4.0 * std::f64::consts::PI / 3f64.sqrt()).sqrt();
            (s / 2.0, s * 3f64.sqrt() / 4.0)
        }
    }
}

/// Draw the parameters of image `index` of the dataset with `seed` from `combos`.
pub fn sample_spec(combos: &[Combo], seed: u64, index: u64) -> ShapeSpec {
    let mut rng = SplitMix64::new(seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
    rng.next_u64();
    let combo = combos[rng.below(combos.len())];
    spec_for(combo, SizeClass::ALL[rng.below(2)], &mut rng)
}

/// How far (pixels) a shape's centre moves from the image centre, at most, along each axis.
///
/// Small on purpose. With the centre anywhere the shape fits (up to ±20 px, this dataset's first
/// placement rule), the denoising loss barely rewards knowing the shape word: the best possible
/// denoiser given the caption predicts a blob smeared over the positions, and knowing circle vs
/// square vs triangle lowers its loss by 4–5% at high noise (the optimal denoiser over the 20,000
/// training latents, `xtask/reference/demo_optimal.py`), against 33–43% at ±4 px. A model trained
/// on the wide placements ignored the shape word entirely.
pub const JITTER: f64 = 4.0;

/// Least distance (pixels) between a shape's bounding box and the image edge.
const MARGIN: f64 = 4.0;

/// A random placement of `combo` at `size`: radius uniform in the size class's range, centre
/// uniform within ±[`JITTER`] of the image centre (kept [`MARGIN`] from the edges).
pub fn spec_for(combo: Combo, size: SizeClass, rng: &mut SplitMix64) -> ShapeSpec {
    let (lo, hi) = size.radius_range();
    let radius = lo + (hi - lo) * rng.uniform();
    let (hx, hy) = half_extent(combo.shape, radius);
    let n = SIZE as f64;
    // Centre within ±JITTER of the image centre, the bounding box at least MARGIN from the edges.
    let place =
        |h: f64, u: f64| (n / 2.0 + JITTER * (2.0 * u - 1.0)).clamp(MARGIN + h, n - MARGIN - h);
    let cx = place(hx, rng.uniform());
    let cy = place(hy, rng.uniform());
    ShapeSpec {
        combo,
        size,
        radius,
        center: (cx, cy),
    }
}

/// Is the point inside the shape?
fn inside(spec: &ShapeSpec, x: f64, y: f64) -> bool {
    let (cx, cy) = spec.center;
    let (hx, hy) = half_extent(spec.combo.shape, spec.radius);
    match spec.combo.shape {
        Shape::Circle => (x - cx).powi(2) + (y - cy).powi(2) <= spec.radius * spec.radius,
        Shape::Square => (x - cx).abs() <= hx && (y - cy).abs() <= hy,
        Shape::Triangle => {
            // apex at the top (cx, cy - hy), base at y = cy + hy
            if y < cy - hy || y > cy + hy {
                return false;
            }
            let t = (y - (cy - hy)) / (2.0 * hy); // 0 at apex, 1 at base
            (x - cx).abs() <= hx * t
        }
    }
}

/// Render to row-major RGB bytes (`SIZE`·`SIZE`·3), anti-aliased by 4x4 supersampling.
pub fn render(spec: &ShapeSpec) -> Vec<u8> {
    let fg = COLORS[spec.combo.color].1;
    let bg = COLORS[spec.combo.background].1;
    let mut out = Vec::with_capacity(SIZE * SIZE * 3);
    const SS: usize = 4;
    for py in 0..SIZE {
        for px in 0..SIZE {
            let mut hits = 0;
            for sy in 0..SS {
                for sx in 0..SS {
                    let x = px as f64 + (sx as f64 + 0.5) / SS as f64;
                    let y = py as f64 + (sy as f64 + 0.5) / SS as f64;
                    hits += inside(spec, x, y) as usize;
                }
            }
            let a = hits as f64 / (SS * SS) as f64;
            for c in 0..3 {
                out.push((fg[c] as f64 * a + bg[c] as f64 * (1.0 - a)).round() as u8);
            }
        }
    }
    out
}

/// Nearest palette colour (index) to an RGB value.
pub fn nearest_color(rgb: [f64; 3]) -> usize {
    (0..COLORS.len())
        .min_by(|&a, &b| {
            let d = |i: usize| {
                (0..3)
                    .map(|c| (rgb[c] - COLORS[i].1[c] as f64).powi(2))
                    .sum::<f64>()
            };
            d(a).total_cmp(&d(b))
        })
        .unwrap()
}

/// What the classifier sees in an image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Classified {
    /// Background: the nearest palette colour to the median of the 2-pixel border.
    pub background: usize,
    /// The shape's colour: nearest palette colour to the median of the foreground pixels (None if
    /// no pixel stands out from the background).
    pub color: Option<usize>,
    /// Shape from the fill ratio of the foreground's bounding box.
    pub shape: Option<Shape>,
    /// Size class from the foreground area.
    pub size: Option<SizeClass>,
    /// Foreground pixels / bounding-box pixels.
    pub fill_ratio: f64,
    /// Foreground pixels.
    pub area: usize,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Classify a `width`x`height` RGB image (row-major bytes). Deterministic, no learned parts.
///
/// Foreground = pixels farther than 50 (RGB Euclidean) from the measured background colour; the
/// largest 4-connected foreground component is the shape. Fill ratio < 0.64 → triangle, < 0.89 →
/// circle, else square; area (scaled to 64x64) < 400 → small.
pub fn classify(rgb: &[u8], width: usize, height: usize) -> Classified {
    assert_eq!(
        rgb.len(),
        width * height * 3,
        "classify: buffer is not width·height·3"
    );
    let px = |x: usize, y: usize| {
        let i = (y * width + x) * 3;
        [rgb[i] as f64, rgb[i + 1] as f64, rgb[i + 2] as f64]
    };
    let mut border: [Vec<f64>; 3] = Default::default();
    for y in 0..height {
        for x in 0..width {
            if x < 2 || y < 2 || x + 2 >= width || y + 2 >= height {
                let p = px(x, y);
                for c in 0..3 {
                    border[c].push(p[c]);
                }
            }
        }
    }
    let bg_rgb = [
        median(&mut border[0]),
        median(&mut border[1]),
        median(&mut border[2]),
    ];
    let background = nearest_color(bg_rgb);
    let dist = |p: [f64; 3]| {
        (0..3)
            .map(|c| (p[c] - bg_rgb[c]).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let fg: Vec<bool> = (0..width * height)
        .map(|i| dist(px(i % width, i / width)) > 50.0)
        .collect();
    // largest 4-connected component
    let mut label = vec![0u32; width * height];
    let mut best: Vec<usize> = Vec::new();
    let mut next = 0u32;
    for start in 0..width * height {
        if !fg[start] || label[start] != 0 {
            continue;
        }
        next += 1;
        let mut comp = vec![start];
        label[start] = next;
        let mut k = 0;
        while k < comp.len() {
            let i = comp[k];
            k += 1;
            let (x, y) = (i % width, i / width);
            let mut push = |j: usize| {
                if fg[j] && label[j] == 0 {
                    label[j] = next;
                    comp.push(j);
                }
            };
            if x > 0 {
                push(i - 1);
            }
            if x + 1 < width {
                push(i + 1);
            }
            if y > 0 {
                push(i - width);
            }
            if y + 1 < height {
                push(i + width);
            }
        }
        if comp.len() > best.len() {
            best = comp;
        }
    }
    if best.len() < 4 {
        return Classified {
            background,
            color: None,
            shape: None,
            size: None,
            fill_ratio: 0.0,
            area: best.len(),
        };
    }
    let mut ch: [Vec<f64>; 3] = Default::default();
    let (mut x0, mut x1, mut y0, mut y1) = (usize::MAX, 0, usize::MAX, 0);
    for &i in &best {
        let (x, y) = (i % width, i / width);
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        let p = px(x, y);
        for c in 0..3 {
            ch[c].push(p[c]);
        }
    }
    let color = nearest_color([median(&mut ch[0]), median(&mut ch[1]), median(&mut ch[2])]);
    let bbox = ((x1 - x0 + 1) * (y1 - y0 + 1)) as f64;
    let fill_ratio = best.len() as f64 / bbox;
    let shape = if fill_ratio < 0.64 {
        Shape::Triangle
    } else if fill_ratio < 0.89 {
        Shape::Circle
    } else {
        Shape::Square
    };
    let area64 = best.len() as f64 * (SIZE * SIZE) as f64 / (width * height) as f64;
    let size = if area64 < 400.0 {
        SizeClass::Small
    } else {
        SizeClass::Large
    };
    Classified {
        background,
        color: Some(color),
        shape: Some(shape),
        size: Some(size),
        fill_ratio,
        area: best.len(),
    }
}

/// Parse a caption of the form `a {size} {color} {shape} on a {background} background`.
pub fn parse_caption(caption: &str) -> Option<(Combo, SizeClass)> {
    let w: Vec<&str> = caption.split_whitespace().collect();
    if w.len() != 8 || w[0] != "a" || w[4] != "on" || w[5] != "a" || w[7] != "background" {
        return None;
    }
    let size = SizeClass::ALL.into_iter().find(|s| s.name() == w[1])?;
    let color = COLORS.iter().position(|c| c.0 == w[2])?;
    let shape = Shape::ALL.into_iter().find(|s| s.name() == w[3])?;
    let background = COLORS.iter().position(|c| c.0 == w[6])?;
    (color != background).then_some((
        Combo {
            color,
            shape,
            background,
        },
        size,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_is_a_tenth_and_leaves_every_attribute_in_training() {
        let held = held_out();
        assert_eq!(Combo::all().len(), 168);
        assert_eq!(held.len(), 17);
        let train = training_combos();
        assert_eq!(train.len(), 151);
        for c in 0..COLORS.len() {
            assert!(train.iter().any(|t| t.color == c) && train.iter().any(|t| t.background == c));
        }
        for s in Shape::ALL {
            assert!(train.iter().any(|t| t.shape == s));
        }
    }

    #[test]
    fn placements_jitter_within_bounds_around_the_centre() {
        let mut rng = SplitMix64::new(3);
        let (mut lo, mut hi) = (f64::MAX, f64::MIN);
        for combo in Combo::all() {
            for size in SizeClass::ALL {
                let spec = spec_for(combo, size, &mut rng);
                let (hx, hy) = half_extent(combo.shape, spec.radius);
                for (c, h) in [(spec.center.0, hx), (spec.center.1, hy)] {
                    let off = c - SIZE as f64 / 2.0;
                    assert!(off.abs() <= JITTER, "{spec:?}");
                    assert!(c - h >= MARGIN && c + h <= SIZE as f64 - MARGIN, "{spec:?}");
                    (lo, hi) = (lo.min(off), hi.max(off));
                }
            }
        }
        // 672 draws of a uniform offset: both ends of the range are reached.
        assert!(
            lo < -0.9 * JITTER && hi > 0.9 * JITTER,
            "offsets span [{lo}, {hi}]"
        );
    }

    #[test]
    fn classifier_reads_rendered_images_exactly() {
        // Every combination at both sizes, several placements: the classifier must be perfect on
        // the renderer's own images, or it cannot score a model.
        let mut rng = SplitMix64::new(7);
        for combo in Combo::all() {
            for size in SizeClass::ALL {
                for _ in 0..3 {
                    let spec = spec_for(combo, size, &mut rng);
                    let got = classify(&render(&spec), SIZE, SIZE);
                    assert_eq!(got.background, combo.background, "{spec:?} {got:?}");
                    assert_eq!(got.color, Some(combo.color), "{spec:?} {got:?}");
                    assert_eq!(got.shape, Some(combo.shape), "{spec:?} {got:?}");
                    assert_eq!(got.size, Some(size), "{spec:?} {got:?}");
                }
            }
        }
    }

    #[test]
    fn captions_round_trip_and_specs_are_deterministic() {
        let combos = training_combos();
        for i in 0..50 {
            let s = sample_spec(&combos, 3, i);
            assert_eq!(s, sample_spec(&combos, 3, i));
            assert_eq!(parse_caption(&s.caption()), Some((s.combo, s.size)));
            assert!(!held_out().contains(&s.combo));
        }
        assert_eq!(
            parse_caption("a large red circle on a red background"),
            None
        );
        assert_eq!(parse_caption("a big red circle on a blue background"), None);
    }
}
