"""What this CPU can do, and the kernel and dtype choices neoxko makes from it.

The fast paths were measured on two kinds of x86 CPU (the numbers are in the README and issue 14):
- AVX-512 with native bf16 (Zen 4, Sapphire Rapids): bf16 arithmetic is native; int8 decoding under
  torch.compile is fastest as an inductor-fused reduction (2x torch's int8 kernel).
- AVX2 only (most laptops, many cloud VMs): bf16 arithmetic is emulated (bf16 prefill ran at 8.3 tok/s where
  fp32 is several times faster), and the same fused reduction compiled to 1.42 tok/s against 8.26 for torch's
  eager int8 kernel, so it is not used there.

The dtype a model computes in when none is named (`default_dtype`, the same for the command line, the Python API and
the server): as stored where the CPU multiplies bf16 natively; on a CPU without native bf16, bf16 weights stay bf16
when neoxko's kernels are built (decoding reads them at memory speed: half the bytes of float32, which measured
27.4 s against 47.6 s for a whole 96-token generate of the 1.3B shape on an AVX2 EPYC), and become float32 when they
are not (torch's own bf16 arithmetic is emulated there). NEOXKO_CPU_CLASS=avx2 makes neoxko choose as on an
AVX2-only CPU (tests, benchmarks; with ATEN_CPU_CAPABILITY=avx2 and NEOXKO_KERNELS_MARCH=haswell for the kernels).
"""

import functools
import os
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Hardware:
    capability: str  # torch's kernel dispatch level: AVX512, AVX2, DEFAULT, SVE256, ...
    native_bf16: bool  # bf16 dot products in hardware (AVX512_BF16, AMX, Arm BF16)
    vnni: bool  # int8 dot products in hardware (AVX512_VNNI or AVX_VNNI)
    cores: int
    threads: int  # what torch will use
    amx_int8: bool = False  # Intel AMX int8 tiles (Sapphire Rapids and later)

    @property
    def int8_activations(self) -> bool:
        """int8 layers quantize their activations too when 8 or more rows go through at once (prefill, batched
        decoding): measured on AMX only, where torch._int_mm was 2-10x torch's weight-only int8 kernel."""
        return self.amx_int8

    @property
    def fused_int8(self) -> bool:
        """Compile int8 batch-1 decoding as an inductor reduction (measured faster on AVX-512 only)."""
        return self.capability.startswith("AVX512")

    def default_dtype(self, stored: torch.dtype) -> tuple[torch.dtype, str]:
        """(the dtype weights stored as `stored` compute in when none is named, why): see the module's docstring."""
        if stored not in (torch.bfloat16, torch.float16) or self.native_bf16 and stored == torch.bfloat16:
            return stored, "as stored: the CPU multiplies bf16 natively, half the bytes of float32 at full speed" \
                if stored == torch.bfloat16 else "as stored"
        from neoxko import kernels

        if stored == torch.bfloat16 and kernels.library() is not None:
            return stored, ("as stored: no native bf16 here, but neoxko's kernels decode bf16 weights at memory speed "
                            "(half the bytes of float32); longer prompts are multiplied in float32")
        why = "no native bf16 on this CPU" if stored == torch.bfloat16 else "float16 arithmetic is slow on CPUs"
        built = "" if kernels.library() is not None else f" and neoxko's kernels are not built ({kernels.why_not()})"
        return torch.float32, f"float32: {why}{built}, so torch's {str(stored)[6:]} arithmetic would be emulated"

    def choices(self) -> list[tuple[str, str, str]]:
        """(what, chosen, why) for `neoxko info --hardware`."""
        dtype, why_dtype = self.default_dtype(torch.bfloat16)
        dtype = "bf16 weights stay bf16" if dtype == torch.bfloat16 else "bf16 weights computed in float32"
        why_dtype = why_dtype.split(": ", 1)[1]
        int8 = "inductor-fused reduction" if self.fused_int8 else "torch's int8 kernel"
        w8a8 = "int8 x int8 (torch._int_mm), activations quantized per row" if self.int8_activations else \
            "torch's weight-only int8 kernel"
        why_w8a8 = ("AMX int8 tiles: for a 2048 x 8192 layer 1.47 ms against 14.0 ms weight-only at 64 rows, "
                    "0.92 against 1.95 at 8; held-out perplexity of ko-small 186.16 against 186.04"
                    if self.int8_activations else "measured faster only with AMX int8 tiles "
                    "(NEOXKO_INT8_ACTIVATIONS=1 tries it here)")
        why_int8 = ("fused into one pass over the weights, about 2x torch's kernel on AVX-512" if self.fused_int8
                    else "the fused reduction compiles to code slower than the eager kernel without AVX-512 "
                         "(measured 1.42 against 8.26 tok/s on an AVX2 CPU)")
        from neoxko import kernels

        isa = kernels.isa()
        if isa:
            built = (f"built for this CPU ({isa}): bf16 layers at 1-{kernels.bf16_rows()} rows (measured here against "
                     "torch's product), every int8 layer, int4 in groups of "
                     "64-256, decoding attention", "torch's matrix-vector kernels reach a third to two thirds of the "
                     "memory bandwidth and its attention sets up 0.2-4 ms a layer for one query (README); the int8 and "
                     "int4 ones quantize activations to int8 per 128 inputs (NEOXKO_KERNELS=0 switches them off)")
        else:
            built = ("not used: torch's kernels run every layer", kernels.why_not())
        spin = os.environ.get("GOMP_SPINCOUNT")
        return [
            ("default compute dtype (generate, serve, chat, load_model: no --dtype)", dtype, why_dtype),
            ("neoxko's CPU kernels", *built),
            ("int8 decoding under --compile" + (" (without neoxko's kernels)" if isa else ""), int8, why_int8),
            ("int8 layers, 8 or more rows at once" + (" (without neoxko's kernels)" if isa and not self.int8_activations
                                                      else ""), w8a8, why_w8a8),
            ("int4" + (" in groups of 32" if isa else ""), "torch's _weight_int4pack_mm_for_cpu",
             "torch's CPU int4 kernel; its weight layout is made for this CPU at load time"),
            ("OpenMP idle threads", f"spin {spin} rounds before sleeping" if spin else "libgomp's default",
             "set by neoxko when it is imported before torch: waking a sleeping thread cost 0.1-0.3 ms a small op"
             if spin else "torch was imported before neoxko (or GOMP_SPINCOUNT is unset): waking a sleeping "
             "thread can cost 0.1-0.3 ms a small op; import neoxko first or set GOMP_SPINCOUNT=1000000"),
            ("threads", str(self.threads), "torch's default: one per physical core (on 2 cores, 2 threads decoded "
             "int8 at 19.8 against 16.3 tok/s for 1, int4 at 29-34 against 20-25)"
             + (" (OMP_NUM_THREADS is set)" if "OMP_NUM_THREADS" in os.environ else "")),
        ]


@functools.cache
def detect() -> Hardware:
    from neoxko.kernels import cpu

    if cpu.assumed_class() == "avx2":  # choose as on an AVX2-only CPU
        return Hardware(capability="AVX2", native_bf16=False, vnni=False, cores=os.cpu_count() or 1,
                        threads=torch.get_num_threads())
    flags = cpu.flags()
    vnni = cpu.probe("_is_vnni_supported") or bool(flags & {"avx512_vnni", "avx_vnni", "asimddp"})
    return Hardware(capability=torch.backends.cpu.get_cpu_capability(), native_bf16=cpu.native_bf16(), vnni=vnni,
                    cores=os.cpu_count() or 1, threads=torch.get_num_threads(), amx_int8="amx_int8" in flags)


_told: set = set()


def default_dtype(stored: torch.dtype) -> torch.dtype:
    """The dtype weights stored as `stored` compute in on this CPU when none is named (Hardware.default_dtype); when
    it is not the stored one, says why once per process (on stderr)."""
    dtype, why = detect().default_dtype(stored)
    if dtype != stored and stored not in _told:
        _told.add(stored)
        print(f"neoxko: {str(stored)[6:]} weights compute in {why}; --dtype {str(stored)[6:]} keeps them as they are",
              file=sys.stderr, flush=True)
    return dtype


def describe(hw: Hardware | None = None) -> str:
    hw = hw or detect()
    lines = [f"cpu capability  {hw.capability} (torch's kernels), native bf16: {'yes' if hw.native_bf16 else 'no'}, "
             f"int8 dot products (VNNI): {'yes' if hw.vnni else 'no'}, {hw.cores} logical cores, "
             f"{hw.threads} torch threads"]
    for what, chosen, why in hw.choices():
        lines.append(f"{what}: {chosen}\n    because {why}")
    return "\n".join(lines)
