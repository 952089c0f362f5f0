#!/usr/bin/env python
"""`adapterlab serve` throughput: requests/s and generated tokens/s with 1 and 4 concurrent clients.

    python bench/serve_bench.py ARTIFACT                   # 8 requests per level, 32 new tokens each
    python bench/serve_bench.py ARTIFACT --requests 16 --max-tokens 64 --concurrency 1,2,4,8
    python bench/serve_bench.py                            # the newest verified artifact under outputs/

The server is started as a real process (`python -m adapterlab.cli serve`, on a free 127.0.0.1 port) and asked
through the official `openai` client, one thread per client, each sending chat completions (greedy, `max_tokens`
fixed) one after the other until the level's requests are done. Per level it prints requests/s and completion
tokens/s over the wall time of the level, and the median and 95th-percentile latency of a request; at 1 client it
also measures the time to the first streamed token.

The server answers one request at a time (one model in memory, the active adapter is model state), so more clients
mean more waiting, not more throughput: the 4-client figures show what queueing costs, and the latency column is the
one a user feels. The machine this runs on is shared in development: compare figures only within one run.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = [f"Return a JSON object with the keys \"name\", \"age\", \"city\" and \"job\" for this text: {t}" for t in (
    "Mara Kohl, 44, is a teacher in Bern.", "Tom Berg, 29, is a welder in Malmo.", "Ines Vidal, 61, is a judge in Lyon.",
    "Omar Haddad, 35, is a chemist in Amman.", "Lena Novak, 23, is a barista in Zagreb.",
    "Kenji Mori, 57, is a potter in Kyoto.", "Sara Lind, 40, is an architect in Oslo.", "Raul Ortiz, 32, is a nurse in Cusco.")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifacts: list[str], port: int, log: Path) -> subprocess.Popen:
    import httpx
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "adapterlab.cli", "serve", *artifacts, "--port", str(port),
                                 "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"adapterlab serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    sys.exit("adapterlab serve did not become healthy in 15 minutes")


def level(client, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    "`requests` chat completions spread over `clients` threads; wall time, latencies, tokens."
    latencies, tokens, lock = [], [], threading.Lock()
    todo = iter(range(requests))

    def worker():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            t0 = time.perf_counter()
            r = client.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0,
                                               messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens.append(r.usage.completion_tokens)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads: t.start()
    for t in threads: t.join()
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "wall_s": wall, "req_per_s": len(lat) / wall,
            "tok_per_s": sum(tokens) / wall, "tokens": sum(tokens), "p50_s": statistics.median(lat),
            "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]}


def first_token_s(client, model: str, max_tokens: int) -> float:
    t0 = time.perf_counter()
    for chunk in client.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": PROMPTS[0]}]):
        if chunk.choices and chunk.choices[0].delta.content:
            return time.perf_counter() - t0
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifacts", nargs="*", metavar="[NAME=]ARTIFACT")
    ap.add_argument("--requests", type=int, default=8, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4", help="comma list of client counts")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import openai
    import torch
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="serve-bench-")) / "server.log"
    t0 = time.perf_counter()
    proc = start_server(args.artifacts, port, log)
    startup = time.perf_counter() - t0
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=900)
        model = next(m.id for m in client.models.list().data if m.id != "base") if len(client.models.list().data) > 1 else "base"
        client.chat.completions.create(model=model, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])  # warm-up
        print(f"adapterlab serve: model `{model}`, {args.requests} greedy chat completions per level, max_tokens "
              f"{args.max_tokens}; server ready in {startup:.1f}s; {os.cpu_count()} CPU(s), torch threads "
              f"{torch.get_num_threads()}, load average at start {os.getloadavg()[0]:.1f}")
        print(f"time to first streamed token (1 client): {first_token_s(client, model, args.max_tokens):.2f}s")
        print("| clients | requests | wall s | requests/s | completion tokens/s | p50 latency s | p95 latency s |")
        print("|---|---|---|---|---|---|---|")
        for c in (int(x) for x in args.concurrency.split(",")):
            r = level(client, model, c, args.requests, args.max_tokens)
            print(f"| {r['clients']} | {r['requests']} | {r['wall_s']:.1f} | {r['req_per_s']:.3f} | {r['tok_per_s']:.2f} "
                  f"| {r['p50_s']:.2f} | {r['p95_s']:.2f} |", flush=True)
        print(f"load average at end {os.getloadavg()[0]:.1f}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
