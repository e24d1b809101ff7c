"""What the CPU can do, as flags and torch's probes (no policy here: neoxko.hardware chooses from these)."""

import functools
import os

import torch


def assumed_class() -> str | None:
    """NEOXKO_CPU_CLASS=avx2: choose as on an AVX2-only CPU (no native bf16, no VNNI), for tests and benchmarks."""
    value = os.environ.get("NEOXKO_CPU_CLASS", "").lower()
    return value or None


@functools.cache
def flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def native_bf16() -> bool:
    """bf16 dot products in hardware (AVX512_BF16, AMX, Arm BF16)."""
    if assumed_class() == "avx2":
        return False
    return probe("_is_avx512_bf16_supported") or probe("_is_amx_tile_supported") or bool(
        flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def probe(name: str) -> bool:
    check = getattr(torch.cpu, name, None)  # private helpers of torch.cpu; absent on some builds
    try:
        return bool(check()) if check else False
    except Exception:  # noqa: BLE001 - a probe that fails means "no"
        return False
