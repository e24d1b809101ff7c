"""Builds the optional compiled PII core: Cython compiles neoxko/pii's hot modules, unchanged, into
neoxko/pii/_compiled/ (about 1.4x the rate of the same code in CPython). neoxko/pii/compiled.py loads a compiled
module only while the source it was built from is the one on disk, so an edit is never shadowed by a stale build.
Without Cython or a C compiler the install goes on and neoxko runs the pure-Python modules (`neoxko info
--hardware` says which runs). Everything else is in pyproject.toml.
"""

import hashlib
import json
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
COMPILED = ("cues", "normalise", "shapes", "context", "rules", "replace")  # (must match neoxko/pii/compiled.py)


class OptionalBuildExt(build_ext):
    """build_ext that warns and carries on where the compiled core cannot be built, and records the sources'
    hashes beside the built modules."""

    def run(self):
        (HERE / "neoxko" / "pii" / "_compiled").mkdir(exist_ok=True)  # (where an in-place or editable build copies)
        try:
            super().run()
        except Exception as error:  # noqa: BLE001 (any build failure: the pure-Python modules still run)
            self._skip(error)
            return
        _write_hashes(HERE / "neoxko" / "pii" / "_compiled" if self.inplace else
                      Path(self.build_lib) / "neoxko" / "pii" / "_compiled")

    def copy_extensions_to_source(self):  # (pip install -e: the built modules are copied beside the sources)
        try:
            super().copy_extensions_to_source()
        except Exception as error:  # noqa: BLE001
            self._skip(error)
            return
        _write_hashes(HERE / "neoxko" / "pii" / "_compiled")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001
            self._skip(error)

    def _skip(self, error: Exception) -> None:
        print(f"neoxko: the compiled PII core was not built ({error}); the pure-Python modules run instead",
              file=sys.stderr)


def _write_hashes(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    hashes = {name: hashlib.sha256((HERE / "neoxko" / "pii" / f"{name}.py").read_bytes()).hexdigest()
              for name in COMPILED}
    (folder / "sources.json").write_text(json.dumps(hashes, indent=1) + "\n")


def _extensions():
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("neoxko: Cython is not installed; the PII core runs as pure Python", file=sys.stderr)
        return []
    from setuptools import Extension

    modules = [Extension(f"neoxko.pii._compiled.{name}", [f"neoxko/pii/{name}.py"]) for name in COMPILED]
    return cythonize(modules, build_dir="build/cython", quiet=True, nthreads=2,
                     compiler_directives={"language_level": 3, "binding": True, "infer_types": True})


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
