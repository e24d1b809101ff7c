"""How a bf16 linear layer is fastest multiplied at each number of rows, on this CPU: torch's bf16 product, neoxko's
kernel 16 rows at a time, float32 (inputs and weights converted at each call), and float32 weights kept (the old
default on CPUs without native bf16, twice the memory). neoxko's Linear picks by these numbers: on a CPU with native
bf16, torch's product from 17 rows on; without, the kernel in chunks below kernels.UPCAST_ROWS rows and float32 from
there (kernels/__init__.py).

Run as it is, then as an AVX2-only CPU would (torch's AVX2 kernels, oneDNN without AVX-512, neoxko's kernels built
for Haswell):

    python benchmarks/prefill_dtype.py
    NEOXKO_CPU_CLASS=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 NEOXKO_KERNELS_MARCH=haswell \\
        NEOXKO_KERNELS_CACHE=/tmp/neoxko-haswell python benchmarks/prefill_dtype.py
"""

import argparse
import time

# isort: off
import neoxko  # noqa: F401  (first: it sets GOMP_SPINCOUNT before torch loads libgomp)
import torch
# isort: on
import torch.nn.functional as F
from machine import describe

from neoxko import kernels
from neoxko.hardware import detect


def best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,16,32,64,128,256,1024")
    parser.add_argument("--shape", default="8192x2048", help="out x in features (1.3B's dense_h_to_4h)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    out_features, in_features = map(int, args.shape.split("x"))
    print(describe())
    print(f"neoxko's choice on this CPU class: native bf16 {'yes' if detect().native_bf16 else 'no'}; kernels "
          f"{kernels.isa() or 'not built: ' + kernels.why_not()}\n")
    torch.manual_seed(0)
    layer = kernels.Linear(in_features, out_features, bias=True).to(torch.bfloat16).eval()
    w, b = layer.weight.detach(), layer.bias.detach()
    w32, b32 = w.float(), b.float()
    print("| rows | torch bf16 ms | kernel, 16 rows at a time ms | float32, converted per call ms | float32 weights "
          "kept ms | neoxko's Linear ms | its max error vs float32 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, in_features).to(torch.bfloat16)
            def chunks(x=x):
                return torch.cat([kernels.bf16_linear(x[i:i + 16], w, b) for i in range(0, x.shape[0], 16)])

            times = [best(lambda x=x: F.linear(x, w, b), args.repeat),
                     best(chunks, args.repeat) if kernels.library() is not None else float("nan"),
                     best(lambda x=x: F.linear(x.float(), w.float(), b.float()).to(torch.bfloat16), args.repeat),
                     best(lambda x=x: F.linear(x.float(), w32, b32), args.repeat),
                     best(lambda x=x: layer(x), args.repeat)]
            exact = F.linear(x.float(), w32, b32)
            error = (layer(x).float() - exact).abs().max().item() / exact.abs().max().item()
            print(f"| {rows} | " + " | ".join(f"{t:.2f}" for t in times) + f" | {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
