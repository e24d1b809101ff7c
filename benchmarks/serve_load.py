"""Load test of `neoxko serve`: N concurrent clients against a local server, the built-in model by default.

Starts the server as a subprocess (so clients and server do not share one interpreter), then for each
concurrency level runs that many client threads, each sending completions back to back until the
level's requests are done. Prints requests/s, generated tokens/s, latency p50/p99, the speedup of
throughput over one client at a time (the sequential baseline), and failures (there should be none).

    python benchmarks/serve_load.py [--model ko-small] [--levels 1,4,16,64] [--requests 64] [--max-tokens 64]
"""

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

PROMPTS = ["대한민국의 수도는", "오늘 날씨가 좋아서", "이 영화는 정말", "국회는 법률안을", "대법원은 원심 판결을",
           "청원인은 다음과 같이", "민법 제1조에 따르면", "우리 동네에는"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
    sys.exit("the server did not come up")


def complete(port: int, body: dict) -> tuple[int, float, int]:
    """(status, seconds, completion tokens) of one request."""
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    tokens = payload.get("usage", {}).get("completion_tokens", 0) if response.status == 200 else 0
    return response.status, time.perf_counter() - t, tokens


def run_level(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    results, lock, counter = [], threading.Lock(), iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            body = {"prompt": PROMPTS[n % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8, "top_k": 40,
                    "seed": n}
            try:
                outcome = complete(port, body)
            except OSError as e:
                outcome = (f"{type(e).__name__}", 0.0, 0)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r[0] == 200]
    latencies = sorted(r[1] for r in ok)
    failures = sorted({str(r[0]) for r in results if r[0] != 200})
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok), "why": failures,
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r[2] for r in ok) / wall,
            "p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ko-small")
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (the sequential level: 16)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--extra", default="", help="more `neoxko serve` arguments, e.g. '--quantize int8'")
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "-m", "neoxko", "serve", "--model", args.model, "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-queue", "1024", *args.extra.split()]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(port, proc)
        complete(port, {"prompt": "워밍업", "max_tokens": 4})
        print(f"model {args.model}, max_tokens {args.max_tokens}, server --max-batch {args.max_batch} {args.extra}\n")
        print("| clients | requests | failed | requests/s | tokens/s | p50 s | p99 s | speedup over sequential |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        base = None
        for clients in map(int, args.levels.split(",")):
            requests = 16 if clients == 1 else max(args.requests, clients)
            r = run_level(port, clients, requests, args.max_tokens)
            base = base or r["tokens_per_s"]
            print(f"| {clients} | {r['requests']} | {r['failed']} | {r['requests_per_s']:.2f} | "
                  f"{r['tokens_per_s']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['tokens_per_s'] / base:.2f}x |"
                  + (f" failures: {', '.join(r['why'])}" if r["why"] else ""), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
