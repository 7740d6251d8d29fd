#!/usr/bin/env python3
"""A tiny but complete Whisper checkpoint (tokenizer, feature extractor, generation config)
and a speech-recognition fine-tuning reference: transformers' Whisper fine-tuning recipe
(HF blog "Fine-Tune Whisper For Multilingual ASR with Transformers": labels from the
tokenizer with language "en" and task "transcribe", its padding collator) with PEFT LoRA.

Writes, deleting and rewriting each folder:

  tests/fixtures/tiny-whisper-asr/
      tokenizer.json, tokenizer_config.json, ...
                        a byte-level BPE (ByteLevel pre-tokenizer without prefix space,
                        GPT-2 byte order, trained on the corpus below to 360 tokens) with
                        Whisper's special tokens right after it, in Whisper's order:
                        <|endoftext|> <|startoftranscript|> <|en|> <|de|> <|fr|>
                        <|translate|> <|transcribe|> <|startoflm|> <|startofprev|>
                        <|nospeech|> <|notimestamps|>; written by WhisperProcessor's
                        save_pretrained (transformers' WhisperTokenizer, no language/task set)
      preprocessor_config.json, processor_config.json
                        WhisperFeatureExtractor(feature_size=80): 16 kHz, hop 160, n_fft 400,
                        30 s chunks (the first as Hub checkpoints carry it, the second as
                        transformers 5's WhisperProcessor writes it)
      config.json, model.safetensors
                        random WhisperForConditionalGeneration (80 mel bins, d_model 16, 2+2
                        layers, 2 heads, ffn 32, 1500 source / 64 target positions), f32
      generation_config.json
                        as Whisper checkpoints carry it: lang_to_id, task_to_id,
                        no_timestamps_token_id, is_multilingual, suppress_tokens ("#", "*"),
                        begin_suppress_tokens (" ", <|endoftext|>), max_length 64
  tests/fixtures/tiny-whisper-asr-ref/
      train.zip         audiofolder layout: metadata.jsonl ({"file_name", "transcription"})
                        and clip0.wav..clip3.wav
      valid.zip         flat pairs: a.wav + a.txt, b.wav + b.txt
                        (every WAV 16 kHz mono 16-bit PCM, 0.5-1.5 s: espeak-ng speech
                        resampled from 22.05 kHz with scipy's resample_poly, or, without
                        espeak-ng, seeded synthetic chirps; ref.json says which)
      adapter_init/     PEFT LoRA (r=4, lora_alpha=8, q_proj + v_proj, no task_type), B ~
                        N(0, 0.05^2) so every gradient is non-zero
      ref.safetensors   input_features (4, 80, 3000) of the training clips; the collated
                        batches (labels with -100 padding and the leading
                        <|startoftranscript|> cut, decoder_input_ids =
                        shift_tokens_right(labels)) for train and valid; logits_init and
                        grad.<PEFT key> of the train batch at adapter_init; train_losses and
                        train_grad_norms of 5 AdamW steps from adapter_init (lr 1e-2, weight
                        decay 0.01, gradients clipped to norm 1, the whole train batch each
                        step) and the adapter after them (final.<PEFT key>); valid_loss_init
      ref.json          versions, token ids, transcripts and label ids, losses, audio
                        source, greedy decodes of the validation clips at adapter_init

Seeded, CPU, one thread, float32, dropout 0 (train-mode forwards equal eval-mode ones).
CI does not run this: its outputs are committed. Run from the repository root with the
test venv (espeak-ng from apt for the speech):
  ~/.cache/loraforge/venv/bin/python scripts/make_whisper_asr_fixture.py
"""
import io
import json
import shutil
import subprocess
import tempfile
import wave
import zipfile
from pathlib import Path

import numpy as np
import peft
import scipy
import tokenizers
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from scipy.signal import resample_poly
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoTokenizer, WhisperConfig, WhisperFeatureExtractor,
                          WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)
from transformers.models.whisper.modeling_whisper import shift_tokens_right

torch.set_num_threads(1)
transformers.utils.logging.disable_progress_bar()

FIX = Path("tests/fixtures")
MODEL = FIX / "tiny-whisper-asr"
REF = FIX / "tiny-whisper-asr-ref"
RATE = 16000
R, ALPHA = 4, 8
LR, WD, MAX_GRAD_NORM, STEPS = 1e-2, 0.01, 1.0, 5
BPE_VOCAB = 360

SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|fr|>", "<|translate|>",
            "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
TRAIN = ["Hello world.", "The Zorblax 3000 is here!", "Turn left, then right.", "Call Acme Widgets today?"]
VALID = [("a", "Good morning, Sam."), ("b", "Is it raining?")]
CORPUS = TRAIN + [t for _, t in VALID] + [
    "the quick brown fox jumps over the lazy dog",
    "what time is it now? it is ten past three.",
    "please call me when you are here, thank you!",
    "we want to go there and then come back today",
    "this is the best day of the year",
    "turn the light on, then turn it off again",
    "how are you doing this morning?",
    "the weather is good and the sun is out",
    "I think that she will see him at home with her friends",
    "they would like to know where it is, and why",
    "left or right? up or down? yes or no.",
    "one two three four five six seven eight nine ten",
]


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------- audio

def espeak_version():
    if shutil.which("espeak-ng") is None:
        return None
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("text-to-speech:")[-1].split("Data at")[0].strip()


def speak(text):
    """espeak-ng's en-us voice at 22.05 kHz, silence trimmed (40 ms kept), resampled to
    16 kHz; the slowest speed from 175 wpm up (steps of 15) that fits in 1.45 s."""
    with tempfile.TemporaryDirectory() as tmp:
        for speed in range(175, 400, 15):
            path = Path(tmp) / "x.wav"
            subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(speed), "-w", str(path), text],
                           check=True, capture_output=True)
            with wave.open(str(path), "rb") as w:
                assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
                native = w.getframerate()
                x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)
            loud = np.nonzero(np.abs(x) > 300)[0]
            margin = int(0.04 * native)
            x = x[max(0, loud[0] - margin):loud[-1] + 1 + margin]
            if len(x) / native <= 1.45:
                break
    assert native == 22050, native
    y = resample_poly(x, 320, 441)  # 22050 * 320 / 441 = 16000
    return y, {"voice": "en-us", "speed_wpm": speed, "native_rate": native}


def synth(i):
    """Seeded stand-in for speech: a harmonic glide with a formant-like tone and noise."""
    rng = np.random.default_rng(100 + i)
    secs = 0.6 + 0.25 * i
    t = np.arange(int(RATE * secs)) / RATE
    f0 = 110 + 40 * i
    phase = 2 * np.pi * (f0 * t + 30 * t * t)
    x = sum(0.25 / k * np.sin(k * phase) for k in range(1, 9))
    x += 0.08 * np.sin(2 * np.pi * (700 + 300 * i) * t)
    x += 0.02 * rng.standard_normal(len(t))
    env = np.minimum(1.0, np.minimum(t, secs - t) / 0.03)
    return x * env * 12000, {"synthetic": f"seed {100 + i}, {secs:.2f} s"}


def pcm16(y):
    """Scales so the peak is at most 0.6 of full scale, pads to at least 0.5 s."""
    y = np.asarray(y, dtype=np.float64)
    peak = np.max(np.abs(y))
    if peak > 0.6 * 32767:
        y = y * (0.6 * 32767 / peak)
    if len(y) < RATE // 2:
        pad = RATE // 2 - len(y)
        y = np.concatenate([np.zeros(pad // 2), y, np.zeros(pad - pad // 2)])
    pcm = np.clip(np.round(y), -32768, 32767).astype("<i2")
    assert 0.5 <= len(pcm) / RATE <= 1.5, len(pcm) / RATE
    return pcm


def wav_bytes(pcm):
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def read_wav(data):
    """What soundfile / datasets give: the int16 samples / 32768 as float32."""
    with wave.open(io.BytesIO(data), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def write_zip(path, entries):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, data)


# ---------------------------------------------------------------------------- tokenizer

def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    assert tok.get_vocab_size() == BPE_VOCAB, tok.get_vocab_size()
    assert tok.add_special_tokens(SPECIALS) == len(SPECIALS)
    ids = [tok.token_to_id(s) for s in SPECIALS]
    assert ids == list(range(BPE_VOCAB, BPE_VOCAB + len(SPECIALS))), ids
    return tok


def main():
    torch.manual_seed(0)
    for d in (MODEL, REF):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    # Tokenizer: trained with `tokenizers`, then handed to transformers' WhisperTokenizer,
    # whose save_pretrained (through WhisperProcessor) writes the folder's tokenizer files.
    raw = build_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        raw.save(str(Path(tmp) / "tokenizer.json"))
        hf_tok = WhisperTokenizer(tokenizer_file=str(Path(tmp) / "tokenizer.json"),
                                  pad_token="<|endoftext|>", extra_special_tokens=SPECIALS[1:],
                                  model_max_length=64)
    fe = WhisperFeatureExtractor(feature_size=80)
    assert (fe.sampling_rate, fe.hop_length, fe.chunk_length, fe.n_fft) == (16000, 160, 30, 400)
    # transformers 5 writes processor_config.json (the feature extractor nested in it);
    # Hub checkpoints (and transformers 4) carry preprocessor_config.json: both are written.
    WhisperProcessor(feature_extractor=fe, tokenizer=hf_tok).save_pretrained(MODEL)
    fe.save_pretrained(MODEL)

    ids = {s: raw.token_to_id(s) for s in SPECIALS}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    en, transcribe, translate = ids["<|en|>"], ids["<|transcribe|>"], ids["<|translate|>"]
    notimestamps = ids["<|notimestamps|>"]
    space = raw.token_to_id("\u0120")  # ByteLevel's symbol for " "
    assert raw.encode(" ", add_special_tokens=False).ids == [space]
    # As Whisper checkpoints list them: some punctuation, then translate .. nospeech.
    suppress = [raw.token_to_id("#"), raw.token_to_id("*")] + [
        ids[s] for s in ("<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>")]
    vocab_size = raw.get_vocab_size(with_added_tokens=True)
    assert vocab_size == BPE_VOCAB + len(SPECIALS)

    # Model, with the generation config a Whisper checkpoint has.
    torch.manual_seed(1)
    cfg = WhisperConfig(
        vocab_size=vocab_size, num_mel_bins=80, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=1500, max_target_positions=64, pad_token_id=eot, bos_token_id=eot,
        eos_token_id=eot, decoder_start_token_id=sot, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, begin_suppress_tokens=[space, eot], suppress_tokens=[],
    )
    model = WhisperForConditionalGeneration(cfg).eval()
    gc = model.generation_config
    gc.decoder_start_token_id = sot
    gc.eos_token_id = eot
    gc.pad_token_id = eot
    gc.bos_token_id = eot
    gc.begin_suppress_tokens = [space, eot]
    gc.suppress_tokens = suppress
    gc.lang_to_id = {"<|en|>": en, "<|de|>": ids["<|de|>"], "<|fr|>": ids["<|fr|>"]}
    gc.task_to_id = {"transcribe": transcribe, "translate": translate}
    gc.no_timestamps_token_id = notimestamps
    gc.is_multilingual = True
    gc.max_length = 64
    gc.forced_decoder_ids = None
    # A checkpoint's own generation config, not one derived from config.json: loading drops
    # the extra fields (lang_to_id, ...) of a config marked "_from_model_config".
    gc._from_model_config = False
    model.save_pretrained(MODEL)
    g_path = MODEL / "generation_config.json"
    g = json.loads(g_path.read_text())
    del g["_from_model_config"]  # as Hub checkpoints have it; absent reads as not derived
    g_path.write_text(json.dumps(g, indent=2, sort_keys=True) + "\n")

    # The folder loads back as a whole: raw tokenizers (what Rust's Tokenizer::from_file
    # reads), AutoTokenizer and WhisperProcessor.
    rust_like = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    assert rust_like.get_vocab_size(with_added_tokens=True) == vocab_size
    assert all(rust_like.token_to_id(s) == i for s, i in ids.items())
    tok = WhisperTokenizer.from_pretrained(MODEL, language="en", task="transcribe")
    auto = AutoTokenizer.from_pretrained(MODEL, language="en", task="transcribe")
    proc = WhisperProcessor.from_pretrained(MODEL, language="en", task="transcribe")
    assert type(auto).__name__ == "WhisperTokenizer", type(auto)
    assert tok.pad_token_id == eot and tok.eos_token_id == eot
    prefix = [sot, en, transcribe, notimestamps]
    assert tok.prefix_tokens == prefix, tok.prefix_tokens

    def label_ids(text):
        """The recipe's labels: tokenizer(text).input_ids with language/task set."""
        full = tok(text).input_ids
        body = tok.encode(text, add_special_tokens=False)
        assert full == prefix + body + [eot], (text, full)
        assert body == rust_like.encode(text, add_special_tokens=False).ids, text
        assert auto(text).input_ids == full and proc.tokenizer(text).input_ids == full
        assert tok.decode(full, skip_special_tokens=True) == text, tok.decode(full, skip_special_tokens=True)
        return full

    # Audio.
    version = espeak_version()
    source = "espeak-ng" if version else "synthetic"
    clips, audio_meta = {}, []
    for i, text in enumerate(TRAIN + [t for _, t in VALID]):
        y, meta = speak(text) if version else synth(i)
        pcm = pcm16(y)
        clips[text] = wav_bytes(pcm)
        audio_meta.append({"transcription": text, "samples": len(pcm), "seconds": len(pcm) / RATE, **meta})
    train_files = [f"clip{i}.wav" for i in range(len(TRAIN))]
    metadata = "".join(json.dumps({"file_name": f, "transcription": t}) + "\n" for f, t in zip(train_files, TRAIN))
    write_zip(REF / "train.zip", [("metadata.jsonl", metadata.encode())] +
              [(f, clips[t]) for f, t in zip(train_files, TRAIN)])
    valid_entries = []
    for stem, text in VALID:
        valid_entries += [(f"{stem}.wav", clips[text]), (f"{stem}.txt", text.encode())]
    write_zip(REF / "valid.zip", valid_entries)

    # The recipe's prepare_dataset and DataCollatorSpeechSeq2SeqWithPadding.
    def prepare(text):
        audio = read_wav(clips[text])
        return {"input_features": fe(audio, sampling_rate=RATE).input_features[0], "labels": label_ids(text)}

    def collate(features):
        batch = proc.feature_extractor.pad([{"input_features": f["input_features"]} for f in features],
                                           return_tensors="pt")
        labels_batch = proc.tokenizer.pad([{"input_ids": f["labels"]} for f in features], return_tensors="pt")
        labels = labels_batch["input_ids"].masked_fill(labels_batch.attention_mask.ne(1), -100)
        if (labels[:, 0] == cfg.decoder_start_token_id).all().cpu().item():
            labels = labels[:, 1:]
        batch["labels"] = labels
        return batch

    train_feats = [prepare(t) for t in TRAIN]
    valid_feats = [prepare(t) for _, t in VALID]
    train = collate(train_feats)
    valid = collate(valid_feats)
    assert train["input_features"].shape == (len(TRAIN), 80, 3000) and train["input_features"].dtype == torch.float32
    assert (train["labels"] == -100).any(), "the train batch should exercise padding"

    # PEFT LoRA, B re-drawn so that every gradient is non-zero.
    def load():
        return WhisperForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32,
                                                               attn_implementation="eager")

    torch.manual_seed(2)
    pm = get_peft_model(load(), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                           target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    adir = REF / "adapter_init"
    pm.save_pretrained(adir)
    c_path = adir / "adapter_config.json"
    c = json.loads(c_path.read_text())
    c["target_modules"] = sorted(c["target_modules"])
    c["base_model_name_or_path"] = MODEL.name
    c_path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    (adir / "README.md").unlink(missing_ok=True)

    def key(n):
        return n.replace(".default", "")

    # At adapter_init: eval-mode loss and logits, validation loss, greedy decodes.
    pm = PeftModel.from_pretrained(load(), adir).eval()
    with torch.no_grad():
        out = pm(input_features=train["input_features"], labels=train["labels"])
        loss_eval = out.loss.item()
        logits_init = out.logits.contiguous()
        valid_loss_init = pm(input_features=valid["input_features"], labels=valid["labels"]).loss.item()
        decodes = []
        for (stem, text), f in zip(VALID, valid_feats):
            seq = pm.generate(input_features=torch.tensor(f["input_features"])[None], language="en", task="transcribe",
                              max_new_tokens=20, do_sample=False, num_beams=1)
            seq = seq[0].tolist()
            # generate returns the new tokens alone; they are a plain greedy loop's over the
            # prompt, suppress_tokens masked at every step and begin_suppress_tokens at the first.
            loop = list(prefix)
            while len(loop) < len(prefix) + 20 and loop[-1] != eot:
                lg = pm(input_features=torch.tensor(f["input_features"])[None],
                        decoder_input_ids=torch.tensor([loop])).logits[0, -1].clone()
                lg[suppress] = -float("inf")
                if len(loop) == len(prefix):
                    lg[[space, eot]] = -float("inf")
                loop.append(int(lg.argmax()))
            assert seq == loop[len(prefix):], (seq, loop)
            decodes.append({"file": f"{stem}.wav", "prompt": prefix, "ids": seq,
                            "text": tok.decode(seq, skip_special_tokens=True),
                            "text_with_specials": tok.decode(seq, skip_special_tokens=False)})

    # 5 AdamW steps from adapter_init on the whole train batch.
    pm = PeftModel.from_pretrained(load(), adir, is_trainable=True)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    names = [key(n) for n, p in pm.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    losses, norms, grads = [], [], {}
    for step in range(STEPS):
        loss = pm(input_features=train["input_features"], labels=train["labels"]).loss
        loss.backward()
        if step == 0:
            for n, p in zip(names, params):
                assert p.grad is not None and p.grad.abs().max() > 0, n
                grads["grad." + n] = p.grad.detach().clone()
        norms.append(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM).item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - loss_eval) < 1e-6, (losses[0], loss_eval)

    dec_train = shift_tokens_right(train["labels"], cfg.pad_token_id, cfg.decoder_start_token_id)
    dec_valid = shift_tokens_right(valid["labels"], cfg.pad_token_id, cfg.decoder_start_token_id)
    tensors = {
        "input_features": train["input_features"].contiguous(),
        "labels": train["labels"].to(torch.int64), "decoder_input_ids": dec_train.to(torch.int64),
        "valid_labels": valid["labels"].to(torch.int64), "valid_decoder_input_ids": dec_valid.to(torch.int64),
        "logits_init": logits_init,
        "train_losses": torch.tensor(losses, dtype=torch.float32),
        "train_grad_norms": torch.tensor(norms, dtype=torch.float32),
        "valid_loss_init": torch.tensor([valid_loss_init], dtype=torch.float32),
        **grads,
        **{"final." + n: p.detach().clone() for n, p in zip(names, params)},
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, REF / "ref.safetensors")

    write_json(REF / "ref.json", {
        "model": MODEL.name,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "tokenizers": tokenizers.__version__,
                     "numpy": np.__version__, "scipy": scipy.__version__, "espeak-ng": version},
        "tokens": {"vocab_size": vocab_size, "bpe_vocab_size": BPE_VOCAB, "special": ids, "space": space,
                   "suppress_tokens": suppress, "begin_suppress_tokens": [space, eot],
                   "prefix": prefix},
        "audio": {"source": source, "rate": RATE, "format": "mono 16-bit PCM WAV",
                  "resampler": "scipy.signal.resample_poly(x, 320, 441)" if version else None,
                  "clips": audio_meta,
                  "features": "WhisperFeatureExtractor(feature_size=80) of int16 / 32768 (float32), "
                              "padded to 30 s: 3000 frames"},
        "train": {"files": train_files, "transcriptions": TRAIN,
                  "label_ids": [f["labels"] for f in train_feats]},
        "valid": {"files": [f"{s}.wav" for s, _ in VALID], "transcriptions": [t for _, t in VALID],
                  "label_ids": [f["labels"] for f in valid_feats]},
        "collator": "labels = tokenizer(text).input_ids (language en, task transcribe, no timestamps) padded "
                    "with -100 to the longest; the first column (all <|startoftranscript|>) cut; "
                    "decoder_input_ids = shift_tokens_right(labels, pad=<|endoftext|>, "
                    "start=<|startoftranscript|>)",
        "loss": "CrossEntropyLoss() mean over every label != -100 in the batch (prefix tokens included)",
        "lora": {"r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                 "task_type": None, "adapter_init": "lora_B ~ N(0, 0.05^2)"},
        "attn_implementation": "eager",
        "optim": {"optimizer": "torch.optim.AdamW", "lr": LR, "weight_decay": WD, "betas": [0.9, 0.999],
                  "eps": 1e-8, "max_grad_norm": MAX_GRAD_NORM, "steps": STEPS, "schedule": "constant",
                  "start": "adapter_init", "batch": "the 4 training examples, every step"},
        "train_losses": losses,
        "train_grad_norms": norms,
        "valid_loss_init": valid_loss_init,
        "greedy_at_init": decodes,
        "notes": [
            "generate(language='en', task='transcribe') feeds the prompt <|startoftranscript|> <|en|> "
            "<|transcribe|> <|notimestamps|> and returns the new tokens alone (greedy_at_init.ids); "
            "the random model's first new token is <|notimestamps|> again",
            "train_grad_norms (before clipping) stay under max_grad_norm 1.0: clipping never scales here",
            "WhisperTokenizer finds a language's token as <|startoftranscript|> + 1 + its index in "
            "Whisper's full language list (en 0, de 2, fr 6): with only en, de, fr here, language='en' "
            "is right but 'de' gives <|fr|> and 'fr' <|startofprev|>; generate uses lang_to_id",
            "input_features are the torch path of WhisperFeatureExtractor (torch is installed)",
        ],
        "shapes": {k: list(v.shape) for k, v in tensors.items() if not k.startswith(("grad.", "final."))},
    })
    print(f"vocab {vocab_size}; specials {ids}; space {space}; audio {source}")
    print("train label ids", [f["labels"] for f in train_feats])
    print("valid label ids", [f["labels"] for f in valid_feats])
    print("train losses", losses, "grad norms", norms, "valid loss", valid_loss_init)
    print("greedy", decodes)


if __name__ == "__main__":
    main()
