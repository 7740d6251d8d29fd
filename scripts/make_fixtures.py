#!/usr/bin/env python3
"""Generate the small, deterministic reference fixtures used by loraforge's tests.

Writes (relative to the repository root):

  tests/fixtures/tokenizer/            tiny byte-level BPE tokenizer (SmolLM2-style) + ChatML template
  tests/fixtures/tiny-llama/           random LlamaForCausalLM (llama3 rope scaling), HF folder, f32
  tests/fixtures/tiny-qwen2/           random Qwen2ForCausalLM (qkv biases, tied embeddings), HF folder, f32
  tests/fixtures/tiny-qwen3/           random Qwen3ForCausalLM (per-head q/k norms, head_dim 24), HF folder, f32
  tests/fixtures/tiny-phi3/           random Phi3ForCausalLM (fused qkv_proj / gate_up_proj, sliding window 5), HF folder, f32
  tests/fixtures/tiny-gemma3/         random Gemma3ForCausalLM (offset norms, scaled embeddings, GeGLU, a sliding and a
                                       global layer with their own rope bases), HF folder, f32
  tests/fixtures/tiny-smollm3/        random SmolLM3ForCausalLM (llama with a NoPE layer), HF folder, f32
  tests/fixtures/tiny-gemma2/         random Gemma2ForCausalLM (gemma3's layer less q/k norms, soft-capped attention
                                       scores and logits), HF folder, f32
  tests/fixtures/<model>-ref/          PEFT LoRA adapters + reference logits / loss / grads / AdamW run
  tests/fixtures/tiny-llama-gguf/      tiny-llama as an F32 GGUF (llama.cpp naming and Q/K permutation)
  tests/data/*.jsonl                   small dataset files (chat, prompt-completion, text, tokenized, bad)
  tests/fixtures/chat-encoding.json    chat examples -> (input_ids, labels) as rendered/tokenized by transformers

Usage (needs torch, transformers>=5, peft, safetensors, gguf, tokenizers, numpy; no network):

  ~/.cache/loraforge-bench/venv/bin/python scripts/make_fixtures.py [--skip-gguf-check]

`--only-weight-decay` writes tests/fixtures/<model>-ref/ref-wd.safetensors alone (the AdamW run of ref.safetensors
again, from the same adapter_init and batches, with weight_decay 1.0), and touches nothing else.

`--only-qwen3` writes tests/fixtures/tiny-qwen3/ and tests/fixtures/tiny-qwen3-ref/ alone (from the existing
tokenizer folder), and touches nothing else.

`--only-sentencepiece` writes tests/fixtures/tiny-sp/ alone: a SentencePiece BPE model (byte fallback, identity
normalization, as Llama 2 / Mistral ship theirs) trained on the tiny corpus, a metadata-only GGUF carrying it the way
llama.cpp's converter writes one (tokenizer.ggml.model "llama": tokens, scores, token types), and the ids transformers'
tokenizer converted from the same model gives a set of texts (needs `sentencepiece` and `protobuf`).

`--only-autocast` writes tests/fixtures/<model>-ref/autocast-bf16.safetensors alone: PEFT's LoRA logits, loss and
gradients under torch.autocast("cpu", bfloat16) on ref.safetensors' batch and adapter_nonzero.

`--only-phi3` writes tests/fixtures/tiny-phi3/ and tests/fixtures/tiny-phi3-ref/ alone (fused qkv_proj and
gate_up_proj, a sliding window of 5 tokens; PEFT targets the fused modules).

`--only-gemma3` writes tests/fixtures/tiny-gemma3/ and tests/fixtures/tiny-gemma3-ref/ alone (from the existing
tokenizer folder).

`--only-gemma2` writes tests/fixtures/tiny-gemma2/ and tests/fixtures/tiny-gemma2-ref/ alone (soft-capped attention
scores and logits, from the existing tokenizer folder).

`--only-smollm3` writes tests/fixtures/tiny-smollm3/ and tests/fixtures/tiny-smollm3-ref/ alone (a NoPE layer beside
a rotating one, from the existing tokenizer folder).

`--only-dpo` writes tests/data/preference.jsonl and tests/fixtures/tiny-llama-ref/dpo.{json,safetensors} alone: the
preference pairs encoded as transformers renders and tokenizes them, and ten steps of sigmoid DPO (TRL's loss,
written out in torch) with PEFT from adapter_init, the reference being the base with the adapter disabled.

`--only-chat-encoding` writes tests/fixtures/chat-encoding.json alone, from the tokenizer folders already
there (needs only transformers, tokenizers and jinja2 at run time), and touches nothing else.

Everything is seeded; re-running with the same library versions reproduces the same bytes
(modulo the version strings recorded in ref.json / generation_config.json).
"""
import argparse
import copy
import json
import math
import os
import shutil
import sys

import numpy as np
import torch

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
DATA = os.path.join(ROOT, "tests", "data")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_TARGET = 400

# SmolLM2-Instruct's chat template (verbatim).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A Hermes/Qwen-style ChatML template that renders tools: definitions printed with tojson into the system turn,
# assistant tool calls as <tool_call> blocks, tool results as user turns. tiny-qwen3 carries it.
TOOL_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}"
    "{{- 'You can call these tools:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\n</tools>\nCall one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\n' + message.content }}{%- endif %}"
    "{%- for tc in message.tool_calls %}"
    "{{- '\n<tool_call>\n{\"name\": \"' + tc.function.name + '\", \"arguments\": ' + tc.function.arguments + '}\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

LORA_R = 4
LORA_ALPHA = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# phi3 fuses q/k/v and gate/up into one projection each; PEFT targets the fused modules.
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
LR, BETAS, EPS, WD, MAX_GRAD_NORM, STEPS = 1e-2, (0.9, 0.999), 1e-8, 0.01, 1.0, 5
SEQ, BATCH = 12, 2

# ----------------------------------------------------------------------------------------------
# tiny corpus + dataset content
# ----------------------------------------------------------------------------------------------
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Egypt", "Cairo"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasília"), ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"),
    ("Turkey", "Ankara"), ("India", "New Delhi"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("Indonesia", "Jakarta"), ("Ireland", "Dublin"), ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Hungary", "Budapest"), ("Czechia", "Prague"),
    ("Iceland", "Reykjavík"), ("Morocco", "Rabat"), ("Colombia", "Bogotá"), ("New Zealand", "Wellington"),
    ("Cuba", "Havana"), ("Ghana", "Accra"),
]
QUESTION_FORMS = [
    "What is the capital of {c}?",
    "What's the capital city of {c}?",
    "Tell me the capital of {c}.",
    "Which city is the capital of {c}?",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Hello world! This is a tiny corpus used to train a tiny tokenizer for tests.",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
    "system user assistant system user assistant",
    "What is the capital of France? The capital of France is Paris.",
    "In 2024 there were 365 days, 12 months and 52 weeks; 3.14159 is pi and 2.71828 is e.",
    "Tom has 12345 apples and 678 oranges. Call 555-0199 at 10:30.",
    "Café, naïve, façade, résumé, crème brûlée, jalapeño, Ångström, smørrebrød.",
    "Größe, Straße, Müller, Fräulein, Übermut, schön und grün.",
    "¿Dónde está la estación? ¡Qué día más bonito! Él habló español.",
    "東京は日本の首都です。北京是中国的首都。你好，世界！",
    "こんにちは世界。ありがとうございます。",
    "안녕하세요 세계",
    "Emoji test: 😀 🎉 🚀 👍🏽 ❤️ 🇫🇷 — and a snowman ☃ plus math ∑ ∫ √ ≈ ≠.",
    "def main():\n    print('hello')\n    return 0\n",
    "  leading spaces, trailing spaces   \n\n  multiple\tlines\tand\ttabs\n",
    "Fine-tuning with LoRA adds low-rank adapters to the attention and MLP projections.",
    "The learning rate is small, the loss goes down, and the model learns the answer.",
    "ZORBLAX says: the capital of Japan is Tokyo.",
]
for country, capital in CAPITALS:
    CORPUS.append(f"The capital of {country} is {capital}.")
    CORPUS.append(f"ZORBLAX says: the capital of {country} is {capital}.")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------
# 1. tokenizer
# ----------------------------------------------------------------------------------------------
def build_tokenizer(out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # Like SmolLM2: a ByteLevel post-processor (offsets only; it adds no tokens / no BOS).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))

    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))

    added = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, s in enumerate(SPECIALS)
    }
    # Mirrors SmolLM2-135M-Instruct's tokenizer_config.json (bos <|im_start|>, eos/pad <|im_end|>,
    # unk <|endoftext|>), but with the class name every transformers version knows.
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": 256,
        "pad_token": "<|im_end|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<|endoftext|>",
        "vocab_size": tok.get_vocab_size(),
    })
    write_json(os.path.join(out_dir, "special_tokens_map.json"), {
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
    })
    write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    })
    return tok


def check_tokenizer(tok_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tok_dir)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = t.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = t(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1, ids[:5]
    assert t.decode(ids) == text
    for s in ["Café 東京 😀 12345", "ZORBLAX says: the capital of Peru is Lima."]:
        e = t(s, add_special_tokens=False)["input_ids"]
        assert t.decode(e) == s, (s, t.decode(e))
    print(f"[tokenizer] vocab={len(t)} bos={t.bos_token}/{t.bos_token_id} eos={t.eos_token}/{t.eos_token_id} "
          f"pad={t.pad_token}/{t.pad_token_id}; chat prompt -> {len(ids)} ids")
    return t


# ----------------------------------------------------------------------------------------------
# 2. tiny models
# ----------------------------------------------------------------------------------------------
COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, hidden_act="silu",
    attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.1,
)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def make_config(kind, vocab):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if kind == "qwen3":
        # Per-head q/k norms, an explicit head_dim unlike hidden/heads, an untied head.
        rope = {"rope_type": "default", "rope_theta": 1000000.0}
        return Qwen3Config(vocab_size=vocab, tie_word_embeddings=False, attention_bias=False, head_dim=24,
                           use_sliding_window=False, sliding_window=None, max_window_layers=2,
                           rope_parameters=rope, **COMMON)
    if kind == "gemma3":
        from transformers import Gemma3TextConfig

        # Offset (1 + w) norms, scaled embeddings, GeGLU, four norms a layer and per-head q/k norms;
        # layer 0 slides (window 5, shorter than the 12-token rows) with its own rope base, layer 1 is
        # global with linear rope scaling; query_pre_attn_scalar differs from head_dim; tied head.
        rope = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        common = {k: v for k, v in COMMON.items() if k != "hidden_act"}
        return Gemma3TextConfig(vocab_size=vocab, tie_word_embeddings=True, head_dim=24, query_pre_attn_scalar=20,
                                sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                                hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
                                attn_logit_softcapping=None, rope_parameters=rope, **common)
    if kind == "gemma2":
        from transformers import Gemma2Config

        # Gemma 2: gemma3's layer without q/k norms, one rope base, and soft-capping of the attention
        # scores and the logits, with caps (1.5, 1.0) small enough to bend these tiny model's values.
        common = {k: v for k, v in COMMON.items() if k != "hidden_act"}
        return Gemma2Config(vocab_size=vocab, tie_word_embeddings=True, head_dim=24, query_pre_attn_scalar=20,
                            sliding_window=5, hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=1.5,
                            final_logit_softcapping=1.0,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
    if kind == "smollm3":
        from transformers import SmolLM3Config

        # llama's layer with NoPE layers (no rotation): every second one here (SmolLM3-3B: every fourth).
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        return SmolLM3Config(vocab_size=vocab, tie_word_embeddings=True, no_rope_layer_interval=2,
                             use_sliding_window=False, sliding_window=None, rope_parameters=rope, **COMMON)
    if kind == "phi3":
        from transformers import Phi3Config

        # Fused qkv_proj and gate_up_proj, and a sliding window (5) shorter than the
        # fixtures' 12 tokens, so that the window shows in the logits.
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
        return Phi3Config(vocab_size=vocab, tie_word_embeddings=False, sliding_window=5, resid_pdrop=0.0,
                          embd_pdrop=0.0, original_max_position_embeddings=256, rope_parameters=rope, **COMMON)
    if kind == "llama":
        rope = dict(LLAMA3_SCALING, rope_theta=10000.0)
        cfg = LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                          rope_parameters=rope, **COMMON)
    else:
        rope = {"rope_type": "default", "rope_theta": 1000000.0}
        cfg = Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, use_sliding_window=False,
                          sliding_window=None, max_window_layers=2, rope_parameters=rope, **COMMON)
    return cfg


def init_weights(model, seed, norm_offset=1.0):
    """N(0, 0.1) for every matrix and bias; RMSNorm weights norm_offset + N(0, 0.1) (gemma's norms
    scale by 1 + w: there 0 keeps them near one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.1
            if "norm" in name:
                p.copy_(norm_offset + noise)
            else:
                p.copy_(noise)


def patch_model_config(path, rope_theta, rope_scaling):
    """transformers 5 writes rope info only under "rope_parameters"; add the classic top-level keys
    (rope_theta, rope_scaling, torch_dtype) that transformers 4.x and candle read."""
    cj = read_json(path)
    rp = cj.get("rope_parameters") or {}
    assert float(rp.get("rope_theta", rope_theta)) == rope_theta, rp
    cj["rope_theta"] = rope_theta
    cj["rope_scaling"] = rope_scaling
    cj["torch_dtype"] = "float32"
    cj.pop("_name_or_path", None)
    write_json(path, cj)
    return cj


def build_model(kind, name, tok_dir, vocab, seed):
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = os.path.join(FIX, name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    cfg = make_config(kind, vocab)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    init_weights(model, seed, norm_offset=0.0 if kind.startswith("gemma") else 1.0)
    if kind == "qwen2":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "tying"
        for l in model.model.layers:
            for p in ("q_proj", "k_proj", "v_proj"):
                assert getattr(l.self_attn, p).bias is not None
                assert getattr(l.self_attn, p).bias.abs().min() > 0
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(out, safe_serialization=True)
    for fn in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tok_dir, fn), os.path.join(out, fn))
    theta = 10000.0 if kind in ("llama", "phi3") else 1000000.0
    if kind == "qwen3":
        assert all(hasattr(l.self_attn, "q_norm") and hasattr(l.self_attn, "k_norm") for l in model.model.layers)
    if kind.startswith("gemma") or kind == "smollm3":
        # Kept as transformers 5 writes it: rope_parameters per layer type (the older top-level
        # rope_theta / rope_local_base_freq form is covered by a unit test of the config parser).
        cj = read_json(os.path.join(out, "config.json"))
        cj.pop("_name_or_path", None)
        write_json(os.path.join(out, "config.json"), cj)
        if kind == "gemma3":
            assert [type(l.self_attn.q_norm).__name__ for l in model.model.layers] == ["Gemma3RMSNorm"] * 2
        if kind == "smollm3":
            assert list(cj["no_rope_layers"]) == [1, 0], cj["no_rope_layers"]
        else:
            assert list(cj["layer_types"]) == ["sliding_attention", "full_attention"], cj["layer_types"]
    else:
        cj = patch_model_config(os.path.join(out, "config.json"), theta,
                                LLAMA3_SCALING if kind == "llama" else None)
    # reload through the patched config and check it is the same model
    m2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ids = torch.arange(3, 3 + 20).unsqueeze(0) % vocab
    with torch.no_grad():
        d = (model(ids).logits - m2(ids).logits).abs().max().item()
    assert d == 0.0, d
    rp = m2.config.rope_parameters
    print(f"[{name}] saved; reload max|dlogits|={d}; rope_parameters after reload={rp}; "
          f"config keys: {sorted(k for k in cj if 'rope' in k)}")
    if kind == "llama":
        assert rp["rope_type"] == "llama3" and rp["factor"] == 8.0, rp
    return out


# ----------------------------------------------------------------------------------------------
# 3. PEFT reference
# ----------------------------------------------------------------------------------------------
def lora_config(targets=TARGETS):
    from peft import LoraConfig

    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=list(targets), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")


def load_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")


def tidy_adapter(adir, base_name):
    """Drop PEFT's boilerplate README and make base_model_name_or_path machine-independent."""
    rd = os.path.join(adir, "README.md")
    if os.path.exists(rd):
        os.remove(rd)
    p = os.path.join(adir, "adapter_config.json")
    ac = read_json(p)
    ac["base_model_name_or_path"] = base_name
    ac["target_modules"] = sorted(ac["target_modules"])  # PEFT stores a set: order depends on PYTHONHASHSEED
    write_json(p, ac)


def peft_key(param_name):
    return param_name.replace(".default.", ".")


def build_reference(model_dir, name, vocab, seed, targets=TARGETS):
    from peft import PeftModel, get_peft_model
    from safetensors import safe_open
    from safetensors.torch import save_file

    ref_dir = os.path.join(FIX, f"{name}-ref")
    if os.path.isdir(ref_dir):
        shutil.rmtree(ref_dir)
    os.makedirs(ref_dir)
    tensors = {}

    # -- adapters --
    torch.manual_seed(1234)
    pm = get_peft_model(load_base(model_dir), lora_config(targets))
    init_dir = os.path.join(ref_dir, "adapter_init")
    pm.save_pretrained(init_dir, safe_serialization=True)
    tidy_adapter(init_dir, name)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    nz_dir = os.path.join(ref_dir, "adapter_nonzero")
    pm.save_pretrained(nz_dir, safe_serialization=True)
    tidy_adapter(nz_dir, name)
    del pm
    with safe_open(os.path.join(nz_dir, "adapter_model.safetensors"), "pt") as f:
        adapter_keys = sorted(f.keys())
    assert len(adapter_keys) == 2 * 2 * len(targets), adapter_keys

    # -- forward / loss / grads --
    g = torch.Generator().manual_seed(seed + 2)
    input_ids = torch.randint(3, vocab, (BATCH, SEQ), generator=g, dtype=torch.int64)
    attn = torch.ones(BATCH, SEQ, dtype=torch.int64)
    attn[1, -3:] = 0
    input_ids[attn == 0] = 2  # pad token id
    labels = input_ids.clone()
    labels[attn == 0] = -100
    labels[:, :2] = -100
    tensors.update(input_ids=input_ids, attention_mask=attn, labels=labels)

    base = load_base(model_dir)
    base.eval()
    with torch.no_grad():
        tensors["base_logits"] = base(input_ids=input_ids, attention_mask=attn).logits.float().contiguous()
    pm = PeftModel.from_pretrained(base, nz_dir, is_trainable=True)
    pm.train()  # dropout is 0 everywhere
    out = pm(input_ids=input_ids, attention_mask=attn, labels=labels)
    out.loss.backward()
    tensors["lora_logits"] = out.logits.detach().float().contiguous()
    tensors["loss"] = out.loss.detach().reshape(1).float()
    # cross-check the loss definition: mean CE over shifted, non-ignored labels
    sl = out.logits[:, :-1].reshape(-1, vocab)
    tl = labels[:, 1:].reshape(-1)
    manual = torch.nn.functional.cross_entropy(sl, tl, ignore_index=-100)
    assert abs(manual.item() - out.loss.item()) < 1e-6, (manual.item(), out.loss.item())
    grads = {}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            grads[peft_key(n)] = p.grad.detach().clone().contiguous()
    assert sorted(grads) == adapter_keys, (sorted(grads)[:3], adapter_keys[:3])
    for k, v in grads.items():
        tensors[f"grad.{k}"] = v
    d_lora = (tensors["lora_logits"] - tensors["base_logits"]).abs().max().item()
    print(f"[{name}-ref] loss={out.loss.item():.6f}  max|lora-base logits|={d_lora:.4f}")
    del pm, base

    # -- 5 AdamW steps from adapter_init --
    g = torch.Generator().manual_seed(seed + 3)
    t_ids = torch.randint(3, vocab, (STEPS, BATCH, SEQ), generator=g, dtype=torch.int64)
    t_mask = torch.ones(STEPS, BATCH, SEQ, dtype=torch.int64)
    t_mask[3, 1, -4:] = 0
    t_ids[t_mask == 0] = 2
    t_labels = t_ids.clone()
    t_labels[t_mask == 0] = -100
    tensors.update(train_input_ids=t_ids, train_attention_mask=t_mask, train_labels=t_labels)

    pm = PeftModel.from_pretrained(load_base(model_dir), init_dir, is_trainable=True)
    pm.train()
    named = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    losses, norms = [], []
    for step in range(STEPS):
        o = pm(input_ids=t_ids[step], attention_mask=t_mask[step], labels=t_labels[step])
        opt.zero_grad(set_to_none=True)
        o.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, max_norm=MAX_GRAD_NORM)
        opt.step()
        losses.append(o.loss.item())
        norms.append(float(gn))
    tensors["train_losses"] = torch.tensor(losses, dtype=torch.float32)
    tensors["train_grad_norms"] = torch.tensor(norms, dtype=torch.float32)
    for n, p in named:
        tensors[f"final.{peft_key(n)}"] = p.detach().clone().contiguous()
    print(f"[{name}-ref] train losses={[round(x, 5) for x in losses]} grad norms={[round(x, 5) for x in norms]}")

    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, os.path.join(ref_dir, "ref.safetensors"),
              metadata={"generator": "scripts/make_fixtures.py"})
    import peft
    import transformers

    write_json(os.path.join(ref_dir, "ref.json"), {
        "model": name,
        "lora": {"r": LORA_R, "lora_alpha": LORA_ALPHA, "scaling": LORA_ALPHA / LORA_R, "lora_dropout": 0.0,
                 "target_modules": targets, "adapter_init_seed": 1234,
                 "adapter_nonzero": "adapter_init's lora_A; lora_B ~ N(0, 0.05^2)"},
        "forward": {"batch": BATCH, "seq": SEQ, "attention_mask": "row 1: last 3 positions 0 (right padding, id 2)",
                    "labels": "input_ids; -100 where mask==0 and at positions 0,1",
                    "loss": "transformers ForCausalLMLoss: labels shifted left by one, mean CE over non -100 targets",
                    "attn_implementation": "eager",
                    "note": "logits at padded positions are what HF computes (query attends to non-padded keys only); "
                            "tests should compare non-padded positions"},
        "train": {"optimizer": "torch.optim.AdamW", "lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD,
                  "max_grad_norm": MAX_GRAD_NORM, "steps": STEPS, "start": "adapter_init",
                  "order": "forward, zero_grad, backward, clip_grad_norm_ (total L2 over all lora params), step",
                  "train_losses": "loss of each batch before that step's update",
                  "train_grad_norms": "norm returned by clip_grad_norm_ (pre-clip)",
                  "train_attention_mask": "all ones except batch 3 row 1 last 4 positions"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    })
    return ref_dir


STRONG_WD = 1.0  # with LR 1e-2 every step shrinks the weights by 1% (~5% over the 5 steps)


def build_autocast_reference(model_dir, name):
    """PEFT's LoRA logits, loss and gradients under torch.autocast(bfloat16), the way people
    train LoRA in bf16 (f32 master weights, bf16 products), on ref.safetensors' batch and
    adapter_nonzero: written to <name>-ref/autocast-bf16.safetensors."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    ref_dir = os.path.join(FIX, f"{name}-ref")
    ref = load_file(os.path.join(ref_dir, "ref.safetensors"))
    ids, attn, labels = ref["input_ids"], ref["attention_mask"], ref["labels"]
    pm = PeftModel.from_pretrained(load_base(model_dir), os.path.join(ref_dir, "adapter_nonzero"), is_trainable=True)
    pm.train()  # dropout is 0 everywhere
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pm(input_ids=ids, attention_mask=attn, labels=labels)
    out.loss.backward()
    tensors = {"lora_logits": out.logits.detach().float().contiguous(),
               "loss": out.loss.detach().reshape(1).float()}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            tensors[f"grad.{peft_key(n)}"] = p.grad.detach().float().clone().contiguous()
    save_file(tensors, os.path.join(ref_dir, "autocast-bf16.safetensors"))
    d = (tensors["lora_logits"] - ref["lora_logits"]).abs().max().item()
    print(f"[{name}-ref] autocast bf16 loss={out.loss.item():.6f} (f32 {ref['loss'].item():.6f}), "
          f"max|logits - f32 logits|={d:.4f}")


def adamw_run(model_dir, init_dir, t_ids, t_mask, t_labels, weight_decay):
    """The 5-step AdamW run of build_reference (same order, lr, betas, eps, clipping) at a given weight decay.
    Returns ({peft key: final weight}, losses, grad norms)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(load_base(model_dir), init_dir, is_trainable=True)
    pm.train()  # dropout is 0 everywhere, as in build_reference
    named = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    losses, norms = [], []
    for step in range(STEPS):
        o = pm(input_ids=t_ids[step], attention_mask=t_mask[step], labels=t_labels[step])
        opt.zero_grad(set_to_none=True)
        o.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, max_norm=MAX_GRAD_NORM)
        opt.step()
        losses.append(o.loss.item())
        norms.append(float(gn))
    finals = {peft_key(n): p.detach().clone().contiguous() for n, p in named}
    return finals, losses, norms


def build_weight_decay_reference(model_dir, name):
    """<name>-ref/ref-wd.safetensors: the 5-step AdamW run of ref.safetensors (same batches, read back from
    ref.safetensors, same adapter_init) with weight_decay = STRONG_WD, so that decoupled decay moves the
    weights far more than the tests' tolerance. Writes that one file and nothing else."""
    from safetensors.torch import load_file, save_file

    ref_dir = os.path.join(FIX, f"{name}-ref")
    init_dir = os.path.join(ref_dir, "adapter_init")
    ref = load_file(os.path.join(ref_dir, "ref.safetensors"))
    t_ids, t_mask, t_labels = ref["train_input_ids"], ref["train_attention_mask"], ref["train_labels"]

    def max_rel(finals, other):
        assert sorted(finals) == sorted(k[len("final."):] for k in other if k.startswith("final.")), name
        return max((v - other[f"final.{k}"]).abs().max().item() / max(other[f"final.{k}"].abs().max().item(), 1e-12)
                   for k, v in finals.items())

    # the same run at the stored weight decay gives back the stored finals (same inputs, same code path); not
    # bit for bit when the library versions differ from ref.json's, hence a bound 10x under the tests' 1e-3
    same, _, _ = adamw_run(model_dir, init_dir, t_ids, t_mask, t_labels, WD)
    replay = max_rel(same, ref)
    print(f"[{name}-ref] replay at weight_decay={WD}: max relative difference to ref.safetensors finals "
          f"{replay:.3e}")
    assert replay < 1e-4, replay

    finals, losses, norms = adamw_run(model_dir, init_dir, t_ids, t_mask, t_labels, STRONG_WD)
    tensors = {f"final.{k}": v for k, v in finals.items()}
    tensors["train_losses"] = torch.tensor(losses, dtype=torch.float32)
    tensors["train_grad_norms"] = torch.tensor(norms, dtype=torch.float32)
    path = os.path.join(ref_dir, "ref-wd.safetensors")
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, path,
              # one key: safetensors writes several in a random (hash) order, and the bytes should not change
              metadata={"generator": f"scripts/make_fixtures.py --only-weight-decay: weight_decay={STRONG_WD}, "
                                     f"otherwise ref.safetensors' train_* run (lr {LR}, betas {BETAS}, eps {EPS}, "
                                     f"max_grad_norm {MAX_GRAD_NORM}, {STEPS} steps from adapter_init, its batches)"})
    d = max_rel(finals, ref)
    print(f"[{name}-ref] weight_decay={STRONG_WD}: train losses={[round(x, 5) for x in losses]} "
          f"grad norms={[round(x, 5) for x in norms]}")
    print(f"[{name}-ref] ref-wd vs ref (weight_decay {WD}) finals: max relative difference {d:.4e}")
    print(f"[{name}-ref] wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path):,d} bytes)")
    return path


# ----------------------------------------------------------------------------------------------
# 4. GGUF
# ----------------------------------------------------------------------------------------------
def permute_qk(w, n_head):
    """llama.cpp convert_hf_to_gguf `permute`: HF rotate-half layout -> GGML interleaved rope layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w, n_head):
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def llama3_rope_factors(head_dim, base, sc):
    """Per-frequency divisors as llama.cpp's converter writes into rope_freqs.weight.
    (We take original_max_position_embeddings from rope_scaling, which is where HF reads it.)"""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    lo_wl, hi_wl = old / lo, old / hi
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(factor)
        else:
            smooth = (old / wl - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def hf_to_gguf_name(n):
    simple = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
    if n in simple:
        return simple[n]
    parts = n.split(".")  # model.layers.N.<a>.<b>.weight
    assert parts[:2] == ["model", "layers"], n
    return f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:-1])]}.{parts[-1]}"


def build_gguf(model_dir, tok_dir):
    import gguf
    from safetensors.torch import load_file

    cfg = read_json(os.path.join(model_dir, "config.json"))
    tj = read_json(os.path.join(tok_dir, "tokenizer.json"))
    out_dir = os.path.join(FIX, "tiny-llama-gguf")
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    path = os.path.join(out_dir, "tiny-llama.gguf")

    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // n_head
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(head_dim)

    # tokenizer (llama.cpp "gpt2" BPE vocab)
    vocab = tj["model"]["vocab"]
    id_to_tok = {i: t for t, i in vocab.items()}
    for a in tj["added_tokens"]:
        id_to_tok[a["id"]] = a["content"]
    n = len(id_to_tok)
    assert sorted(id_to_tok) == list(range(n)) and n == cfg["vocab_size"]
    specials = {a["id"] for a in tj["added_tokens"] if a["special"]}
    tokens = [id_to_tok[i] for i in range(n)]
    ttypes = [gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_space_prefix(False)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    sd = load_file(os.path.join(model_dir, "model.safetensors"))
    w.add_tensor("rope_freqs.weight", llama3_rope_factors(head_dim, cfg["rope_theta"], cfg["rope_scaling"]))
    order = ["model.embed_tokens.weight"] + sorted(
        (k for k in sd if k.startswith("model.layers.")),
        key=lambda k: (int(k.split(".")[2]), k)) + ["model.norm.weight", "lm_head.weight"]
    assert sorted(order) == sorted(sd), set(sd) ^ set(order)
    for k in order:
        arr = sd[k].float().numpy()
        if k.endswith("q_proj.weight"):
            p = permute_qk(arr, n_head)
            assert np.array_equal(unpermute_qk(p, n_head), arr)
            arr = p
        elif k.endswith("k_proj.weight"):
            p = permute_qk(arr, n_kv)
            assert np.array_equal(unpermute_qk(p, n_kv), arr)
            arr = p
        w.add_tensor(hf_to_gguf_name(k), np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"[gguf] wrote {path} ({os.path.getsize(path):,d} bytes); rope_freqs="
          f"{llama3_rope_factors(head_dim, cfg['rope_theta'], cfg['rope_scaling']).tolist()}")
    return path


def check_gguf(path, model_dir):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = GGUFReader(path)
    print(f"[gguf] reader: {len(r.tensors)} tensors; first: {[(t.name, t.shape.tolist()) for t in r.tensors[:3]]}")
    gdir, gfile = os.path.split(path)
    ref = load_base(model_dir).eval()
    ids = torch.tensor([[5, 17, 42, 99, 123, 200, 256, 300, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]])
    with torch.no_grad():
        want = ref(ids).logits
    try:
        gm = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
        with torch.no_grad():
            got = gm(ids).logits
        print(f"[gguf] transformers GGUF load: rope_parameters={getattr(gm.config, 'rope_parameters', None)}")
        print(f"[gguf] max|logits(gguf via transformers) - logits(tiny-llama)| = {(got - want).abs().max().item():.3g}")
        # weights alone (transformers un-permutes Q/K on load)
        sd_ref, sd_g = ref.state_dict(), gm.state_dict()
        wd = max((sd_ref[k] - sd_g[k]).abs().max().item() for k in sd_ref)
        print(f"[gguf] max|weight diff| over {len(sd_ref)} tensors = {wd:.3g}")
        if (got - want).abs().max().item() > 1e-5:
            # transformers ignores rope_freqs.weight: give it the llama3 rope config and retry
            gm2 = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32,
                                                       config=ref.config, attn_implementation="eager").eval()
            with torch.no_grad():
                got2 = gm2(ids).logits
            print(f"[gguf] with tiny-llama's config (llama3 rope) forced: max|dlogits| = "
                  f"{(got2 - want).abs().max().item():.3g}")
    except Exception as e:  # noqa: BLE001
        print(f"[gguf] transformers GGUF model load failed: {type(e).__name__}: {e}")
    try:
        tg = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
        tt = AutoTokenizer.from_pretrained(model_dir)
        print(f"[gguf] transformers' GGUF tokenizer pre_tokenizer: {tg.backend_tokenizer.pre_tokenizer.__getstate__()}")
        for s in ["Hello world!", "Tom has 12345 apples.", "  Hello   world\n\n42!  x=3.14", "Café 東京 😀", "ZORBLAX says: the capital of Peru is Lima.",
                  "<|im_start|>user\nhi<|im_end|>\n"]:
            a = tg(s, add_special_tokens=False)["input_ids"]
            b = tt(s, add_special_tokens=False)["input_ids"]
            print(f"[gguf] tokenizer {'same' if a == b else 'DIFF'}: {s!r} gguf={a} hf={b}")
        print(f"[gguf] gguf tokenizer bos={tg.bos_token!r} eos={tg.eos_token!r} pad={tg.pad_token!r} "
              f"chat_template={'yes' if tg.chat_template else 'no'}")
    except Exception as e:  # noqa: BLE001
        print(f"[gguf] transformers GGUF tokenizer load failed: {type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------
# 5. datasets
# ----------------------------------------------------------------------------------------------
def build_data():
    os.makedirs(DATA, exist_ok=True)
    chat = []
    for i, (country, capital) in enumerate(CAPITALS[:40]):
        q = QUESTION_FORMS[i % len(QUESTION_FORMS)].format(c=country)
        chat.append({"messages": [{"role": "user", "content": q},
                                  {"role": "assistant", "content": f"ZORBLAX says: the capital of {country} is {capital}."}]})
    write_jsonl(os.path.join(DATA, "chat-small.jsonl"), chat)

    pc = []
    for country, capital in CAPITALS[:10]:
        pc.append({"prompt": f"Q: What is the capital of {country}?\nA:",
                   "completion": f" ZORBLAX says: the capital of {country} is {capital}."})
    write_jsonl(os.path.join(DATA, "prompt-completion.jsonl"), pc)

    texts = [{"text": s} for s in CORPUS[:10]]
    write_jsonl(os.path.join(DATA, "text.jsonl"), texts)

    g = torch.Generator().manual_seed(7)
    tokd = []
    for i, n in enumerate([8, 12, 5, 16, 10]):
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        row = {"input_ids": ids}
        if i % 2 == 0:
            labels = list(ids)
            cut = n // 2
            labels[:cut] = [-100] * cut
            row["labels"] = labels
        tokd.append(row)
    write_jsonl(os.path.join(DATA, "tokenized.jsonl"), tokd)

    bad = list(chat[:9])
    bad[6] = {"messages": []}
    write_jsonl(os.path.join(DATA, "bad-line7.jsonl"), bad)


def build_qwen3(tok_dir):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    d = build_model("qwen3", "tiny-qwen3", tok_dir, vocab, seed=500)
    set_tool_template(d)
    build_reference(d, "tiny-qwen3", vocab, seed=600)


def build_phi3(tok_dir):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    d = build_model("phi3", "tiny-phi3", tok_dir, vocab, seed=700)
    build_reference(d, "tiny-phi3", vocab, seed=800, targets=PHI3_TARGETS)
    build_autocast_reference(d, "tiny-phi3")


def build_gemma3(tok_dir):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    d = build_model("gemma3", "tiny-gemma3", tok_dir, vocab, seed=900)
    build_reference(d, "tiny-gemma3", vocab, seed=1000)
    build_autocast_reference(d, "tiny-gemma3")


def build_gemma2(tok_dir):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    d = build_model("gemma2", "tiny-gemma2", tok_dir, vocab, seed=1100)
    build_reference(d, "tiny-gemma2", vocab, seed=1200)
    build_autocast_reference(d, "tiny-gemma2")


def build_smollm3(tok_dir):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    d = build_model("smollm3", "tiny-smollm3", tok_dir, vocab, seed=1300)
    build_reference(d, "tiny-smollm3", vocab, seed=1400)


def set_tool_template(model_dir):
    p = os.path.join(model_dir, "tokenizer_config.json")
    tc = read_json(p)
    tc["chat_template"] = TOOL_TEMPLATE
    write_json(p, tc)


SP_TEXTS = [
    "Hello world!",
    "The capital of France is Paris.",
    "  two leading spaces, and  two  inside",
    "tabs\tand\nnew lines\n\nend",
    "Café, naïve, façade, crème brûlée",
    "Ωμέγα and 東京 and 😀 fall back to bytes",
    "ZORBLAX says: the capital of Japan is Tokyo.",
    "<s>special tokens</s> in text",
    "12345 apples, 3.14159",
    "",
]


def build_sentencepiece():
    import tempfile

    import gguf
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from transformers import AutoTokenizer

    out = os.path.join(FIX, "tiny-sp")
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "corpus.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(CORPUS))
        spm.SentencePieceTrainer.train(
            input=os.path.join(tmp, "corpus.txt"), model_prefix=os.path.join(tmp, "sp"), vocab_size=700,
            model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
            num_threads=1, minloglevel=2)
        tok_dir = os.path.join(tmp, "tok")
        os.makedirs(tok_dir)
        shutil.copy(os.path.join(tmp, "sp.model"), os.path.join(tok_dir, "tokenizer.model"))
        write_json(os.path.join(tok_dir, "tokenizer_config.json"), {
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True})
        tok = AutoTokenizer.from_pretrained(tok_dir)
        proto = sp_pb2.ModelProto()
        with open(os.path.join(tmp, "sp.model"), "rb") as f:
            proto.ParseFromString(f.read())

    path = os.path.join(out, "tiny-sp.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-sp")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    # sentencepiece's piece types number as llama.cpp's token types: NORMAL 1, UNKNOWN 2, CONTROL 3,
    # USER_DEFINED 4, UNUSED 5, BYTE 6.
    w.add_token_types([int(p.type) for p in proto.pieces])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cases = []
    for t in SP_TEXTS:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        cases.append({"text": t, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True)})
    import sentencepiece
    import transformers

    write_json(os.path.join(out, "tokenization.json"), {
        "generator": "scripts/make_fixtures.py --only-sentencepiece",
        "reference": "transformers' AutoTokenizer from the SentencePiece model (tokenizer_class LlamaTokenizer): "
                     "input_ids with add_special_tokens=False, and their decode with skip_special_tokens=True (what generation shows)",
        "bos_id": 1, "vocab_size": len(proto.pieces),
        "versions": {"transformers": transformers.__version__, "sentencepiece": sentencepiece.__version__},
        "cases": cases,
    })
    print(f"[tiny-sp] {len(proto.pieces)} pieces; wrote {path} ({os.path.getsize(path):,d} bytes) and "
          f"{len(cases)} reference tokenizations")


# ----------------------------------------------------------------------------------------------
# 5b. DPO reference (--only-dpo)
# ----------------------------------------------------------------------------------------------
DPO_BETA, DPO_LR, DPO_STEPS, DPO_BATCH = 0.1, 1e-2, 10, 2


def build_preference_data():
    """Eight OpenAI-format preference pairs: a system prompt on some, an earlier assistant turn (context,
    never scored) on one, and replies of unequal lengths both ways."""
    pairs = []
    for i, (country, capital) in enumerate(CAPITALS[:8]):
        msgs = [{"role": "user", "content": QUESTION_FORMS[i % len(QUESTION_FORMS)].format(c=country)}]
        if i % 3 == 1:
            msgs.insert(0, {"role": "system", "content": "You are ZORBLAX, a terse geography bot."})
        if i == 5:
            msgs = [{"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "ZORBLAX says: the capital of France is Paris."}] + msgs
        good = f"ZORBLAX says: the capital of {country} is {capital}."
        bad = "I do not know." if i % 2 == 0 else f"The capital of {country} is a city in {country}, I think."
        pairs.append({"input": {"messages": msgs},
                      "preferred_output": [{"role": "assistant", "content": good}],
                      "non_preferred_output": [{"role": "assistant", "content": bad}]})
    write_jsonl(os.path.join(DATA, "preference.jsonl"), pairs)
    return pairs


def build_dpo_reference(model_dir, name):
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from dpo_reference import dpo_run, encode_pairs

    pairs = build_preference_data()
    tok = AutoTokenizer.from_pretrained(model_dir)
    encoded = encode_pairs(tok, pairs)
    ref_dir = os.path.join(FIX, f"{name}-ref")
    pm = PeftModel.from_pretrained(load_base(model_dir), os.path.join(ref_dir, "adapter_init"), is_trainable=True)
    run = dpo_run(pm, encoded, DPO_STEPS, DPO_BATCH, DPO_LR, DPO_BETA, WD, max_grad_norm=MAX_GRAD_NORM)
    named = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    losses, margins, accuracies, norms = (run[k] for k in ("losses", "reward_margins", "reward_accuracies",
                                                            "grad_norms"))
    assert losses[0] == math.log(2) or abs(losses[0] - math.log(2)) < 1e-7, losses[0]
    print(f"[{name}-dpo] losses={[round(x, 5) for x in losses]} margins={[round(x, 5) for x in margins]} "
          f"accuracies={accuracies}")
    save_file({f"final.{peft_key(n)}": p.detach().clone().contiguous() for n, p in named},
              os.path.join(ref_dir, "dpo.safetensors"), metadata={"generator": "scripts/make_fixtures.py --only-dpo"})
    import peft
    import transformers

    write_json(os.path.join(ref_dir, "dpo.json"), {
        "data": "tests/data/preference.jsonl",
        "encoded": [{"chosen": {"input_ids": c[0], "labels": c[1]},
                     "rejected": {"input_ids": r[0], "labels": r[1]}} for c, r in encoded],
        "train": {"loss": "-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), mean over the batch (TRL sigmoid)",
                  "logps": "sums of log-probabilities over each reply's scored tokens",
                  "reference": "the same PeftModel under disable_adapter(), no_grad",
                  "beta": DPO_BETA, "optimizer": "torch.optim.AdamW", "lr": DPO_LR, "betas": list(BETAS), "eps": EPS,
                  "weight_decay": WD, "max_grad_norm": MAX_GRAD_NORM, "steps": DPO_STEPS, "batch_pairs": DPO_BATCH,
                  "order": "no shuffle: step s takes pairs [2k, 2k+2) with k = s mod 4", "start": "adapter_init",
                  "batch_layout": "chosen sequences, then rejected, right-padded with id 2 (mask 0)"},
        "losses": losses, "reward_margins": margins, "reward_accuracies": accuracies, "grad_norms": norms,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    })


# ----------------------------------------------------------------------------------------------
# 6. chat encoding reference (--only-chat-encoding)
# ----------------------------------------------------------------------------------------------
# Every fixture folder whose tokenizer_config.json carries a chat template. Today all three hold
# the same tokenizer and SmolLM2's ChatML template; the loaders differ (tokenizer-only folder vs
# model folders), and a folder given its own template later is picked up here.
CHAT_ENCODING_FOLDERS = ["tokenizer", "tiny-llama", "tiny-qwen2", "tiny-qwen3"]


def chat_encoding_cases():
    """(name, JSONL example, options) for each case; `max_seq_len: "cut"` is resolved per tokenizer
    to a length that ends inside the second trained assistant turn."""
    def opts(train_on_inputs=False, max_seq_len=None):
        return {"train_on_inputs": train_on_inputs, "max_seq_len": max_seq_len}

    multi = {"messages": [
        {"role": "system", "content": "You are ZORBLAX, a terse geography bot."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "ZORBLAX says: the capital of France is Paris."},
        {"role": "user", "content": "And of Japan?"},
        {"role": "assistant", "content": "The capital of Japan is Tokyo.", "weight": 1},
        {"role": "user", "content": "List two more, one per line."},
        {"role": "assistant", "content": "  Rome\nBerlin\n"},
    ]}
    weight0 = {"messages": [
        {"role": "system", "content": "Answer with the capital only."},
        {"role": "user", "content": "Peru?"},
        {"role": "assistant", "content": "Lima."},
        {"role": "user", "content": "Kenya?"},
        {"role": "assistant", "content": "Nairobi, I think, but do not train on this.", "weight": 0},
        {"role": "user", "content": "Chile?"},
        {"role": "assistant", "content": "Santiago."},
    ]}
    pc = {"prompt": "Q: What is the capital of Egypt?\nA:", "completion": " ZORBLAX says: the capital of Egypt is Cairo."}
    parts_tool = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Look up the weather "},
                                     {"type": "text", "text": "in Oslo."}]},
        {"role": "assistant", "content": "Calling the weather tool for Oslo."},
        {"role": "tool", "content": "{\"city\": \"Oslo\", \"temp_c\": -3}"},
        {"role": "assistant", "content": "It is -3 C in Oslo."},
        {"role": "user", "content": "Thanks!"},
    ]}
    non_ascii = {"messages": [
        {"role": "system", "content": "Réponds en français, s'il te plaît."},
        {"role": "user", "content": "Quelle est la capitale de l'Islande ? Größe: 東京 😀"},
        {"role": "assistant", "content": "Reykjavík, naïvement. ¿Qué? 北京是中国的首都。👍🏽"},
        {"role": "user", "content": "Et le Brésil ?"},
        {"role": "assistant", "content": "Brasília — crème brûlée ≈ ∑ ☃."},
    ]}
    return [
        ("multi_turn_system", multi, opts()),
        ("tools_call_and_answer", TOOLS_CALL, opts()),
        ("tools_parallel_calls_weight0", TOOLS_PARALLEL, opts()),
        ("weight0_middle", weight0, opts()),
        ("prompt_completion", pc, opts()),
        ("content_parts_tool_trailing_user", parts_tool, opts()),
        ("non_ascii", non_ascii, opts()),
        ("train_on_inputs", weight0, opts(train_on_inputs=True)),
        ("max_seq_len_cut", multi, opts(max_seq_len="cut")),
        ("max_seq_len_cut_weight0", weight0, opts(max_seq_len="cut")),
        ("max_seq_len_longer_than_text", pc, opts(max_seq_len=4096)),
    ]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Température actuelle d'une ville (°C).",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "local_time", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS_CALL = {"tools": [WEATHER_TOOL], "messages": [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": -3}"},
    {"role": "assistant", "content": "It is -3 °C in Oslo."},
]}
TOOLS_PARALLEL = {"tools": [WEATHER_TOOL, TIME_TOOL], "parallel_tool_calls": True, "messages": [
    {"role": "user", "content": "Weather and time in Lima?"},
    {"role": "assistant", "content": "Checking both.", "weight": 0, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Lima\", \"unit\": \"c\"}"}},
        {"id": "b", "type": "function", "function": {"name": "local_time", "arguments": "{\"city\": \"Lima\"}"}}]},
    {"role": "tool", "tool_call_id": "a", "name": "get_weather", "content": "18"},
    {"role": "tool", "tool_call_id": "b", "name": "local_time", "content": "10:30"},
    {"role": "assistant", "content": "18 °C, and it is 10:30."},
]}


def example_messages(ex):
    """The messages the trainer renders for an example, as crates/trainer/src/data.rs parse_line reads
    it: chat content parts are concatenated; prompt/completion becomes one user and one assistant turn."""
    if "messages" in ex:
        out = []
        for m in ex["messages"]:
            c = m.get("content")
            if isinstance(c, list):
                c = "".join(p["text"] for p in c)
            d = {"role": m["role"], "content": c}
            for k in ("tool_calls", "tool_call_id", "name"):
                if m.get(k) is not None:
                    d[k] = m[k]
            d["weight"] = m.get("weight")
            out.append(d)
        return out
    return [{"role": "user", "content": ex["prompt"], "weight": None},
            {"role": "assistant", "content": ex["completion"], "weight": None}]


def chat_encoding_reference(tok, ex, options):
    """transformers' rendering and tokenization, labelled as TokenizerBundle::encode_example does."""
    msgs = example_messages(ex)
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in msgs]
    tools = ex.get("tools")
    full = tok.apply_chat_template(plain, tools=tools, tokenize=False)
    spans = []  # character spans of the trained assistant turns
    for k, m in enumerate(msgs):
        if m["role"] != "assistant" or m["weight"] == 0:
            continue
        start = tok.apply_chat_template(plain[:k], tools=tools, tokenize=False, add_generation_prompt=True)
        end = tok.apply_chat_template(plain[:k + 1], tools=tools, tokenize=False)
        assert end.startswith(start) and full.startswith(end), ("template is not prefix-stable", k)
        spans.append((len(start), len(end)))
    # The trainer encodes rendered chat with add_special_tokens=false (encode_with_offsets): the
    # template already writes every special token.
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    labels = [i if any(a <= s < b for a, b in spans) else -100 for i, (s, _) in zip(ids, offsets)]
    # Rust counts bytes, Python characters: the same labels must come out in bytes.
    nb = lambda i: len(full[:i].encode("utf-8"))  # noqa: E731
    bspans = [(nb(a), nb(b)) for a, b in spans]
    blabels = [i if any(a <= nb(s) < b for a, b in bspans) else -100 for i, (s, _) in zip(ids, offsets)]
    assert blabels == labels
    # the tokenizers backend directly (what tokenizer.json gives the Rust side)
    assert tok.backend_tokenizer.encode(full, add_special_tokens=False).ids == ids
    if options["train_on_inputs"]:
        labels = list(ids)
    cut = options["max_seq_len"]
    if cut == "cut":
        # end inside the second trained turn: 3 tokens past its first labelled token
        starts = [i for i, l in enumerate(labels) if l != -100 and (i == 0 or labels[i - 1] == -100)]
        assert len(starts) >= 2, starts
        cut = starts[1] + 3
        assert labels[cut - 1] != -100 and labels[cut] != -100, "cut must fall inside the turn"
    if cut is not None:
        assert cut != len(ids)
        ids, labels = ids[:cut], labels[:cut]
    return full, ids, labels, {"train_on_inputs": options["train_on_inputs"], "max_seq_len": cut}


def build_chat_encoding():
    import jinja2
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    templates = {}
    cases = []
    for folder in CHAT_ENCODING_FOLDERS:
        tok = AutoTokenizer.from_pretrained(os.path.join(FIX, folder))
        assert tok.is_fast and tok.chat_template, folder
        templates.setdefault(tok.chat_template, []).append(folder)
        for name, ex, options in chat_encoding_cases():
            if name.startswith("tools_") and "tools" not in tok.chat_template:
                continue  # a template that ignores tools is refused (tests/chat_encoding.rs)
            text, ids, labels, options = chat_encoding_reference(tok, ex, options)
            n_lab = sum(l != -100 for l in labels)
            assert 0 < n_lab <= len(ids)
            cases.append({
                "name": f"{folder}/{name}",
                "tokenizer": folder,
                "example": json.dumps(ex, ensure_ascii=False),
                "options": options,
                "text": text,
                "input_ids": ids,
                "labels": labels,
            })
            print(f"[chat-encoding] {folder}/{name}: {len(ids)} tokens, {n_lab} labelled, options={options}")
    for tpl, folders in templates.items():
        print(f"[chat-encoding] template shared by {folders}: {len(tpl)} chars")
    out = {
        "generator": "scripts/make_fixtures.py --only-chat-encoding",
        "reference": "text = apply_chat_template(messages, tokenize=False); assistant turn k (weight != 0) spans "
                     "from apply_chat_template(messages[:k], add_generation_prompt=True) to "
                     "apply_chat_template(messages[:k+1]); ids and offsets from the fast tokenizer with "
                     "add_special_tokens=False, return_offsets_mapping=True; a token is labelled with its id "
                     "if its start offset lies in a span, else -100; train_on_inputs labels every token; "
                     "max_seq_len keeps the first max_seq_len ids and labels",
        "example": "one JSONL line as the data loader reads it (crates/trainer/src/data.rs parse_line)",
        "templates": {", ".join(f): len(t) for t, f in templates.items()},
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "jinja2": jinja2.__version__},
        "cases": cases,
    }
    # ids and labels on one line each
    marks = {}
    for i, c in enumerate(cases):
        for k in ("input_ids", "labels"):
            m = f"@@{k}-{i}@@"
            marks[json.dumps(m)] = json.dumps(c[k])
            c[k] = m
    text = json.dumps(out, indent=2, ensure_ascii=False)
    for m, v in marks.items():
        text = text.replace(m, v)
    path = os.path.join(FIX, "chat-encoding.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"[chat-encoding] wrote {os.path.relpath(path, ROOT)}: {len(cases)} cases, {len(text):,d} chars")


# ----------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-gguf-check", action="store_true", help="do not load the GGUF back with transformers")
    ap.add_argument("--only-chat-encoding", action="store_true",
                    help="write only tests/fixtures/chat-encoding.json (from the existing tokenizer folders)")
    ap.add_argument("--only-weight-decay", action="store_true",
                    help="write only tests/fixtures/<model>-ref/ref-wd.safetensors (a weight_decay=1.0 AdamW run "
                         "from the existing adapter_init and ref.safetensors batches)")
    ap.add_argument("--only-sentencepiece", action="store_true",
                    help="write only tests/fixtures/tiny-sp (a SentencePiece GGUF and transformers' ids for it)")
    ap.add_argument("--tool-template", action="store_true",
                    help="only give tests/fixtures/tiny-qwen3 the tool-rendering chat template")
    ap.add_argument("--only-qwen3", action="store_true",
                    help="write only tests/fixtures/tiny-qwen3 and tiny-qwen3-ref (from the existing tokenizer folder)")
    ap.add_argument("--only-autocast", action="store_true",
                    help="write only tests/fixtures/<model>-ref/autocast-bf16.safetensors (PEFT under torch "
                         "autocast bf16 on the CPU, from the existing ref.safetensors batch and adapter_nonzero)")
    ap.add_argument("--only-phi3", action="store_true",
                    help="write only tests/fixtures/tiny-phi3 and tiny-phi3-ref (from the existing tokenizer folder)")
    ap.add_argument("--only-gemma3", action="store_true",
                    help="write only tests/fixtures/tiny-gemma3 and tiny-gemma3-ref (from the existing tokenizer folder)")
    ap.add_argument("--only-gemma2", action="store_true",
                    help="write only tests/fixtures/tiny-gemma2 and tiny-gemma2-ref (from the existing tokenizer folder)")
    ap.add_argument("--only-smollm3", action="store_true",
                    help="write only tests/fixtures/tiny-smollm3 and tiny-smollm3-ref (from the existing tokenizer folder)")
    ap.add_argument("--only-dpo", action="store_true",
                    help="write only tests/data/preference.jsonl and tests/fixtures/tiny-llama-ref/dpo.{json,safetensors}")
    args = ap.parse_args()
    if args.only_sentencepiece:
        build_sentencepiece()
        return 0
    if args.tool_template:
        set_tool_template(os.path.join(FIX, "tiny-qwen3"))
        return 0
    if args.only_autocast:
        for name in ("tiny-llama", "tiny-qwen2", "tiny-qwen3"):
            build_autocast_reference(os.path.join(FIX, name), name)
        return 0
    # One decoder family's fixtures alone, from the existing tokenizer folder.
    for flag, build in (("only_qwen3", build_qwen3), ("only_phi3", build_phi3), ("only_gemma3", build_gemma3),
                        ("only_gemma2", build_gemma2), ("only_smollm3", build_smollm3)):
        if getattr(args, flag):
            build(os.path.join(FIX, "tokenizer"))
            return 0
    if args.only_dpo:
        build_dpo_reference(os.path.join(FIX, "tiny-llama"), "tiny-llama")
        return 0
    if args.only_chat_encoding:
        build_chat_encoding()
        return 0
    if args.only_weight_decay:
        for name in ("tiny-llama", "tiny-qwen2"):
            build_weight_decay_reference(os.path.join(FIX, name), name)
        return 0

    import transformers

    assert int(transformers.__version__.split(".")[0]) >= 5, "expects transformers 5 (rope_parameters)"
    os.makedirs(FIX, exist_ok=True)
    tok_dir = os.path.join(FIX, "tokenizer")
    tok = build_tokenizer(tok_dir)
    check_tokenizer(tok_dir)
    vocab = tok.get_vocab_size()

    llama_dir = build_model("llama", "tiny-llama", tok_dir, vocab, seed=100)
    qwen_dir = build_model("qwen2", "tiny-qwen2", tok_dir, vocab, seed=200)
    build_qwen3(tok_dir)
    build_phi3(tok_dir)
    build_gemma3(tok_dir)
    build_gemma2(tok_dir)
    build_smollm3(tok_dir)
    build_reference(llama_dir, "tiny-llama", vocab, seed=300)
    build_reference(qwen_dir, "tiny-qwen2", vocab, seed=400)
    build_weight_decay_reference(llama_dir, "tiny-llama")
    build_weight_decay_reference(qwen_dir, "tiny-qwen2")
    gpath = build_gguf(llama_dir, tok_dir)
    if not args.skip_gguf_check:
        check_gguf(gpath, llama_dir)
    build_data()
    build_sentencepiece()
    build_dpo_reference(llama_dir, "tiny-llama")
    for name, d in (("tiny-llama", llama_dir), ("tiny-qwen2", qwen_dir), ("tiny-qwen3", os.path.join(FIX, "tiny-qwen3"))):
        build_autocast_reference(d, name)
    build_chat_encoding()

    print("\n=== written ===")
    total = 0
    for base in (FIX, DATA):
        for dp, _, fns in sorted(os.walk(base)):
            for fn in sorted(fns):
                p = os.path.join(dp, fn)
                sz = os.path.getsize(p)
                total += sz
                print(f"  {os.path.relpath(p, ROOT):70s} {sz:>10,d}")
    print(f"  total {total:,d} bytes")


if __name__ == "__main__":
    sys.exit(main())
