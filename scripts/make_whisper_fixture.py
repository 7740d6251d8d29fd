#!/usr/bin/env python3
"""A tiny random Whisper (transformers' WhisperForConditionalGeneration) with PEFT LoRA
on q_proj and v_proj: the reference loraforge's Whisper model is checked against
(crates/trainer/tests/whisper_fidelity.rs).

Writes, deleting and rewriting each folder:

  tests/fixtures/tiny-whisper/        config.json + model.safetensors (8 mel bins, d_model
                                      16, 2 encoder and 2 decoder layers, 2 heads, 12
                                      source positions: 24 input frames)
  tests/fixtures/tiny-whisper-ref/
      adapter/          PEFT's save_pretrained: r=4, lora_alpha=8, target_modules
                        ["q_proj", "v_proj"]; B ~ N(0, 0.1^2) so every gradient is non-zero
      ref.safetensors   input_features, decoder_input_ids, labels (-100 on the second
                        row's last two), logits (with the adapter), base_logits (adapter
                        disabled), loss (transformers' mean cross entropy over the labels),
                        grad.<PEFT key> of that loss
      ref.json          versions, shapes

Seeded, CPU, one thread, float32, eval mode (no dropout). CI does not run this: its
outputs are committed. Run from the repository root with the test venv:
  ~/.cache/loraforge/venv/bin/python scripts/make_whisper_fixture.py
"""
import json
import shutil
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import WhisperConfig, WhisperForConditionalGeneration

FIX = Path("tests/fixtures")
R, ALPHA = 4, 8


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = WhisperConfig(
        vocab_size=96, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_source_positions=12, max_target_positions=16,
        pad_token_id=95, bos_token_id=94, eos_token_id=95, decoder_start_token_id=94,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    model = WhisperForConditionalGeneration(cfg).eval()
    out = FIX / "tiny-whisper"
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    ref_dir = FIX / "tiny-whisper-ref"
    if ref_dir.exists():
        shutil.rmtree(ref_dir)
    pm = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                          target_modules=["q_proj", "v_proj"]))
    pm.eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    pm.save_pretrained(ref_dir / "adapter")
    c_path = ref_dir / "adapter" / "adapter_config.json"
    c = json.loads(c_path.read_text())
    c["target_modules"] = sorted(c["target_modules"])
    c_path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    (ref_dir / "adapter" / "README.md").unlink(missing_ok=True)

    feats = torch.randn(2, 8, 24)
    dec = torch.randint(0, 94, (2, 6))
    dec[:, 0] = 94
    labels = torch.cat([dec[:, 1:], torch.full((2, 1), 95)], dim=1)
    labels[1, -2:] = -100
    o = pm(input_features=feats, decoder_input_ids=dec, labels=labels)
    o.loss.backward()
    with torch.no_grad(), pm.disable_adapter():
        base = pm(input_features=feats, decoder_input_ids=dec).logits
    ref = {"input_features": feats, "decoder_input_ids": dec, "labels": labels,
           "logits": o.logits.detach(), "base_logits": base, "loss": o.loss.detach().reshape(1)}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            ref[f"grad.{n.replace('.default', '')}"] = p.grad
    save_file({k: v.contiguous() for k, v in ref.items()}, ref_dir / "ref.safetensors")
    (ref_dir / "ref.json").write_text(json.dumps({
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "r": R, "lora_alpha": ALPHA,
        "shapes": {k: list(v.shape) for k, v in ref.items()},
    }, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
