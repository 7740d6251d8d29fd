#!/usr/bin/env python3
"""Reference fixtures for encoder (BERT / RoBERTa) sequence classification.

Writes (relative to the repository root):

  tests/fixtures/tiny-bert/         random BertForSequenceClassification (3 labels) + WordPiece tokenizer
  tests/fixtures/tiny-roberta/      random RobertaForSequenceClassification (3 labels) + byte-level BPE tokenizer
  tests/fixtures/<model>-ref/       PEFT SEQ_CLS adapters (initial, non-zero) and ref.safetensors:
                                    a padded batch (pairs for BERT), base and LoRA logits, every LoRA and
                                    classifier-head gradient, BCE / MSE losses on the LoRA logits, and the
                                    losses of 5 AdamW steps from the initial adapter

Model dropout is 0 in the saved configs, so train-mode forwards are deterministic.
Usage (torch, transformers>=5, peft, tokenizers, safetensors; no network):

  $LORAFORGE_VENV/bin/python scripts/make_encoder_fixtures.py
"""
import json
import os
import shutil

import torch

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")

R, ALPHA = 4, 8
LR, WD, MAX_GRAD_NORM, STEPS = 1e-2, 0.01, 1.0, 5
LABELS = ["negative", "neutral", "positive"]
TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    # "dense" would also reach RoBERTa's classification head, which PEFT keeps in modules_to_save.
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense"],
}

CORPUS = [
    "the film was great and the acting was wonderful",
    "a terrible plot with boring characters and awful music",
    "the story was fine , nothing special",
    "i felt the ending was brilliant !",
    "really dreadful camera work ; quite tedious overall",
    "an enjoyable script with a pleasant scene or two",
    "was it good ? maybe . was it bad ? no .",
    "numbers 123 and 4567 , café naïve",
]
PAIRS = [
    ("the film was great", "i felt the ending was brilliant !"),
    ("boring characters", "awful music and a terrible plot"),
    ("the story was fine", None),
    ("quite tedious overall ; really dreadful", None),
]


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def bert_tokenizer(out):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS * 3, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials,
                                                                  show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.save(os.path.join(out, "tokenizer.json"))
    write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "BertTokenizerFast", "do_lower_case": True, "model_max_length": 64,
        "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    })
    return tok, tok.token_to_id("[PAD]")


def roberta_tokenizer(out):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                      add_prefix_space=False)
    tok.save(os.path.join(out, "tokenizer.json"))
    write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "RobertaTokenizerFast", "model_max_length": 64, "bos_token": "<s>",
        "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "mask_token": "<mask>",
    })
    return tok, 1


def build_model(kind, seed):
    from transformers import (BertConfig, BertForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)

    out = os.path.join(FIX, f"tiny-{kind}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    tok, pad = (bert_tokenizer if kind == "bert" else roberta_tokenizer)(out)
    common = dict(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, hidden_act="gelu", hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, num_labels=len(LABELS),
                  id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)},
                  pad_token_id=pad)
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = BertConfig(max_position_embeddings=64, type_vocab_size=2, **common)
        model = BertForSequenceClassification(cfg)
    else:
        cfg = RobertaConfig(max_position_embeddings=66, type_vocab_size=1, bos_token_id=0, eos_token_id=2,
                            **common)
        model = RobertaForSequenceClassification(cfg)
    # Larger than the default init (std 0.02), so that the fixture exercises every path.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() >= 2:
                p.normal_(0, 0.2)
            else:
                p.normal_(0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    return out, tok


def batch(kind, tok):
    from tokenizers import Tokenizer

    rows = [tok.encode(a, b) if b is not None else tok.encode(a) for a, b in PAIRS]
    t = max(len(r.ids) for r in rows)
    pad = 0 if kind == "bert" else 1
    ids = [r.ids + [pad] * (t - len(r.ids)) for r in rows]
    types = [r.type_ids + [0] * (t - len(r.type_ids)) for r in rows]
    mask = [[1] * len(r.ids) + [0] * (t - len(r.ids)) for r in rows]
    del Tokenizer
    return (torch.tensor(ids), torch.tensor(types), torch.tensor(mask), torch.tensor([2, 0, 1, 0]))


def lora_cfg(kind):
    from peft import LoraConfig

    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS[kind], bias="none",
                      task_type="SEQ_CLS")


def forward(m, kind, ids, types, mask, labels=None):
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if kind == "bert":
        kw["token_type_ids"] = types
    return m(**kw)


def tidy_adapter(adir, name):
    """Records the fixture's folder name rather than this machine's absolute path."""
    p = os.path.join(adir, "adapter_config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = name
    write_json(p, cfg)


def build_reference(kind, seed):
    from peft import PeftModel, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    model_dir, tok = build_model(kind, seed)
    ref = os.path.join(FIX, f"tiny-{kind}-ref")
    shutil.rmtree(ref, ignore_errors=True)
    os.makedirs(ref)
    ids, types, mask, labels = batch(kind, tok)

    def load():
        return AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32,
                                                                  attn_implementation="eager")

    base = load().eval()
    with torch.no_grad():
        base_logits = forward(base, kind, ids, types, mask).logits

    torch.manual_seed(seed + 1)
    pm = get_peft_model(load(), lora_cfg(kind))
    pm.save_pretrained(os.path.join(ref, "adapter_init"))
    tidy_adapter(os.path.join(ref, "adapter_init"), f"tiny-{kind}")
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
            elif p.requires_grad and "lora_" not in n:  # the classifier head
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(os.path.join(ref, "adapter_nonzero"))
    tidy_adapter(os.path.join(ref, "adapter_nonzero"), f"tiny-{kind}")

    pm = PeftModel.from_pretrained(load(), os.path.join(ref, "adapter_nonzero"), is_trainable=True)
    pm.train()
    out = forward(pm, kind, ids, types, mask, labels)
    out.loss.backward()
    tensors = {
        "input_ids": ids.to(torch.int64), "token_type_ids": types.to(torch.int64),
        "attention_mask": mask.to(torch.int64), "labels": labels.to(torch.int64),
        "logits_base": base_logits.contiguous(), "logits_lora": out.logits.detach().contiguous(),
        "loss_lora": out.loss.detach().reshape(1),
    }
    n_grads = 0
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, n
            key = n.replace(".default", "").replace(".modules_to_save", "")
            tensors["grad." + key] = p.grad.contiguous()
            n_grads += 1
    lg = out.logits.detach()
    multi = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1]], dtype=torch.float32)
    tensors["multi_targets"] = multi
    tensors["loss_bce"] = torch.nn.functional.binary_cross_entropy_with_logits(lg, multi).reshape(1)
    reg = torch.tensor([0.5, -1.0, 2.0, 0.0])
    tensors["regression_targets"] = reg
    tensors["loss_mse"] = torch.nn.functional.mse_loss(lg[:, 0], reg).reshape(1)

    # 5 steps of AdamW from the initial adapter on the same batch.
    pm = PeftModel.from_pretrained(load(), os.path.join(ref, "adapter_init"), is_trainable=True)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    losses = []
    for _ in range(STEPS):
        loss = forward(pm, kind, ids, types, mask, labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    tensors["train_losses"] = torch.tensor(losses, dtype=torch.float32)
    save_file(tensors, os.path.join(ref, "ref.safetensors"))
    import peft
    import transformers

    write_json(os.path.join(ref, "ref.json"), {
        "model": f"tiny-{kind}", "labels": LABELS,
        "lora": {"r": R, "lora_alpha": ALPHA, "target_modules": TARGETS[kind], "task_type": "SEQ_CLS",
                 "adapter_nonzero": "lora_B ~ N(0, 0.1^2), classifier head += N(0, 0.1^2)"},
        "forward": {"batch": len(PAIRS), "pairs": [list(p) for p in PAIRS], "attn_implementation": "eager",
                    "loss": "cross entropy, mean over the batch (single_label_classification)"},
        "train": {"optimizer": "torch.optim.AdamW", "lr": LR, "weight_decay": WD, "max_grad_norm": MAX_GRAD_NORM,
                  "steps": STEPS, "start": "adapter_init", "batch": "the forward batch, every step"},
        "grad_tensors": n_grads,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    })
    print(f"[{kind}] logits {tuple(base_logits.shape)}; loss {out.loss.item():.5f}; {n_grads} grads; "
          f"train losses {[round(x, 5) for x in losses]}")


if __name__ == "__main__":
    build_reference("bert", 11)
    build_reference("roberta", 12)
