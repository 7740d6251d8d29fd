#!/usr/bin/env python3
"""Transcribes WAV files with a loraforge speech-recognition adapter through HuggingFace
PEFT and transformers' Whisper (`generate`, greedy): the reference for
`loraforge transcribe` and `POST /v1/audio/transcriptions`.

    python scripts/peft_transcribe.py --base models/tiny-whisper-asr --adapter ADAPTER --audio a.wav [--audio b.wav ...] [--language en]

Fails (exit 1) unless PEFT loads the adapter with no missing or unexpected keys and
every tensor bit-exactly. Audio is read as soundfile reads it (16-bit PCM / 32768) and
must already be 16 kHz mono (no resampling here, so both sides see the same samples).
Prints one JSON line per file: {"audio", "ids" (the generated tokens), "text"}, after a
summary line on stderr.
"""
import argparse
import json
import sys
import wave

from peft_loaded import check_loaded


def read_wav(path):
    import numpy as np

    with wave.open(path, "rb") as w:
        if w.getnchannels() != 1 or w.getframerate() != 16000 or w.getsampwidth() != 2:
            sys.exit(f"{path}: expected 16 kHz mono 16-bit PCM")
        data = w.readframes(w.getnframes())
    return np.frombuffer(data, dtype="<i2").astype("float32") / 32768.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--audio", action="append", required=True)
    ap.add_argument("--language", default="en")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.set_num_threads(2)
    model = WhisperForConditionalGeneration.from_pretrained(args.base, dtype=torch.float32)
    cfg = model.config
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
        check_loaded(model, args.adapter)
    model.eval()
    fe = WhisperFeatureExtractor.from_pretrained(args.base)
    tok = AutoTokenizer.from_pretrained(args.base)
    for path in args.audio:
        feats = fe(read_wav(path), sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            # At most half the decoder's positions, as loraforge (OpenAI's sample_len).
            out = model.generate(input_features=feats, language=args.language, task="transcribe",
                                 do_sample=False, num_beams=1,
                                 max_new_tokens=cfg.max_target_positions // 2)
        ids = [int(i) for i in out[0]]
        # generate returns the new tokens alone (transformers 5), the prompt left out; the
        # end token, when reached, is the last.
        new = [i for i in ids if i != cfg.eos_token_id]
        text = tok.decode(new, skip_special_tokens=True).strip()
        print(json.dumps({"audio": path, "ids": new, "text": text}))


if __name__ == "__main__":
    main()
