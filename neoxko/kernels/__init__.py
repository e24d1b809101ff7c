"""neoxko's CPU kernels for decoding (linear.c): bf16, int8 and int4 matrix-vector products near the memory bandwidth.

torch's CPU kernels for one row at a time (batch-1 decoding) reach a third to two thirds of the bandwidth
(README, issue 14). linear.c is built on first use with the system C compiler for the CPU it runs on
(-march=native, into ~/.cache/neoxko/kernels or $NEOXKO_KERNELS_CACHE) and called through ctypes, on torch's
OpenMP threads. Where it cannot be built (no compiler, no AVX2, not x86) or NEOXKO_KERNELS=0, `library()` is None,
`why_not()` says why, and the layers use torch's kernels.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

SOURCE = Path(__file__).with_name("linear.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
ALIGN = 128  # the inputs every kernel needs to be a multiple of (one activation block)
INT4_GROUPS = (64, 128, 256)  # the int4 group sizes the kernel takes
_TYPES = {torch.float32: 0, torch.bfloat16: 1}
_why_not = ""


def cache_dir() -> Path:
    return Path(os.environ.get("NEOXKO_KERNELS_CACHE") or Path.home() / ".cache" / "neoxko" / "kernels")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, or None (why_not() says why)."""
    global _why_not
    if os.environ.get("NEOXKO_KERNELS", "") == "0":
        _why_not = "NEOXKO_KERNELS=0"
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _why_not = f"written for x86 (AVX2); this CPU is {platform.machine()}"
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        _why_not = "no C compiler found (install gcc, or set CC)"
        return None
    try:
        path = _build(compiler)
    except (OSError, subprocess.SubprocessError) as e:
        _why_not = f"building {SOURCE.name} failed: {_first_line(e)}"
        return None
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    return lib


def _built() -> bool:
    """library() is not None, answered from the cache under torch.compile (which cannot trace the build)."""
    if torch.compiler.is_compiling():
        return library.cache_info().currsize > 0 and library() is not None
    return library() is not None


def why_not() -> str:
    library()
    return _why_not


def isa() -> str | None:
    lib = library()
    return lib.nk_isa().decode() if lib else None


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()
                         + _cpu_signature().encode()).hexdigest()[:16]
    path = cache_dir() / f"linear-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # built aside, renamed into place: no torn file
        out = Path(tmp) / path.name
        run = subprocess.run([compiler, *FLAGS, "-o", str(out), str(SOURCE), "-lm"], capture_output=True, text=True,
                             timeout=300)
        if run.returncode:
            raise subprocess.SubprocessError(run.stderr.strip() or f"{compiler} exited with {run.returncode}")
        os.replace(out, path)
    return path


def _cpu_signature() -> str:
    """-march=native code runs only on this kind of CPU: the cache key includes its flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    errors = [line for line in text.splitlines() if "error" in line]
    return (errors or text.splitlines() or [type(e).__name__])[0][:300]


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.nk_int8_linear.argtypes = [p, i, i64, i64, p, p, i, i64, p, i, p, i]
    lib.nk_int4_linear.argtypes = [p, i, i64, i64, p, p, p, i64, i64, p, i, p, i]
    lib.nk_bf16_linear.argtypes = [p, i, i64, i64, p, i64, p, i, p, i]
    for f in (lib.nk_int8_linear, lib.nk_int4_linear, lib.nk_bf16_linear):
        f.restype = i
    lib.nk_isa.restype = ctypes.c_char_p


TILE = 4  # output rows a tile interleaves (NT in linear.c)


def eligible(in_features: int, out_features: int) -> bool:
    """Whether a layer of this shape can use the kernels here (built, in_features a multiple of 128, out_features of
    4)."""
    return in_features % ALIGN == 0 and out_features % TILE == 0 and library() is not None


def takes(x: Tensor) -> bool:
    """Whether the kernels take this input: on the CPU, float32 or bf16, no gradient wanted."""
    return x.device.type == "cpu" and x.dtype in _TYPES and not (x.requires_grad and torch.is_grad_enabled())


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _bias(bias: Tensor | None) -> tuple[int | None, int]:
    return (bias.data_ptr(), _TYPES[bias.dtype]) if bias is not None else (None, 0)


def _check(status: int) -> None:
    if status:
        raise MemoryError("neoxko's CPU kernel could not allocate its activation buffer")


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """x @ (W * scale[:, None]).T + bias, W int8 (N, K) in the tile-major layout (tile_int8)."""
    if torch.compiler.is_compiling():
        return torch.ops.neoxko.int8_linear(x, weight, scale, bias)
    rows = _rows(x)
    y = torch.empty(rows.shape[0], weight.shape[0], dtype=x.dtype)
    scale = scale.contiguous()
    _check(library().nk_int8_linear(rows.data_ptr(), _TYPES[x.dtype], rows.shape[0], rows.shape[1],
                                    weight.data_ptr(), scale.data_ptr(), _TYPES[scale.dtype], weight.shape[0],
                                    *_bias(bias), y.data_ptr(), _TYPES[x.dtype]))
    return y.view(*x.shape[:-1], weight.shape[0])


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Tensor | None) -> Tensor:
    """x @ W.T + bias, W = (q - 8) * scale + zero per group: qweight (N, K / 2) from pack_int4, bf16 scales and
    zeros (N, K / group_size)."""
    if torch.compiler.is_compiling():
        return torch.ops.neoxko.int4_linear(x, qweight, scales, zeros, group_size, bias)
    rows = _rows(x)
    y = torch.empty(rows.shape[0], qweight.shape[0], dtype=x.dtype)
    _check(library().nk_int4_linear(rows.data_ptr(), _TYPES[x.dtype], rows.shape[0], rows.shape[1],
                                    qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), group_size,
                                    qweight.shape[0], *_bias(bias), y.data_ptr(), _TYPES[x.dtype]))
    return y.view(*x.shape[:-1], qweight.shape[0])


def bf16_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T + bias with weight bf16 (N, K), row-major as nn.Linear keeps it."""
    if torch.compiler.is_compiling():
        return torch.ops.neoxko.bf16_linear(x, weight, bias)
    rows = _rows(x)
    y = torch.empty(rows.shape[0], weight.shape[0], dtype=x.dtype)
    _check(library().nk_bf16_linear(rows.data_ptr(), _TYPES[x.dtype], rows.shape[0], rows.shape[1],
                                    weight.data_ptr(), weight.shape[0], *_bias(bias), y.data_ptr(),
                                    _TYPES[x.dtype]))
    return y.view(*x.shape[:-1], weight.shape[0])


# The same three as custom ops, so torch.compile sees one opaque call (a ctypes call would break the graph).
@torch.library.custom_op("neoxko::int8_linear", mutates_args=())
def _int8_op(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    return int8_linear(x, weight, scale, bias)


@torch.library.custom_op("neoxko::int4_linear", mutates_args=())
def _int4_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
             bias: Tensor | None) -> Tensor:
    return int4_linear(x, qweight, scales, zeros, group_size, bias)


@torch.library.custom_op("neoxko::bf16_linear", mutates_args=())
def _bf16_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return bf16_linear(x, weight, bias)


@_int8_op.register_fake
def _(x, weight, scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@_int4_op.register_fake
def _(x, qweight, scales, zeros, group_size, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@_bf16_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


BF16_MAX_ROWS = 16  # more rows at once (prefill) go to torch's matrix product, which is faster there


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose bf16 weights go through neoxko's kernel for up to 16 rows
    at once on the CPU (decoding) when no gradient is wanted; everything else is nn.Linear's own forward."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (w.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and x.numel() <= BF16_MAX_ROWS * x.shape[-1]
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) and w.device.type == "cpu"
                and self.in_features % 32 == 0 and _built()):
            return bf16_linear(x, w, self.bias)
        return super().forward(x)


def tile_int8(q: Tensor) -> Tensor:
    """Row-major int8 (N, K) -> the kernel's tile-major layout: rows 4t..4t+3 interleaved 128 inputs at a time."""
    n, k = q.shape
    return q.view(n // TILE, TILE, k // ALIGN, ALIGN).transpose(1, 2).contiguous().view(n, k)


def untile_int8(t: Tensor) -> Tensor:
    n, k = t.shape
    return t.view(n // TILE, k // ALIGN, TILE, ALIGN).transpose(1, 2).contiguous().view(n, k)


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) values in 0..15 -> the kernel's uint8 (N, K / 2): in each chunk of 128 inputs of a row, byte j holds
    input j (low nibble) and input j + 64 (high nibble); the chunks of rows 4t..4t+3 interleaved (tile-major)."""
    n, k = q.shape
    chunks = q.to(torch.uint8).view(n, k // 128, 2, 64)
    packed = chunks[:, :, 0] | (chunks[:, :, 1] << 4)  # (N, K / 128, 64)
    return packed.view(n // TILE, TILE, k // 128, 64).transpose(1, 2).contiguous().view(n, k // 2)


def unpack_int4(packed: Tensor) -> Tensor:
    """pack_int4 undone: (N, K) uint8 values in 0..15."""
    n, half = packed.shape
    chunks = packed.view(n // TILE, half // 64, TILE, 64).transpose(1, 2).reshape(n, half // 64, 1, 64)
    return torch.cat([chunks & 0x0F, chunks >> 4], dim=2).reshape(n, half * 2)
