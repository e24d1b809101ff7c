"""GGUF files written by `neoxko export --format gguf`, run by llama.cpp (llama-cpp-python), beside neoxko on the same
model: file size, perplexity on held-out Korean text, greedy tokens equal to neoxko's, decode speed at batch 1; and
each file read back by neoxko (`neoxko export FILE.gguf --format hf`), its perplexity beside llama.cpp's.

    python benchmarks/gguf_export.py [--model ko-small] [--texts 120] [--prompts 8] [--new-tokens 32]

Perplexity: tests/fixtures/ko_heldout.jsonl (texts the built-in model never saw), each text scored whole. Greedy: the
same prompt ids, llama.cpp's argmax against `neoxko.generate_tokens` at temperature 0 on the float32 model. llama.cpp
runs without its extra buffer types (its AMX repack of q8_0 crashes on batches on AMX CPUs, llama-cpp-python 0.3.36).
"""

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from neoxko.checkpoint import load_model  # noqa: E402
from neoxko.formats.gguf import read_gguf, write_gguf  # noqa: E402
from neoxko.generate import Sampling, generate_tokens  # noqa: E402
from neoxko.tokenizer import load_tokenizer  # noqa: E402

HELDOUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "ko_heldout.jsonl"


def open_llama(path: Path):
    import llama_cpp
    import llama_cpp.llama_cpp as low

    defaults = low.llama_model_default_params

    def plain():
        params = defaults()
        params.use_extra_bufts = False
        return params
    low.llama_model_default_params = plain
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=2, logits_all=True, verbose=False)
    finally:
        low.llama_model_default_params = defaults


def llama_nll(llm, ids: list[int]) -> float:
    llm.reset()
    llm.eval(ids)
    logits = torch.from_numpy(np.array(llm.scores[:len(ids) - 1], dtype=np.float32))
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()


def neoxko_nll(model, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()


def llama_greedy(llm, ids: list[int], n: int) -> tuple[list[int], float]:
    llm.reset()
    llm.eval(ids)
    out, start = [], time.perf_counter()
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out, n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ko-small")
    parser.add_argument("--texts", type=int, default=120)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    import llama_cpp

    print(describe())
    print(f"llama-cpp-python {llama_cpp.__version__}, model {args.model}\n")
    model, tok = load_model(args.model, dtype="float32"), load_tokenizer(args.model)
    texts = [tok.encode(json.loads(line)["text"]) for line in HELDOUT.open(encoding="utf-8")]
    texts = [ids[:model.config.max_position_embeddings] for ids in texts if len(ids) >= 8][:args.texts]
    prompts = [ids[:6] for ids in texts[-args.prompts:]]
    count = sum(len(ids) - 1 for ids in texts)
    ours = [[int(t) for t in generate_tokens(model, [p], args.new_tokens, Sampling(temperature=0))] for p in prompts]
    base = math.exp(sum(neoxko_nll(model, ids) for ids in texts) / count)
    print("| weights | file MB | llama.cpp perplexity | vs neoxko float32 | greedy tokens equal to neoxko's | "
          "llama.cpp tok/s | read back by neoxko: perplexity |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| neoxko float32 (reference) | - | {base:.3f} | - | - | - | - |")
    with tempfile.TemporaryDirectory() as tmp:
        for quant in ("bf16", "f16", "q8_0", "q4_0", "q4_k_m"):
            path = write_gguf(model, Path(tmp) / f"{quant}.gguf", quant)
            llm = open_llama(path)
            ppl = math.exp(sum(llama_nll(llm, ids) for ids in texts) / count)
            equal, speeds = 0, []
            for prompt, expected in zip(prompts, ours, strict=True):
                got, speed = llama_greedy(llm, prompt, len(expected))
                equal += sum(a == b for a, b in zip(got, expected, strict=True))
                speeds.append(speed)
            total = sum(map(len, ours))
            back = load_model(read_gguf(path, Path(tmp) / f"{quant}-back"), dtype="float32")
            back_ppl = math.exp(sum(neoxko_nll(back, ids) for ids in texts) / count)
            print(f"| {quant} | {path.stat().st_size / 1e6:.1f} | {ppl:.3f} | {ppl / base - 1:+.2%} | "
                  f"{equal}/{total} | {np.median(speeds):.0f} | {back_ppl:.3f} |")
            del llm, back


if __name__ == "__main__":
    main()
