#!/usr/bin/env python3
"""Writes a llama-shaped HF model folder with random weights, for benchmarks only.

A lent GPU machine can download nothing and takes at most 64 MiB of files along, less than
any real checkpoint. A training step's time and memory depend on the shapes, not on the
weight values, so scripts/gpu-check.sh measures both engines on a model of a real model's
exact shape whose weights transformers draws here (its own init, initializer_range 0.02,
seed 0). Both engines then train the same weights, so their losses still compare.

  python scripts/make_llama_shaped.py --shape smollm2|1b|3b|8b --tokenizer DIR --out DIR
      [--device cuda] [--dtype f32|bf16]

Shapes: SmolLM2-135M, Llama 3.2 1B / 3B and Llama 3.1 8B (their config.json values).
The tokenizer files are copied from --tokenizer (any llama tokenizer; its ids must fit the
vocabulary). Weights are saved in float32, or bfloat16 with --dtype bf16 (drawn in bf16:
half the memory, for the larger shapes on a small machine).
"""
import argparse
import os
import shutil

import torch
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                    max_position_embeddings=8192, rope_theta=100000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
               max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
               max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
               max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu", help="where to draw the weights (faster on a GPU)")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    a = ap.parse_args()
    cfg = LlamaConfig(rms_norm_eps=1e-5, initializer_range=0.02, bos_token_id=1, eos_token_id=2,
                      **SHAPES[a.shape])
    torch.manual_seed(0)
    if a.dtype == "bf16":
        torch.set_default_dtype(torch.bfloat16)
    with torch.device(a.device):
        model = LlamaForCausalLM(cfg)
    model.to("cpu").save_pretrained(a.out)
    for f in TOKENIZER_FILES:
        src = os.path.join(a.tokenizer, f)
        if os.path.exists(src):
            shutil.copy(src, a.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{a.shape}: {n / 1e6:.0f}M parameters -> {a.out}")


if __name__ == "__main__":
    main()
