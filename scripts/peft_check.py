#!/usr/bin/env python3
"""Loads a loraforge adapter with HuggingFace PEFT and fails unless it loads cleanly.

    python scripts/peft_check.py --base models/SmolLM2-135M-Instruct.Q4_1.gguf --adapter out/adapter

The base is an HF folder or a .gguf file (through transformers' GGUF loader). Exits 1 when
PEFT reports missing or unexpected keys, when a tensor does not load bit-exactly, or when
the adapter does not change the logits. Over an HF folder it also loads the adapter alone,
through AutoPeftModelForCausalLM (the base found from the adapter's base_model_name_or_path,
offline), and exits 1 unless that gives the same logits. With --merged DIR (a `loraforge merge` folder) it also
exits 1 unless transformers' logits of DIR are PEFT's (base + adapter) within 1e-4. Prints one
summary line.
"""
import argparse
import os
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--merged", help="a merged model folder that must compute as base + adapter")
    args = ap.parse_args()
    # Everything here is local: a base that only resolves on the hub is a failure.
    os.environ["HF_HUB_OFFLINE"] = "1"

    import torch
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    if args.base.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(args.base))
        base = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    else:
        base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(args.base)
    model = PeftModel.from_pretrained(base, args.adapter)
    model.eval()
    sd_file = load_file(os.path.join(args.adapter, "adapter_model.safetensors"))
    sd_model = get_peft_model_state_dict(model)
    missing = sorted(set(sd_model) - set(sd_file))
    unexpected = sorted(set(sd_file) - set(sd_model))
    common = set(sd_model) & set(sd_file)
    diff = max((sd_model[k].float() - sd_file[k].float()).abs().max().item() for k in common) if common else float("inf")
    enc = tok("The capital of France is Paris.", return_tensors="pt")
    with torch.no_grad():
        with model.disable_adapter():
            lb = model(**enc).logits
        la = model(**enc).logits
    effect = (la - lb).abs().max().item()
    print(f"PEFT: {len(sd_file)} tensors in file, {len(sd_model)} expected; missing {len(missing)} {missing[:3]}; "
          f"unexpected {len(unexpected)} {unexpected[:3]}; max |loaded - file| {diff:.3g}; adapter effect on logits {effect:.3g}")
    ok = not missing and not unexpected and diff == 0.0 and effect > 0.0
    if not args.base.endswith(".gguf"):
        from peft import AutoPeftModelForCausalLM

        auto = AutoPeftModelForCausalLM.from_pretrained(args.adapter, dtype=torch.float32)
        auto.eval()
        with torch.no_grad():
            gap = (auto(**enc).logits - la).abs().max().item()
        print(f"AutoPeftModelForCausalLM from the adapter alone: base "
              f"{auto.peft_config['default'].base_model_name_or_path}; max |logits - PEFT's| {gap:.3g}")
        ok = ok and gap == 0.0
    if args.merged:
        merged = AutoModelForCausalLM.from_pretrained(args.merged, dtype=torch.float32)
        with torch.no_grad():
            lm = merged(**enc).logits
        gap = (lm - la).abs().max().item()
        print(f"merged model: max |logits - PEFT's| {gap:.3g} (adapter effect {effect:.3g})")
        ok = ok and gap <= 1e-4
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
