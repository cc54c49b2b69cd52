"""How much can the shape word lower the demo model's denoising loss at best? Computed without
training anything: the *optimal* denoiser of a finite dataset is a weighted mean of its latents,

    E[z0 | z_t, caption] = sum_j w_j z0_j,   w_j ∝ exp(-|z_t - sqrt(ᾱ) z0_j|² / (2 (1 - ᾱ))),

over the training images whose caption matches. Matching the whole caption gives the best loss a
model that reads every word can reach; matching all words but the shape gives the best loss of a
model that ignores the shape word. Their ratio is what the shape word is worth to the loss at that
noise level (v-prediction: the x0 error divided by 1 - ᾱ). Each test image is left out of its own
candidate set. At low noise the estimate favours the larger (shape-blind) set, whose nearest
neighbours are closer; the high-noise rows are the ones that matter.

The latents come from a checkpoint's first stage (the reference AutoencoderKL, as demo_probe.py),
scaled by its scale_factor.

    LDM_REFERENCE=... TAMING_REFERENCE=... python3 xtask/reference/demo_optimal.py \\
        --ckpt crates/ldm/assets/demo/model.safetensors --data target/demo/data
"""
import argparse
import os
import sys
from collections import defaultdict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_modules import load_checkpoint  # noqa: E402

# ᾱ of the demo's SD schedule at t = 500, 700, 900, 999, and two noisier levels (an LDM schedule's
# end, β 0.0015 → 0.0195, and beyond).
ALPHA_BARS = [0.28, 0.083, 0.014, 0.0047, 0.00087, 0.00014]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", type=int, default=20000, help="training images to use")
    ap.add_argument("--tests", type=int, default=300, help="test images (drawn from them)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from PIL import Image

    torch.set_num_threads(a.threads)
    _, _, ae, scale, _ = load_checkpoint(a.ckpt)

    names = sorted(f[:-4] for f in os.listdir(a.data) if f.endswith(".png"))[:a.images]
    caps = [open(os.path.join(a.data, k + ".txt")).read().strip() for k in names]
    z = []
    with torch.no_grad():
        for i in range(0, len(names), 500):
            x = np.stack([np.asarray(Image.open(os.path.join(a.data, k + ".png")).convert("RGB"))
                          for k in names[i:i + 500]])
            x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
            z.append(ae.encode(x).mode() * scale)
    z = torch.cat(z).flatten(1).double()

    # Candidate sets: the same caption, and the same caption but for the shape word (the 4th).
    with_shape, without_shape = defaultdict(list), defaultdict(list)
    key_with, key_without = [], []
    for i, c in enumerate(caps):
        w = c.split()
        key_with.append(c)
        key_without.append(" ".join(w[:3] + w[4:]))
        with_shape[key_with[-1]].append(i)
        without_shape[key_without[-1]].append(i)
    tests = torch.randperm(len(caps), generator=torch.Generator().manual_seed(0))[:a.tests].tolist()

    def best_loss(ab, groups, keys):
        g = torch.Generator().manual_seed(1)
        total = 0.0
        for i in tests:
            cand = torch.tensor([j for j in groups[keys[i]] if j != i])
            eps = torch.randn(z.shape[1], generator=g, dtype=torch.float64)
            zt = ab ** 0.5 * z[i] + (1 - ab) ** 0.5 * eps
            logw = -((zt - ab ** 0.5 * z[cand]) ** 2).sum(1) / (2 * (1 - ab))
            z0 = (torch.softmax(logw, 0)[:, None] * z[cand]).sum(0)
            total += ((z0 - z[i]) ** 2).mean().item() / (1 - ab)
        return total / len(tests)

    print(f"{a.ckpt} on {a.data}: {len(caps)} images, {len(tests)} test images")
    print("best achievable v-loss")
    print(f"{'ᾱ_t':>9} {'shape word read':>16} {'shape word ignored':>19} {'ratio':>6}")
    for ab in ALPHA_BARS:
        known = best_loss(ab, with_shape, key_with)
        blind = best_loss(ab, without_shape, key_without)
        print(f"{ab:9.2e} {known:16.4f} {blind:19.4f} {blind / known:6.2f}", flush=True)


if __name__ == "__main__":
    main()
