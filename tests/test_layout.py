"""The house: the core never imports the lab side, and no pgolf modules import each other in a circle.

Every import counts, at module level or inside a function (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pgolf"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every pgolf module `path` imports (absolute names; `from pkg import mod` counts mod when it is one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    known = {module_name(p) for p in PKG.rglob("*.py")}
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PKG.rglob("*.py")}


def test_core_imports_nothing_of_the_lab():
    bad = {m: sorted(d for d in deps if d == "pgolf.lab" or d.startswith("pgolf.lab."))
           for m, deps in graph().items() if not m.startswith("pgolf.lab") and m != "pgolf.cli"}
    assert not {m: d for m, d in bad.items() if d}


def test_no_import_circles():
    g = graph()
    # package faces (`__init__`) are left out: a package importing its own submodules is not a circle
    g = {m: {d for d in deps if not (m.startswith(d + ".") or d.startswith(m + "."))} for m, deps in g.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles[:3]


def test_the_walker_sees_a_circle_and_a_lab_import(tmp_path, monkeypatch):
    """The two checks above fail on a house that has the faults."""
    pkg = tmp_path / "pgolf"
    (pkg / "lab").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "lab" / "__init__.py").write_text("")
    (pkg / "lab" / "plots.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pgolf import b\n")
    (pkg / "b.py").write_text("from pgolf.a import f\nfrom pgolf.lab.plots import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    g = graph()
    assert "pgolf.lab.plots" in g["pgolf.b"] and "pgolf.a" in g["pgolf.b"] and "pgolf.b" in g["pgolf.a"]
    import pytest
    with pytest.raises(AssertionError):
        test_no_import_circles()
    with pytest.raises(AssertionError):
        test_core_imports_nothing_of_the_lab()
