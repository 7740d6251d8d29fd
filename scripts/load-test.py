#!/usr/bin/env python3
"""Latency of a loraforge server while it trains: `GET /v1/fine_tuning/jobs/{id}` at a fixed
request rate (open loop: requests are sent on schedule, not after the previous answer), on
a pool of keep-alive connections. Prints p50/p90/p99/max latency and the error count.

    python3 scripts/load-test.py --base http://127.0.0.1:8080 --job ftjob-... --rps 200 --seconds 20

Standard library only (asyncio streams), so it runs anywhere Python 3.9+ does. Start a long
job first (`scripts/load-test.sh` does all of it: server, model, data, job, this script).
"""
import argparse
import asyncio
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--key", default=None)
    ap.add_argument("--rps", type=float, default=200)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--connections", type=int, default=32)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
