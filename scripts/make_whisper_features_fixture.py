#!/usr/bin/env python3
"""transformers' WhisperFeatureExtractor on a short synthetic clip: the reference for
loraforge's log-mel front end (crates/trainer/tests/whisper_features.rs).

Writes tests/fixtures/whisper-features/ (deleted and rewritten):

  speech16k.wav     1.3 s at 16 kHz, 16-bit PCM mono: a gliding tone with harmonics, a
                    second tone and seeded noise, so that every mel band has energy
  speech22k.wav     the same signal rendered at 22.05 kHz, 32-bit float stereo (the
                    decoder's float and channel paths; not a feature reference)
  ref.safetensors   mel_80 / mel_128: the Slaney filter banks (201 x bins);
                    features_80 / features_128: log-mel of speech16k.wav as the extractor
                    computes it (the int16 samples / 32768, zero-padded to 30 s), the first
                    160 of its 3000 frames, and last_80 / last_128 its last frame (the
                    padding's value, which frames 160..2999 all share)
  ref.json          versions, shapes

Deterministic, CPU. CI does not run this: its outputs are committed. Run from the
repository root with the test venv:
  ~/.cache/loraforge/venv/bin/python scripts/make_whisper_features_fixture.py
"""
import json
import shutil
import wave
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers import WhisperFeatureExtractor

OUT = Path("tests/fixtures/whisper-features")
KEEP = 160


def signal(rate, seconds=1.3):
    t = np.arange(int(rate * seconds)) / rate
    # A glide from 180 Hz up 220 Hz a second, its phase in closed form so that every
    # sampling rate renders the same continuous signal.
    phase = 2 * np.pi * (180 * t + 110 * t * t)
    x = sum(0.3 / k * np.sin(k * phase) for k in range(1, 12))
    x += 0.1 * np.sin(2 * np.pi * 3100 * t) * (t > 0.5)
    x += 0.02 * np.random.default_rng(0).standard_normal(len(t))
    return (x * np.minimum(1.0, t / 0.05)).astype(np.float64)


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    pcm = np.clip(np.round(signal(16000) * 20000), -32768, 32767).astype("<i2")
    with wave.open(str(OUT / "speech16k.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    # 32-bit float WAV (format tag 3), written by hand: Python's wave module writes PCM only.
    t = np.arange(int(22050 * 0.5)) / 22050
    x = (0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.cos(2 * np.pi * 3000 * t)).astype("<f4")
    stereo = np.stack([x, 0.5 * x], axis=1).astype("<f4").tobytes()
    fmt = (3).to_bytes(2, "little") + (2).to_bytes(2, "little") + (22050).to_bytes(4, "little") \
        + (22050 * 8).to_bytes(4, "little") + (8).to_bytes(2, "little") + (32).to_bytes(2, "little")
    body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt \
        + b"data" + len(stereo).to_bytes(4, "little") + stereo
    (OUT / "speech22k.wav").write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)

    samples = pcm.astype(np.float32) / 32768.0
    ref = {}
    for bins in (80, 128):
        fe = WhisperFeatureExtractor(feature_size=bins)
        feats = fe(samples, sampling_rate=16000, return_tensors="np").input_features[0]
        assert feats.shape == (bins, 3000), feats.shape
        assert np.all(feats[:, KEEP:] == feats[:, -1:]), "the padded frames differ"
        ref[f"mel_{bins}"] = fe.mel_filters.astype(np.float32)
        ref[f"features_{bins}"] = np.ascontiguousarray(feats[:, :KEEP]).astype(np.float32)
        ref[f"last_{bins}"] = np.ascontiguousarray(feats[:, -1]).astype(np.float32)
    save_file(ref, str(OUT / "ref.safetensors"))
    (OUT / "ref.json").write_text(json.dumps({
        "torch": torch.__version__, "transformers": transformers.__version__,
        "numpy": np.__version__, "samples": len(samples),
        "shapes": {k: list(v.shape) for k, v in ref.items()},
    }, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
