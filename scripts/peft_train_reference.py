#!/usr/bin/env python3
"""PEFT + PyTorch side of scripts/gpu-check.sh: LoRA training steps of a causal LM on the
token rows of a JSONL file, on any torch device, as people run PEFT there.

  python scripts/peft_train_reference.py --model DIR --data rows.jsonl --init DIR
      [--device cuda|cpu] [--dtype f32|bf16] [--batch 8] [--steps 8] [--rank 16] [--warmup 2]
      [--gradient-checkpointing] [--base-4bit]

- Data: one `{"input_ids": [...]}` per line; batch k is lines k*B .. k*B+B-1 (file order),
  labels = input_ids (the model's own shift), exactly what `loraforge train --no-shuffle
  --no-packing` reads from the same file.
- Adapter: LoRA r/alpha=2r on the seven projections, dropout 0. `--init` is read when it
  exists, else PEFT's own initialisation (seed 0, on the CPU) is written there first, so
  that loraforge and every dtype start from one adapter.
- Recipe: torch.optim.AdamW(lr 2e-4, weight decay 0), constant lr, no clipping.
- `--dtype bf16` is the usual GPU recipe: base weights loaded in bfloat16, adapter weights
  and optimizer state in float32 (PEFT's autocast_adapter_dtype), forward under
  torch.autocast(bfloat16). `f32` is float32 throughout (TF32 off, torch's default).

Prints `RESULT {json}`: per-step losses, tokens/s (median step after the warm-up, timed
with the device synchronised), and the allocator's peak (torch.cuda.max_memory_reserved).
"""
import argparse
import json
import os
import statistics
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--init", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--base-4bit", action="store_true",
                    help="QLoRA: the base in bitsandbytes NF4 (compute in --dtype), as prepare_model_for_kbit_training")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="transformers' activation checkpointing (one layer's activations kept)")
    args = ap.parse_args()

    rows = [json.loads(line)["input_ids"] for line in open(args.data) if line.strip()]
    need = args.steps * args.batch
    if len(rows) < need:
        raise SystemExit(f"{args.data}: {len(rows)} rows, {need} needed")
    data = torch.tensor(rows[:need], dtype=torch.long)

    base_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    quant = None
    if args.base_4bit:
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=base_dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=base_dtype, attn_implementation="sdpa",
                                                 quantization_config=quant,
                                                 device_map=args.device if quant else None)
    if os.path.exists(os.path.join(args.init, "adapter_model.safetensors")):
        model = PeftModel.from_pretrained(model, args.init, is_trainable=True)
    else:
        torch.manual_seed(0)
        cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                         target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        model.save_pretrained(args.init)
    # Adapter weights in f32 whatever the base (PEFT does this itself on load; be explicit).
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    dev = torch.device(args.device)
    model.to(dev)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    losses, times = [], []
    for step in range(args.steps):
        x = data[step * args.batch:(step + 1) * args.batch].to(dev)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        print(f"step {step + 1} loss {losses[-1]:.6f} {times[-1]:.3f}s", flush=True)
    timed = times[args.warmup:] or times
    res = {
        "engine": "peft", "dtype": args.dtype, "device": args.device,
        "torch": torch.__version__,
        "losses": losses,
        "tokens_per_s": args.batch * data.shape[1] / statistics.median(timed),
        "peak_reserved_mib": torch.cuda.max_memory_reserved(dev) / 2**20 if cuda else None,
        "peak_allocated_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None,
    }
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
