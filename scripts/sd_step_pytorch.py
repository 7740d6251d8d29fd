#!/usr/bin/env python3
"""diffusers + PEFT side of scripts/bench-sd-vs-pytorch.sh: LoRA training steps of a diffusers
UNet on random inputs, the same shapes and recipe as `loraforge-bench sd`.

  python scripts/sd_step_pytorch.py --unet DIR [--res 256] [--steps 3] [--threads 2] [--seed 0]
      [--device cpu|cuda]

UNet2DConditionModel.from_pretrained(DIR) in float32, requires_grad_(False), then
unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=[to_q, to_k, to_v, to_out.0]))
as diffusers' train_text_to_image_lora.py does; batch 1; latents and target (1, 4, res/8, res/8)
and context (1, 77, cross_attention_dim) from N(0, 1), one timestep from 0..1000; MSE, backward,
torch.optim.AdamW(lr 1e-4, its default weight decay 1e-2) on the LoRA parameters. diffusers'
default attention processor (torch's scaled_dot_product_attention) is used, as in training.
Prints one JSON line per step (forward, backward, optimizer seconds; peak RSS from VmHWM).
"""
import argparse
import json
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig


def status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) // 1024
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--unet", required=True)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(a.unet, torch_dtype=torch.float32)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    unet.to(dev)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    print(json.dumps({"event": "loaded", "load_s": time.perf_counter() - t,
                      "lora_parameters": sum(p.numel() for p in params), "res": a.res, "threads": a.threads,
                      "torch": torch.__version__, "attn_processor": type(unet.attn_processors[
                          next(iter(unet.attn_processors))]).__name__,
                      "rss_mib": status_mib("VmRSS:")}), flush=True)
    lat = a.res // 8
    ctx_dim = unet.config.cross_attention_dim
    for step in range(1, a.steps + 1):
        sample = torch.randn(1, 4, lat, lat).to(dev)
        target = torch.randn(1, 4, lat, lat).to(dev)
        context = torch.randn(1, 77, ctx_dim).to(dev)
        timestep = torch.randint(0, 1000, (1,)).to(dev)
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        pred = unet(sample, timestep, context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(dev)
        t3 = time.perf_counter()
        print(json.dumps({"event": "step", "step": step, "loss": loss.item(), "timestep": int(timestep),
                          "forward_s": t1 - t0, "backward_s": t2 - t1, "optim_s": t3 - t2, "step_s": t3 - t0,
                          "rss_mib": status_mib("VmRSS:"), "peak_rss_mib": status_mib("VmHWM:"),
                          "peak_reserved_mib": torch.cuda.max_memory_reserved(dev) / 2**20 if cuda else None}),
              flush=True)


if __name__ == "__main__":
    main()
