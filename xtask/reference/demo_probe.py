"""Which words of the prompt does a demo-model checkpoint use? Built from the *reference* modules
(CompVis UNetModel, BERTEmbedder, AutoencoderKL, as xtask/reference/demo_train.py) and a checkpoint
that `ldm eval shapes --ckpt` reads (CompVis layout: the shipped f16 weights, `ldm train diffusion`'s
model.safetensors, or demo_train.py's output).

Three measurements, the first two on 128 training images (captions `a {size} {color} {shape} on a
{background} background`):

1. Denoising loss (v-prediction, the demo's SD schedule) with the right caption and with one word
   swapped for another of its kind, at t = 100..900. A word the model uses raises the loss when it
   is wrong; a word it ignores leaves it unchanged.
2. How far each word's information travels through the text encoder: the change of the BERT output
   at the word's own position and at the others when the word alone changes. The UNet's
   cross-attention can read a word from any position it reaches.
3. How far apart the first stage's latents of a circle, a square and a triangle are (same colours,
   centre and area), against their pixels: the UNet's loss only sees what the latents keep.

    LDM_REFERENCE=... TAMING_REFERENCE=... python3 xtask/reference/demo_probe.py \\
        --ckpt crates/ldm/assets/demo/model.safetensors --data target/demo/data
"""
import argparse
import os
import random
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_modules import ROOT, alphas_cumprod, bert_ids, load_checkpoint  # noqa: E402

# Each word's token position (after [CLS]; its index in the caption is one less) and its kind.
WORDS = {
    "size": (2, ["small", "large"]),
    "colour": (3, "red green blue yellow white black purple orange".split()),
    "shape": (4, ["circle", "square", "triangle"]),
    "background": (7, "red green blue yellow white black purple orange".split()),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help="BERTEmbedder max_seq_len (default: the checkpoint's position table)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from PIL import Image

    torch.set_num_threads(a.threads)
    unet, bert, ae, scale, n = load_checkpoint(a.ckpt, a.max_seq_len)

    ids = bert_ids(n, os.path.join(ROOT, "target", "bert-vocab.txt"))

    names = sorted(f[:-4] for f in os.listdir(a.data) if f.endswith(".png"))[1000:1128]
    x = torch.from_numpy(np.stack([np.asarray(Image.open(os.path.join(a.data, k + ".png")).convert("RGB"))
                                   for k in names])).permute(0, 3, 1, 2).float() / 127.5 - 1
    caps = [open(os.path.join(a.data, k + ".txt")).read().strip() for k in names]
    z = ae.encode(x).mode() * scale
    rng = random.Random(0)

    def swap(cap, pos, pool):
        w = cap.split()
        w[pos - 1] = rng.choice([p for p in pool if p != w[pos - 1]])
        return " ".join(w)

    variants = {"right caption": caps, **{f"wrong {k}": [swap(c, p, pool) for c in caps]
                                           for k, (p, pool) in WORDS.items()}, "empty": [""] * len(caps)}
    acp = alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    print(f"{a.ckpt}: context {n} tokens\n\ndenoising loss (v) on {len(caps)} training images")
    print("t    " + "".join(f"{k:>18}" for k in variants))
    with torch.no_grad():
        for t0 in (100, 300, 500, 700, 900):
            t = torch.full((len(caps),), t0)
            noise = torch.randn(z.shape, generator=g)
            sa, so = acp[t].sqrt().view(-1, 1, 1, 1), (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
            xt, target = sa * z + so * noise, sa * noise - so * z
            row = [((unet(xt, timesteps=t, context=bert(ids(v))) - target) ** 2).mean().item()
                   for v in variants.values()]
            print(f"{t0:<5}" + "".join(f"{v:>18.4f}" for v in row))

        base = "a large red circle on a blue background"
        alt = {"size": "small", "colour": "green", "shape": "square", "background": "yellow"}
        o0 = bert(ids([base]))[0]
        print(f"\nchange of the text encoder's output when one word of {base!r} changes")
        print(f"{'word':<20}{'own position':>14}{'other positions':>17}")
        for k, (pos, _) in WORDS.items():
            w = base.split()
            w[pos - 1] = alt[k]
            d = (bert(ids([" ".join(w)]))[0] - o0).norm(dim=-1)
            others = torch.cat([d[:pos], d[pos + 1:]]).mean().item()
            print(f"{k + ' -> ' + alt[k]:<20}{d[pos].item():>14.2f}{others:>17.2f}")

        # 3. What the first stage keeps of the shape: squared distances between the latents (scaled
        # as the UNet sees them) of a red shape centred on blue, against those of the pixels.
        # Shapes as `ldm data shapes` draws them: equal areas, 4x4 supersampled.
        print("\nsquared distance between shapes of one size, latent (pixel); 'none': the background alone")
        pairs = [("circle", "square"), ("circle", "triangle"), ("square", "triangle"),
                 ("circle", "circle x1.2"), ("circle", "none")]
        sq = lambda m, p, q: ((m[p] - m[q]) ** 2).sum().item()
        for size, r in (("small", 8.5), ("large", 15.5)):
            px = {k: render(k, r) for k in ("circle", "square", "triangle", "none")}
            px["circle x1.2"] = render("circle", 1.2 * r)
            zs = {k: ae.encode(v).mode() * scale for k, v in px.items()}
            print(f"{size:<6}" + "   ".join(f"{p}-{q}: {sq(zs, p, q):.1f} ({sq(px, p, q):.0f})" for p, q in pairs))


def render(shape, r, fg=(220, 30, 30), bg=(30, 60, 220)):
    """A centred shape of equal-area radius r as crates/ldm/src/demo/shapes.rs draws it, in [-1, 1]."""
    ss = 4
    ys, xs = np.mgrid[0:64 * ss, 0:64 * ss]
    x, y, c = (xs + 0.5) / ss, (ys + 0.5) / ss, 32.0
    if shape == "circle":
        m = (x - c) ** 2 + (y - c) ** 2 <= r * r
    elif shape == "square":
        h = r * np.sqrt(np.pi) / 2
        m = (abs(x - c) <= h) & (abs(y - c) <= h)
    elif shape == "triangle":  # apex up, bounding box centred
        s = r * np.sqrt(4 * np.pi / np.sqrt(3))
        hx, hy = s / 2, s * np.sqrt(3) / 4
        m = (y >= c - hy) & (y <= c + hy) & (abs(x - c) <= hx * (y - (c - hy)) / (2 * hy))
    else:
        m = np.zeros_like(x, dtype=bool)
    a = m.reshape(64, ss, 64, ss).mean((1, 3))[..., None]
    img = np.round(np.array(fg) * a + np.array(bg) * (1 - a))
    return torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1


if __name__ == "__main__":
    main()
