"""The compiled PII core (setup.py builds it with Cython at install): it finds the same spans as the same modules run
by CPython, and a module whose source changed after the build runs from its source, never from the old build."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from neoxko.pii import compiled

ROOT = Path(__file__).resolve().parents[1]
built = pytest.mark.skipif(not compiled.LIBRARIES, reason=f"the compiled PII core is not in use here: "
                                                          f"{compiled.WHY_NOT}")

SPANS = """
import json, sys
from neoxko.pii import compiled, find_pii
from neoxko.pii.score import builtin_sets
texts = [text for items, _ in builtin_sets(600).values() for text, _ in items]
json.dump({"core": compiled.describe(), "spans": [find_pii(t) for t in texts]}, sys.stdout)
"""

LOADERS = """
import json, sys
import neoxko.pii
from neoxko.pii import compiled
json.dump({"loaders": {name: type(sys.modules["neoxko.pii." + name].__loader__).__name__
                       for name in compiled.COMPILED}, "core": compiled.describe()}, sys.stdout)
"""


def _run(code: str, env: dict | None = None, path: Path = ROOT) -> dict:
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=path)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@built
def test_compiled_and_python_find_the_same_spans():
    fast, pure = _run(SPANS), _run(SPANS, {"NEOXKO_PII_PURE": "1"})
    assert fast["core"].startswith("compiled") and pure["core"].startswith("pure Python (NEOXKO_PII_PURE")
    assert len(fast["spans"]) > 2000 and sum(map(len, fast["spans"])) > 1000
    assert fast["spans"] == pure["spans"]


@built
def test_an_edited_module_runs_from_its_source_not_its_old_build(tmp_path):
    shutil.copytree(ROOT / "neoxko", tmp_path / "neoxko", ignore=shutil.ignore_patterns("__pycache__"))
    fresh = _run(LOADERS, path=tmp_path)
    assert set(fresh["loaders"].values()) == {"ExtensionFileLoader"}, fresh
    with open(tmp_path / "neoxko" / "pii" / "rules.py", "a", encoding="utf-8") as f:
        f.write("\n# an edit after the build\n")
    edited = _run(LOADERS, path=tmp_path)
    assert edited["loaders"].pop("rules") == "SourceFileLoader"
    assert set(edited["loaders"].values()) == {"ExtensionFileLoader"}
    assert "rules changed since the build: installing neoxko again rebuilds" in edited["core"]


def test_without_a_build_the_modules_run_as_python(tmp_path):
    shutil.copytree(ROOT / "neoxko", tmp_path / "neoxko", ignore=shutil.ignore_patterns("__pycache__", "_compiled"))
    bare = _run(LOADERS, path=tmp_path)
    assert set(bare["loaders"].values()) == {"SourceFileLoader"}
    assert bare["core"] == "pure Python (not built: installing neoxko where Cython and a C compiler are builds it)"


def test_info_hardware_says_which_core_runs():
    done = subprocess.run([sys.executable, "-m", "neoxko", "info", "--hardware", "--json"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pii_core"] == compiled.describe()
