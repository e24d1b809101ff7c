"""int8 layers with activations quantized too (W8A8, torch._int_mm) against weight-only int8 (W8A16, torch's
_weight_int8pack_mm), in one run on the Polyglot-Ko 1.3B shape with random weights: prefill, batched decoding and
batch-1 decoding (which stays weight-only: W8A8 starts at neoxko.quantize.W8A8_MIN_ROWS rows), and how far the
logits move.

    python benchmarks/int8_activations.py [--prompt 256] [--batch 8] [--new-tokens 16] [--threads 2]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import neoxko.quantize as quantize
    from neoxko.config import PRESETS
    from neoxko.generate import Sampling, generate_tokens
    from neoxko.model import GPTNeoX, init_weights

    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPTNeoX(PRESETS["polyglot-ko-1.3b"])
    model.to_empty(device="cpu")
    model.setup_rope()
    with torch.no_grad():
        init_weights(model)
    model = model.to(torch.bfloat16).eval()
    prompt = torch.randint(0, 30000, (1, args.prompt))
    batch = [torch.randint(0, 30000, (64,)).tolist() for _ in range(args.batch)]

    def prefill() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(prompt)
        return args.prompt / (time.perf_counter() - start)

    def decode(prompts) -> float:
        start = time.perf_counter()
        n = 0
        for _ in generate_tokens(model, prompts, args.new_tokens, Sampling(temperature=0)):
            n += len(prompts)
        return n / (time.perf_counter() - start)

    rows = {}
    for name, on in (("bf16 (no quantization)", None), ("weight-only int8 (W8A16)", False),
                     ("int8 activations too (W8A8)", True)):
        if on is not None:
            model = quantize.quantize_model(model)  # (once: the second time it is already quantized)
            quantize.INT8_ACTIVATIONS = on
        prefill(), decode(batch[:1])  # warm-up
        rows[name] = (max(prefill() for _ in range(2)), decode(batch), decode(batch[:1]))
        with torch.no_grad():
            rows[name] += (model(prompt[:, :64]).float(),)
    print(describe())
    print(f"Polyglot-Ko 1.3B shape, random weights, int8; prefill of {args.prompt} tokens, decoding of "
          f"{args.new_tokens} tokens after 64-token prompts (generate tok/s: new tokens over the whole call, the "
          "prompt's prefill included)\n")
    print(f"| linear layers | prefill tok/s | batch-{args.batch} generate tok/s | batch-1 generate tok/s |")
    print("|---|---:|---:|---:|")
    for name, (p, d, d1, _) in rows.items():
        print(f"| {name} | {p:.1f} | {d:.2f} | {d1:.2f} |")
    _, a, b = (r[3] for r in rows.values())
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"\nW8A8 against W8A16 logits, 64 positions: top-1 agreement {agree:.3f}, max |diff| "
          f"{(a - b).abs().max().item():.3f} (logits up to {a.abs().max().item():.1f})")


if __name__ == "__main__":
    main()
