#!/usr/bin/env python3
"""Tiny random ResNets (transformers' ResNetForImageClassification) with PEFT LoRA on
their convolutions and the head trained in full: the reference loraforge's image
classification family is checked against (crates/trainer/tests/resnet_fidelity.rs).

Writes, deleting and rewriting each folder:

  tests/fixtures/tiny-resnet/             a basic-block ResNet (3 channels, 3 labels):
                                          config.json, model.safetensors,
                                          preprocessor_config.json (ViT-style 32x32, ImageNet
                                          mean/std); the base model of the API tests
  tests/fixtures/tiny-resnet-bottleneck/  a bottleneck ResNet (1 channel, 4 labels,
                                          downsample_in_bottleneck), no preprocessor
  tests/fixtures/tiny-resnet-ref/<name>/  for each model:
      adapter/          PEFT's save_pretrained: r=4, lora_alpha=8, target_modules
                        ["convolution"], modules_to_save ["classifier"]; A as PEFT
                        initialises it, B ~ N(0, 0.1^2) so that every gradient is non-zero
      ref.safetensors   pixel_values, labels, logits (with the adapter), base_logits
                        (adapter disabled), loss (cross entropy, mean), grad.<PEFT key>
                        of that loss for every trainable tensor
      ref.json          versions, shapes

The BatchNorm layers get random running statistics and affine weights (a fresh
BatchNorm is the identity, which would test nothing) and run in eval mode, as loraforge
runs them. Seeded, CPU, one thread, float32. CI does not run this: its outputs are
committed. Run from the repository root with the test venv:
  ~/.cache/loraforge/venv/bin/python scripts/make_resnet_fixtures.py
"""
import json
import shutil
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import ResNetConfig, ResNetForImageClassification

FIX = Path("tests/fixtures")
R, ALPHA = 4, 8

MODELS = {
    "tiny-resnet": dict(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2],
        layer_type="basic", num_labels=3, size=(29, 31), preprocessor=True,
    ),
    "tiny-resnet-bottleneck": dict(
        num_channels=1, embedding_size=8, hidden_sizes=[16, 32], depths=[2, 1],
        layer_type="bottleneck", downsample_in_bottleneck=True, num_labels=4,
        size=(24, 20), preprocessor=False,
    ),
}


def randomize_batchnorm(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.7, 1.3)
                m.bias.normal_(0.0, 0.1)


def make(name, spec):
    size = spec.pop("size")
    preprocessor = spec.pop("preprocessor")
    labels = [f"class_{i}" for i in range(spec["num_labels"])]
    cfg = ResNetConfig(
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}, **spec
    )
    model = ResNetForImageClassification(cfg)
    randomize_batchnorm(model)
    model.eval()
    out = FIX / name
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    if preprocessor:
        (out / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": 32, "width": 32},
            "resample": 2,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
        }, indent=2) + "\n")

    peft_model = get_peft_model(model, LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["convolution"],
        modules_to_save=["classifier"]))
    peft_model.eval()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    ref_dir = FIX / "tiny-resnet-ref" / name
    if ref_dir.exists():
        shutil.rmtree(ref_dir)
    peft_model.save_pretrained(ref_dir / "adapter")
    cfg_path = ref_dir / "adapter" / "adapter_config.json"
    c = json.loads(cfg_path.read_text())
    c["target_modules"] = sorted(c["target_modules"])
    c["modules_to_save"] = sorted(c["modules_to_save"])
    cfg_path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    (ref_dir / "adapter" / "README.md").unlink(missing_ok=True)

    x = torch.randn(3, spec["num_channels"], *size)
    y = torch.tensor([0, 2, 1])
    logits = peft_model(pixel_values=x).logits
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(pixel_values=x).logits
    ref = {"pixel_values": x, "labels": y, "logits": logits.detach(),
           "base_logits": base_logits, "loss": loss.detach().reshape(1)}
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            key = n.replace(".default", "").replace("modules_to_save.", "")
            ref[f"grad.{key}"] = p.grad
    save_file({k: v.contiguous() for k, v in ref.items()}, ref_dir / "ref.safetensors")
    (ref_dir / "ref.json").write_text(json.dumps({
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "r": R, "lora_alpha": ALPHA,
        "shapes": {k: list(v.shape) for k, v in ref.items()},
    }, indent=2, sort_keys=True) + "\n")


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for name, spec in MODELS.items():
        make(name, dict(spec))


if __name__ == "__main__":
    main()
