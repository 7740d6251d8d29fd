#!/usr/bin/env python3
"""Checks loraforge's llama.cpp exports in llama.cpp itself (llama-cpp-python).

  llama-cpp-check.py --model BASE.gguf --lora ADAPTER.gguf [--merged MERGED.gguf] \
      --expect CASES.json

CASES.json is a list of `loraforge generate --json --ignore-eos` results, greedy, as
{"prompt_ids": [...], "base": [...ids...], "adapter": [...ids...]}: what loraforge
generated from the same prompt ids without and with the adapter. llama.cpp runs the same
prompt ids greedily with the LoRA GGUF applied (and with --merged, the merged GGUF of
`loraforge export --format merged-gguf` alone), and each of its token sequences must
equal loraforge's with the adapter for the first --min-same tokens; the rest is
reported. With the LoRA, llama.cpp must answer at least one prompt otherwise than with
the base alone within those tokens, so that a LoRA llama.cpp ignored cannot pass. The base alone is compared too, for the record only: on a 4-bit base,
llama.cpp's products (activations quantized to 8 bits) and loraforge's (f32 over the
dequantized weights) differ by enough to flip near-ties of the untrained model, while a
trained adapter's answers are decided by wide margins. Prints what matched; exits 1 on a mismatch.
"""

import argparse
import json
import sys

import numpy as np
from llama_cpp import Llama


def greedy(llm, prompt_ids, n):
    """n tokens chosen by argmax after prompt_ids (no sampler, no stop token)."""
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
        token = int(np.argmax(logits))
        out.append(token)
        llm.eval([token])
    return out


def same_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--lora", required=True)
    p.add_argument("--merged")
    p.add_argument("--expect", required=True)
    p.add_argument("--min-same", type=int, default=16)
    args = p.parse_args()
    cases = json.load(open(args.expect))
    kw = dict(n_ctx=512, n_threads=2, logits_all=True, verbose=False, seed=0)
    runs = {
        "base": Llama(model_path=args.model, **kw),
        "adapter": Llama(model_path=args.model, lora_path=args.lora, **kw),
    }
    if args.merged:
        runs["merged"] = Llama(model_path=args.merged, **kw)
    failed = False
    changed = False
    for i, case in enumerate(cases):
        got_by = {}
        for which, llm in runs.items():
            want = case["adapter" if which == "merged" else which]
            got = greedy(llm, case["prompt_ids"], len(want))
            got_by[which] = got
            same = same_prefix(got, want)
            need = 0 if which == "base" else min(args.min_same, len(want))
            ok = same >= need
            failed |= not ok
            text = llm.detokenize(got).decode("utf-8", "replace")
            verdict = "ok" if ok else "MISMATCH"
            if which == "base":
                verdict = "(for the record)"
            print(
                f"case {i} {which}: {same}/{len(want)} tokens as loraforge "
                f"(need {need}) {verdict}: {text!r}"
            )
            if not ok:
                print(f"  loraforge: {want}\n  llama.cpp: {got}")
        # In llama.cpp itself, within the tokens compared: the LoRA changed the answer.
        n = min(args.min_same, len(case["adapter"]))
        changed |= got_by["base"][:n] != got_by["adapter"][:n]
    if not changed:
        print("the LoRA changed no answer in llama.cpp: nothing shows that it applied it")
        failed = True
    print("llama.cpp check: " + ("FAILED" if failed else "passed"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
