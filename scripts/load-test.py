#!/usr/bin/env python3
"""Latency of a loraforge server while it trains, in one of two phases.

`--phase get` (default): `GET /v1/fine_tuning/jobs/{id}` at a fixed request rate (open loop:
requests are sent on schedule, not after the previous answer), on a pool of keep-alive
connections. Prints p50/p90/p99/max latency and the error count.

    python3 scripts/load-test.py --base http://127.0.0.1:8080 --job ftjob-... --rps 200 --seconds 20

`--phase sse`: `--subscribers` concurrent SSE streams of the job's events for `--seconds`.
Each metrics event carries `data.created_at_ms` (the worker's clock when it wrote the event;
client and server share the machine, so the same clock); an event's delivery latency to a
subscriber is the time its last byte was read minus that. Prints p50/p99/max over every
(event, subscriber) pair of the metrics events made once all streams were open, and checks
each subscriber against the job's event list (`GET .../events`): missed, duplicated or
out-of-order events are counted.

    python3 scripts/load-test.py --phase sse --base http://127.0.0.1:8080 --job ftjob-... \
        --subscribers 1000 --seconds 30

Standard library only (asyncio streams), so it runs anywhere Python 3.9+ does. Start a long
job first (`scripts/load-test.sh` does all of it: server, model, data, job, this script).
"""
import argparse
import asyncio
import bisect
import json
import statistics
import time
import urllib.parse


class Conn:
    def __init__(self, host, port, key):
        self.host, self.port, self.key = host, port, key
        self.r = self.w = None

    async def get(self, path):
        if self.w is None:
            self.r, self.w = await asyncio.open_connection(self.host, self.port)
        auth = f"Authorization: Bearer {self.key}\r\n" if self.key else ""
        self.w.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n{auth}\r\n".encode())
        await self.w.drain()
        status = int((await self.r.readline()).split()[1])
        length = 0
        while True:
            line = await self.r.readline()
            if line in (b"\r\n", b""):
                break
            k, _, v = line.decode().partition(":")
            if k.lower() == "content-length":
                length = int(v)
        body = await self.r.readexactly(length)
        return status, body


async def run(args):
    u = urllib.parse.urlparse(args.base)
    path = f"/v1/fine_tuning/jobs/{args.job}"
    pool = asyncio.Queue()
    for _ in range(args.connections):
        pool.put_nowait(Conn(u.hostname, u.port or 80, args.key))
    lat, errors, steps = [], 0, []

    async def one():
        nonlocal errors
        c = await pool.get()
        t = time.perf_counter()
        try:
            st, body = await c.get(path)
            lat.append(time.perf_counter() - t)
            if st != 200:
                errors += 1
            else:
                p = json.loads(body).get("progress") or {}
                steps.append(p.get("step"))
        except Exception:
            errors += 1
            c.w = None
        finally:
            pool.put_nowait(c)

    n = int(args.rps * args.seconds)
    t0 = time.perf_counter()
    tasks = []
    for i in range(n):
        due = t0 + i / args.rps
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    took = time.perf_counter() - t0
    lat.sort()
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1000  # noqa: E731
    seen = [s for s in steps if s is not None]
    print(f"{n} GET {path} in {took:.1f} s ({n / took:.0f}/s offered {args.rps}/s); errors {errors}")
    print(f"latency ms: p50 {q(0.5):.2f}  p90 {q(0.9):.2f}  p99 {q(0.99):.2f}  max {lat[-1] * 1000:.2f}  "
          f"mean {statistics.mean(lat) * 1000:.2f}")
    if seen:
        print(f"the job trained from step {min(seen)} to {max(seen)} meanwhile")
    print("RESULT " + json.dumps({"requests": n, "errors": errors, "p50_ms": q(0.5), "p99_ms": q(0.99),
                                  "max_ms": lat[-1] * 1000, "steps": [min(seen), max(seen)] if seen else None}))


async def open_stream(host, port, path, key, last_id):
    """Opens one SSE stream; returns the reader once the response headers are in, and
    whether the body is chunked."""
    r, w = await asyncio.open_connection(host, port)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    w.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
            f"Last-Event-ID: {last_id}\r\n{auth}\r\n".encode())
    await w.drain()
    status = int((await r.readline()).split()[1])
    if status != 200:
        raise RuntimeError(f"stream answered {status}")
    chunked = False
    while True:
        line = await r.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode().partition(":")
        if k.lower() == "transfer-encoding" and "chunked" in v.lower():
            chunked = True
    return r, w, chunked


def dechunk(raw):
    """The body of a chunked response, and (payload offset, raw offset, length) per chunk."""
    payload, segs, i = bytearray(), [], 0
    while True:
        j = raw.find(b"\r\n", i)
        if j < 0:
            break
        size = int(raw[i:j].split(b";")[0], 16)
        if size == 0:
            break
        start = j + 2
        part = raw[start:start + size]
        segs.append((len(payload), start, len(part)))
        payload += part
        i = start + size + 2
    return bytes(payload), segs


def parse_stream(reads, chunked):
    """Events of one subscriber from its timestamped reads: a list of (id, type, data, ms),
    ms being the wall-clock time the read that completed the event returned."""
    raw = b"".join(d for _, d in reads)
    ends, n = [], 0  # raw offset just after each read
    for _, d in reads:
        n += len(d)
        ends.append(n)
    if chunked:
        payload, segs = dechunk(raw)
        starts = [s[0] for s in segs]
    else:
        payload, segs, starts = raw, None, None

    def when(q):  # payload offset -> time of the read that delivered that byte
        if segs is not None:
            k = bisect.bisect_right(starts, q) - 1
            ps, rs, _ = segs[k]
            q = rs + (q - ps)
        return reads[bisect.bisect_right(ends, q)][0]

    events, pos = [], 0
    while True:
        end = payload.find(b"\n\n", pos)
        if end < 0:
            break
        block = payload[pos:end].decode()
        pos = end + 2
        ev = {}
        for line in block.split("\n"):
            k, _, v = line.partition(":")
            ev[k] = v[1:] if v.startswith(" ") else v
        if "id" in ev:
            events.append((int(ev["id"]), ev.get("event", "message"), ev.get("data", ""), when(end + 1)))
    return events


async def run_sse(args):
    u = urllib.parse.urlparse(args.base)
    host, port = u.hostname, u.port or 80
    path = f"/v1/fine_tuning/jobs/{args.job}/events"
    c = Conn(host, port, args.key)
    st, body = await c.get(f"{path}?limit=1")
    newest = json.loads(body)["data"]
    last_id = int(newest[0]["id"].removeprefix("ftevent-")) if newest else 0

    reads = [[] for _ in range(args.subscribers)]
    chunked = [False] * args.subscribers
    opened, failed = asyncio.Event(), {}
    gate = asyncio.Semaphore(100)  # connect in waves: no SYN backlog overflow on the server
    n_open = 0

    async def subscriber(i):
        nonlocal n_open
        try:
            async with gate:
                r, w, chunked[i] = await open_stream(host, port, f"{path}?stream=true", args.key, last_id)
        except Exception as e:  # noqa: BLE001
            failed[i] = repr(e)
            r = None
        n_open += 1
        if n_open == args.subscribers:
            opened.set()
        if r is None:
            return
        out = reads[i]
        try:
            while True:
                d = await r.read(65536)
                # Only the timestamp here: parsing waits until the end, so the client's
                # own work does not delay the reads of the other 999 streams.
                out.append((time.time() * 1000, d))
                if not d:
                    return
        finally:
            w.close()

    tasks = [asyncio.create_task(subscriber(i)) for i in range(args.subscribers)]
    await opened.wait()
    t_open = time.time() * 1000
    print(f"{args.subscribers - len(failed)} of {args.subscribers} SSE streams open"
          + (f"; {len(failed)} failed, e.g. {next(iter(failed.values()))}" if failed else ""))
    await asyncio.sleep(args.seconds)
    t_end = time.time() * 1000
    await asyncio.sleep(args.grace)  # events made just before t_end are still on their way
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    # The reference: every metrics event the job's list has, made while all streams were open.
    st, body = await c.get(f"{path}?limit=1000")
    listed = json.loads(body)["data"]
    want = {}
    for e in listed:
        ms = (e.get("data") or {}).get("created_at_ms")
        if e["type"] == "metrics" and ms is not None and t_open <= ms <= t_end:
            want[int(e["id"].removeprefix("ftevent-"))] = ms
    lat, missed, dup, disorder = [], 0, 0, 0
    subs = args.subscribers - len(failed)
    for i in range(args.subscribers):
        if i in failed:
            continue
        evs = parse_stream([x for x in reads[i] if x[1]], chunked[i])
        ids = [e[0] for e in evs]
        dup += len(ids) - len(set(ids))
        disorder += sum(1 for a, b in zip(ids, ids[1:]) if b <= a)
        got = {e[0]: e[3] for e in evs}
        for eid, ms in want.items():
            if eid in got:
                lat.append(got[eid] - ms)
            else:
                missed += 1
    lat.sort()
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))]  # noqa: E731
    print(f"{len(want)} metrics events in {(t_end - t_open) / 1000:.1f} s x {subs} subscribers = "
          f"{len(lat)} deliveries; missed {missed}, duplicated {dup}, out of order {disorder}")
    if lat:
        print(f"delivery latency ms (receive - created_at_ms): p50 {q(0.5):.1f}  p90 {q(0.9):.1f}  "
              f"p99 {q(0.99):.1f}  max {lat[-1]:.1f}  min {lat[0]:.1f}")
    print("RESULT " + json.dumps({"events": len(want), "subscribers": subs, "deliveries": len(lat),
                                  "missed": missed, "duplicated": dup, "out_of_order": disorder,
                                  "p50_ms": q(0.5) if lat else None, "p99_ms": q(0.99) if lat else None,
                                  "max_ms": lat[-1] if lat else None}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--key", default=None)
    ap.add_argument("--rps", type=float, default=200)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--phase", choices=["get", "sse"], default="get")
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--grace", type=float, default=2, help="seconds streams stay open after the window")
    args = ap.parse_args()
    asyncio.run(run(args) if args.phase == "get" else run_sse(args))


if __name__ == "__main__":
    main()
