#!/usr/bin/env python3
"""Reference tokenization of SmolLM2-135M-Instruct for the GGUF tokenizer test.

Tokenizes a varied text set with the `tokenizer.json` that ../shared/bench/convert_gguf_to_hf.py
builds from the same GGUF (HF's own SmolLM2 tokenizer: byte-level BPE with digits split one by
one) and writes tests/fixtures/smollm2-tokenization.json. Run once; the output is committed.

    python scripts/make_smollm2_tokenization.py --hf-dir ~/.cache/loraforge-bench/models/smollm2-135m-instruct-hf
"""
import argparse
import json
import os

from tokenizers import Tokenizer

TEXTS = [
    "Hello world",
    " leading space",
    "   three leading spaces and trailing   ",
    "The capital of France is Paris.",
    "Tom has 12345 apples and 7 pears; 3.14159 is pi, 1e10 is big.",
    "  Hello   world\n\n42!",
    "Café naïve résumé — déjà vu, Ærøskøbing, straße",
    "日本語のテキストと中文字符",
    "Здравствуй, мир! Γειά σου Κόσμε",
    "emoji 🎉🚀👩‍💻 mixed",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "def f(x):\n    return x ** 2  # square\n\tindented\r\nwindows",
    "URLs like https://example.com/a?b=c&d=e and emails a.b@c.de",
    "MiXeD CaSe, don't, I'll, we're, they've, she'd",
    "\n\n\n",
    "a",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", default=os.path.expanduser("~/.cache/loraforge-bench/models/smollm2-135m-instruct-hf"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "smollm2-tokenization.json"))
    args = ap.parse_args()
    tok = Tokenizer.from_file(os.path.join(args.hf_dir, "tokenizer.json"))
    cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=True).ids} for t in TEXTS]
    with open(args.out, "w") as f:
        json.dump({"source": "SmolLM2-135M-Instruct tokenizer.json (convert_gguf_to_hf.py)", "cases": cases}, f, ensure_ascii=False, indent=1)
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
