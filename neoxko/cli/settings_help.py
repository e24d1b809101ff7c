"""The settings a config dataclass takes, for `--help`: each key, its default and its comment, read from the class's
source with ast (no import: the help of every command stays as fast as argparse's)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def settings(module: str, name: str) -> list[tuple[str, str, str]]:
    """(key, default, comment) of each field of class `name` in neoxko/<module>.py, its bases' first (a field the
    class sets again keeps its first place, with the class's default and comment)."""
    source = (ROOT / f"{module}.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    lines = source.splitlines()
    found = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name)
    fields: dict[str, tuple[str, str]] = {}
    for base in found.bases:
        if isinstance(base, ast.Name) and base.id in BASES:
            fields |= {key: (default, comment) for key, default, comment in settings(*BASES[base.id])}
    for node in found.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above = [line.strip().lstrip("#").strip() for line in lines[_first_comment(lines, node.lineno - 2):
                                                                    node.lineno - 1]]
        line = lines[node.lineno - 1]
        inline = line.split("  # ", 1)[1].strip() if "  # " in line else ""
        above = [text for text in above if not _label(text)]  # ("# optimisation": a section's name, not a meaning)
        comment = (inline or " ".join(above)).removeprefix(f"{node.target.id}: ")
        fields[node.target.id] = (_default(node.value), comment)
    return [(key, default, comment) for key, (default, comment) in fields.items()]


def _label(text: str) -> bool:
    """A comment that names a group of settings: a few words, no punctuation."""
    return len(text.split()) <= 4 and not any(c in text for c in ":,.()=")


def _first_comment(lines: list[str], index: int) -> int:
    """The first line of the comment block that ends at lines[index] (index + 1 when there is none)."""
    start = index + 1
    while index >= 0 and lines[index].strip().startswith("#"):
        start, index = index, index - 1
    return start


def _default(value: ast.expr | None) -> str:
    if value is None:
        return "(required)"
    if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field":
        for keyword in value.keywords:
            if keyword.arg == "default_factory":
                factory = keyword.value
                if isinstance(factory, ast.Lambda):
                    return ast.unparse(factory.body)
                made = ast.unparse(factory)
                return {"list": "[]", "dict": "{}", "tuple": "()"}.get(made, f"{made}()")
            if keyword.arg == "default":
                return ast.unparse(keyword.value)
    return ast.unparse(value)


BASES = {"TrainConfig": ("train/config", "TrainConfig")}


def epilog(module: str, name: str, example: str) -> str:
    """The settings as --help's closing text."""
    width = 36
    lines = [f"settings (key=value after the command, or keys of the --config YAML file), e.g. {example}:"]
    for key, default, comment in settings(module, name):
        head = f"  {key}={default}"
        if not comment:
            lines.append(head)
        elif len(head) < width:
            lines.append(f"{head:<{width}} {comment}")
        else:
            lines.append(f"{head}\n{'':<{width}} {comment}")
    return "\n".join(lines)
