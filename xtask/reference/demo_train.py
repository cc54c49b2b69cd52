"""The demo model's diffusion stage trained by the *reference* modules, to check that `ldm train
diffusion` learns at the reference's pace (same loss curve for the same recipe).

It builds CompVis' UNetModel, BERTEmbedder (bert-base-uncased WordPiece from the vocabulary the
library embeds) and AutoencoderKL (our trained first stage; `norm_num_groups: 0` = no GroupNorm,
patched in as Identity) from a checkout of CompVis/latent-diffusion + taming-transformers, and
trains with the recipe of `cargo xtask train-demo`'s first diffusion stage: v-prediction, offset
noise 0.5, 10% empty captions, horizontal flips, AdamW (eps 1e-8, weight decay 0.01) with a
linear warm-up from 1e-6·lr over 100 steps, scale_by_std on the first batch, EMA 0.995 with
LitEma's warm-up. Data order, noise and dropout come from torch/numpy seeds, not ours, so the
curves agree in trend, not draw for draw. Initialisation is the reference's too: x-transformers
draws BERT's token and position embeddings from N(0, 0.02²), where `ldm`'s (Burn's `Embedding`
default, as torch's `nn.Embedding`) are N(0, 1); `--embed-std 1` draws them as ours.
`--max-seq-len` is the config's BERT context (`max_seq_len`, 77 unless set). Captions are tokenized
by the `tokenizers` library directly (see demo_modules.bert_ids).

    LDM_REFERENCE=... TAMING_REFERENCE=... python3 xtask/reference/demo_train.py \
        --data target/demo/data --first-stage target/demo/autoencoder/first_stage.safetensors \
        --steps 1300 --lr 1e-3 --out /tmp/reference-demo

writes OUT.csv (step,loss: compare with <run>/losses.csv of `ldm train diffusion`) and
OUT.safetensors, a CompVis-layout checkpoint (EMA UNet) that `ldm eval shapes --ckpt` reads.
"""
import argparse
import copy
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_modules import alphas_cumprod, bert_ids, reference_modules  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--first-stage", required=True)
    ap.add_argument("--steps", type=int, default=1300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=77, help="BERTEmbedder max_seq_len (the config's)")
    ap.add_argument("--embed-std", type=float, default=None,
                    help="std of BERT's token and position embeddings at init (x-transformers: 0.02; ldm: 1)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from PIL import Image
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    unet, bert, ae = reference_modules(a.max_seq_len)
    if a.embed_std is not None:
        with torch.no_grad():
            bert.transformer.token_emb.weight.normal_(0, a.embed_std)
            bert.transformer.pos_emb.emb.weight.normal_(0, a.embed_std)
    ids_of = bert_ids(a.max_seq_len, a.out + ".vocab.txt")
    first = load_file(a.first_stage)
    ae.load_state_dict({k[len("first_stage_model."):]: v for k, v in first.items()})
    ae.eval().requires_grad_(False)

    names = sorted(f[:-4] for f in os.listdir(a.data) if f.endswith(".png"))
    imgs = torch.from_numpy(np.stack([np.asarray(Image.open(os.path.join(a.data, n + ".png")).convert("RGB"))
                                      for n in names])).permute(0, 3, 1, 2)
    caps = [open(os.path.join(a.data, n + ".txt")).read().strip() for n in names]
    n_data, b = len(names), a.batch
    acp = alphas_cumprod()
    opt = torch.optim.AdamW(list(unet.parameters()) + list(bert.parameters()), lr=a.lr, eps=1e-8, weight_decay=0.01)
    ema, n_ema, scale = copy.deepcopy(unet).requires_grad_(False), 0, None
    perm, t0, log = rng.permutation(n_data), time.time(), open(a.out + ".csv", "w")
    log.write("step,loss\n")
    for s in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, 1e-6 + (1 - 1e-6) * s / 100)
        idx = perm[np.arange(s * b, (s + 1) * b) % n_data]
        x = imgs[idx].float() / 127.5 - 1
        flip = torch.from_numpy(rng.random(b) < 0.5)
        x[flip] = x[flip].flip(-1)
        c = ["" if rng.random() < 0.1 else caps[i] for i in idx]
        with torch.no_grad():
            z = ae.encode(x).sample()
            if scale is None:
                scale = 1 / z.flatten().std().item()
                print("scale_factor", scale)
            z = z * scale
        ids = ids_of(c)
        t = torch.randint(0, 1000, (b,))
        noise = torch.randn_like(z) + 0.5 * torch.randn(b, 3, 1, 1)
        sa, so = acp[t].sqrt().view(b, 1, 1, 1), (1 - acp[t]).sqrt().view(b, 1, 1, 1)
        pred = unet(sa * z + so * noise, timesteps=t, context=bert(ids))
        loss = ((pred - (sa * noise - so * z)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        n_ema += 1
        d = min(0.995, (1 + n_ema) / (10 + n_ema))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.sub_((1 - d) * (pe - p))
        log.write(f"{s},{loss.item()}\n")
        if (s + 1) % 50 == 0:
            log.flush()
            print(s + 1, f"loss {loss.item():.4f}", f"{(time.time() - t0) / (s + 1):.2f} s/step", flush=True)
    st = {"model.diffusion_model." + k: v.contiguous() for k, v in ema.state_dict().items()}
    st.update({"cond_stage_model." + k: v.contiguous() for k, v in bert.state_dict().items()})
    st.update(first)
    st["scale_factor"] = torch.tensor(scale)
    save_file(st, a.out + ".safetensors")
    print("wrote", a.out + ".safetensors")


if __name__ == "__main__":
    main()
