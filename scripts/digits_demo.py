#!/usr/bin/env python3
"""A real image-classification run anyone can repeat: scikit-learn's 8x8 `digits` images
(shipped in its wheel; no download) trained through loraforge's API on a small
ResNet-config model, LoRA on its convolutions plus its classifier head.

    ~/.cache/loraforge/venv/bin/python scripts/digits_demo.py --bin target/release/loraforge

No pretrained ResNet can be downloaded here, so the backbone is a seeded random one
(transformers' own initialisation): what the run shows is that the LoRA and the head
learn through the API end to end, a demonstration, not a benchmark. It writes a work
folder with the model (models/digits-resnet: 1 channel, 16 -> 32 -> 64 channels, basic
layers; its preprocessor upsamples the 8x8 images to 32x32, nearest), the ImageFolder
zips (digits-train.zip, digits-valid.zip: a stratified 80/20 split, seeded), then starts
`loraforge serve` on a free port, uploads both zips, runs one job with validation,
prints the validation accuracy and macro-F1 as the job reports them (chance: 0.10), then
downloads the adapter and classifies a held-out 7 with `loraforge classify --image`.
"""
import argparse
import io
import json
import os
import subprocess
import tempfile
import time
import urllib.request
import zipfile

from demo_server import call, events, finished, serve, upload


def make_data(work):
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    train, valid = [], []
    for label in range(10):
        idx = np.flatnonzero(d.target == label)
        rng.shuffle(idx)
        cut = int(round(len(idx) * 0.8))
        train += [(label, i) for i in idx[:cut]]
        valid += [(label, i) for i in idx[cut:]]
    for name, rows in [("digits-train.zip", train), ("digits-valid.zip", valid)]:
        with zipfile.ZipFile(os.path.join(work, name), "w") as z:
            for label, i in rows:
                img = Image.fromarray((d.images[i] * (255 / 16)).round().astype("uint8"), "L")
                buf = io.BytesIO()
                img.save(buf, "PNG")
                z.writestr(f"digits/{label}/{i:04d}.png", buf.getvalue())
    return len(train), len(valid)


def make_model(work):
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                       layer_type="basic", num_labels=10)
    out = os.path.join(work, "models", "digits-resnet")
    ResNetForImageClassification(cfg).eval().save_pretrained(out)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "ViTImageProcessor", "do_resize": True,
                   "size": {"height": 32, "width": 32}, "resample": 0, "do_rescale": True,
                   "rescale_factor": 1 / 255, "do_normalize": True,
                   "image_mean": [0.5], "image_std": [0.5]}, f, indent=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="the loraforge binary")
    ap.add_argument("--work", help="work folder (default: a new temporary one)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="loraforge-digits-")
    os.makedirs(work, exist_ok=True)
    n_train, n_valid = make_data(work)
    make_model(work)
    print(f"data: {n_train} training and {n_valid} validation images in {work}", flush=True)

    with serve(args.bin, work) as base:
        files = {name: upload(base, os.path.join(work, name))
                 for name in ("digits-train.zip", "digits-valid.zip")}
        steps_per_epoch = -(-n_train // args.batch_size)
        job = call(base, "POST", "/v1/fine_tuning/jobs", {
            "model": "digits-resnet", "task": "image_classification", "seed": 0,
            "training_file": files["digits-train.zip"],
            "validation_file": files["digits-valid.zip"],
            "hyperparameters": {"n_epochs": args.epochs, "batch_size": args.batch_size,
                                "learning_rate": args.lr, "lora_r": args.rank,
                                "lora_alpha": 2 * args.rank, "eval_interval": steps_per_epoch}})
        t0 = time.time()
        j = finished(base, job["id"])
        evals = sorted((e["data"]["step"], e["data"]["valid_accuracy"], e["data"]["valid_macro_f1"],
                        e["data"]["valid_loss"])
                       for e in events(base, job["id"])
                       if (e.get("data") or {}).get("valid_accuracy") is not None)
        for step, acc, f1, loss in evals:
            print(f"step {step}: validation accuracy {acc:.4f}, macro-F1 {f1:.4f}, loss {loss:.4f}")
        print(f"{j['fine_tuned_model']}: {args.epochs} epochs, {j['trained_tokens']} images seen, "
              f"{time.time() - t0:.0f} s; final validation accuracy {evals[-1][1]:.4f} (chance 0.10)")
        # The download, and `loraforge classify` with it on a held-out 7.
        with urllib.request.urlopen(f"{base}/v1/fine_tuning/jobs/{job['id']}/adapter?format=zip") as r:
            zipfile.ZipFile(io.BytesIO(r.read())).extractall(os.path.join(work, "adapter"))
        with zipfile.ZipFile(os.path.join(work, "digits-valid.zip")) as z:
            seven = sorted(n for n in z.namelist() if n.startswith("digits/7/"))[0]
            with open(os.path.join(work, "seven.png"), "wb") as f:
                f.write(z.read(seven))
        out = subprocess.run(
            [args.bin, "classify", "--model", os.path.join(work, "models", "digits-resnet"),
             "--adapter", os.path.join(work, "adapter"), "--image", os.path.join(work, "seven.png")],
            check=True, capture_output=True, text=True).stdout
        print(f"loraforge classify --image seven.png ({seven}): {out.strip()}")


if __name__ == "__main__":
    main()
