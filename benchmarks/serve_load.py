"""Load test of `neoxko serve`: concurrent clients against a local server, the built-in model by default.

Starts the server as a subprocess (clients and server do not share an interpreter). Part 1: for each
completion length (24 and 128 tokens) and each concurrency level, that many client threads send
completions back to back; level 1 is the same requests sent one after another, the baseline of the
speedup. Prints requests/s, tokens/s, latency p50/p99 and failures (there should be none).

Part 2, a long prompt arriving while streams decode: 8 clients stream 128-token completions; then a
1,500-token prompt arrives, and right after it a short one. Prints the long prompt's time to first token,
the short one's, and the longest gap between two tokens of the running streams, for chunked prefill
(--prefill-chunk 128, 256 (the default), 512) and for the whole prompt in one forward. ko-small's context is 512
tokens, so this part serves a model of ko-small's shape with a 2,048-token context and random weights
(the time of a forward does not depend on the weights).

    python benchmarks/serve_load.py [--model ko-small] [--levels 1,4,16,64] [--lengths 24,128] [--skip-long]
"""

import argparse
import dataclasses
import http.client
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

PROMPTS = ["대한민국의 수도는", "오늘 날씨가 좋아서", "이 영화는 정말", "국회는 법률안을", "대법원은 원심 판결을",
           "청원인은 다음과 같이", "민법 제1조에 따르면", "우리 동네에는"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, *extra: str):
        self.port = free_port()
        command = [sys.executable, "-m", "neoxko", "serve", "--model", model, "--port", str(self.port),
                   "--max-queue", "1024", *extra]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"the server exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        else:
            sys.exit("the server did not come up")
        complete(self.port, {"prompt": "워밍업", "max_tokens": 4})

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def complete(port: int, body: dict) -> tuple:
    """(status, seconds, completion tokens) of one request."""
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    tokens = payload.get("usage", {}).get("completion_tokens", 0) if response.status == 200 else 0
    return response.status, time.perf_counter() - t, tokens


def stream(port: int, body: dict) -> list[float]:
    """The arrival time of each token event of a streamed completion."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body | {"stream": True}),
                 headers={"Content-Type": "application/json"})
    response, times = conn.getresponse(), []
    for line in response:
        if line.startswith(b"data: {"):
            times.append(time.perf_counter())
    conn.close()
    return times


def run_clients(client, clients: int) -> float:
    """Run client() in that many threads at once; the seconds until the last is done."""
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def run_level(port: int, clients: int, requests: int, max_tokens: int, models: list[str] | None = None,
              extra: dict | None = None) -> dict:
    """models: request n names models[n % len(models)] (adapters); extra: more request fields."""
    results, lock, counter = [], threading.Lock(), iter(range(requests))

    def client() -> None:
        while (n := next(counter, None)) is not None:
            # temperature 0.8 with its own seed, and no end of text: every request makes max_tokens tokens
            body = {"prompt": PROMPTS[n % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8, "top_k": 40,
                    "seed": n, "ignore_eos": True} | ({"model": models[n % len(models)]} if models else {}) | \
                (extra or {})
            try:
                outcome = complete(port, body)
            except OSError as e:
                outcome = (type(e).__name__, 0.0, 0)
            with lock:
                results.append(outcome)

    wall = run_clients(client, clients)
    ok = [r for r in results if r[0] == 200]
    latencies = sorted(r[1] for r in ok) or [float("nan")]
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok),
            "why": sorted({str(r[0]) for r in results if r[0] != 200}), "requests_per_s": len(ok) / wall,
            "tokens_per_s": sum(r[2] for r in ok) / wall, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def load_table(args) -> None:
    server = Server(args.model, "--max-batch", str(args.max_batch), *args.extra.split())
    try:
        print(f"\n## Throughput: {args.model}, server --max-batch {args.max_batch} {args.extra}\n")
        print("| tokens | clients | requests | failed | requests/s | tokens/s | p50 s | p99 s | p99/p50 | speedup over "
              "sequential |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for length in map(int, args.lengths.split(",")):
            base = None
            for clients in map(int, args.levels.split(",")):
                requests = args.sequential if clients == 1 else max(args.requests, 2 * clients)
                r = run_level(server.port, clients, requests, length)
                base = base or r["tokens_per_s"]
                print(f"| {length} | {clients} | {r['requests']} | {r['failed']} | {r['requests_per_s']:.2f} | "
                      f"{r['tokens_per_s']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['p99'] / r['p50']:.2f} | "
                      f"{r['tokens_per_s'] / base:.1f}x |" + (f" failures: {', '.join(r['why'])}" if r["why"] else ""),
                      flush=True)
    finally:
        server.close()


def make_adapters(base: str, tmp: Path, count: int) -> list[Path]:
    """count LoRA adapters on all four kinds of linear layer (ranks 8 and 16), random A and B, in peft's format."""
    import torch

    from neoxko.checkpoint import load_model
    from neoxko.finetune.lora import TARGETS, LoraSettings, apply_lora, is_lora_key, save_adapter

    folders = []
    for i in range(count):
        torch.manual_seed(i)
        model = load_model(base, dtype="float32")
        settings = LoraSettings(r=8 * (1 + i % 2), alpha=16, dropout=0, targets=TARGETS)
        apply_lora(model, settings)
        state = {name: torch.randn_like(t) * 0.02 for name, t in model.state_dict().items() if is_lora_key(name)}
        folders.append(save_adapter(state, settings, tmp / f"adapter{i}", base))
    return folders


def lora_table(args) -> None:
    """4 adapters served unmerged (each request names one) against one merged model, at 16 clients."""
    from neoxko.checkpoint import load_model, resolve, save_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapters = make_adapters(args.model, tmp, 4)
        merged = tmp / "merged"
        save_model(load_model(args.model, adapter=adapters[0]), merged)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (resolve(args.model) / name).exists():
                shutil.copy(resolve(args.model) / name, merged / name)
        print(f"\n## 4 LoRA adapters unmerged vs 1 merged model: {args.model}, 16 clients, {args.lora_requests} "
              f"requests of {args.lora_tokens} tokens, --max-batch {args.max_batch}\n")
        print("| served | requests name | tokens/s | p50 s | p99 s | failed | vs merged |")
        print("|---|---|---:|---:|---:|---:|---:|")
        loras = [f"a{i}={folder}" for i, folder in enumerate(adapters)]
        runs = [("merged model (adapter 0)", str(merged), [], None),
                ("base + 4 adapters, unmerged", args.model, ["--lora", *loras], ["a0", "a1", "a2", "a3"]),
                ("base + 4 adapters, unmerged", args.model, ["--lora", *loras], None)]
        base = None
        for label, model, extra, models in runs:
            server = Server(model, "--max-batch", str(args.max_batch), *extra)
            try:
                run_level(server.port, 16, 16, args.lora_tokens, models)  # warm-up
                r = run_level(server.port, 16, args.lora_requests, args.lora_tokens, models)
            finally:
                server.close()
            base = base or r["tokens_per_s"]
            print(f"| {label} | {'a0..a3 in turn' if models else 'the base'} | {r['tokens_per_s']:.0f} | "
                  f"{r['p50']:.2f} | {r['p99']:.2f} | {r['failed']} | {r['tokens_per_s'] / base:.2f}x |", flush=True)


MEMBER = {"type": "object", "properties": {
    "이름": {"type": "string", "maxLength": 10}, "나이": {"type": "integer", "minimum": 0, "maximum": 120},
    "도시": {"enum": ["서울특별시", "부산광역시", "대구광역시", "제주특별자치도"]},
    "소개": {"type": "string"}}, "required": ["이름", "나이", "도시", "소개"], "additionalProperties": False}
CONSTRAINTS = {
    "free text": None,
    "JSON schema (Korean strings, an enum)": {"response_format": {"type": "json_schema",
                                                                  "json_schema": {"schema": MEMBER}}},
    "any JSON object": {"response_format": {"type": "json_object"}},
    "regex [가-힣 ,.0-9]+": {"structured_outputs": {"regex": "[가-힣 ,.0-9]+"}},
}


def stream_gaps(port: int, clients: int, requests: int, max_tokens: int, extra: dict | None) -> dict:
    """Streams requests over clients threads; the gaps between consecutive tokens of each stream (prefill apart)."""
    gaps, tokens, lock, counter = [], [], threading.Lock(), iter(range(requests))

    def client() -> None:
        while (n := next(counter, None)) is not None:
            times = stream(port, {"prompt": PROMPTS[n % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8,
                                  "seed": n, "ignore_eos": True} | (extra or {}))
            with lock:
                gaps.extend(b - a for a, b in zip(times, times[1:], strict=False))
                tokens.append(len(times))

    wall = run_clients(client, clients)
    return {"gap": statistics.median(gaps), "mean_gap": statistics.fmean(gaps), "tokens": statistics.fmean(tokens),
            "tokens_per_s": sum(tokens) / wall}


def structured_table(args) -> None:
    """Per-token time of constrained against free generation, at 1 and 16 clients: the median gap between two
    streamed tokens (constrained replies end when their grammar does, so whole-request times would not compare)."""
    server = Server(args.model, "--max-batch", str(args.max_batch))
    try:
        print(f"\n## Structured outputs against free text: {args.model}, up to {args.lora_tokens} tokens per "
              f"request, --max-batch {args.max_batch}\n")
        print("| constraint | clients | tokens per reply | ms per token, median | mean | tokens/s | vs free (median) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for clients in map(int, args.structured_clients.split(",")):
            base = None
            requests = 8 if clients == 1 else args.lora_requests
            for label, extra in CONSTRAINTS.items():
                stream_gaps(server.port, clients, clients, args.lora_tokens, extra)  # warm-up
                r = stream_gaps(server.port, clients, requests, args.lora_tokens, extra)
                base = base or r["gap"]
                print(f"| {label} | {clients} | {r['tokens']:.0f} | {1000 * r['gap']:.2f} | {1000 * r['mean_gap']:.2f} "
                      f"| {r['tokens_per_s']:.0f} | {r['gap'] / base:.3f}x |", flush=True)
    finally:
        server.close()


def long_prompt_folder(tmp: Path, config=None) -> Path:
    """ko-small's shape with a 2,048-token context (or the shape of config), random weights, the built-in
    tokenizer."""
    import torch

    from neoxko.checkpoint import read_config, resolve, save_model
    from neoxko.model import GPTNeoX, init_weights

    source = resolve("ko-small")
    config = config or dataclasses.replace(read_config(source), max_position_embeddings=2048)
    model = GPTNeoX(config).to(torch.bfloat16)
    init_weights(model)
    save_model(model, tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(source) / name).exists():
            shutil.copy(Path(source) / name, tmp / name)
    return tmp


def long_prompt_row(port: int, long_tokens: int) -> dict:
    streams, results = 8, {}
    background = [None] * streams

    def run(i):
        background[i] = stream(port, {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 128, "temperature": 0.8,
                                      "seed": i, "ignore_eos": True})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the streams are decoding
    long_prompt = [100 + (i * 7) % 29000 for i in range(long_tokens)]
    arrived = time.perf_counter()

    def long_request():
        results["long"] = stream(port, {"prompt": [long_prompt], "max_tokens": 8, "temperature": 0})

    def short_request():
        time.sleep(0.01)  # just after the long one
        results["short_sent"] = time.perf_counter()
        results["short"] = stream(port, {"prompt": "짧은 질문", "max_tokens": 8, "temperature": 0})

    extra = [threading.Thread(target=long_request), threading.Thread(target=short_request)]
    for t in extra:
        t.start()
    for t in threads + extra:
        t.join()
    window = [b - a for times in background for a, b in zip(times, times[1:], strict=False) if b > arrived]
    gaps = sorted(b - a for times in background for a, b in zip(times, times[1:], strict=False))
    return {"long_ttft": results["long"][0] - arrived, "short_ttft": results["short"][0] - results["short_sent"],
            "max_gap": max(window or [0]), "median_gap": statistics.median(gaps)}


def long_prompt_table(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = long_prompt_folder(Path(tmp))
        print(f"\n## A {args.long_tokens}-token prompt arriving while 8 streams decode (ko-small shape, 2,048 "
              "context, random weights)\n")
        print("| prefill | long prompt TTFT s | short prompt TTFT s | longest stall of a running stream s | "
              "median token gap s |")
        print("|---|---:|---:|---:|---:|")
        chunks = [(f"chunks of {c}", c) for c in map(int, args.chunks.split(","))] + [("one forward", 4096)]
        for label, chunk in chunks:
            server = Server(str(folder), "--max-batch", "16", "--prefill-chunk", str(chunk))
            try:
                r = long_prompt_row(server.port, args.long_tokens)
            finally:
                server.close()
            print(f"| {label} | {r['long_ttft']:.2f} | {r['short_ttft']:.2f} | {r['max_gap']:.3f} | "
                  f"{r['median_gap']:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ko-small")
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--lengths", default="24,128", help="completion lengths in tokens")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (at least 2 per client)")
    parser.add_argument("--sequential", type=int, default=16, help="requests of the one-client level")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--extra", default="", help="more `neoxko serve` arguments, e.g. '--quantize int8'")
    parser.add_argument("--long-tokens", type=int, default=1500)
    parser.add_argument("--chunks", default="128,256,512", help="--prefill-chunk values to compare")
    parser.add_argument("--skip-long", action="store_true", help="no long-prompt table")
    parser.add_argument("--tables", default="throughput,long,lora,structured",
                        help="which tables: throughput, long (a long prompt among streams), lora (4 adapters vs "
                             "merged), structured (constrained vs free generation)")
    parser.add_argument("--structured-clients", default="1,16", help="client counts of the structured table")
    parser.add_argument("--shape", default=None,
                        help="serve random weights of this preset's shape (e.g. polyglot-ko-1.3b) instead of --model")
    parser.add_argument("--lora-requests", type=int, default=64)
    parser.add_argument("--lora-tokens", type=int, default=64)
    args = parser.parse_args()
    tables = set(args.tables.split(",")) - ({"long"} if args.skip_long else set())
    print(describe())
    if args.shape:
        from neoxko.config import ModelConfig

        keep = tempfile.TemporaryDirectory()  # (removed at exit)
        args.model = str(long_prompt_folder(Path(keep.name), ModelConfig.from_name(args.shape)))
        print(f"serving random weights of {args.shape}'s shape, bfloat16")
    if "throughput" in tables:
        load_table(args)
    if "long" in tables:
        long_prompt_table(args)
    if "lora" in tables:
        lora_table(args)
    if "structured" in tables:
        structured_table(args)


if __name__ == "__main__":
    main()
