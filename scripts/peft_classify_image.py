#!/usr/bin/env python3
"""Classifies images with a loraforge image-classification adapter through HuggingFace
PEFT and the model folder's own image processor: the reference for
`loraforge classify --image`.

    python scripts/peft_classify_image.py --base models/tiny-resnet --adapter ADAPTER --image a.png [--image b.png ...]

The label set comes from the adapter's labels.json; the base gets a head of that size
(the adapter's classifier, trained in full, replaces it). Fails (exit 1) unless PEFT
loads the adapter with no missing or unexpected keys and every tensor bit-exactly.
Prints one JSON line per image: {"label": <argmax label>, "scores": [softmax per label]},
after a summary line on stderr.
"""
import argparse
import json
import os

from peft_loaded import check_loaded


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--image", action="append", required=True)
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    torch.set_num_threads(2)
    with open(os.path.join(args.adapter, "labels.json")) as f:
        labels = json.load(f)
    id2label = {int(k): v for k, v in labels["id2label"].items()}
    base = AutoModelForImageClassification.from_pretrained(
        args.base, num_labels=labels["num_labels"], id2label=id2label, label2id=labels["label2id"],
        ignore_mismatched_sizes=True, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter)
    model.eval()
    check_loaded(model, args.adapter)
    proc = AutoImageProcessor.from_pretrained(args.base)
    grey = base.config.num_channels == 1
    for path in args.image:
        img = Image.open(path).convert("L" if grey else "RGB")
        pixel_values = proc(img, return_tensors="pt").pixel_values
        with torch.no_grad():
            logits = model(pixel_values=pixel_values).logits[0]
        p = torch.softmax(logits, -1)
        print(json.dumps({"label": id2label[int(p.argmax())], "scores": [round(float(x), 6) for x in p]}))


if __name__ == "__main__":
    main()
