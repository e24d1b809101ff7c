"""The loader's layout: formats as modules of neoxko.formats, no import circle anywhere in the package, and names
resolved without torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from neoxko.errors import CheckpointError
from neoxko.formats import QUANTIZED, quantized, stored

PACKAGE = Path(__file__).resolve().parents[1] / "neoxko"


def _imports() -> dict[str, set[str]]:
    """Module -> the neoxko modules it imports, at the top or inside a function."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neoxko"):
                found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name and m != "neoxko"}
    return graph


def test_no_module_of_the_package_imports_itself_through_others():
    graph = _imports()
    assert "neoxko.checkpoint" in graph and "neoxko.formats.hf" in graph["neoxko.checkpoint"]
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                cycle = path[path.index(imported):] + [imported]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, path + [imported])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_names_resolve_without_torch(tmp_path):
    code = ("import sys; from neoxko.formats.locate import resolve, adapter_base\n"
            "print(resolve('ko-small').name, adapter_base(resolve('ko-small-chat')).name, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ko-small", "ko-small", "False"]


def test_the_registry_names_what_it_cannot_read(tmp_path):
    assert [quantized(name).NAME for name in QUANTIZED] == ["int8", "int4"]
    assert stored(tmp_path, {}).NAME == "float"
    assert stored(tmp_path, {"quant_method": "neoxko_int4"}).METHOD == "neoxko_int4"
    with pytest.raises(CheckpointError, match="quantized with 'awq', which neoxko cannot read"):
        stored(tmp_path, {"quant_method": "awq"})
    with pytest.raises(CheckpointError, match="unknown quantization 'int3'; the ones supported are int8 and int4"):
        quantized("int3")
