"""Building the kernels safely: a damaged cached library is rebuilt (never loaded), a compiler that hangs is stopped
with a one-line fallback message, and processes that start at once build one library between them."""

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neoxko.kernels.build import checked

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler on this machine")

PROBE = "from neoxko import kernels; print(kernels.isa()); print(kernels.why_not())"


def run_probe(cache: Path, **env) -> subprocess.CompletedProcess:
    environment = os.environ | {"NEOXKO_KERNELS_CACHE": str(cache), "NEOXKO_KERNELS": "1"} | env
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environment, timeout=600)


def libraries(cache: Path) -> list[Path]:
    return sorted(cache.glob("linear-*.so"))


def test_a_truncated_cached_library_is_rebuilt_not_loaded(tmp_path):
    first = run_probe(tmp_path)
    assert first.returncode == 0 and first.stdout.split("\n")[0] != "None", first.stderr
    (library,) = libraries(tmp_path)
    whole = library.read_bytes()
    library.write_bytes(whole[: len(whole) // 3])  # what a full disk or a killed copy leaves: SIGBUS if mapped
    again = run_probe(tmp_path)
    assert again.returncode == 0, again.stderr  # (135 when the torn library was loaded)
    assert f"the cached kernel library {library} is damaged or incomplete; rebuilding it" in again.stderr
    assert checked(library) and len(library.read_bytes()) > len(whole) // 3
    assert again.stdout.split("\n")[0] == first.stdout.split("\n")[0]


def fake_compiler(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "cc"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_a_compiler_that_hangs_times_out_with_a_one_line_fallback(tmp_path):
    cc = fake_compiler(tmp_path, "sleep 60")
    start = time.monotonic()
    result = run_probe(tmp_path / "cache", CC=str(cc), NEOXKO_KERNELS_BUILD_TIMEOUT="2")
    assert time.monotonic() - start < 30 and result.returncode == 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("neoxko:")]
    assert len(lines) == 1 and "timed out" in lines[0] and "decoding uses torch's kernels instead" in lines[0], \
        result.stderr
    assert result.stdout.split("\n")[0] == "None"


def test_a_failing_compiler_gives_the_same_one_line_fallback(tmp_path):
    cc = fake_compiler(tmp_path, 'case "$1" in --version) echo fake 1.0;; *) echo "fatal error: no omp.h" >&2; '
                                 'exit 1;; esac')
    result = run_probe(tmp_path / "cache", CC=str(cc))
    assert result.returncode == 0 and result.stdout.split("\n")[0] == "None"
    assert "building neoxko's kernels (linear.c, attention.c) failed: fatal error: no omp.h" in result.stderr


def test_processes_starting_at_once_build_one_library(tmp_path):
    real = shutil.which("cc") or shutil.which("gcc")
    log = tmp_path / "compiles.log"
    cc = fake_compiler(tmp_path, f'case "$1" in --version) exec {real} --version;; esac\n'
                                 f'echo compile >> {log}\nsleep 2\nexec {real} "$@"')
    environment = os.environ | {"NEOXKO_KERNELS_CACHE": str(tmp_path / "cache"), "NEOXKO_KERNELS": "1", "CC": str(cc)}
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=environment) for _ in range(3)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert len({out.split("\n")[0] for out, _ in outputs}) == 1 and outputs[0][0].split("\n")[0] != "None"
    assert log.read_text().split() == ["compile"]  # one compile, the others waited for it and loaded its library
    assert len(libraries(tmp_path / "cache")) == 1


CHOICE = ("from neoxko import load_model; import sys; m = load_model('ko-small'); "
          "print(m.gpt_neox.layers[0].mlp.dense_h_to_4h.weight.dtype)")


@pytest.mark.parametrize("kernels_on,dtype", [("1", "torch.bfloat16"), ("0", "torch.float32")])
def test_the_python_api_the_command_line_and_the_server_choose_the_same_dtype(tmp_path, kernels_on, dtype):
    """On a CPU without native bf16 (NEOXKO_CPU_CLASS=avx2 makes neoxko choose as on one), bf16 weights stay bf16
    where neoxko's kernels run and become float32 where they do not: load_model, `neoxko generate`, `neoxko info`
    and `neoxko serve` alike."""
    import socket
    import urllib.request

    env = os.environ | {"NEOXKO_CPU_CLASS": "avx2", "NEOXKO_KERNELS": kernels_on}  # (the usual kernel cache)
    api = subprocess.run([sys.executable, "-c", CHOICE], capture_output=True, text=True, env=env, timeout=300)
    assert api.stdout.strip() == dtype, api.stderr
    notice = "bfloat16 weights compute in float32: no native bf16 on this CPU"
    assert (notice in api.stderr) == (dtype == "torch.float32") and api.stderr.count(notice) <= 1
    info = subprocess.run([sys.executable, "-m", "neoxko", "info", "--hardware"], capture_output=True, text=True,
                          env=env, timeout=300)
    said = "bf16 weights stay bf16" if dtype == "torch.bfloat16" else "bf16 weights computed in float32"
    assert f"default compute dtype (generate, serve, chat, load_model: no --dtype): {said}" in info.stdout
    gen = subprocess.run([sys.executable, "-m", "neoxko", "generate", "--max-new-tokens", "2", "안녕"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert gen.returncode == 0 and (notice in gen.stderr) == (dtype == "torch.float32"), gen.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "neoxko", "serve", "--port", str(port)], stderr=subprocess.PIPE,
                              text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.3)
    finally:
        server.terminate()
        _, err = server.communicate(timeout=60)
    short = "bfloat16" if dtype == "torch.bfloat16" else "float32"
    assert re.search(rf"KV cache [0-9.]+ GB, {short}\)", err), err


def test_a_cpu_without_native_bf16_multiplies_long_inputs_in_float32(monkeypatch):
    """Prefill there: through the kernel 16 rows at a time, or in float32 from UPCAST_ROWS rows; both within bf16's
    rounding of the float32 product."""
    import torch

    from neoxko import kernels

    if kernels.library() is None:
        pytest.skip(f"neoxko's kernels are not built here: {kernels.why_not()}")
    monkeypatch.setattr(kernels, "_emulated_bf16", lambda: True)
    torch.manual_seed(0)
    layer = kernels.Linear(256, 512).to(torch.bfloat16).eval()
    for rows in (20, kernels.UPCAST_ROWS + 3):
        x = torch.randn(2, rows, 256).to(torch.bfloat16)
        exact = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
        with torch.inference_mode():
            got = layer(x)
        assert got.dtype == torch.bfloat16 and got.shape == exact.shape
        assert ((got.float() - exact).abs() <= exact.abs() * 2**-7 + 1e-3).all(), rows


def test_how_many_rows_the_bf16_kernel_takes_is_measured_once_and_kept(tmp_path):
    probe = "from neoxko import kernels; print(kernels.bf16_rows())"
    env = os.environ | {"NEOXKO_KERNELS_CACHE": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0 and 1 <= int(first.stdout) <= 16, first.stderr
    kept = list(tmp_path.glob("bf16-rows-*.json"))
    from neoxko.kernels import cpu

    assert len(kept) == (0 if not cpu.native_bf16() else 1)  # (emulated bf16: always 16, nothing to measure)
    if kept:
        import json

        kept[0].write_text(json.dumps({"rows": 3}))  # what the next process reads instead of measuring again
        again = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=600)
        assert again.stdout.strip() == "3"
    forced = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env=env | {"NEOXKO_BF16_ROWS": "8"}, timeout=600)
    assert forced.stdout.strip() == "8"
