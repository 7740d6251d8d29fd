#!/usr/bin/env python3
"""LoCon (LoRA on the UNet's convolutions) goldens for the tiny SD fixture, beside the
ones scripts/make_sd_fixture.py writes. Reads tests/fixtures/sd-tiny (the pipeline) and
tests/fixtures/sd-tiny-ref/{unet,lora}.safetensors (inputs and the loss target); writes
into tests/fixtures/sd-tiny-ref/:

  locon_peft.safetensors  PEFT LoRA (r 4, alpha 8, A gaussian, B ~ N(0, 0.1^2)) on kohya's
                          LoCon module set: the attention blocks' linears and 1x1
                          projections, and each ResnetBlock2D's conv1, conv2 (3x3),
                          conv_shortcut (1x1) and time_emb_proj, and the down/upsamplers'
                          conv (3x3): init.<path>.lora_{A,B}.weight, out, loss (MSE against
                          lora.safetensors' target), grad.<path>.lora_{A,B}.weight
  locon.safetensors       a kohya LoCon file as sd-scripts' networks.lora writes it with
                          network_dim 4 / network_alpha 2 and conv_dim 2 / conv_alpha 1:
                          linears and 1x1 convs at rank 4, 3x3 convs at rank 2 (lora_down
                          [r, in, 3, 3], lora_up [out, r, 1, 1]), random N(0, 0.1^2) values,
                          alpha tensors, ss_network_args '{"conv_dim": "2", "conv_alpha": "1"}'
  locon_out.safetensors   the UNet's output after diffusers' load_lora_weights of it

diffusers' converter drops the alphas of attention modules (it names their alpha keys
wrongly) and gives them the most common alpha instead: linear modules outnumber the 3x3
convolutions here (as in SD 1.5, 228 to 50), so that alpha is network_alpha and the output
is kohya's; asserted below.

Needs diffusers 0.42 next to the test venv's torch and peft (CI does not run this; its
outputs are committed). Seeded, CPU, float32:
  PYTHONPATH=<diffusers> ~/.cache/loraforge/venv/bin/python scripts/make_sd_locon_fixture.py
"""
import json
import os

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD = os.path.join(ROOT, "tests", "fixtures", "sd-tiny")
REF = os.path.join(ROOT, "tests", "fixtures", "sd-tiny-ref")
STD = 0.1
LORA_R, LORA_ALPHA = 4, 8
NET_R, NET_ALPHA = 4, 2.0
CONV_R, CONV_ALPHA = 2, 1.0
ATTN = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
RESNET = ["conv1", "conv2", "conv_shortcut", "time_emb_proj"]
SAMPLERS = ["downsamplers.0.conv", "upsamplers.0.conv"]


def save_st(tensors, path, metadata=None):
    """safetensors with `__metadata__` in sorted key order, so that reruns write the same bytes."""
    b = save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b[8 + n:])


def load_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(os.path.join(SD, "unet"), dtype=torch.float32).eval()


def locon_modules(unet):
    """kohya's LoCon set in named_modules order: every Linear / Conv2d child of a
    Transformer2DModel, ResnetBlock2D, Downsample2D or Upsample2D."""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    blocks = (Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D)
    out = []
    for name, block in unet.named_modules():
        if isinstance(block, blocks):
            for child, m in block.named_modules():
                if child and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                    out.append((f"{name}.{child}", m))
    return out


def main():
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    x = load_file(os.path.join(REF, "unet.safetensors"))
    target = load_file(os.path.join(REF, "lora.safetensors"))["target"]
    sample, timesteps, ehs = x["sample"], x["timesteps"], x["encoder_hidden_states"]

    # ---------------- PEFT LoRA on the LoCon set ----------------
    torch.manual_seed(50)
    ul = load_unet()
    ul.requires_grad_(False)
    ul.add_adapter(LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian",
                              target_modules=ATTN + RESNET + SAMPLERS))
    mods = [(n, m) for n, m in ul.named_modules() if isinstance(m, LoraLayer)]
    assert [n for n, _ in mods] == [n for n, _ in locon_modules(load_unet())], "PEFT's set is not kohya's"
    torch.manual_seed(51)
    t = {}
    with torch.no_grad():
        for n, m in mods:
            w = m.lora_B["default"].weight
            w.copy_(torch.randn(w.shape) * STD)
    for n, m in mods:
        t[f"init.{n}.lora_A.weight"] = m.lora_A["default"].weight.detach().clone()
        t[f"init.{n}.lora_B.weight"] = m.lora_B["default"].weight.detach().clone()
    out = ul(sample, timesteps, encoder_hidden_states=ehs).sample
    loss = F.mse_loss(out, target)
    loss.backward()
    for n, m in mods:
        t[f"grad.{n}.lora_A.weight"] = m.lora_A["default"].weight.grad
        t[f"grad.{n}.lora_B.weight"] = m.lora_B["default"].weight.grad
        assert t[f"grad.{n}.lora_A.weight"].abs().max() > 0, n
    t["out"], t["loss"] = out.detach(), loss.detach().reshape(1)
    save_st(t, os.path.join(REF, "locon_peft.safetensors"))
    n_conv3 = sum(1 for _, m in mods if isinstance(m.base_layer, torch.nn.Conv2d)
                  and m.base_layer.kernel_size != (1, 1))
    print(f"locon_peft: {len(mods)} modules ({n_conv3} 3x3 convolutions), loss {loss.item():.6f}")

    # ---------------- a kohya LoCon file, and diffusers' output with it ----------------
    torch.manual_seed(52)
    kt = {}
    n_lin = n_conv = 0
    for path, m in locon_modules(load_unet()):
        kn = "lora_unet_" + path.replace(".", "_")
        conv3 = isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
        r, alpha = (CONV_R, CONV_ALPHA) if conv3 else (NET_R, NET_ALPHA)
        if isinstance(m, torch.nn.Conv2d):
            down = torch.randn(r, m.in_channels, *m.kernel_size) * STD
            up = torch.randn(m.out_channels, r, 1, 1) * STD
        else:
            down = torch.randn(r, m.in_features) * STD
            up = torch.randn(m.out_features, r) * STD
        kt[f"{kn}.lora_down.weight"], kt[f"{kn}.lora_up.weight"] = down, up
        kt[f"{kn}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        n_conv += conv3
        n_lin += not conv3
    assert n_lin > n_conv, (n_lin, n_conv)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(NET_R),
        "ss_network_alpha": str(NET_ALPHA),
        "ss_network_args": json.dumps({"conv_dim": str(CONV_R), "conv_alpha": str(int(CONV_ALPHA))}),
        "ss_v2": "False",
        "ss_base_model_version": "sd_v1",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.title": "sd-tiny-locon",
    }
    kpath = os.path.join(REF, "locon.safetensors")
    save_st(kt, kpath, metadata=meta)
    with safe_open(kpath, "pt") as f:
        assert f.metadata() == meta

    pipe = StableDiffusionPipeline.from_pretrained(SD, dtype=torch.float32, safety_checker=None)
    with torch.no_grad():
        base = pipe.unet(sample, timesteps, encoder_hidden_states=ehs).sample
        pipe.load_lora_weights(REF, weight_name="locon.safetensors")
        kout = pipe.unet(sample, timesteps, encoder_hidden_states=ehs).sample
    loaded = [(n, m) for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)]
    assert len(loaded) == n_lin + n_conv, (len(loaded), n_lin, n_conv)

    # kohya's own arithmetic, by hooks on a plain UNet: each module adds up(down(x)) * alpha / r.
    plain = load_unet()
    handles = []
    for path, m in locon_modules(plain):
        kn = "lora_unet_" + path.replace(".", "_")
        down, up = kt[f"{kn}.lora_down.weight"], kt[f"{kn}.lora_up.weight"]
        scale = kt[f"{kn}.alpha"].item() / down.shape[0]

        def hook(mod, inp, outp, down=down, up=up, scale=scale):
            if isinstance(mod, torch.nn.Conv2d):
                h = F.conv2d(inp[0], down, stride=mod.stride, padding=mod.padding)
                return outp + F.conv2d(h, up) * scale
            return outp + (inp[0] @ down.T) @ up.T * scale

        handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        want = plain(sample, timesteps, encoder_hidden_states=ehs).sample
    d_kohya = (kout - want).abs().max().item()
    d_base = (kout - base).abs().max().item()
    print(f"locon: {n_lin} linear/1x1 modules at r {NET_R}, {n_conv} 3x3 at r {CONV_R}; "
          f"diffusers vs kohya's arithmetic {d_kohya:.2e}, vs the base {d_base:.2e}")
    assert d_kohya < 1e-5 and d_base > 1e-3
    save_st({"out": kout}, os.path.join(REF, "locon_out.safetensors"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
