"""neoxko's CPU kernels for decoding: bf16, int8 and int4 matrix-vector products near the memory bandwidth (linear.c),
and attention of one query over the cache (attention.c).

torch's CPU kernels for one row at a time (batch-1 decoding) reach a third to two thirds of the bandwidth
(README, issue 14), and its attention spends 0.2-4 ms a layer on a single query. They are built on first use
(a few seconds, once) with the system C compiler for the CPU it runs on (-march=native, or NEOXKO_KERNELS_MARCH;
into ~/.cache/neoxko/kernels or $NEOXKO_KERNELS_CACHE; build.py: one build across processes, checked libraries,
time limits) and called through ctypes, on torch's OpenMP threads.
Where they cannot be built (no compiler, no AVX2, not x86) or NEOXKO_KERNELS=0, `library()` is None, `why_not()`
says why, and the layers use torch's kernels.
"""

import ctypes
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor, nn

from neoxko.kernels import cpu
from neoxko.kernels.build import build, cpu_signature  # noqa: F401 (cpu_signature: re-exported)

HERE = Path(__file__).parent
SOURCES = [HERE / "linear.c", HERE / "attention.c"]  # one library; both include common.h
FLAGS = ["-O3", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
ALIGN = 128  # the inputs every kernel needs to be a multiple of (one activation block)
INT4_GROUPS = (64, 128, 256)  # the int4 group sizes the kernel takes
_TYPES = {torch.float32: 0, torch.bfloat16: 1}
_why_not = ""
_library: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()
_ready = False  # library() built: a plain bool that torch.compile reads


def cache_dir() -> Path:
    return Path(os.environ.get("NEOXKO_KERNELS_CACHE") or Path.home() / ".cache" / "neoxko" / "kernels")


def library() -> ctypes.CDLL | None:
    """The built kernels, or None (why_not() says why); built or found once per process."""
    global _tried
    if _tried:
        return _library
    with _lock:  # (serving threads may ask at once)
        if not _tried:
            _find()
            _tried = True
    return _library


def _find() -> None:
    global _library, _ready, _why_not
    if os.environ.get("NEOXKO_KERNELS", "") == "0":
        _why_not = "NEOXKO_KERNELS=0"
        return
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _why_not = f"written for x86 (AVX2); this CPU is {platform.machine()}"
        return
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        _fell_back("no C compiler found (install gcc, or set CC)")
        return
    try:
        path = build(compiler, SOURCES, [HERE / "common.h"], flags(), cache_dir())
        lib = ctypes.CDLL(str(path))
    except subprocess.TimeoutExpired as e:
        _fell_back(f"building neoxko's kernels timed out: {_first_line(e)} (NEOXKO_KERNELS_BUILD_TIMEOUT raises the "
                   "limit)")
        return
    except (OSError, subprocess.SubprocessError) as e:
        _fell_back(f"building neoxko's kernels ({', '.join(p.name for p in SOURCES)}) failed: {_first_line(e)}")
        return
    _declare(lib)
    _library, _ready = lib, True


def _fell_back(why: str) -> None:
    """Record why the kernels are not used and say so once, in one line: decoding goes on with torch's kernels."""
    global _why_not
    _why_not = why
    print(f"neoxko: {why}; decoding uses torch's kernels instead (slower at batch 1; NEOXKO_KERNELS=0 silences "
          "this)", file=sys.stderr, flush=True)


def _built() -> bool:
    """library() is not None. Under torch.compile (which cannot trace a build) it reads the flag library() left:
    kernels not yet looked for count as absent there, so a compiled graph never builds them."""
    if torch.compiler.is_compiling():
        return _ready
    return library() is not None


def why_not() -> str:
    library()
    return _why_not


def isa() -> str | None:
    lib = library()
    return lib.nk_isa().decode() if lib else None


def flags() -> list[str]:
    """-march=native, or the CPU NEOXKO_KERNELS_MARCH names (haswell: the AVX2 code on an AVX-512 machine)."""
    return [f"-march={os.environ.get('NEOXKO_KERNELS_MARCH') or 'native'}", *FLAGS]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    errors = [line for line in text.splitlines() if "error" in line]
    return (errors or text.splitlines() or [type(e).__name__])[0][:300]


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.nk_int8_linear.argtypes = [p, i, i64, i64, p, p, i, i64, p, i, p, i]
    lib.nk_int4_linear.argtypes = [p, i, i64, i64, p, p, p, i64, i64, p, i, p, i]
    lib.nk_bf16_linear.argtypes = [p, i, i64, i64, p, i64, p, i, p, i]
    lib.nk_int4_dequantize.argtypes = [p, p, p, i64, i64, i64, p, i]
    lib.nk_attend_one.argtypes = [p, p, p, i, *[i64] * 10, p, i64, ctypes.c_float, p]
    for f in (lib.nk_int8_linear, lib.nk_int4_linear, lib.nk_bf16_linear, lib.nk_attend_one,
              lib.nk_int4_dequantize):
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
        raise MemoryError("neoxko's CPU kernel could not allocate its working buffer")


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


INT4_DENSE_ROWS = 256  # from this many rows at once, int4 layers multiply dequantized weights (measured: README)


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Tensor | None) -> Tensor:
    """x @ W.T + bias, W = (q - 8) * scale + zero per group: qweight (N, K / 2) from pack_int4, bf16 scales and
    zeros (N, K / group_size). From INT4_DENSE_ROWS rows on, the weights are dequantized to x's dtype for one dense
    product (torch's), which is faster there than the int4 tiles (2048 x 8192 at 512 rows: 60 against 78 ms)."""
    if torch.compiler.is_compiling():
        return torch.ops.neoxko.int4_linear(x, qweight, scales, zeros, group_size, bias)
    rows = _rows(x)
    if rows.shape[0] >= INT4_DENSE_ROWS:
        w = dequantize_int4(qweight, scales, zeros, group_size, x.dtype)
        return nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)
    y = torch.empty(rows.shape[0], qweight.shape[0], dtype=x.dtype)
    _check(library().nk_int4_linear(rows.data_ptr(), _TYPES[x.dtype], rows.shape[0], rows.shape[1],
                                    qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), group_size,
                                    qweight.shape[0], *_bias(bias), y.data_ptr(), _TYPES[x.dtype]))
    return y.view(*x.shape[:-1], qweight.shape[0])


def dequantize_int4(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """The (N, K) weights of an int4 layer in the kernel's layout, as float32 or bf16."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    w = torch.empty(n, k, dtype=dtype)
    _check(library().nk_int4_dequantize(qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), group_size, n, k,
                                        w.data_ptr(), _TYPES[dtype]))
    return w


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


MAX_HEAD = 256  # head sizes the attention kernel takes (a multiple of 16 up to this)


def attention_takes(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether attend_one takes this decoding step: one query a row, on the CPU, k and v as the cache holds them (the
    query's dtype, contiguous head dimension), a boolean mask of one row per batch row or shared, no gradient."""
    return (q.size(2) == 1 and q.device.type == "cpu" and q.dtype in _TYPES and k.dtype == v.dtype == q.dtype
            and mask is not None and mask.dtype == torch.bool and mask.size(-2) == 1 and mask.size(1) == 1
            and mask.size(-1) == k.size(2) and mask.stride(-1) == 1 and k.stride(-1) == v.stride(-1) == 1
            and q.size(-1) % 16 == 0 and q.size(-1) <= MAX_HEAD and not (torch.is_grad_enabled() and q.requires_grad)
            and _built())


def attend_one(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D), hidden where mask is False) v for q (B, H, 1, D) over k, v (B, H, S, D); computed in
    float32 from the cache as stored, reading only the slots the mask shows."""
    if torch.compiler.is_compiling():
        return torch.ops.neoxko.attend_one(q, k, v, mask)
    B, H, _, D = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    m = mask.view(torch.uint8)
    _check(library().nk_attend_one(q.data_ptr(), k.data_ptr(), v.data_ptr(), _TYPES[q.dtype], B, H, k.size(2), D,
                                   k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                                   m.data_ptr(), m.stride(0) if m.size(0) > 1 else 0, D ** -0.5, out.data_ptr()))
    return out


# The same four as custom ops, so torch.compile sees one opaque call (a ctypes call would break the graph).
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


@torch.library.custom_op("neoxko::attend_one", mutates_args=())
def _attend_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    return attend_one(q, k, v, mask)


@_attend_op.register_fake
def _(q, k, v, mask):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@_int8_op.register_fake
def _(x, weight, scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@_int4_op.register_fake
def _(x, qweight, scales, zeros, group_size, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@_bf16_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


BF16_MAX_ROWS = 16  # the most rows the bf16 kernel takes at once
UPCAST_ROWS = 128  # on a CPU without native bf16, fewer rows than this go through the kernel BF16_MAX_ROWS at a time,
# and from this many on, weights and inputs are multiplied in float32 (torch's own bf16 product is emulated there:
# 2048 x 8192 at 256 rows, 315 ms against 67 ms; at 128, 146 against 44 through the kernel; prefill_dtype.py)
_bf16_rows: int | None = None
_bf16_lock = threading.Lock()


def bf16_rows() -> int:
    """Up to how many rows the bf16 kernel beats torch's product here: 16 where bf16 is emulated; where the CPU
    multiplies bf16 natively, measured once per machine (AMX's tiles win from 8 rows: 1.3 against 1.85 ms for
    8192 x 2048; on Zen 4 the kernel wins to 16) and kept beside the built library; NEOXKO_BF16_ROWS overrides."""
    global _bf16_rows
    if _bf16_rows is None:
        with _bf16_lock:
            if _bf16_rows is None:
                _bf16_rows = _measured_bf16_rows()
    return _bf16_rows


def _measured_bf16_rows() -> int:
    import json
    import time

    if os.environ.get("NEOXKO_BF16_ROWS"):
        return max(0, min(BF16_MAX_ROWS, int(os.environ["NEOXKO_BF16_ROWS"])))
    if _emulated_bf16() or library() is None:
        return BF16_MAX_ROWS
    import hashlib

    key = hashlib.sha256((cpu_signature() + torch.__version__ + str(torch.get_num_threads())).encode()).hexdigest()[:16]
    path = cache_dir() / f"bf16-rows-{key}.json"
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    weight = torch.randn(8192, 2048).to(torch.bfloat16)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    rows, table = 1, {}
    with torch.inference_mode():
        for n in (2, 4, 8, 12, 16):
            x = torch.randn(n, 2048).to(torch.bfloat16)
            table[n] = (best(lambda x=x: bf16_linear(x, weight, None)),
                        best(lambda x=x: nn.functional.linear(x, weight)))
            if table[n][0] > table[n][1]:
                break
            rows = n
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": rows, "seconds (kernel, torch)": table}), encoding="utf-8")
    except OSError:
        pass
    return rows


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose bf16 weights go through neoxko's kernel for up to
    bf16_rows() rows at once on the CPU (decoding) when no gradient is wanted; on a CPU without native bf16, more rows
    go through it 16 at a time, or through float32 from UPCAST_ROWS rows on; everything else is nn.Linear's own
    forward."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if not (w.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and w.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                and type(w) in (torch.Tensor, nn.Parameter) and w.is_contiguous()  # (not a DTensor shard, not a view)
                and self.in_features % 32 == 0):
            return super().forward(x)
        rows = x.numel() // x.shape[-1]
        if rows <= (_bf16_rows or BF16_MAX_ROWS if torch.compiler.is_compiling() else bf16_rows()) and _built():
            return bf16_linear(x, w, self.bias)
        if _emulated_bf16() and not torch.compiler.is_compiling():
            if rows < UPCAST_ROWS and _built():
                flat = x.reshape(rows, x.shape[-1])
                parts = [bf16_linear(flat[i:i + BF16_MAX_ROWS], w, self.bias) for i in range(0, rows, BF16_MAX_ROWS)]
                return torch.cat(parts).view(*x.shape[:-1], self.out_features)
            bias = self.bias.float() if self.bias is not None else None
            return nn.functional.linear(x.float(), w.float(), bias).to(x.dtype)
        return super().forward(x)


def _emulated_bf16() -> bool:
    """The CPU has no native bf16 (torch's bf16 products are emulated)."""
    return not cpu.native_bf16()


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
