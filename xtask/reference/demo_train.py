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
default, as torch's `nn.Embedding`) are N(0, 1); `--embed-std 1` draws them as ours. `--max-seq-len` is the config's BERT context
(`max_seq_len`, 77 unless set). Captions are tokenized by the `tokenizers` library directly (the
transformers 5 `BertTokenizerFast(vocab_file=...)` silently ignores the file: every word [UNK]).

    LDM_REFERENCE=... TAMING_REFERENCE=... python3 xtask/reference/demo_train.py \
        --data target/demo/data --first-stage target/demo/autoencoder/first_stage.safetensors \
        --steps 1300 --lr 1e-3 --out /tmp/reference-demo

writes OUT.csv (step,loss: compare with <run>/losses.csv of `ldm train diffusion`) and
OUT.safetensors, a CompVis-layout checkpoint (EMA UNet) that `ldm eval shapes --ckpt` reads.
"""
import argparse
import copy
import gzip
import os
import sys
import time
import types

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


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
    for var in ("LDM_REFERENCE", "TAMING_REFERENCE"):
        if not os.path.isdir(os.environ.get(var, "")):
            sys.exit(f"set {var} to a checkout (see README.md, section 'Parity fixtures')")
        sys.path.insert(0, os.environ[var])
    for m in ("clip", "kornia"):  # imported by encoders/modules.py, unused here
        sys.modules.setdefault(m, types.ModuleType(m))
    import ldm.modules.diffusionmodules.model as model_py

    model_py.Normalize = lambda c, num_groups=32: torch.nn.Identity()  # norm_num_groups: 0
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.modules.encoders.modules import BERTEmbedder
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from tokenizers import BertWordPieceTokenizer

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # crates/ldm/assets/demo/config.yaml
    unet = UNetModel(image_size=16, in_channels=3, out_channels=3, model_channels=64, attention_resolutions=[1, 2],
                     num_res_blocks=1, channel_mult=[1, 2], num_head_channels=32, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=64)
    bert = BERTEmbedder(n_embed=64, n_layer=2, max_seq_len=a.max_seq_len, use_tokenizer=False)
    if a.embed_std is not None:
        with torch.no_grad():
            bert.transformer.token_emb.weight.normal_(0, a.embed_std)
            bert.transformer.pos_emb.emb.weight.normal_(0, a.embed_std)
    vocab = os.path.join(a.out + ".vocab.txt")
    with gzip.open(os.path.join(ROOT, "crates/ldm/assets/tokenizers/bert/vocab.txt.gz")) as f, open(vocab, "wb") as g:
        g.write(f.read())
    # `tokenizers` directly: transformers 5's BertTokenizerFast(vocab_file=...) ignores the file and
    # maps every word to [UNK] without a warning (a text-blind model). Checked below.
    tok = BertWordPieceTokenizer(vocab, lowercase=True)
    tok.enable_truncation(a.max_seq_len)
    tok.enable_padding(length=a.max_seq_len, pad_id=0, pad_token="[PAD]")
    probe = tok.encode("a large red circle on a blue background").ids
    assert probe[:5] == [101, 1037, 2312, 2417, 4418], f"BERT tokenizer broken: {probe[:10]}"
    dd = dict(double_z=True, z_channels=3, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    ae = AutoencoderKL(ddconfig=dd, lossconfig={"target": "torch.nn.Identity"}, embed_dim=3)
    first = load_file(a.first_stage)
    ae.load_state_dict({k[len("first_stage_model."):]: v for k, v in first.items()})
    ae.eval().requires_grad_(False)

    names = sorted(f[:-4] for f in os.listdir(a.data) if f.endswith(".png"))
    imgs = torch.from_numpy(np.stack([np.asarray(Image.open(os.path.join(a.data, n + ".png")).convert("RGB"))
                                      for n in names])).permute(0, 3, 1, 2)
    caps = [open(os.path.join(a.data, n + ".txt")).read().strip() for n in names]
    n_data, b = len(names), a.batch
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0).float()
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
        ids = torch.tensor([e.ids for e in tok.encode_batch(c)])
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
