#!/usr/bin/env python3
"""Writes a Stable Diffusion 1.5-SHAPED UNet with random weights, for benchmarks only.

No SD weights can be downloaded where loraforge is developed, but a training step's time and
memory depend on the architecture and the tensor shapes, not on the weight values. This writes
OUT/unet/config.json with SD 1.5's exact UNet config (runwayml/stable-diffusion-v1-5,
unet/config.json: 860M parameters) and OUT/unet/diffusion_pytorch_model.safetensors with every
parameter drawn from N(0, 0.02^2) under a fixed seed, stored as float16 (1.7 GB; loraforge and
diffusers both upcast to float32 on load). The weights are NOT committed anywhere.

  ~/.cache/loraforge/venv/bin/python scripts/make_sd15_shaped.py ~/.cache/loraforge-bench/sd15-shaped

Needs torch and diffusers (0.42.1 here). Takes about 20 s; peak RSS about 4 GB (the f32 model plus its f16 copy).
"""
import argparse
import json
import os

import torch
from diffusers import UNet2DConditionModel

# runwayml/stable-diffusion-v1-5 unet/config.json; diffusers' defaults fill in the rest
# (act_fn silu, center_input_sample false, downsample_padding 1, mid_block_scale_factor 1,
# use_linear_projection false, ...), which match SD 1.5.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write; the UNet goes to OUT/unet/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**SD15_UNET)
    n = 0
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, args.std)
            n += p.numel()
    unet = unet.to(torch.float16)
    dest = os.path.join(os.path.expanduser(args.out), "unet")
    unet.save_pretrained(dest, safe_serialization=True)
    with open(os.path.join(dest, "README.md"), "w") as f:
        f.write(
            "SD 1.5-shaped UNet with RANDOM weights (N(0, %g^2), seed %d, stored float16), written by\n"
            "loraforge's scripts/make_sd15_shaped.py for speed and memory benchmarks only. It generates\n"
            "nothing meaningful.\n" % (args.std, args.seed)
        )
    print(json.dumps({"unet": dest, "parameters": n, "seed": args.seed, "std": args.std}))


if __name__ == "__main__":
    main()
