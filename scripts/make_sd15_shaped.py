#!/usr/bin/env python3
"""Writes a Stable Diffusion 1.5-SHAPED UNet with random weights, for benchmarks only.

No SD weights can be downloaded where loraforge is developed, but a training step's time and
memory depend on the architecture and the tensor shapes, not on the weight values. This writes
OUT/unet/config.json with SD 1.5's exact UNet config (runwayml/stable-diffusion-v1-5,
unet/config.json: 860M parameters) and OUT/unet/diffusion_pytorch_model.safetensors with every
parameter drawn from N(0, 0.02^2) under a fixed seed, stored as float16 (1.7 GB; loraforge and
diffusers both upcast to float32 on load). The weights are NOT committed anywhere.

With --full it also writes the rest of a diffusers SD 1.5 pipeline folder, so that `loraforge
train --task text_to_image --model OUT` runs on it: vae/ (SD 1.5's AutoencoderKL config, 84M
random parameters), text_encoder/ (SD 1.5's CLIP ViT-L/14 text config, 123M random parameters),
and tokenizer/, scheduler/ and model_index.json copied from tests/fixtures/sd-tiny (the real CLIP
vocabulary and SD 1.5's DDPM schedule).

  ~/.cache/loraforge/venv/bin/python scripts/make_sd15_shaped.py [--full] ~/.cache/loraforge-bench/sd15-shaped

Needs torch, transformers and diffusers (0.42.1 here). Takes about 20 s (--full: 30 s); peak RSS about 4 GB (the f32 model plus its f16 copy).
"""
import argparse
import json
import os
import shutil

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

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

# runwayml/stable-diffusion-v1-5 vae/config.json
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# runwayml/stable-diffusion-v1-5 text_encoder/config.json (CLIP ViT-L/14's text tower)
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


def randomize(model, std):
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
            n += p.numel()
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write; the UNet goes to OUT/unet/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--full", action="store_true", help="also vae/, text_encoder/, tokenizer/, scheduler/")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    root = os.path.expanduser(args.out)
    unet = UNet2DConditionModel(**SD15_UNET)
    n = randomize(unet, args.std)
    dest = os.path.join(root, "unet")
    unet.to(torch.float16).save_pretrained(dest, safe_serialization=True)
    with open(os.path.join(root, "README.md"), "w") as f:
        f.write(
            "SD 1.5-shaped weights, all RANDOM (N(0, %g^2), seed %d, stored float16), written by\n"
            "loraforge's scripts/make_sd15_shaped.py for speed and memory benchmarks only. It generates\n"
            "nothing meaningful.\n" % (args.std, args.seed)
        )
    out = {"unet": dest, "parameters": n, "seed": args.seed, "std": args.std}
    if args.full:
        from transformers import CLIPTextConfig, CLIPTextModel

        vae = AutoencoderKL(**SD15_VAE)
        out["vae_parameters"] = randomize(vae, args.std)
        vae.to(torch.float16).save_pretrained(os.path.join(root, "vae"), safe_serialization=True)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
        out["text_encoder_parameters"] = randomize(text, args.std)
        text.to(torch.float16).save_pretrained(os.path.join(root, "text_encoder"), safe_serialization=True)
        tiny = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "sd-tiny")
        for d in ("tokenizer", "scheduler"):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
            shutil.copytree(os.path.join(tiny, d), os.path.join(root, d))
        shutil.copy(os.path.join(tiny, "model_index.json"), root)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
