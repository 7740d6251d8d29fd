#!/usr/bin/env python3
"""Classifies texts with a loraforge sequence-classification adapter through HuggingFace
PEFT, the reference for `loraforge classify`.

    python scripts/peft_classify.py --base models/all-MiniLM-L6-v2 --adapter ADAPTER --input texts.jsonl

The label set comes from the adapter's labels.json. Fails (exit 1) unless PEFT loads the
adapter with no missing or unexpected keys and every tensor bit-exactly. Prints one JSON
line per input: {"label": <argmax label>, "scores": [softmax per label]}, after a
summary line on stderr.
"""
import argparse
import json
import os

from peft_loaded import check_loaded


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--max-seq-len", type=int, default=512)
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(2)
    with open(os.path.join(args.adapter, "labels.json")) as f:
        labels = json.load(f)
    id2label = {int(k): v for k, v in labels["id2label"].items()}
    base = AutoModelForSequenceClassification.from_pretrained(
        args.base, num_labels=labels["num_labels"], id2label=id2label, label2id=labels["label2id"],
        problem_type=labels["problem_type"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.base)
    model = PeftModel.from_pretrained(base, args.adapter)
    model.eval()
    check_loaded(model, args.adapter)
    rows = [json.loads(l) for l in open(args.input) if l.strip()]
    for r in rows:
        enc = tok(r["text"], r.get("text_pair"), truncation=True, max_length=args.max_seq_len, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0]
        p = torch.softmax(logits, -1)
        print(json.dumps({"label": id2label[int(p.argmax())], "scores": [round(float(x), 6) for x in p]}))


if __name__ == "__main__":
    main()
