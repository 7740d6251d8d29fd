#!/usr/bin/env python3
"""The "real data" half of scripts/bench-real-data.sh: variable-length chat, each tool's own
batching.

  make  --model HF_DIR --out DIR [--examples N] [--seed S]
        writes DIR/chat.jsonl (OpenAI chat lines whose replies run from a few words to a few
        hundred) and DIR/tokenized.jsonl (the same conversations through the model's chat
        template with transformers: input_ids, and labels that score the assistant reply
        only), so that both engines train on the same tokens and the same scored tokens.

  train --model HF_DIR --data DIR/tokenized.jsonl --out ADAPTER_DIR [--batch 4] ...
        one epoch of PEFT LoRA the way transformers' Trainer batches by default: a shuffled
        order (RandomSampler), batches of --batch examples padded to their longest with
        labels padded by -100 (as TRL's SFT collator and DataCollatorForSeq2Seq pad), the
        mean loss over the batch's scored tokens. Prints
        'RESULT {json}' with the loop's seconds, trained (scored) tokens, real and padded
        tokens, and peak RSS.
"""
import argparse
import json
import os
import random
import sys
import time

WORDS = (
    "the a model data train value layer token batch memory speed answer question reason "
    "because which while after before small large quick careful simple exact measure result "
    "engine server request file line step loss rate weight matrix vector sum product every "
    "some many few more less often never always first last next again here there how why "
    "what when where people team machine test check build run write read keep make take"
).split()


def sentence(rng, n):
    w = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(w).capitalize() + "."


def paragraph(rng, words):
    out, left = [], words
    while left > 0:
        n = min(left, rng.randint(6, 16))
        out.append(sentence(rng, n))
        left -= n
    return " ".join(out)


def make(args):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    chat, tokenized, lengths = [], [], []
    for _ in range(args.examples):
        # Replies log-uniform from 8 to 400 words: most short, a few long, as chat data is.
        reply = int(round(8 * (50 ** rng.random())))
        messages = [
            {"role": "user", "content": paragraph(rng, rng.randint(5, 40))},
            {"role": "assistant", "content": paragraph(rng, reply)},
        ]
        prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(messages, tokenize=False)
        assert full.startswith(prompt), "the template does not extend the prompt"
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"]
        assert ids[: len(p_ids)] == p_ids, "prompt tokens change when the reply follows"
        labels = [-100] * len(p_ids) + ids[len(p_ids):]
        chat.append({"messages": messages})
        tokenized.append({"input_ids": ids, "labels": labels})
        lengths.append(len(ids))
    for name, rows in (("chat.jsonl", chat), ("tokenized.jsonl", tokenized)):
        with open(os.path.join(args.out, name), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    lengths.sort()
    print(f"{len(lengths)} examples, {sum(lengths)} tokens; lengths min {lengths[0]}, "
          f"median {lengths[len(lengths) // 2]}, max {lengths[-1]}")


def train(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, args.bench)
    import bench_common as bc

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = [json.loads(l) for l in open(args.data) if l.strip()]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=0.0)
    model.train()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    bc.reset_hwm()
    scored = real = padded = 0
    losses = []
    t0 = time.perf_counter()
    for k in range(0, len(order), args.batch):
        batch = [rows[i] for i in order[k:k + args.batch]]
        t = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), t), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), t), dtype=torch.long)
        labels = torch.full((len(batch), t), -100, dtype=torch.long)
        for j, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[j, :n] = torch.tensor(r["input_ids"])
            mask[j, :n] = 1
            labels[j, :n] = torch.tensor(r["labels"])
            real += n
            scored += sum(1 for x in r["labels"][1:] if x != -100)
        padded += len(batch) * t
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        print(f"batch {k // args.batch + 1}: {len(batch)} x {t} tokens, loss {losses[-1]}",
              flush=True)
    seconds = time.perf_counter() - t0
    res = {
        "engine": "peft", "seconds": round(seconds, 2), "steps": len(losses),
        "trained_tokens": scored, "real_tokens": real, "padded_tokens": padded,
        "trained_tokens_per_s": round(scored / seconds, 1),
        "peak_rss_mib": round(bc.hwm_mib(), 1), "losses": losses,
    }
    model.save_pretrained(args.out)
    print("RESULT " + json.dumps(res))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["make", "train"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data")
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--bench", default=os.path.join(os.path.dirname(__file__), "../../shared/bench"))
    args = ap.parse_args()
    make(args) if args.cmd == "make" else train(args)


if __name__ == "__main__":
    main()
