#!/usr/bin/env python3
"""PyTorch/diffusers reference side of `cargo xtask bench`.

Times one workload per process with randomly initialised models at real
Stable Diffusion v1 shapes (no network, no downloads: every model is built
from a config dict), so the numbers can be set next to the Rust crate's own
measurements of the same workloads:

  unet-32 / unet-64   UNet2DConditionModel forward, latent [2,4,S,S], t [2], ctx [2,77,768]
  unet-train-32       the same UNet's training step at S = 32: forward, mean square, backward
  vae-32 / vae-64     AutoencoderKL.decode of a [1,4,S,S] latent
  clip                CLIPTextModel (ViT-L/14 text tower), input_ids [2,77]
  txt2img-256         CLIP (cond+uncond) + 20 DDIM steps, CFG 7.5 + VAE decode, by hand

`cargo xtask bench` runs this script once per workload (so the peak memory
reported is that workload's alone), e.g.

  python3 xtask/bench/bench_torch.py --workload unet-32 --threads 2 --runs 5

and parses the single JSON line it prints on stdout (all logs go to stderr):
impl, torch, diffusers, workload, device, device_name, dtype, threads,
warmup_s, runs_s, median_s, peak_bytes, memory_kind ("rss" on cpu: the
process's peak RSS; "device" on cuda: torch.cuda.max_memory_allocated),
build_s (model construction, not timed) and attention (the attention path).
"""
import argparse, json, resource, statistics, sys, time

import torch
import diffusers
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

WORKLOADS = ["unet-32", "unet-train-32", "unet-64", "vae-32", "vae-64", "clip", "txt2img-256"]
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
)
SCHED_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, set_alpha_to_one=False, clip_sample=False,
)
STEPS, GUIDANCE, VAE_SCALE = 20, 7.5, 0.18215


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown cpu"


def processors(model):
    """Distinct attention processor class names of a diffusers model."""
    return sorted({type(p).__name__ for p in model.attn_processors.values()})


def build(workload, dev, dtype, seed):
    """Build the models for one workload; return (step closure, attention description)."""
    g = torch.Generator(device="cpu").manual_seed(seed + 1)  # inputs: own CPU stream
    rand = lambda *s: torch.randn(*s, generator=g).to(dev, dtype)
    ids = lambda: torch.randint(0, CLIP_CONFIG["vocab_size"], (2, 77), generator=g).to(dev)
    prep = lambda m: m.to(dev, dtype).eval()
    attn = []
    unet = vae = clip = None
    if workload.startswith("unet") or workload == "txt2img-256":
        unet = prep(UNet2DConditionModel(**UNET_CONFIG))
        attn.append("unet:" + "+".join(processors(unet)))
    if workload.startswith("vae") or workload == "txt2img-256":
        vae = prep(AutoencoderKL(**VAE_CONFIG))
        attn.append("vae:" + "+".join(processors(vae)))
    if workload in ("clip", "txt2img-256"):
        clip = prep(CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG)))
        attn.append("clip:" + str(getattr(clip.config, "_attn_implementation", "?")))

    if workload.startswith("unet"):
        s = int(workload.split("-")[-1])
        x, t, ctx = rand(2, 4, s, s), torch.tensor([500, 500], device=dev), rand(2, 77, 768)
        if workload == "unet-train-32":
            def step():
                unet.zero_grad(set_to_none=True)
                unet(x, t, encoder_hidden_states=ctx).sample.square().mean().backward()
        else:
            step = lambda: unet(x, t, encoder_hidden_states=ctx).sample
    elif workload.startswith("vae"):
        s = int(workload.split("-")[1])
        z = rand(1, 4, s, s)
        step = lambda: vae.decode(z).sample
    elif workload == "clip":
        tok = ids()
        step = lambda: clip(input_ids=tok).last_hidden_state
    else:
        sched = DDIMScheduler(**SCHED_CONFIG)
        tok, noise = ids(), rand(1, 4, 32, 32)

        def step():
            ctx = clip(input_ids=tok).last_hidden_state  # row 0 = uncond, row 1 = cond
            sched.set_timesteps(STEPS, device=dev)
            lat = noise * sched.init_noise_sigma
            for t in sched.timesteps:
                inp = sched.scale_model_input(torch.cat([lat, lat]), t)
                eps = unet(inp, t, encoder_hidden_states=ctx).sample
                e_u, e_c = eps.chunk(2)
                lat = sched.step(e_u + GUIDANCE * (e_c - e_u), t, lat).prev_sample
            return vae.decode(lat / VAE_SCALE).sample
    return step, "sdpa (" + ", ".join(attn) + ")"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="f32", choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.workload not in WORKLOADS:
        sys.exit(f"unknown workload {a.workload!r}; expected one of {', '.join(WORKLOADS)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but torch.cuda.is_available() is False")
    runs = a.runs if a.runs is not None else (3 if a.workload == "txt2img-256" else 5)

    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError as e:  # only allowed before any inter-op work started
        log(f"set_num_interop_threads(1) ignored: {e}")
    torch.manual_seed(a.seed)  # weight init
    cuda = a.device == "cuda"
    dev = torch.device(a.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    # Gradients only for the training workload.
    with torch.inference_mode(a.workload != "unet-train-32"):
        t0 = time.perf_counter()
        step, attention = build(a.workload, dev, DTYPES[a.dtype], a.seed)
        sync()
        build_s = time.perf_counter() - t0
        log(f"{a.workload}: built in {build_s:.2f}s on {a.device}/{a.dtype}, {attention}")

        def timed():
            sync()
            t = time.perf_counter()
            step()
            sync()
            return time.perf_counter() - t

        warm, times = [], []
        for i in range(a.warmup):
            warm.append(timed())
            log(f"warmup {i}: {warm[-1]:.3f}s")
        for i in range(runs):
            times.append(timed())
            log(f"run {i}: {times[-1]:.3f}s")

    if cuda:
        peak, kind = torch.cuda.max_memory_allocated(), "device"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss"
    print(json.dumps({
        "impl": "pytorch", "torch": torch.__version__, "diffusers": diffusers.__version__,
        "workload": a.workload, "device": a.device,
        "device_name": torch.cuda.get_device_name() if cuda else cpu_name(),
        "dtype": a.dtype, "threads": a.threads,
        "warmup_s": [round(x, 6) for x in warm], "runs_s": [round(x, 6) for x in times],
        "median_s": round(statistics.median(times), 6) if times else None,
        "peak_bytes": peak, "memory_kind": kind, "build_s": round(build_s, 6),
        "attention": attention,
    }))


if __name__ == "__main__":
    main()
