"""One line about the machine a benchmark ran on: CPU model, cores, the vector units torch uses, torch."""

import os
import platform
from pathlib import Path


def describe() -> str:
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return (f"CPU: {name}, {os.cpu_count()} cores, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
            f" ({', '.join(have) or 'no avx2/avx512'}); torch {torch.__version__}, {torch.get_num_threads()} threads")
