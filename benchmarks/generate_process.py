"""Whole-process generation as a user times it: `neoxko generate` on a bf16 folder of the 1.3B shape (random weights)
with no dtype flag (the default path), with each explicit dtype, and transformers' generate in bf16, each a fresh
process (import, load, prefill, 96 greedy tokens), interleaved, best of --repeat. Prints the CPU class and the
default path's choice.

    python benchmarks/generate_process.py [--model FOLDER] [--new-tokens 96] [--repeat 2]
    NEOXKO_CPU_CLASS=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 NEOXKO_KERNELS_MARCH=haswell \\
        NEOXKO_KERNELS_CACHE=/tmp/neoxko-haswell python benchmarks/generate_process.py   # as on an AVX2-only CPU
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe

PROMPT = "대한민국의 수도는 서울이며, 인구는 약 천만 명이다. 서울에는 한강이 흐르고"
HF = """
import sys, torch, transformers
folder, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = transformers.AutoTokenizer.from_pretrained(folder)
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
ids = tok(prompt, return_tensors="pt").input_ids
with torch.inference_mode():
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
print(tok.decode(out[0, ids.shape[1]:]))
"""


def random_folder(folder: Path) -> Path:
    import torch

    from neoxko.checkpoint import save_model
    from neoxko.config import PRESETS
    from neoxko.model import GPTNeoX

    with torch.device("meta"):
        model = GPTNeoX(PRESETS["polyglot-ko-1.3b"])
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.setup_rope("cpu")
    return save_model(model.to(torch.bfloat16), folder, tokenizer="ko-small")


def timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"{' '.join(command)} failed: {run.stderr[-2000:]}")
    return time.perf_counter() - start, run.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a bf16 folder of the 1.3B shape (default: random weights)")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="explicit --dtype runs beside the default")
    args = parser.parse_args()
    print(describe())
    import torch

    from neoxko.hardware import detect

    hw = detect()
    dtype, why = hw.default_dtype(torch.bfloat16)
    print(f"CPU class: {'native bf16' if hw.native_bf16 else hw.capability + ' without native bf16'}; default path "
          f"for bf16 weights: {str(dtype)[6:]} ({why})")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else random_folder(Path(tmp) / "m")
        neoxko = [sys.executable, "-m", "neoxko", "generate", "--model", str(folder), "--temperature", "0",
                  "--max-new-tokens", str(args.new_tokens), PROMPT]
        runs = {"neoxko generate, no --dtype (the default)": neoxko}
        runs |= {f"neoxko generate --dtype {d}": neoxko + ["--dtype", d] for d in args.dtypes.split(",") if d}
        runs["transformers bf16 generate"] = [sys.executable, "-c", HF, str(folder), PROMPT, str(args.new_tokens)]
        best = {name: float("inf") for name in runs}
        for _ in range(args.repeat):
            for name, command in runs.items():
                best[name] = min(best[name], timed(command)[0])
        reference = best["transformers bf16 generate"]
        print(f"\n{args.new_tokens} new tokens, greedy, whole process, best of {args.repeat}:\n")
        print("| run | seconds | transformers bf16 / this |")
        print("|---|---:|---:|")
        for name, seconds in best.items():
            print(f"| {name} | {seconds:.1f} | {reference / seconds:.2f}x |")


if __name__ == "__main__":
    main()
