"""Load test of `matryoshka serve` on loopback: concurrency 1 / 8 / 32, latency percentiles, pairs/s, errors, RSS.

    python -m benchmarks.bench_server [--models models/onnx] [--requests 48] [--texts 8] [--exit-layer 8]

Starts the server as a subprocess on a free 127.0.0.1 port, sends a bounded number of /rerank
requests (real SciFact query-passage pairs) at each concurrency, and stops the server. Prints per
concurrency: p50 / p99 request latency, pairs scored per second, the error count (must be 0), and
the server's resident memory before and after (no growth expected once every config is loaded).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.common import scifact_pairs

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def burst(url: str, bodies: list[dict], concurrency: int) -> tuple[list[float], int]:
    latencies, errors = [], 0
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(body):
            nonlocal errors
            async with semaphore:
                start = time.perf_counter()
                response = await client.post(f"{url}/rerank", json=body)
                latencies.append(time.perf_counter() - start)
                errors += response.status_code != 200
        await asyncio.gather(*[one(b) for b in bodies])
    return latencies, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=str(ROOT / "models" / "onnx"))
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--texts", type=int, default=8, help="texts per request")
    parser.add_argument("--exit-layer", type=int, default=None)
    parser.add_argument("--ratio", type=int, default=1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "matryoshka_reranker.cli", "serve", "--models", args.models,
                               "--port", str(port), "--max-queue", "256"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        pairs = scifact_pairs(args.requests * args.texts)
        bodies = [{"query": pairs[i * args.texts][0], "texts": [p for _, p in pairs[i * args.texts:(i + 1) * args.texts]],
                   "truncate": True, **({"exit_layer": args.exit_layer} if args.exit_layer else {}),
                   "ratio": args.ratio} for i in range(args.requests)]
        asyncio.run(burst(url, bodies[:2], 1))  # load the session
        print(f"# {args.models}: {args.requests} requests x {args.texts} texts per concurrency level, "
              f"exit {args.exit_layer or 'default'}, ratio {args.ratio}, loopback, {os.cpu_count()} CPUs")
        print(f"{'concurrency':>11s} {'p50 ms':>8s} {'p99 ms':>8s} {'pairs/s':>8s} {'errors':>6s} "
              f"{'RSS before MB':>14s} {'RSS after MB':>13s}")
        for concurrency in args.concurrency:
            before = rss_mb(server.pid)
            start = time.perf_counter()
            latencies, errors = asyncio.run(burst(url, bodies, concurrency))
            wall = time.perf_counter() - start
            after = rss_mb(server.pid)
            ordered = sorted(latencies)
            p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
            print(f"{concurrency:>11d} {1000 * statistics.median(ordered):8.0f} {1000 * p99:8.0f} "
                  f"{args.requests * args.texts / wall:8.1f} {errors:>6d} {before:14.0f} {after:13.0f}")
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
