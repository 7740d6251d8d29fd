#!/usr/bin/env python3
"""DPO as TRL's sigmoid loss defines it, written out in torch + PEFT: the reference loraforge's DPO is
checked against (tests/fixtures/tiny-llama-ref/dpo.json via make_fixtures.py --only-dpo, and SmolLM2 in the
`it` suite).

    python scripts/dpo_reference.py --base models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data tests/data/preference.jsonl --adapter-out /tmp/init --out /tmp/dpo.json \
        [--steps 10 --batch 2 --lr 1e-3 --beta 0.1 --weight-decay 0 --r 8 --alpha 16 --seed 0]

With --adapter-out it first writes PEFT's fresh adapter (lora_B = 0) there, from which the run starts;
with --adapter it starts from that folder instead. Writes per-step losses, reward margins and accuracies,
gradient norms and the encoded pairs to --out (JSON).

The definition (TRL DPOTrainer, loss_type "sigmoid"): a pair's prompt is the chat template of
input.messages with the generation prompt; each reply is what the template renders for it after that
(end of turn included); log-probabilities are sums over the reply's tokens; the reference model is the
same PeftModel under disable_adapter(); loss = -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), mean
over the batch. No shuffling: step s takes pairs [B*k, B*k+B) with k = s mod (pairs / B). AdamW as torch
has it, gradients clipped to norm 1.
"""
import argparse
import json
import os
import sys

import torch


def encode_reply(tok, messages, reply):
    """Input ids and labels of the conversation followed by `reply`: only the reply is scored, from the end
    of the generation prompt to the end of what the template renders for it (the supervised chat rule)."""
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages + [reply], tokenize=False)
    assert full.startswith(prompt), (prompt, full)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [i if s >= len(prompt) else -100 for i, (s, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def encode_pairs(tok, pairs):
    return [(encode_reply(tok, p["input"]["messages"], p["preferred_output"][0]),
             encode_reply(tok, p["input"]["messages"], p["non_preferred_output"][0])) for p in pairs]


def sequence_logps(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    tgt = labels[:, 1:]
    keep = tgt != -100
    lp = torch.log_softmax(logits, dim=-1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * keep).sum(-1)


def dpo_run(pm, encoded, steps, batch, lr, beta, weight_decay, max_grad_norm=1.0, pad_id=2):
    """Trains `pm` (a trainable PeftModel) in place; returns per-step losses, margins, accuracies, norms."""
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    per_epoch = len(encoded) // batch
    import time

    out = {"losses": [], "reward_margins": [], "reward_accuracies": [], "grad_norms": [], "step_ends": []}
    for step in range(steps):
        k = step % per_epoch
        chunk = encoded[k * batch:(k + 1) * batch]
        seqs = [c for c, _ in chunk] + [r for _, r in chunk]  # chosen first, then rejected (TRL's order)
        t = max(len(i) for i, _ in seqs)
        ids = torch.tensor([i + [pad_id] * (t - len(i)) for i, _ in seqs])
        mask = torch.tensor([[1] * len(i) + [0] * (t - len(i)) for i, _ in seqs])
        labels = torch.tensor([lab + [-100] * (t - len(lab)) for _, lab in seqs])
        policy = sequence_logps(pm, ids, mask, labels)
        with torch.no_grad(), pm.disable_adapter():
            reference = sequence_logps(pm, ids, mask, labels)
        ratio = policy - reference
        n = len(chunk)
        z = beta * (ratio[:n] - ratio[n:])
        loss = -torch.nn.functional.logsigmoid(z).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, max_norm=max_grad_norm)
        opt.step()
        out["losses"].append(loss.item())
        out["reward_margins"].append(z.detach().mean().item())
        out["reward_accuracies"].append((z.detach() > 0).float().mean().item())
        out["grad_norms"].append(float(gn))
        out["step_ends"].append(time.perf_counter())
    return out


def load_base(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(path))
        return (AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32),
                AutoTokenizer.from_pretrained(d, gguf_file=f))
    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager"),
            AutoTokenizer.from_pretrained(path))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    start = ap.add_mutually_exclusive_group(required=True)
    start.add_argument("--adapter", help="start from this PEFT adapter")
    start.add_argument("--adapter-out", help="write PEFT's fresh adapter here and start from it")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from peft import LoraConfig, PeftModel, get_peft_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base, tok = load_base(args.base)
    if args.adapter_out:
        cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj"])
        pm = get_peft_model(base, cfg)
        pm.save_pretrained(args.adapter_out, safe_serialization=True)
    else:
        pm = PeftModel.from_pretrained(base, args.adapter, is_trainable=True)
    with open(args.data) as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    encoded = encode_pairs(tok, pairs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    run = dpo_run(pm, encoded, args.steps, args.batch, args.lr, args.beta, args.weight_decay, pad_id=pad)
    # Steps 2.. (the first carries one-off costs), as the bench reads loraforge's metrics.
    ends = run.pop("step_ends")
    run["seconds_per_step"] = (ends[-1] - ends[0]) / max(1, len(ends) - 1)
    run["encoded"] = [{"chosen": {"input_ids": c[0], "labels": c[1]},
                       "rejected": {"input_ids": r[0], "labels": r[1]}} for c, r in encoded]
    with open(args.out, "w") as f:
        json.dump(run, f)
    print("DPO reference: losses " + " ".join(f"{x:.5f}" for x in run["losses"]))
    print("DPO reference: reward accuracies " + " ".join(f"{x:.2f}" for x in run["reward_accuracies"]))


if __name__ == "__main__":
    sys.exit(main())
