"""What the API demonstrations share (digits_demo.py, speech_demo.py, beside it): a
`loraforge serve` of their own on a free port, JSON calls, and a finished job's events."""
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request


@contextlib.contextmanager
def serve(binary, work, *flags):
    """Runs `binary serve` on a free port with `work`/data and `work`/models, the
    caller's database, key and storage settings left out; yields its base URL."""
    stdout = open(os.path.join(work, "serve.out"), "w+")
    env = {k: v for k, v in os.environ.items()
           if k not in ("LORAFORGE_DATABASE_URL", "LORAFORGE_API_KEY", "LORAFORGE_STORAGE_URL")}
    server = subprocess.Popen(
        [binary, "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir",
         os.path.join(work, "data"), "--models-dir", os.path.join(work, "models"),
         "--train-threads", str(os.cpu_count() or 2), *flags],
        stdout=stdout, stderr=open(os.path.join(work, "serve.log"), "w"), env=env)
    try:
        base = None
        for _ in range(300):
            stdout.seek(0)
            for line in stdout.read().splitlines():
                if line.startswith("loraforge listening on "):
                    base = line.split(" on ", 1)[1].strip()
            if base:
                break
            time.sleep(0.1)
        if not base:
            sys.exit("the server did not start; see serve.log")
        yield base
    finally:
        server.terminate()
        server.wait()


def call(base, method, path, body=None, ctype="application/json"):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": ctype} if data is not None else {})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def finished(base, job_id, poll=2):
    """The job once it has ended; exits unless it succeeded."""
    while True:
        j = call(base, "GET", f"/v1/fine_tuning/jobs/{job_id}")
        if j["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(poll)
    if j["status"] != "succeeded":
        sys.exit(f"job {j['status']}: {j['error']}")
    return j


def events(base, job_id):
    """Every event of a job, all pages, newest first."""
    out, after = [], None
    while True:
        page = call(base, "GET", f"/v1/fine_tuning/jobs/{job_id}/events?limit=100"
                    + (f"&after={after}" if after else ""))
        out += page["data"]
        if not page.get("has_more") or not page["data"]:
            return out
        after = page["data"][-1]["id"]


def upload(base, path):
    """Uploads a zip for fine-tuning, prints what the server made of it, and returns its
    id; exits unless it was processed."""
    name = os.path.basename(path)
    with open(path, "rb") as f:
        r = call(base, "POST", f"/v1/files?purpose=fine-tune&filename={name}", f.read(),
                 "application/zip")
    print(f"{name}: {r['format']}, {r['status']}: {r['status_details']}", flush=True)
    if r["status"] != "processed":
        sys.exit(1)
    return r["id"]
