#!/usr/bin/env python3
"""Drives a running `loraforge serve` with the official `openai` Python client.

usage: openai_client_test.py BASE_URL   (e.g. http://127.0.0.1:8080)

Exercises files.create(purpose="fine-tune"), list (with auto-pagination),
retrieve, content, wait_for_processing and delete, plus the error paths the client
maps to exceptions. Exits non-zero on the first failure.
"""

import json
import os
import sys

import openai
from openai import OpenAI


def chat_jsonl(n, tag="x"):
    lines = []
    for i in range(n):
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "You are terse."},
                        {"role": "user", "content": f"question {tag} {i}"},
                        {"role": "assistant", "content": f"answer {tag} {i}"},
                    ]
                }
            )
        )
    return ("\n".join(lines) + "\n").encode()


def finished(client, job_id, seconds, poll=0.2):
    """The job once it has ended, or as it is after `seconds`."""
    import time

    deadline = time.time() + seconds
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled") or time.time() > deadline:
            return job
        time.sleep(poll)


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok   {what}")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    base = sys.argv[1].rstrip("/")
    client = OpenAI(
        base_url=f"{base}/v1",
        api_key=os.environ.get("LORAFORGE_API_KEY", "unused-by-default"),
        max_retries=0,
    )

    data = chat_jsonl(12)
    f = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    check(f.id.startswith("file-"), f"files.create -> {f.id}")
    check(f.object == "file" and f.purpose == "fine-tune", "file object shape")
    check(f.status == "processed", f"status processed ({f.status}, {f.status_details})")
    check(f.bytes == len(data) and f.filename == "train.jsonl", "bytes and filename")
    check(getattr(f, "examples", None) == 12, "extra field examples kept by the client")

    f = client.files.wait_for_processing(f.id)
    check(f.status == "processed", "files.wait_for_processing returns at once")

    got = client.files.retrieve(f.id)
    check(got.id == f.id and got.bytes == f.bytes, "files.retrieve")

    content = client.files.content(f.id)
    check(content.read() == data, "files.content returns the bytes uploaded")

    more = [
        client.files.create(file=(f"more-{i}.jsonl", chat_jsonl(2, str(i))), purpose="fine-tune").id
        for i in range(3)
    ]
    page = client.files.list(limit=2)
    check(len(page.data) == 2 and page.has_more, "files.list(limit=2) is one page of two")
    all_ids = [x.id for x in client.files.list(limit=2)]  # auto-pagination follows `after`
    check(all_ids == list(reversed([f.id] + more)), "files.list auto-paginates, newest first")

    bad = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": []}\n'
    b = client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    check(b.status == "error", "an invalid file is stored with status error")
    check((b.status_details or "").startswith("line 2: "), f"status_details names the line: {b.status_details!r}")

    d = client.files.delete(f.id)
    check(d.deleted and d.id == f.id, "files.delete")
    try:
        client.files.retrieve(f.id)
        check(False, "retrieve after delete raises NotFoundError")
    except openai.NotFoundError as e:
        check(e.status_code == 404, "retrieve after delete raises NotFoundError")

    try:
        client.files.create(file=("x.jsonl", data), purpose="assistants")
        check(False, "a wrong purpose raises BadRequestError")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "purpose", "a wrong purpose raises BadRequestError")

    for x in more + [b.id]:
        client.files.delete(x)
    check(client.files.list().data == [], "everything deleted")

    fine_tuning(client)
    speech(client)
    if os.environ.get("LORAFORGE_SMOLLM2"):
        smollm2(client, os.environ["LORAFORGE_SMOLLM2"])
    print("openai client test: all passed")


def smollm2(client, model):
    """The real SmolLM2: a short job, then base and fine-tuned answers to a training prompt."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "chat-small.jsonl")
    with open(path, "rb") as f:
        train = client.files.create(file=("chat-small.jsonl", f.read()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=model, training_file=train.id, extra_body={"hyperparameters": {
        "max_steps": 8, "batch_size": 4, "learning_rate": 1e-3, "lr_scheduler": "constant"}})
    job = finished(client, job.id, 900, poll=1)
    check(job.status == "succeeded", f"SmolLM2 job {job.status} ({job.error})")
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    base = client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=24)
    tuned = client.chat.completions.create(model=job.fine_tuned_model, messages=ask, temperature=0, max_tokens=24)
    b, t = base.choices[0].message.content, tuned.choices[0].message.content
    check(b != t, f"SmolLM2 base {b!r} vs fine-tuned {t!r}")


def speech(client):
    """Whisper: an audio zip trained through `client.fine_tuning`, then
    `client.audio.transcriptions.create` on the base model and on the fine-tune."""
    import io
    import zipfile
    from pathlib import Path

    ref = Path(__file__).resolve().parent.parent / "tests/fixtures/tiny-whisper-asr-ref"
    zipped = (ref / "train.zip").read_bytes()
    train = client.files.create(file=("speech.zip", zipped), purpose="fine-tune")
    check(train.status == "processed" and getattr(train, "format", None) == "audio_transcripts",
          f"an audio zip is processed as audio_transcripts ({train.status}, {train.status_details})")
    job = client.fine_tuning.jobs.create(
        model="tiny-whisper-asr", training_file=train.id, suffix="asr",
        extra_body={"task": "speech_recognition", "language": "en",
                    "hyperparameters": {"n_epochs": 2, "batch_size": 2, "learning_rate": 1e-2}})
    job = finished(client, job.id, 300)
    check(job.status == "succeeded", f"a speech_recognition job succeeds ({job.status}, {job.error})")
    wav = zipfile.ZipFile(io.BytesIO(zipped)).read("clip0.wav")
    for model in ["tiny-whisper-asr", job.fine_tuned_model]:
        t = client.audio.transcriptions.create(model=model, file=("clip0.wav", wav), language="en")
        check(isinstance(t.text, str), f"audio.transcriptions.create on {model} -> {t.text[:40]!r}")
        text = client.audio.transcriptions.create(model=model, file=("clip0.wav", wav),
                                                  language="en", response_format="text")
        check(isinstance(text, str) and text == t.text, "response_format text is the same text")
        v = client.audio.transcriptions.create(model=model, file=("clip0.wav", wav),
                                               language="en", response_format="verbose_json")
        check(v.text == t.text and v.language == "english" and 0.5 < v.duration < 2.0
              and len(v.segments) == 1, f"verbose_json: language, duration {v.duration}, one segment")
        seg = v.segments[0]
        check(seg.avg_logprob <= 0 and seg.compression_ratio > 0 and 0 <= seg.no_speech_prob <= 1,
              f"verbose_json segment fields the client types: {seg.avg_logprob:.3f}, "
              f"{seg.compression_ratio:.2f}, {seg.no_speech_prob:.3f}")
    try:
        client.audio.transcriptions.create(model="tiny-llama", file=("clip0.wav", wav))
        check(False, "a text model refuses transcriptions")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "model", "a text model refuses transcriptions (400 on model)")
    try:
        client.audio.transcriptions.create(model="tiny-whisper-asr", file=("x.wav", b"not audio"))
        check(False, "undecodable audio is refused")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "file", "undecodable audio is a 400 on file")


def fine_tuning(client):
    """A LoRA job on the tiny fixture model, through `client.fine_tuning`."""
    import io
    import zipfile

    import openai

    train = client.files.create(file=("ft.jsonl", chat_jsonl(12, "ft")), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=train.id,
        suffix="oai",
        extra_body={"hyperparameters": {"n_epochs": 1, "batch_size": 2, "lora_r": 4, "lora_alpha": 8,
                                        "lora_target_modules": "all-linear", "max_steps": 6,
                                        "checkpoint_interval": 3}},
    )
    check(job.id.startswith("ftjob-") and job.object == "fine_tuning.job", f"fine_tuning.jobs.create -> {job.id}")
    check(job.status in ("queued", "running"), f"a new job is queued ({job.status})")
    check(job.hyperparameters.lora_r == 4, "LoRA extensions came back in hyperparameters")
    with_key = client.fine_tuning.jobs.create(model="tiny-llama", training_file=train.id,
                                              extra_body={"hyperparameters": {"max_steps": 1}},
                                              extra_headers={"Idempotency-Key": "oai-test-1"})
    again = client.fine_tuning.jobs.create(model="tiny-llama", training_file=train.id,
                                           extra_body={"hyperparameters": {"max_steps": 1}},
                                           extra_headers={"Idempotency-Key": "oai-test-1"})
    check(again.id == with_key.id, "a retried create with the same Idempotency-Key returns the same job")
    job = finished(client, job.id, 120)
    check(job.status == "succeeded", f"fine_tuning.jobs.retrieve until succeeded ({job.status}, {job.error})")
    check(job.fine_tuned_model == f"ft:tiny-llama:oai:{job.id}", f"fine_tuned_model {job.fine_tuned_model}")
    events = client.fine_tuning.jobs.list_events(job.id, limit=100)
    msgs = [e.message for e in events.data]
    check(msgs[0] == "The job has successfully completed", "list_events, newest first")
    check(any(m.startswith("Step 6/6: training loss=") for m in msgs), "metrics events per step")
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id)
    check([c.step_number for c in ckpts.data] == [3], "checkpoints.list")
    check(len(job.result_files) == 2, "result_files: metrics CSV and adapter zip")
    z = zipfile.ZipFile(io.BytesIO(client.files.content(job.result_files[1]).read()))
    # The PEFT folder, and the LoRA GGUF llama.cpp loads (a llama model's adapter has one).
    check(sorted(z.namelist()) == ["README.md", "adapter_config.json", "adapter_model.gguf",
                                   "adapter_model.safetensors"],
          "files.content of the adapter zip")
    check(json_load(z.read("adapter_config.json"))["peft_type"] == "LORA", "the zip holds a PEFT adapter")
    reply = client.chat.completions.create(model=job.fine_tuned_model, temperature=0, max_tokens=8,
                                           messages=[{"role": "user", "content": "hello"}])
    text = reply.choices[0].message.content
    check(isinstance(text, str) and reply.usage.completion_tokens > 0,
          f"chat.completions.create on the fine-tuned model: {text!r}")
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=job.fine_tuned_model, temperature=0, max_tokens=8, stream=True,
        messages=[{"role": "user", "content": "hello"}]) if c.choices]
    check("".join(pieces) == text and len(pieces) > 1, "stream=True: chunks that add up to the same text")
    base = client.completions.create(model="tiny-llama", prompt="hello", max_tokens=4, temperature=0)
    check(isinstance(base.choices[0].text, str), "completions.create on the base model")
    listed = [j.id for j in client.fine_tuning.jobs.list(limit=10)]
    check(job.id in listed, "fine_tuning.jobs.list")
    try:
        client.fine_tuning.jobs.create(model="no-such-model", training_file=train.id)
        check(False, "an unknown model is refused")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "model", "an unknown model raises BadRequestError naming the param")
    gone = client.models.delete(job.fine_tuned_model)
    check(gone.deleted and gone.id == job.fine_tuned_model, "models.delete of the fine-tuned model")
    check(job.fine_tuned_model not in [m.id for m in client.models.list()], "a deleted model is not listed")
    try:
        client.chat.completions.create(model=job.fine_tuned_model, max_tokens=2,
                                       messages=[{"role": "user", "content": "hello"}])
        check(False, "a deleted model is not served")
    except openai.NotFoundError:
        check(True, "a deleted model is not served (NotFoundError)")
    check(client.files.retrieve(job.result_files[1]).id == job.result_files[1], "its result files stay")
    m = ckpts.data[0].metrics
    check(m.step == 3 and isinstance(m.train_loss, float) and hasattr(m, "full_valid_loss"),
          f"checkpoint metrics in OpenAI's names: {m}")
    methods(client, train)


def methods(client, train):
    """OpenAI's `method`: supervised as its own block, DPO on a preference file, reinforcement refused,
    and jobs found again by their metadata."""
    import openai

    sup = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=train.id, metadata={"team": "search", "run": "sup"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "auto", "batch_size": "auto"}}},
        extra_body={"method": {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": "auto", "batch_size": "auto", "max_steps": 1, "lora_r": 2}}}})
    hp = sup.method.supervised.hyperparameters
    check(sup.method.type == "supervised" and (hp.n_epochs, hp.batch_size) == (8, 1),
          f"method supervised is taken from its own block, \"auto\" resolved for 12 examples: {sup.method}")
    check(sup.hyperparameters.lora_r == 2, "LoRA keys under method.supervised.hyperparameters")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "preference.jsonl")
    with open(path, "rb") as f:
        pairs = client.files.create(file=("preference.jsonl", f.read()), purpose="fine-tune")
    check(pairs.status == "processed" and getattr(pairs, "format", None) == "preference",
          f"a preference file is recognised ({pairs.status}, {getattr(pairs, 'format', None)})")
    try:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=pairs.id)
        check(False, "preference pairs are refused for a supervised job")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "training_file", "preference pairs are refused for a supervised job")
    dpo = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=pairs.id, metadata={"team": "search", "run": "dpo"},
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
        extra_body={"method": {"type": "dpo", "dpo": {"hyperparameters": {
            "beta": 0.2, "batch_size": 2, "max_steps": 4, "learning_rate": 1e-2, "lr_scheduler": "constant",
            "lora_r": 4, "checkpoint_interval": 2}}}})
    check(dpo.method.type == "dpo" and dpo.method.dpo.hyperparameters.beta == 0.2,
          f"a DPO job keeps its method and beta: {dpo.method}")
    try:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=train.id,
                                       method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}})
        check(False, "a chat file is refused for a DPO job")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "training_file", "a chat file is refused for a DPO job")
    try:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=train.id,
                                       extra_body={"method": {"type": "reinforcement", "reinforcement": {}}})
        check(False, "reinforcement is refused")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "method.type" and "reinforcement" in e.message,
              f"reinforcement raises BadRequestError naming method.type: {e.message}")
    dpo = finished(client, dpo.id, 300)
    check(dpo.status == "succeeded", f"the DPO job trains ({dpo.status}, {dpo.error})")
    msgs = [e.message for e in client.fine_tuning.jobs.list_events(dpo.id, limit=100).data]
    check(any(m.startswith("Step 1/4: training loss=0.6931, reward margin=0.0000, reward accuracy=0.000")
              for m in msgs), "DPO's step 1 is ln 2 with no margin")
    check(any("reward accuracy" in m for m in msgs if m.startswith("Step 4/4")), "reward metrics in the events")
    tagged = [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "search"})]
    check(sorted(tagged) == sorted([sup.id, dpo.id]), "jobs.list(metadata=...) finds the jobs tagged so")
    only = [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "search", "run": "dpo"})]
    check(only == [dpo.id], "every metadata pair must match")


def json_load(b):
    import json

    return json.loads(b)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # any failure, including connection errors
        print(f"FAIL {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
