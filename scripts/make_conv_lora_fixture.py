#!/usr/bin/env python3
"""PEFT's Conv2d LoRA on a tiny random CNN: the reference loraforge's conv LoRA layer is
checked against (crates/trainer/tests/fidelity.rs,
conv_lora_outputs_gradients_and_merges_match_peft).

Writes tests/fixtures/conv-lora/ (deleted and rewritten):

  base.safetensors     the frozen CNN: stem (3->8, 7x7, stride 2, padding 3, bias),
                       c1 (8->8, 3x3, stride 1, padding 1, no bias), c2 (8->12, 3x3,
                       stride 2, padding 1, bias, dilation 1), proj (12->6, 1x1, bias);
                       SiLU between them
  adapter/             PEFT's save_pretrained (r=4, lora_alpha=6, target_modules all four),
                       A as PEFT initialises it (kaiming-uniform), B ~ N(0, 0.1^2) so that
                       every gradient is non-zero
  ref.safetensors      x (2, 3, 17, 15), g (the upstream gradient), out (with the adapter),
                       base_out (adapter disabled), grad.x, grad.<PEFT key> of (out * g).sum(),
                       merged.<module>.weight (merge_and_unload)
  ref.json             versions, seed, shapes

Seeded (torch.manual_seed(0)), CPU, one thread, float32. CI does not run this: its
outputs are committed. Run from the repository root with the test venv:
  ~/.cache/loraforge/venv/bin/python scripts/make_conv_lora_fixture.py
"""
import json
import shutil
from pathlib import Path

import peft
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

OUT = Path("tests/fixtures/conv-lora")
R, ALPHA = 4, 6
MODULES = ["stem", "c1", "c2", "proj"]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 7, stride=2, padding=3)
        self.c1 = torch.nn.Conv2d(8, 8, 3, stride=1, padding=1, bias=False)
        self.c2 = torch.nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.proj = torch.nn.Conv2d(12, 6, 1)

    def forward(self, x):
        act = torch.nn.functional.silu
        return self.proj(act(self.c2(act(self.c1(act(self.stem(x)))))))


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    net = Net().eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, OUT / "base.safetensors")
    model = get_peft_model(
        net, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=MODULES)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(OUT / "adapter")
    # PEFT keeps target_modules as a set: sorted, so that a rerun writes the same file.
    cfg_path = OUT / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (OUT / "adapter" / "README.md").unlink()
    x = torch.randn(2, 3, 17, 15, requires_grad=True)
    out = model(x)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    ref = {"x": x.detach(), "g": g, "out": out.detach(), "grad.x": x.grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = name.replace(".default", "")
            ref[f"grad.{key}"] = p.grad
    with torch.no_grad(), model.disable_adapter():
        ref["base_out"] = model(x)
    merged = model.merge_and_unload()
    for m in MODULES:
        ref[f"merged.{m}.weight"] = getattr(merged, m).weight.detach()
    save_file({k: v.contiguous() for k, v in ref.items()}, OUT / "ref.safetensors")
    (OUT / "ref.json").write_text(
        json.dumps(
            {
                "torch": torch.__version__,
                "peft": peft.__version__,
                "seed": 0,
                "r": R,
                "lora_alpha": ALPHA,
                "modules": MODULES,
                "shapes": {k: list(v.shape) for k, v in sorted(ref.items())},
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
