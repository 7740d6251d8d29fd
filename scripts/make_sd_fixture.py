#!/usr/bin/env python3
"""Deterministic Stable Diffusion 1.x fixtures for loraforge's SD LoRA tests.

Writes (relative to the repository root; each output folder is deleted and rewritten):

  tests/fixtures/sd-tiny/          a tiny, SD-1.x-shaped pipeline in diffusers folder layout with random
                                   weights stored as float16:
                                     model_index.json                 (StableDiffusionPipeline.save_pretrained)
                                     unet/        config.json + diffusion_pytorch_model.safetensors
                                     vae/         config.json + diffusion_pytorch_model.safetensors
                                     text_encoder/ config.json + model.safetensors (keys prefixed `text_model.`)
                                     tokenizer/   vocab.json, merges.txt, tokenizer_config.json,
                                                  special_tokens_map.json (the real 49,408-token CLIP BPE)
                                     scheduler/   scheduler_config.json (DDPM, SD 1.x betas)
                                     README.md
  tests/fixtures/sd-tiny-ref/      float32 goldens, all computed in float32 from the f16-rounded weights:
                                     unet.safetensors   sample, timesteps, encoder_hidden_states, out
                                     vae.safetensors    image, mean, logvar, decoded
                                     clip.safetensors   input_ids, last_hidden_state
                                     tokens.json        prompts and their unpadded CLIP ids
                                     lora.safetensors   PEFT LoRA (r=4, alpha=8) init A/B, dL/dA, dL/dB, out,
                                                        target, loss
                                     lora_proj.safetensors  the same on kohya's attention+MLP set: also
                                                        proj_in/proj_out (1x1 Conv2d: A/B 4-D) and
                                                        ff.net.0.proj/ff.net.2
                                     kohya.safetensors  kohya-format LoRA (r=4, alpha=2.0) with kohya metadata
                                     kohya_out.safetensors  UNet output after diffusers loads kohya.safetensors
                                     ref.json           versions, seeds, configs, module list, notes
  tests/data/sd/                   tiny images + captions and dataset zips for the image-dataset import
                                   tests (kohya, flat, imagefolder layouts; EXIF rotation; zip path
                                   traversal / absolute path), with a README.md describing each file.

Tokenizer check: transformers 5 has no slow (pure-Python) CLIPTokenizer any more; its CLIPTokenizer is
tokenizers-backed.  The token ids are therefore checked three ways and must agree exactly: transformers'
CLIPTokenizer loaded from tokenizer/, a `tokenizers` pipeline assembled from vocab.json + merges.txt as in
docs section 1.3, and a pure-Python port of OpenAI CLIP's SimpleTokenizer reading the .gz merges directly.

Seeds: every random draw happens after torch.manual_seed(SEED + k) (SEED = 0, k fixed per section, see
the calls to reseed()); CPU, one thread.  A rerun with the same library versions rewrites byte-identical
files.  CI does NOT run this script: its outputs are committed.

Requirements (Python 3.11; PyPI is needed only for the open_clip wheel download):

  pip install torch==2.15.* transformers==5.24.* diffusers==0.42.1 peft==0.21.* safetensors numpy Pillow regex
  pip download open_clip_torch==3.3.0 --no-deps     # NOT installed: only its BPE merges file is read

The CLIP BPE merges come from `open_clip/bpe_simple_vocab_16e6.txt.gz` inside the open_clip_torch 3.3.0
wheel (MIT licence; sha256 pinned below).  Pass the wheel with --open-clip-wheel, or the script runs
`python -m pip download open_clip_torch==3.3.0 --no-deps` into a temporary folder itself.

Usage, from the repository root:

  OMP_NUM_THREADS=1 nice ~/.cache/loraforge/venv/bin/python scripts/make_sd_fixture.py \\
      [--open-clip-wheel /path/to/open_clip_torch-3.3.0-py3-none-any.whl]
"""
import argparse
import gzip
import hashlib
import html
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import zipfile

import numpy as np
import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD = os.path.join(ROOT, "tests", "fixtures", "sd-tiny")
REF = os.path.join(ROOT, "tests", "fixtures", "sd-tiny-ref")
DATA = os.path.join(ROOT, "tests", "data", "sd")

SEED = 0
OPEN_CLIP_VERSION = "3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
N_MERGES = 48894  # 49152 - 256 - 2: lines 1..48894 after the header
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
MAX_LEN = 77

STD = 0.1
LORA_R, LORA_ALPHA = 4, 8
KOHYA_R, KOHYA_ALPHA = 4, 2.0
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TIMESTEPS = [10.0, 700.0]
FIXED_TIME = 1767225600  # 2026-01-01T00:00:00Z, used for the kohya metadata timestamps

UNET_KW = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32, attention_head_dim=8, cross_attention_dim=16,
)
VAE_KW = dict(
    in_channels=3, out_channels=3, block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32,
    latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    sample_size=32,
)
CLIP_KW = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=49408,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16, bos_token_id=BOS_ID,
    eos_token_id=EOS_ID, pad_token_id=EOS_ID,
)
SCHED_KW = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, steps_offset=1,
)

LONG_PROMPT = (
    "a highly detailed oil painting of a red fox sitting in a snowy forest at dawn, soft golden light, "
    "mist between the pine trees, fresh tracks in the snow, a frozen river in the background, "
    "dramatic clouds, birds in the sky, cinematic composition, rule of thirds, sharp focus, "
    "intricate fur texture, warm and cool colour contrast, trending on artstation, masterpiece, "
    "best quality, ultra wide angle, volumetric lighting, 8k resolution"
)
PROMPTS = [
    "a photo of a cat",
    "A Photo Of SKS Dog, HDR",
    "it's a dog's life!",
    "3 cats, 12 dogs",
    "  a   red\tball \n\n on the   grass  ",
    "café naïve — 東京",
    "cafe\u0301 (decomposed é, NFC-normalised)",
    "",
    LONG_PROMPT,
]


def reseed(k):
    torch.manual_seed(SEED + k)
    random.seed(SEED + k)
    np.random.seed(SEED + k)


def write_json(path, obj, indent=2):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def write_text(path, text):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def maxdiff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def save_st(tensors, path, metadata=None):
    """safetensors.torch.save, but with `__metadata__` in sorted key order: safetensors serialises the
    metadata from a hash map, so its order (and the file's bytes) would otherwise change run to run."""
    from safetensors.torch import save
    b = save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b[8 + n:])


def fresh_dir(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


# ----------------------------------------------------------------------------------------------
# CLIP BPE tokenizer from open_clip's merges file
# ----------------------------------------------------------------------------------------------
def bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable unicode map (same order as open_clip and OpenAI CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def read_bpe_gz(wheel):
    tmp = None
    if wheel is None:
        tmp = tempfile.mkdtemp(prefix="open_clip_wheel_")
        subprocess.check_call([sys.executable, "-m", "pip", "download", f"open_clip_torch=={OPEN_CLIP_VERSION}",
                               "--no-deps", "-d", tmp])
        wheel = os.path.join(tmp, f"open_clip_torch-{OPEN_CLIP_VERSION}-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        raw = z.read(BPE_MEMBER)
    if tmp is not None:
        shutil.rmtree(tmp)
    got = hashlib.sha256(raw).hexdigest()
    assert got == BPE_SHA256, f"{BPE_MEMBER} sha256 {got} != pinned {BPE_SHA256}"
    return raw


def build_clip_vocab(bpe_gz):
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = lines[1:N_MERGES + 1]
    assert len(merges) == N_MERGES and all(len(m.split()) == 2 for m in merges)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    assert vocab.index(BOS) == BOS_ID and vocab.index(EOS) == EOS_ID
    return vocab, merges


class OpenAIClipReference:
    """Independent pure-Python reference: OpenAI CLIP's SimpleTokenizer (as copied into open_clip), read
    straight from the .gz merges.  ftfy.fix_text is replaced by NFC normalisation (what ftfy does for the
    prompts used here: they contain no mojibake, curly quotes or HTML entities)."""

    def __init__(self, bpe_gz):
        import regex
        vocab, merges = build_clip_vocab(bpe_gz)
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE)
        self.re = regex

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return word

    def encode(self, text):
        text = unicodedata.normalize("NFC", text)
        text = html.unescape(html.unescape(text)).strip()
        text = " ".join(text.split()).strip().lower()
        ids = [BOS_ID]
        for tok in self.re.findall(self.pat, text):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(tok))
        return ids + [EOS_ID]


def doc_pipeline_tokenizer(folder):
    """The `tokenizers` pipeline of docs/stable-diffusion-lora.md section 1.3, assembled from vocab.json +
    merges.txt alone (what the Rust side has to do, since SD folders ship no tokenizer.json)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    tk = Tokenizer(models.BPE.from_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                                        end_of_word_suffix="</w>", continuing_subword_prefix="", unk_token=EOS))
    tk.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                          normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}",
                                                      special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)])
    return tk


def added_token(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tokenizer(out, vocab, merges):
    """The four files a real SD 1.x `tokenizer/` folder ships (no tokenizer.json)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False, separators=(",", ":"))
    write_text(os.path.join(out, "merges.txt"), "#version: 0.2\n" + "\n".join(merges) + "\n")
    write_json(os.path.join(out, "special_tokens_map.json"), {
        "bos_token": added_token(BOS), "eos_token": added_token(EOS), "pad_token": EOS, "unk_token": added_token(EOS),
    })
    cfg = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": MAX_LEN,
           "pad_token": EOS, "tokenizer_class": "CLIPTokenizer"}
    for k, t in (("bos_token", BOS), ("eos_token", EOS), ("unk_token", EOS)):
        cfg[k] = dict(added_token(t), __type="AddedToken")
    write_json(os.path.join(out, "tokenizer_config.json"), dict(sorted(cfg.items())))


# ----------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------
def randomize_(model):
    """Every parameter ~ N(0, STD^2), except GroupNorm/LayerNorm weights = 1 + N(0, STD^2); then round to f16."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    seen = 0
    with torch.no_grad():
        for _, mod in model.named_modules():
            own = list(mod.named_parameters(recurse=False))
            if own and "norm" in type(mod).__name__.lower():
                assert isinstance(mod, norms), f"unexpected norm type {type(mod)}"
            for pname, p in own:
                noise = torch.randn(p.shape, dtype=torch.float32) * STD
                p.copy_(1.0 + noise if isinstance(mod, norms) and pname == "weight" else noise)
                seen += 1
        assert seen == len(list(model.parameters()))
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# LoRA helpers
# ----------------------------------------------------------------------------------------------
def lora_modules(model):
    from peft.tuners.lora import LoraLayer
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def base_modules(unet):
    """diffusers paths of the to_q/to_k/to_v/to_out.0 Linears, in named_modules order."""
    out = []
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS):
            out.append((name, m))
    return out


def load_unet(dtype=torch.float32):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(os.path.join(SD, "unet"), dtype=dtype).eval()


def kohya_name(path):
    return "lora_unet_" + path.replace(".", "_")


# safetensors hashes as kohya's train_util.precalculate_safetensors_hashes computes them
def kohya_hashes(tensors, metadata):
    from safetensors.torch import save
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = save(tensors, ss_only)
    n = int.from_bytes(b[:8], "little")
    model_hash = hashlib.sha256(b[8 + n:]).hexdigest()
    legacy_hash = hashlib.sha256(b[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


# ----------------------------------------------------------------------------------------------
# image data
# ----------------------------------------------------------------------------------------------
def png_bytes(img):
    b = io.BytesIO()
    img.save(b, format="PNG", optimize=False, compress_level=9)
    return b.getvalue()


def jpeg_bytes(img, **kw):
    b = io.BytesIO()
    img.save(b, format="JPEG", quality=95, subsampling=0, optimize=False, **kw)
    return b.getvalue()


def make_images():
    from PIL import Image, ImageDraw
    imgs = {}
    im = Image.new("RGB", (32, 32), (255, 255, 255))
    ImageDraw.Draw(im).rectangle([8, 8, 23, 23], fill=(255, 0, 0))
    imgs["red_square.png"] = (png_bytes(im), "a red square on a white background", "RGB PNG 32x32")
    im = Image.new("RGB", (48, 40), (255, 255, 0))
    ImageDraw.Draw(im).ellipse([8, 6, 39, 33], fill=(0, 0, 255))
    imgs["blue_circle.jpg"] = (jpeg_bytes(im), "a blue circle on a yellow background", "RGB JPEG 48x40 (w x h)")
    im = Image.new("RGBA", (48, 40), (0, 0, 0, 0))
    ImageDraw.Draw(im).polygon([(24, 4), (44, 36), (4, 36)], fill=(0, 160, 0, 255))
    imgs["green_triangle.png"] = (png_bytes(im), "a green triangle, transparent background",
                                  "RGBA PNG 48x40, fully transparent outside the triangle")
    im = Image.new("L", (32, 32), 0)
    d = ImageDraw.Draw(im)
    for x in range(0, 32, 8):
        d.rectangle([x, 0, x + 3, 31], fill=200)
    imgs["gray_stripes.jpg"] = (jpeg_bytes(im), "grey vertical stripes", "greyscale (L) JPEG 32x32")
    return imgs


def write_zip(path, entries):
    """entries: list of (name, bytes or None for a directory entry). Fixed timestamps -> reproducible."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries:
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.create_system = 3  # unix
            if data is None:
                zi.external_attr = (0o40755 << 16) | 0x10
                z.writestr(zi, b"")
            else:
                zi.external_attr = 0o100644 << 16
                zi.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(zi, data)
    with zipfile.ZipFile(path) as z:
        assert z.namelist() == [n for n, _ in entries], z.namelist()


def make_data(kohya_captions):
    from PIL import Image, ImageOps
    fresh_dir(DATA)
    imgs = make_images()
    for name, (data, caption, _) in imgs.items():
        with open(os.path.join(DATA, name), "wb") as f:
            f.write(data)
        write_text(os.path.join(DATA, os.path.splitext(name)[0] + ".txt"), caption + "\n")
    b = lambda n: imgs[n][0]  # noqa: E731

    # kohya DreamBooth layout (with directory entries, as `zip -r` writes them)
    write_zip(os.path.join(DATA, "kohya.zip"), [
        ("10_sks dog/", None),
        ("10_sks dog/dog1.png", b("red_square.png")),
        ("10_sks dog/dog1.txt", (kohya_captions["dog1.png"] + "\n").encode()),
        ("10_sks dog/dog2.jpg", b("blue_circle.jpg")),
        ("10_sks dog/dog2.caption", kohya_captions["dog2.jpg"].encode()),
        ("2_red ball/", None),
        ("2_red ball/ball.png", b("green_triangle.png")),
    ])
    write_zip(os.path.join(DATA, "flat.zip"), [
        ("red_square.png", b("red_square.png")),
        ("red_square.txt", imgs["red_square.png"][1].encode()),
        ("blue_circle.jpg", b("blue_circle.jpg")),
        ("blue_circle.txt", imgs["blue_circle.jpg"][1].encode()),
        ("gray_stripes.jpg", b("gray_stripes.jpg")),
    ])
    meta = "".join(json.dumps({"file_name": n, "text": imgs[n][1]}, ensure_ascii=False) + "\n" for n in imgs)
    write_zip(os.path.join(DATA, "imagefolder.zip"),
              [("train/metadata.jsonl", meta.encode())] + [("train/" + n, b(n)) for n in imgs])
    write_zip(os.path.join(DATA, "traversal.zip"), [
        ("ok.png", b("red_square.png")), ("ok.txt", b"a red square"), ("../evil.png", b("red_square.png"))])
    write_zip(os.path.join(DATA, "absolute.zip"), [
        ("ok.png", b("red_square.png")), ("ok.txt", b"a red square"), ("/abs.png", b("red_square.png"))])

    # EXIF orientation 6: stored 40 wide x 24 high, left half red / right half blue
    im = Image.new("RGB", (40, 24), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 24))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = os.path.join(DATA, "exif-rotated.jpg")
    with open(path, "wb") as f:
        f.write(jpeg_bytes(im, exif=exif.tobytes()))
    with Image.open(path) as raw:
        assert raw.size == (40, 24) and raw.getexif().get(0x0112) == 6
        shown = ImageOps.exif_transpose(raw).convert("RGB")
    assert shown.size == (24, 40), shown.size
    probes = {}
    for (x, y), want in (((12, 5), (255, 0, 0)), ((12, 15), (255, 0, 0)), ((12, 25), (0, 0, 255)),
                         ((12, 34), (0, 0, 255)), ((2, 2), (255, 0, 0)), ((21, 37), (0, 0, 255))):
        got = shown.getpixel((x, y))
        assert all(abs(g - w) <= 8 for g, w in zip(got, want)), ((x, y), got, want)
        probes[f"({x},{y})"] = list(got)

    # sanity: every image decodes, every zip lists what we think
    for name in imgs:
        with Image.open(os.path.join(DATA, name)) as im:
            im.load()
    write_text(os.path.join(DATA, "README.md"), data_readme(imgs, kohya_captions, probes))
    return imgs


def data_readme(imgs, kohya_captions, probes):
    rows = "\n".join(f"| `{n}` | {d} | `{os.path.splitext(n)[0]}.txt`: \"{c}\" |" for n, (_, c, d) in imgs.items())
    return f"""# SD image-dataset test data

Written by `scripts/make_sd_fixture.py` (PIL, fixed content, zip entries dated 1980-01-01, unix
permissions 0644 / 0755); rerunning it rewrites identical bytes.  All images are tiny solid-colour
shapes drawn with PIL.  Caption `.txt` files next to the images end in a newline; importers should trim
captions.

## Images

| file | what | caption file |
|---|---|---|
{rows}

## Zips

| file | entries | expected import |
|---|---|---|
| `kohya.zip` | `10_sks dog/` (directory entry), `10_sks dog/dog1.png` + `dog1.txt`, `10_sks dog/dog2.jpg` + `dog2.caption`, `2_red ball/` (directory entry), `2_red ball/ball.png` (no caption file) | kohya DreamBooth layout: folder `10_sks dog` = 10 repeats, class tokens `sks dog`: dog1.png -> "{kohya_captions['dog1.png']}" (`.txt`, trailing newline), dog2.jpg -> "{kohya_captions['dog2.jpg']}" (`.caption`, no newline); folder `2_red ball` = 2 repeats: ball.png -> "red ball" (class tokens, no caption file). 3 images, 2x10 + 1x2 = 22 samples per epoch. dog1 = red_square.png, dog2 = blue_circle.jpg, ball = green_triangle.png (RGBA) bytes. |
| `flat.zip` | `red_square.png` + `red_square.txt`, `blue_circle.jpg` + `blue_circle.txt`, `gray_stripes.jpg` (no caption) | flat layout: 2 captioned images (captions without trailing newline) and 1 without a caption (error unless a trigger word is set) |
| `imagefolder.zip` | `train/metadata.jsonl` + the 4 images in `train/` | diffusers imagefolder: one `{{"file_name": ..., "text": ...}}` line per image, file names relative to `train/`, captions as in the table above |
| `traversal.zip` | `ok.png`, `ok.txt`, `../evil.png` | must be rejected (path traversal) |
| `absolute.zip` | `ok.png`, `ok.txt`, `/abs.png` | must be rejected (absolute path) |

## `exif-rotated.jpg`

A baseline JPEG (quality 95, 4:4:4) whose stored pixels are **40 wide x 24 high**: columns 0-19 red
(255,0,0), columns 20-39 blue (0,0,255).  Its EXIF IFD0 has `Orientation` (0x0112) = **6**, i.e.
"rotate 90 degrees clockwise to display".

Expected after applying the orientation (checked with `PIL.ImageOps.exif_transpose`): **24 wide x 40
high**, rows 0-19 red (top half), rows 20-39 blue (bottom half); the stored left column becomes the
displayed top row.  Without applying it, a decoder returns 40x24 with red on the left.  JPEG is lossy and
the red/blue edge (row 20 after rotation) is smeared over a few pixels, so compare pixels away from it
with a tolerance.  Pixels measured with PIL after exif_transpose, as (x, y): RGB:
{chr(10).join(f"- {k}: {tuple(v)}" for k, v in probes.items())}
"""


# ----------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--open-clip-wheel", help="path to open_clip_torch-3.3.0-py3-none-any.whl (else pip download)")
    args = ap.parse_args()

    import diffusers
    import peft
    import PIL
    import safetensors
    import transformers
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                "diffusers": diffusers.__version__, "peft": peft.__version__, "safetensors": safetensors.__version__,
                "Pillow": PIL.__version__, "numpy": np.__version__, "open_clip_torch (BPE file only)": OPEN_CLIP_VERSION}
    print("versions:", versions)
    summary = {}

    # ---------------- tokenizer ----------------
    bpe_gz = read_bpe_gz(args.open_clip_wheel)
    vocab, merges = build_clip_vocab(bpe_gz)
    tmp_tok = tempfile.mkdtemp(prefix="sd_tiny_tok_")
    write_tokenizer(tmp_tok, vocab, merges)
    tok = CLIPTokenizer.from_pretrained(tmp_tok)
    assert len(tok) == 49408, len(tok)

    # ---------------- models ----------------
    reseed(1)
    unet = randomize_(UNet2DConditionModel(**UNET_KW)).eval()
    reseed(2)
    vae = randomize_(AutoencoderKL(**VAE_KW)).eval()
    reseed(3)
    te = randomize_(CLIPTextModel(CLIPTextConfig(**CLIP_KW))).eval()
    sched = DDPMScheduler(**SCHED_KW)
    summary["params"] = {"unet": count_params(unet), "vae": count_params(vae), "text_encoder": count_params(te)}

    fresh_dir(SD)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for m in (unet, vae, te):
        m.half()
    pipe.save_pretrained(SD, safe_serialization=True)
    for m in (unet, vae, te):
        m.float()
    # tokenizer/: exactly the four files of a real SD 1.x folder
    shutil.rmtree(os.path.join(SD, "tokenizer"))
    write_tokenizer(os.path.join(SD, "tokenizer"), vocab, merges)
    shutil.rmtree(tmp_tok)
    # scheduler: DDPMScheduler has no `set_alpha_to_one` argument; SD 1.x scheduler configs carry it
    # (diffusers ignores it with a notice when loading into DDPMScheduler), so add it to the JSON.
    sp = os.path.join(SD, "scheduler", "scheduler_config.json")
    with open(sp, encoding="utf-8") as f:
        scfg = json.load(f)
    scfg["set_alpha_to_one"] = False
    write_json(sp, dict(sorted(scfg.items())))
    # text encoder: real SD checkpoints (and candle) use `text_model.`-prefixed keys
    tp = os.path.join(SD, "text_encoder", "model.safetensors")
    with safe_open(tp, "pt") as f:
        te_meta = f.metadata()
    te_sd = load_file(tp)
    renamed = not all(k.startswith("text_model.") for k in te_sd)
    if renamed:
        te_sd = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in te_sd.items()}
    save_st(te_sd, tp, metadata=te_meta or {"format": "pt"})
    summary["text_encoder_keys_renamed"] = renamed
    for sub, fn in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                    ("text_encoder", "model.safetensors")):
        sd = load_file(os.path.join(SD, sub, fn))
        assert all(v.dtype == torch.float16 for v in sd.values()), sub
    te_keys = sorted(te_sd)
    assert all(k.startswith("text_model.") for k in te_keys)
    model_index = json.load(open(os.path.join(SD, "model_index.json")))
    assert model_index["safety_checker"] == [None, None] and model_index["feature_extractor"] == [None, None]

    # ---------------- tokens ----------------
    ref_tok = OpenAIClipReference(bpe_gz)
    doc_tok = doc_pipeline_tokenizer(os.path.join(SD, "tokenizer"))
    assert doc_tok.get_vocab_size() == 49408
    disk_tok = CLIPTokenizer.from_pretrained(os.path.join(SD, "tokenizer"))
    assert len(disk_tok) == 49408 and disk_tok.model_max_length == MAX_LEN
    assert disk_tok.bos_token_id == BOS_ID and disk_tok.eos_token_id == EOS_ID and disk_tok.pad_token_id == EOS_ID
    tokens = []
    for p in PROMPTS:
        ids = disk_tok(p).input_ids
        ref = ref_tok.encode(p)
        assert ids == ref, (p, ids, ref)
        assert ids == doc_tok.encode(p).ids, (p, ids, doc_tok.encode(p).ids)
        tokens.append({"prompt": p, "ids": ids})
    assert tokens[0]["ids"] == [49406, 320, 1125, 539, 320, 2368, 49407], tokens[0]["ids"]
    assert len(tokens[-1]["ids"]) > MAX_LEN, len(tokens[-1]["ids"])
    input_ids = disk_tok(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True,
                         return_tensors="pt").input_ids.to(torch.int64)
    for row, t in zip(input_ids.tolist(), tokens):
        ids = t["ids"] if len(t["ids"]) <= MAX_LEN else t["ids"][:MAX_LEN - 1] + [EOS_ID]
        assert row == ids + [EOS_ID] * (MAX_LEN - len(ids)), t["prompt"]
    summary["token_counts"] = [len(t["ids"]) for t in tokens]

    fresh_dir(REF)
    write_json(os.path.join(REF, "tokens.json"), tokens)

    # ---------------- goldens (in-memory f16-rounded models, f32 compute) ----------------
    reseed(10)
    sample = torch.randn(2, 4, 16, 16)
    timesteps = torch.tensor(TIMESTEPS, dtype=torch.float32)
    ehs = torch.randn(2, MAX_LEN, 16)
    reseed(11)
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    reseed(12)
    target = torch.randn(2, 4, 16, 16)

    with torch.no_grad():
        unet_out = unet(sample, timesteps, encoder_hidden_states=ehs).sample
        post = vae.encode(image).latent_dist
        mean, logvar = post.mean.contiguous().clone(), post.logvar.contiguous().clone()
        decoded = vae.decode(mean).sample
        lhs = te(input_ids)[0]
    save_st({"sample": sample, "timesteps": timesteps, "encoder_hidden_states": ehs, "out": unet_out},
            os.path.join(REF, "unet.safetensors"))
    save_st({"image": image, "mean": mean, "logvar": logvar, "decoded": decoded}, os.path.join(REF, "vae.safetensors"))
    save_st({"input_ids": input_ids, "last_hidden_state": lhs}, os.path.join(REF, "clip.safetensors"))
    summary["logvar_range"] = [logvar.min().item(), logvar.max().item()]
    summary["unet_out_std"] = unet_out.std().item()

    # ---------------- verify: reload the folder from disk and recompute ----------------
    diffs = {}
    u2 = load_unet()
    v2 = AutoencoderKL.from_pretrained(os.path.join(SD, "vae"), dtype=torch.float32).eval()
    t2 = CLIPTextModel.from_pretrained(os.path.join(SD, "text_encoder"), dtype=torch.float32).eval()
    for name, a, b in (("unet", unet, u2), ("vae", vae, v2), ("text_encoder", te, t2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), name
        diffs[f"{name}.weights"] = max(maxdiff(sa[k], sb[k]) for k in sa)
    g = load_file(os.path.join(REF, "unet.safetensors"))
    gv = load_file(os.path.join(REF, "vae.safetensors"))
    gc = load_file(os.path.join(REF, "clip.safetensors"))
    with torch.no_grad():
        diffs["unet.out"] = maxdiff(u2(g["sample"], g["timesteps"], encoder_hidden_states=g["encoder_hidden_states"]).sample,
                                    g["out"])
        p2 = v2.encode(gv["image"]).latent_dist
        diffs["vae.mean"] = maxdiff(p2.mean, gv["mean"])
        diffs["vae.logvar"] = maxdiff(p2.logvar, gv["logvar"])
        diffs["vae.decoded"] = maxdiff(v2.decode(gv["mean"]).sample, gv["decoded"])
        diffs["clip.last_hidden_state"] = maxdiff(t2(gc["input_ids"])[0], gc["last_hidden_state"])
    del u2, v2, t2

    # ---------------- PEFT LoRA gradients ----------------
    ul = load_unet()
    ul.requires_grad_(False)
    reseed(20)
    ul.add_adapter(LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian", target_modules=TARGETS))
    mods = lora_modules(ul)
    paths = [n for n, _ in mods]
    assert paths == [n for n, _ in base_modules(load_unet())], "PEFT paths differ from the diffusers module paths"
    from diffusers.models.attention import BasicTransformerBlock
    n_blocks = sum(1 for m in ul.modules() if isinstance(m, BasicTransformerBlock))
    assert len(mods) == 4 * 2 * n_blocks, (len(mods), n_blocks)
    reseed(21)
    with torch.no_grad():
        for _, m in mods:
            w = m.lora_B["default"].weight
            w.copy_(torch.randn(w.shape) * STD)
    lora_t = {}
    for n, m in mods:
        lora_t[f"init.{n}.lora_A.weight"] = m.lora_A["default"].weight.detach().clone()
        lora_t[f"init.{n}.lora_B.weight"] = m.lora_B["default"].weight.detach().clone()
    out = ul(sample, timesteps, encoder_hidden_states=ehs).sample
    loss = F.mse_loss(out, target)
    loss.backward()
    for n, m in mods:
        for ab in ("lora_A", "lora_B"):
            gr = getattr(m, ab)["default"].weight.grad
            assert gr is not None and gr.abs().max() > 0, (n, ab)
            lora_t[f"grad.{n}.{ab}.weight"] = gr.detach().clone()
    lora_t.update({"out": out.detach().clone(), "target": target, "loss": loss.detach().clone()})
    save_st(lora_t, os.path.join(REF, "lora.safetensors"))
    assert maxdiff(out.detach(), unet_out) > 1e-4, "LoRA output equals the base output"
    summary["lora_modules"] = len(mods)
    summary["transformer_blocks"] = n_blocks
    summary["lora_loss"] = loss.item()
    del ul

    # verify: a fresh UNet from disk + the saved init A/B reproduce out / loss / grads exactly
    gl = load_file(os.path.join(REF, "lora.safetensors"))
    u3 = load_unet()
    u3.requires_grad_(False)
    u3.add_adapter(LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian", target_modules=TARGETS))
    with torch.no_grad():
        for n, m in lora_modules(u3):
            m.lora_A["default"].weight.copy_(gl[f"init.{n}.lora_A.weight"])
            m.lora_B["default"].weight.copy_(gl[f"init.{n}.lora_B.weight"])
    o3 = u3(g["sample"], g["timesteps"], encoder_hidden_states=g["encoder_hidden_states"]).sample
    l3 = F.mse_loss(o3, gl["target"])
    l3.backward()
    diffs["lora.out"] = maxdiff(o3.detach(), gl["out"])
    diffs["lora.loss"] = maxdiff(l3.detach(), gl["loss"])
    diffs["lora.grads"] = max(maxdiff(getattr(m, ab)["default"].weight.grad, gl[f"grad.{n}.{ab}.weight"])
                              for n, m in lora_modules(u3) for ab in ("lora_A", "lora_B"))
    del u3

    # ---------------- PEFT LoRA on kohya's attention+MLP set (1x1 conv proj_in/proj_out) --------
    proj_targets = TARGETS + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    up = load_unet()
    up.requires_grad_(False)
    reseed(40)
    up.add_adapter(LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian",
                              target_modules=proj_targets))
    pmods = lora_modules(up)
    n_conv = sum(1 for _, m in pmods if isinstance(m.lora_A["default"], torch.nn.Conv2d))
    assert n_conv == 2 * n_blocks, (n_conv, n_blocks)
    reseed(41)
    with torch.no_grad():
        for _, m in pmods:
            w = m.lora_B["default"].weight
            w.copy_(torch.randn(w.shape) * STD)
    proj_t = {}
    for n, m in pmods:
        proj_t[f"init.{n}.lora_A.weight"] = m.lora_A["default"].weight.detach().clone()
        proj_t[f"init.{n}.lora_B.weight"] = m.lora_B["default"].weight.detach().clone()
    pout = up(sample, timesteps, encoder_hidden_states=ehs).sample
    ploss = F.mse_loss(pout, target)
    ploss.backward()
    for n, m in pmods:
        for ab in ("lora_A", "lora_B"):
            gr = getattr(m, ab)["default"].weight.grad
            assert gr is not None and gr.abs().max() > 0, (n, ab)
            proj_t[f"grad.{n}.{ab}.weight"] = gr.detach().clone()
    proj_t.update({"out": pout.detach().clone(), "loss": ploss.detach().clone()})
    save_st(proj_t, os.path.join(REF, "lora_proj.safetensors"))
    summary["lora_proj_modules"] = len(pmods)
    summary["lora_proj_conv_modules"] = n_conv
    del up

    # ---------------- kohya LoRA ----------------
    kohya_captions = {"dog1.png": "sks dog, on grass", "dog2.jpg": "sks dog sitting"}
    reseed(30)
    kt = {}
    for path, lin in base_modules(load_unet()):
        kn = kohya_name(path)
        kt[f"{kn}.lora_down.weight"] = torch.randn(KOHYA_R, lin.in_features) * STD
        kt[f"{kn}.lora_up.weight"] = torch.randn(lin.out_features, KOHYA_R) * STD
        kt[f"{kn}.alpha"] = torch.tensor(KOHYA_ALPHA, dtype=torch.float32)
    tag_freq = {"10_sks dog": {}, "2_red ball": {"red ball": 1}}
    for c in kohya_captions.values():
        for t in (s.strip() for s in c.split(",")):
            tag_freq["10_sks dog"][t] = tag_freq["10_sks dog"].get(t, 0) + 1
    import datetime
    kmeta = {
        "ss_session_id": "1234567890",
        "ss_training_started_at": f"{FIXED_TIME}.0",
        "ss_output_name": "sd-tiny-kohya",
        "ss_learning_rate": "0.0001",
        "ss_text_encoder_lr": "None",
        "ss_unet_lr": "0.0001",
        "ss_num_train_images": "22",
        "ss_num_reg_images": "0",
        "ss_num_batches_per_epoch": "22",
        "ss_num_epochs": "1",
        "ss_gradient_checkpointing": "False",
        "ss_gradient_accumulation_steps": "1",
        "ss_max_train_steps": "22",
        "ss_lr_warmup_steps": "0",
        "ss_lr_scheduler": "constant",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(KOHYA_R),
        "ss_network_alpha": str(KOHYA_ALPHA),
        "ss_network_dropout": "None",
        "ss_mixed_precision": "no",
        "ss_full_fp16": "False",
        "ss_v2": "False",
        "ss_base_model_version": "sd_v1",
        "ss_clip_skip": "None",
        "ss_max_token_length": "None",
        "ss_cache_latents": "True",
        "ss_seed": str(SEED),
        "ss_noise_offset": "None",
        "ss_training_comment": "loraforge sd-tiny test fixture (random weights)",
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_max_grad_norm": "1.0",
        "ss_min_snr_gamma": "None",
        "ss_batch_size_per_device": "1",
        "ss_total_batch_size": "1",
        "ss_resolution": "(128, 128)",
        "ss_enable_bucket": "False",
        "ss_keep_tokens": "0",
        "ss_dataset_dirs": json.dumps({"10_sks dog": {"n_repeats": 10, "img_count": 2},
                                       "2_red ball": {"n_repeats": 2, "img_count": 1}}),
        "ss_reg_dataset_dirs": "{}",
        "ss_tag_frequency": json.dumps(tag_freq),
        "ss_sd_model_name": "sd-tiny",
        "ss_training_finished_at": f"{FIXED_TIME + 60}.0",
        "ss_steps": "22",
        "ss_epoch": "1",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "sd-tiny-kohya",
        "modelspec.resolution": "128x128",
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": datetime.datetime.fromtimestamp(FIXED_TIME + 60, datetime.timezone.utc)
                                           .replace(tzinfo=None).isoformat(),
    }
    kmeta["sshs_model_hash"], kmeta["sshs_legacy_hash"] = kohya_hashes(kt, kmeta)
    kpath = os.path.join(REF, "kohya.safetensors")
    save_st(kt, kpath, metadata=kmeta)
    with safe_open(kpath, "pt") as f:
        assert f.metadata() == kmeta

    pipe2 = StableDiffusionPipeline.from_pretrained(SD, dtype=torch.float32, safety_checker=None)
    assert pipe2.safety_checker is None and isinstance(pipe2.scheduler, DDPMScheduler)
    assert pipe2.scheduler.config.beta_schedule == "scaled_linear" and pipe2.scheduler.config.steps_offset == 1
    with torch.no_grad():
        # the whole-pipeline load must give the same components as the per-folder loads
        diffs["pipeline.unet.out"] = maxdiff(pipe2.unet(sample, timesteps, encoder_hidden_states=ehs).sample, unet_out)
        diffs["pipeline.text_encoder"] = maxdiff(pipe2.text_encoder(input_ids)[0], lhs)
        pipe_ids = pipe2.tokenizer(PROMPTS, padding="max_length", max_length=pipe2.tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids
        assert torch.equal(pipe_ids, input_ids)
        pipe2.load_lora_weights(REF, weight_name="kohya.safetensors")
        kout = pipe2.unet(sample, timesteps, encoder_hidden_states=ehs).sample
    save_st({"out": kout}, os.path.join(REF, "kohya_out.safetensors"))
    n_loaded = len(lora_modules(pipe2.unet))
    assert n_loaded == summary["lora_modules"], n_loaded
    diffs["kohya_out_vs_base (must be > 0)"] = maxdiff(kout, unet_out)
    assert diffs["kohya_out_vs_base (must be > 0)"] > 1e-4
    del pipe2

    uk = load_unet()
    uk.add_adapter(LoraConfig(r=KOHYA_R, lora_alpha=KOHYA_ALPHA, target_modules=TARGETS))
    with torch.no_grad():
        for n, m in lora_modules(uk):
            m.lora_A["default"].weight.copy_(kt[f"{kohya_name(n)}.lora_down.weight"])
            m.lora_B["default"].weight.copy_(kt[f"{kohya_name(n)}.lora_up.weight"])
            assert m.scaling["default"] == KOHYA_ALPHA / KOHYA_R
        pout = uk(sample, timesteps, encoder_hidden_states=ehs).sample
    diffs["kohya_out_vs_peft(alpha=2)"] = maxdiff(kout, pout)
    assert diffs["kohya_out_vs_peft(alpha=2)"] == 0.0, diffs
    del uk

    for k, v in diffs.items():
        if "must be > 0" not in k:
            assert v == 0.0, (k, v)

    # ---------------- image data ----------------
    imgs = make_data(kohya_captions)

    # ---------------- README + ref.json ----------------
    write_text(os.path.join(SD, "README.md"), sd_readme(summary))
    write_json(os.path.join(REF, "ref.json"), {
        "generator": "scripts/make_sd_fixture.py",
        "versions": versions,
        "seed": SEED,
        "weights": "N(0, 0.1^2); GroupNorm/LayerNorm weights 1 + N(0, 0.1^2); rounded to float16 and stored as "
                   "float16; goldens computed in float32 with the f16-rounded weights",
        "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_KW.items()},
        "vae_config": VAE_KW,
        "clip_config": CLIP_KW,
        "scheduler_config": dict(SCHED_KW, set_alpha_to_one=False),
        "params": summary["params"],
        "unet_inputs": {"sample": "N(0,1) (2,4,16,16)", "timesteps": TIMESTEPS,
                        "encoder_hidden_states": "N(0,1) (2,77,16)"},
        "vae_inputs": {"image": "U(-1,1) (2,3,32,32)",
                       "note": "mean/logvar = encode(image).latent_dist (logvar clamped to [-30, 20]); "
                               "decoded = decode(mean) with no scaling_factor"},
        "clip": {"prompts": PROMPTS, "padding": "max_length 77 with <|endoftext|> (49407), truncation keeps "
                 "<|endoftext|> last", "output": "last_hidden_state = text_encoder(input_ids)[0], no attention mask"},
        "tokenizer_check": "ids from transformers' CLIPTokenizer (tokenizers-backed; transformers 5 has no slow "
                           "one), from a tokenizers pipeline built from vocab.json + merges.txt (docs section 1.3) "
                           "and from a pure-Python OpenAI CLIP SimpleTokenizer port agree for every prompt",
        "lora": {"peft": {"r": LORA_R, "lora_alpha": LORA_ALPHA, "init_lora_weights": "gaussian",
                          "target_modules": TARGETS, "lora_B": "N(0, 0.1^2) after init"},
                 "loss": "F.mse_loss(out, target), mean", "modules": paths},
        "kohya": {"r": KOHYA_R, "alpha": KOHYA_ALPHA, "scale": KOHYA_ALPHA / KOHYA_R,
                  "A_B": "N(0, 0.1^2), float32",
                  "kohya_out": "StableDiffusionPipeline.from_pretrained(sd-tiny).load_lora_weights(sd-tiny-ref, "
                               "weight_name='kohya.safetensors'), then pipe.unet(sample, timesteps, "
                               "encoder_hidden_states) with unet.safetensors' inputs; equals PEFT LoRA with "
                               "lora_A = lora_down, lora_B = lora_up, lora_alpha = 2 exactly",
                  "metadata": kmeta},
    }, indent=1)

    # ---------------- determinism of file lists + summary ----------------
    def files(d):
        for dp, _, fns in os.walk(d):
            for fn in sorted(fns):
                yield os.path.join(dp, fn)

    sd_bytes = sum(os.path.getsize(p) for p in files(SD))
    assert sd_bytes < 10 * 1024 * 1024, sd_bytes
    print("\n== summary ==")
    print("params:", summary["params"], "| text_encoder keys renamed to text_model.*:", renamed)
    print(f"LoRA modules: {summary['lora_modules']} (= 4 targets x 2 attentions x {n_blocks} transformer blocks)")
    print(f"kohya tensors: {len(kt)} ({len(kt) // 3} modules x down/up/alpha)")
    print("token counts:", summary["token_counts"])
    print("logvar range:", summary["logvar_range"], "| unet out std:", summary["unet_out_std"],
          "| lora loss:", summary["lora_loss"])
    print("max diffs:")
    for k, v in diffs.items():
        print(f"  {k:40s} {v:.3g}")
    for d in (SD, REF, DATA):
        print(f"\n{os.path.relpath(d, ROOT)}/  ({sum(os.path.getsize(p) for p in files(d)):,} bytes)")
        for p in files(d):
            print(f"  {os.path.getsize(p):>10,}  {os.path.relpath(p, d)}")
    for fn in ("unet", "vae", "clip", "lora", "kohya", "kohya_out"):
        with safe_open(os.path.join(REF, fn + ".safetensors"), "pt") as f:
            ks = list(f.keys())
            shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in ks}
        if len(ks) > 8:
            print(f"{fn}.safetensors: {len(ks)} tensors, e.g. " + ", ".join(f"{k} {shapes[k]}" for k in ks[:3]))
        else:
            print(f"{fn}.safetensors: " + ", ".join(f"{k} {shapes[k]}" for k in ks))
    del imgs


def sd_readme(summary):
    p = summary["params"]
    return f"""# sd-tiny

A tiny Stable-Diffusion-1.x-shaped pipeline in diffusers folder layout, for loraforge's SD LoRA tests.
**Random weights**: it generates noise, not pictures.  Written by `scripts/make_sd_fixture.py` (seed 0,
CPU; CI does not run it); regenerate from the repository root with

    OMP_NUM_THREADS=1 nice ~/.cache/loraforge/venv/bin/python scripts/make_sd_fixture.py

Goldens computed from it live in `../sd-tiny-ref/` (see `ref.json` there).

| component | config | params |
|---|---|---|
| `unet/` | UNet2DConditionModel, block_out_channels (32, 64), layers_per_block 1, CrossAttnDownBlock2D + DownBlock2D / UpBlock2D + CrossAttnUpBlock2D, 32 groups, 8 heads, cross_attention_dim 16, sample_size 16 | {p['unet']:,} |
| `vae/` | AutoencoderKL, block_out_channels [32, 64], layers_per_block 1, 32 groups, 4 latent channels | {p['vae']:,} |
| `text_encoder/` | CLIPTextModel, hidden 16, 2 layers, 2 heads, intermediate 32, vocab 49408, quick_gelu; keys carry the `text_model.` prefix like real SD checkpoints | {p['text_encoder']:,} |
| `tokenizer/` | the real CLIP BPE tokenizer (49,408 tokens): `vocab.json` + `merges.txt` + configs, no `tokenizer.json` | - |
| `scheduler/` | DDPMScheduler, 1000 steps, scaled_linear 0.00085-0.012, epsilon, clip_sample false, steps_offset 1 (plus `set_alpha_to_one: false`, which real SD 1.x configs carry and DDPMScheduler ignores) | - |

Weights: every parameter drawn from N(0, 0.1^2) (GroupNorm/LayerNorm weights 1 + N(0, 0.1^2)), then
rounded to float16 and **stored as float16**.  Load them as float32: the goldens were computed in
float32 from these f16 values (`text_encoder/config.json` says `"dtype": "float16"` for that reason).
`safety_checker` and `feature_extractor` are null in `model_index.json`.  The text encoder's safetensors
keys were renamed from transformers 5's bare `embeddings.*` / `encoder.*` / `final_layer_norm.*` to
`text_model.*`; `CLIPTextModel.from_pretrained` still loads the folder to identical weights and outputs.

Licence: the weights are random numbers (no licence attached).  `tokenizer/vocab.json` and
`tokenizer/merges.txt` are derived from `open_clip/bpe_simple_vocab_16e6.txt.gz` in the
`open_clip_torch` 3.3.0 wheel (MIT licence, Copyright (c) 2012-2021 Gabriel Ilharco, Mitchell Wortsman,
Nicholas Carlini, Rohan Taori, Achal Dave, Vaishaal Shankar, John Miller, Hongseok Namkoong, Hannaneh
Hajishirzi, Ali Farhadi, Ludwig Schmidt; the BPE file originates from OpenAI CLIP, MIT licence,
Copyright (c) 2021 OpenAI): merges = lines 1..48894 after the header; vocab = the 256 byte-level symbols,
the same with `</w>`, one token per merge, `<|startoftext|>` (49406), `<|endoftext|>` (49407).
"""


if __name__ == "__main__":
    main()
