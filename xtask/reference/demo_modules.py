"""The demo model's modules from the reference code, its BERT tokenizer and noise schedule, shared
by demo_train.py, demo_probe.py and demo_optimal.py: CompVis UNetModel, BERTEmbedder and AutoencoderKL as crates/ldm/assets/demo/
config.yaml and autoencoder.yaml configure them (`norm_num_groups: 0` = no GroupNorm, patched in as
Identity), from checkouts of CompVis/latent-diffusion and taming-transformers named by
LDM_REFERENCE and TAMING_REFERENCE.
"""
import gzip
import os
import sys
import types

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def reference_modules(max_seq_len):
    """Fresh (unet, bert, autoencoder) with the reference's initialisation."""
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

    unet = UNetModel(image_size=16, in_channels=3, out_channels=3, model_channels=64, attention_resolutions=[1, 2],
                     num_res_blocks=1, channel_mult=[1, 2], num_head_channels=32, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=64)
    bert = BERTEmbedder(n_embed=64, n_layer=2, max_seq_len=max_seq_len, use_tokenizer=False)
    dd = dict(double_z=True, z_channels=3, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    ae = AutoencoderKL(ddconfig=dd, lossconfig={"target": "torch.nn.Identity"}, embed_dim=3)
    return unet, bert, ae


def load_checkpoint(path, max_seq_len=None):
    """(unet, bert, autoencoder, scale_factor, context length) of a CompVis-layout demo checkpoint
    (the shipped f16 weights, `ldm train diffusion`'s model.safetensors, demo_train.py's output),
    the modules in eval mode and frozen. The context length is the checkpoint's position table
    unless `max_seq_len` is given."""
    from safetensors.torch import load_file

    sd = {k: v.float() for k, v in load_file(path).items()}
    part = lambda p: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    n = max_seq_len or sd["cond_stage_model.transformer.pos_emb.emb.weight"].shape[0]
    unet, bert, ae = reference_modules(n)
    unet.load_state_dict(part("model.diffusion_model."))
    missing = bert.load_state_dict(part("cond_stage_model."), strict=False).missing_keys
    assert all("to_logits" in k for k in missing), missing
    ae.load_state_dict(part("first_stage_model."))
    for m in (unet, bert, ae):
        m.eval().requires_grad_(False)
    return unet, bert, ae, float(sd["scale_factor"]), n


def bert_ids(max_seq_len, vocab_copy):
    """A function captions → [B, max_seq_len] ids (bert-base-uncased WordPiece from the vocabulary
    the library embeds, copied to `vocab_copy`), as BERTTokenizer(max_length=max_seq_len) pads and
    truncates. The `tokenizers` library directly: transformers 5's BertTokenizerFast(vocab_file=...)
    ignores the file and maps every word to [UNK] without a warning (a model blind to its prompts),
    so a known caption's ids are checked."""
    from tokenizers import BertWordPieceTokenizer

    os.makedirs(os.path.dirname(os.path.abspath(vocab_copy)), exist_ok=True)
    with gzip.open(os.path.join(ROOT, "crates/ldm/assets/tokenizers/bert/vocab.txt.gz")) as f, \
            open(vocab_copy, "wb") as g:
        g.write(f.read())
    tok = BertWordPieceTokenizer(vocab_copy, lowercase=True)
    tok.enable_truncation(max_seq_len)
    tok.enable_padding(length=max_seq_len, pad_id=0, pad_token="[PAD]")
    probe = tok.encode("a large red circle on a blue background").ids
    assert probe[:5] == [101, 1037, 2312, 2417, 4418], f"BERT tokenizer broken: {probe[:10]}"
    return lambda caps: torch.tensor([e.ids for e in tok.encode_batch(list(caps))])


def alphas_cumprod():
    """ᾱ_t of the demo config's schedule (LDM "linear": β from 0.00085 to 0.012 on a square-root
    scale, 1,000 steps), float32."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()
