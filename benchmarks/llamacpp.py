"""llama.cpp beside neoxko in benchmarks/decode.py (--llamacpp): build or reuse it, convert, quantize, time.

- llama-cpp-python is a PyPI source package compiled for this CPU on install (`pip install llama-cpp-python`;
  5 min 46 s and 5 min 57 s on the 2-core AMD EPYC these numbers come from). --build-llamacpp installs it when
  it is missing.
- The converter is the one that ships in that package's source, `vendor/llama.cpp/convert_hf_to_gguf.py` (with
  its own gguf-py), fetched once with `pip download` into ~/.cache/neoxko/llama.cpp-VERSION. Two things in it
  are bypassed, neither touching the weights: transformers 5 renames config.json's rotary_pct (the converter
  then reads the file as written), and llama.cpp's list of known BPE pre-tokenizers has no Polyglot-Ko (the
  benchmark feeds token ids, so the "default" one is declared).
- q8_0 and q4_0 are made from the bf16 GGUF by llama.cpp's own quantizer (llama_model_quantize).
- Timing: the same prompt token ids and greedy decoding; prefill is one llama_decode of the prompt, decode the
  tokens after it; batch B runs B sequences in one llama_batch, as a server would.
"""

import ctypes
import importlib
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

BUILD_NOTE = "5 min 46 s to 5 min 57 s on a 2-core AMD EPYC"


def ensure(build: bool):
    """The llama_cpp module, installed (compiled for this CPU) first if build and it is missing."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        if not build:
            raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python (it compiles "
                             f"llama.cpp for this CPU: {BUILD_NOTE}), or pass --build-llamacpp") from None
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"], check=True)
    print(f"built llama-cpp-python in {time.perf_counter() - start:.0f} s", flush=True)
    return importlib.import_module("llama_cpp")


def converter(llama_cpp) -> Path:
    """vendor/llama.cpp of the installed version's source package (downloaded once)."""
    version = llama_cpp.__version__
    cache = Path.home() / ".cache" / "neoxko" / f"llama.cpp-{version}"
    root = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={version}", "-d", str(cache)], check=True, capture_output=True)
        with tarfile.open(cache / f"llama_cpp_python-{version}.tar.gz") as tar:
            tar.extractall(cache, filter="data")
    return root


_CONVERT = """
import runpy, sys
import transformers

def _as_written(*args, **kwargs):  # transformers 5 renames rotary_pct; let the converter read config.json itself
    raise ValueError("config.json is read as written")

transformers.AutoConfig.from_pretrained = _as_written
root = sys.argv.pop(1)
sys.path[:0] = [root + "/gguf-py", root]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"  # token ids are fed; no pre-tokenizer runs
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(llama_cpp, folder: Path, out: Path) -> Path:
    """A Hugging Face folder to a bf16 GGUF, with llama.cpp's own converter."""
    if not out.is_file():
        subprocess.run([sys.executable, "-c", _CONVERT, str(converter(llama_cpp)), str(folder), "--outfile", str(out),
                        "--outtype", "bf16"], check=True, capture_output=True)
    return out


def quantize(llama_cpp, source: Path, out: Path, kind: str) -> Path:
    """q8_0 or q4_0 from a bf16 GGUF, with llama.cpp's quantizer."""
    if not out.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
        params.nthread = 0
        if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {source} to {kind}")
    return out


def weight_bytes(llama_cpp, path: Path) -> int:
    """Bytes a decode step reads: every tensor but the token embedding table (one row of it), read with the gguf-py
    that ships beside the converter."""
    gguf_py = str(converter(llama_cpp) / "gguf-py")
    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    import gguf

    reader = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")


class Timer:
    """One llama.cpp model and context for B sequences of prompt + new tokens, greedy."""

    def __init__(self, llama_cpp, path: Path, batch: int, context: int, threads: int):
        self.lib, self.batch = llama_cpp, batch
        self.llm = llama_cpp.Llama(str(path), n_ctx=16, n_threads=threads, verbose=False)  # the weights
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = batch * context
        params.n_batch = params.n_ubatch = max(batch * context, 512)
        params.n_seq_max = batch
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True
        self.ctx = llama_cpp.llama_init_from_model(self.llm._model.model, params)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.llm._model.model))
        self.tokens = llama_cpp.llama_batch_init(batch * context, 0, batch)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """One llama_decode of (token, position, sequence, wants logits); the greedy next token of each logit row."""
        b = self.tokens
        b.n_tokens = len(items)
        for i, (token, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        rows = [i for i, item in enumerate(items) if item[3]]
        return [int(np.argmax(np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), (self.vocab,))))
                for i in rows]

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        """(prefill seconds, seconds for new_tokens decode steps after it)."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        start = time.perf_counter()
        items = [(t, p, s, p == len(prompt) - 1) for s, prompt in enumerate(prompts) for p, t in enumerate(prompt)]
        nxt = self._decode(items)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(new_tokens):
            nxt = self._decode([(t, len(prompts[s]) + step, s, True) for s, t in enumerate(nxt)])
        return prefill, time.perf_counter() - start

    def once(self, prompts: list[list[int]], new_tokens: int):
        """Warmed up now; each call gives (prefill seconds, prefill and decode seconds)."""
        prompts = [list(map(int, p)) for p in prompts]
        self.run(prompts, 2)

        def timed():
            prefill, decode = self.run(prompts, new_tokens)
            return prefill, prefill + decode
        return timed

    def close(self) -> None:
        self.lib.llama_batch_free(self.tokens)
        self.lib.llama_free(self.ctx)
        self.llm.close()
