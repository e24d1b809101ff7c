"""Building the kernels safely: one build however many processes start at once (a file lock beside the cached
library), a cache whose libraries are checked before they are loaded (size and sha256 written beside each when it is
built: a truncated or damaged file is rebuilt, never mapped, since a torn library crashes the process with SIGBUS),
and a time limit on every compiler call.

The library's name is a hash of the sources, the flags, the compiler's version and the CPU's flags (-march=native
code runs only on the kind of CPU it was built on).
"""

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from neoxko.kernels.cpu import flags as cpu_flags

VERSION_TIMEOUT_S = 10.0


def build_timeout() -> float:
    """Seconds a compile may take (NEOXKO_KERNELS_BUILD_TIMEOUT, default 180)."""
    return float(os.environ.get("NEOXKO_KERNELS_BUILD_TIMEOUT") or 180)


def build(compiler: str, sources: list[Path], headers: list[Path], flags: list[str], cache: Path) -> Path:
    """The path of a checked library built from sources with flags, from the cache or compiled now (once across
    processes). Raises subprocess.SubprocessError (a timeout included) or OSError when it cannot be built."""
    limit = build_timeout()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True,
                             timeout=min(VERSION_TIMEOUT_S, limit)).stdout
    code = b"".join(path.read_bytes() for path in [*sources, *headers])
    key = hashlib.sha256(code + " ".join(flags).encode() + version.encode()
                         + cpu_signature().encode()).hexdigest()[:16]
    path = cache / f"linear-{key}.so"
    if checked(path):
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock"), limit + 60):
        if checked(path):  # another process built it while this one waited
            return path
        if path.exists() and _stamp_path(path).exists():  # (one without a stamp is from an older neoxko)
            print(f"neoxko: the cached kernel library {path} is damaged or incomplete; rebuilding it", file=sys.stderr,
                  flush=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, renamed into place: no torn file
            out = Path(tmp) / path.name
            run = subprocess.run([compiler, *flags, "-o", str(out), *map(str, sources), "-lm"], capture_output=True,
                                 text=True, timeout=limit)
            if run.returncode:
                raise subprocess.SubprocessError(run.stderr.strip() or f"{compiler} exited with {run.returncode}")
            stamp = Path(tmp) / "stamp"
            stamp.write_text(_stamp(out), encoding="utf-8")
            os.replace(out, path)
            os.replace(stamp, _stamp_path(path))  # last: a library is trusted only once its stamp is in place
    return path


def checked(path: Path) -> bool:
    """Whether path holds the whole library that was built there (its stamp matches its size and sha256)."""
    stamp = _stamp_path(path)
    try:
        return path.is_file() and stamp.read_text(encoding="utf-8") == _stamp(path)
    except (OSError, UnicodeDecodeError):
        return False


def _stamp_path(path: Path) -> Path:
    return path.with_suffix(".so.sha256")


def _stamp(path: Path) -> str:
    data = path.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}\n"


@contextmanager
def _locked(lock_path: Path, wait_s: float):
    """An exclusive lock on lock_path across processes (fcntl; none where there is no fcntl), waited for at most
    wait_s (the holder's compile has its own time limit)."""
    try:
        import fcntl
    except ImportError:  # (Windows: no kernels are built there anyway)
        yield
        return
    with open(lock_path, "a+") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(f"the lock {lock_path}", wait_s) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cpu_signature() -> str:
    """-march=native code runs only on this kind of CPU: the cache key includes its flags."""
    return " ".join(sorted(cpu_flags())) or platform.processor()
