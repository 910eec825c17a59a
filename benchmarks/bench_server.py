"""Load test of `matryoshka serve` on loopback: concurrency 1 / 8 / 32, latency percentiles, pairs/s, errors, RSS.

    python -m benchmarks.bench_server [--models models/onnx] [--requests 48] [--texts 8] [--exit-layer 8]
        [--pipeline params.yaml [--dtype auto]]

Starts the server as a subprocess on a free 127.0.0.1 port, sends a bounded number of /rerank
requests (real SciFact query-passage pairs) at each concurrency, and stops the server. Prints per
concurrency: p50 / p99 request latency, pairs scored per second, the error count (must be 0), and
the server's resident memory before and after (no growth expected once every config is loaded).
With ``--pipeline``, a second server runs the PyTorch backend (``serve --pipeline``: the same trained
model, bf16 on AMX CPUs) and each concurrency level runs on both in turn, one after the other (the
idle one waits passively; which goes first alternates from level to level), with the PyTorch / ONNX pairs/s
ratio: one burst each, so a single side-by-side reading, not a median of rounds.
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
    parser.add_argument("--pipeline", default=None, help="params.yaml: also serve the trained model with PyTorch")
    parser.add_argument("--dtype", default=None, help="with --pipeline: auto (default), float32 or bfloat16")
    args = parser.parse_args()

    commands = {"onnx": ["--models", args.models]}
    if args.pipeline:
        commands["pytorch"] = ["--pipeline", args.pipeline, "--ratios", str(args.ratio)] + (
            ["--layers", str(args.exit_layer)] if args.exit_layer else []) + (["--dtype", args.dtype] if args.dtype else [])
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for backend, command in commands.items():
            servers[backend] = start_server(command)
        pairs = scifact_pairs(args.requests * args.texts)
        bodies = [{"query": pairs[i * args.texts][0], "texts": [p for _, p in pairs[i * args.texts:(i + 1) * args.texts]],
                   "truncate": True, **({"exit_layer": args.exit_layer} if args.exit_layer else {}),
                   "ratio": args.ratio} for i in range(args.requests)]
        for _, url in servers.values():
            asyncio.run(burst(url, bodies[:2], 1))  # load the session / warm up
        print(f"# {args.models}{' and ' + args.pipeline + ' (PyTorch)' if args.pipeline else ''}: {args.requests} "
              f"requests x {args.texts} texts per concurrency level, exit {args.exit_layer or 'default'}, "
              f"ratio {args.ratio}, loopback, {os.cpu_count()} CPUs")
        print(f"{'backend':>8s} {'concurrency':>11s} {'p50 ms':>8s} {'p99 ms':>8s} {'pairs/s':>8s} {'vs onnx':>8s} "
              f"{'errors':>6s} {'RSS before MB':>14s} {'RSS after MB':>13s}")
        for level, concurrency in enumerate(args.concurrency):
            rates, rows = {}, {}
            order = list(servers) if level % 2 == 0 else list(servers)[::-1]  # which goes first alternates
            for backend in order:
                server, url = servers[backend]
                before = rss_mb(server.pid)
                start = time.perf_counter()
                latencies, errors = asyncio.run(burst(url, bodies, concurrency))
                wall = time.perf_counter() - start
                after = rss_mb(server.pid)
                ordered = sorted(latencies)
                p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
                rates[backend] = args.requests * args.texts / wall
                rows[backend] = (statistics.median(ordered), p99, errors, before, after)
            for backend in servers:  # printed in the same order every level
                p50, p99, errors, before, after = rows[backend]
                print(f"{backend:>8s} {concurrency:>11d} {1000 * p50:8.0f} {1000 * p99:8.0f} "
                      f"{rates[backend]:8.1f} {rates[backend] / rates['onnx']:7.2f}x {errors:>6d} {before:14.0f} "
                      f"{after:13.0f}", flush=True)
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(60)


def start_server(command: list[str]) -> tuple[subprocess.Popen, str]:
    """``matryoshka serve <command>`` on a free loopback port, once /health answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "matryoshka_reranker.cli", "serve", *command,
                               "--port", str(port), "--max-queue", "256"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"matryoshka serve {' '.join(command)} did not start within 2 minutes")


if __name__ == "__main__":
    main()
