"""The compiled PII core: the same modules, built by Cython at install time (setup.py) into neoxko/pii/_compiled/.

A module runs compiled only while the source on disk is the one it was built from (setup.py records each source's
sha256 beside the built modules), so an edited rule is never shadowed by an old build; the others run as Python.
NEOXKO_PII_PURE=1 runs them all as Python (to compare the two: `benchmarks/pii.py --pure`).
"""

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path

COMPILED = ("cues", "normalise", "shapes", "context", "rules", "replace")  # (must match setup.py)
HERE = Path(__file__).resolve().parent
FOLDER = HERE / "_compiled"


def _built() -> tuple[dict[str, Path], str]:
    """The compiled modules whose source is unchanged (name -> library), and why the others are not used."""
    if os.environ.get("NEOXKO_PII_PURE", "") not in ("", "0"):
        return {}, "NEOXKO_PII_PURE is set"
    try:
        recorded = json.loads((FOLDER / "sources.json").read_text())
    except (OSError, ValueError):
        return {}, "not built: installing neoxko where Cython and a C compiler are builds it"
    found, stale = {}, []
    for name in COMPILED:
        library = next((FOLDER / f"{name}{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES
                        if (FOLDER / f"{name}{suffix}").is_file()), None)
        if library is None:
            continue
        if hashlib.sha256((HERE / f"{name}.py").read_bytes()).hexdigest() != recorded.get(name):
            stale.append(name)
            continue
        found[name] = library
    if stale:
        return found, f"{', '.join(stale)} changed since the build: installing neoxko again rebuilds"
    return found, "" if found else "not built for this Python: installing neoxko again builds it"


class _Finder:
    """Serves neoxko.pii.<name> from its compiled library."""

    def __init__(self, libraries: dict[str, Path]):
        self.libraries = {f"{__package__}.{name}": path for name, path in libraries.items()}

    def find_spec(self, fullname, path=None, target=None):
        library = self.libraries.get(fullname)
        if library is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(library))
        return importlib.util.spec_from_loader(fullname, loader, origin=str(library))


LIBRARIES, WHY_NOT = _built()


def install() -> None:
    """Put the finder first, before any of the modules is imported."""
    if LIBRARIES and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(LIBRARIES))


def describe() -> str:
    """Which modules run compiled, for `neoxko info --hardware`."""
    pure = [name for name in COMPILED if name not in LIBRARIES]
    if not pure:
        return "compiled (Cython): all of the PII core"
    if not LIBRARIES:
        return f"pure Python ({WHY_NOT})"
    return f"compiled (Cython) but {', '.join(pure)}" + (f" ({WHY_NOT})" if WHY_NOT else "")
