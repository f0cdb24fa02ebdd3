"""Reading pgolf's modules for the flattening (pgolf.script.bundle): the closure of the record entry.

`Closure` parses `pgolf.export.record` and every pgolf module it can reach (imports at module level
and inside functions; never the modules in NOT_EXPORTED), records each module's module-level names,
its pgolf imports resolved to what they name (a module's own name, a name it imported, a submodule)
and its third-party imports, and trims the registry tables it was given to the entries a
configuration reaches, before anything else reads them.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pgolf
from pgolf.errors import PgolfError
from pgolf.script.scopes import Binder, import_aliases

ENTRY = "pgolf.export.record"
ENTRY_FUNCTION = "main"
PACKAGE_DIR = Path(pgolf.__file__).resolve().parent
# Never part of a record script: the notebooks' side, the command line, the exporter itself.
NOT_EXPORTED = ("pgolf.lab", "pgolf.cli", "pgolf.envinfo", "pgolf.script.bundle", "pgolf.script.closure",
                "pgolf.script.scopes", "pgolf.script.specialise", "pgolf.script.facts", "pgolf.script.walker",
                "pgolf.script.fold", "pgolf.export.submission", "pgolf.export.check")


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    own: set[str] = field(default_factory=set)  # module-level names of its own statements
    links: dict[str, tuple] = field(default_factory=dict)  # module-level pgolf imports: alias -> target
    externs: dict[str, tuple] = field(default_factory=dict)  # module-level third-party aliases -> ("ext", obj)

    @property
    def package(self) -> str:
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def _not_exported(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in NOT_EXPORTED)


def module_path(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "pgolf":
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def extern_object(node: ast.Import | ast.ImportFrom, i: int) -> tuple[str, str | None]:
    """(object path, extra module to load) of the i-th name a third-party import binds."""
    a = node.names[i]
    if isinstance(node, ast.ImportFrom):
        return f"{node.module}.{a.name}", None
    if a.asname:
        return a.name, None
    top = a.name.split(".")[0]
    return top, (a.name if a.name != top else None)  # `import importlib.util` binds importlib


class Closure:
    """The pgolf modules reachable from the entry, parsed, with their module-level bindings."""

    def __init__(self, trims: dict[tuple[str, str], set[str]]):
        self.mods: dict[str, Module] = {}
        self.trims = trims
        self.loads: dict[str, dict[str, set[str]]] = {}  # extern object -> module -> its `import a.b` lines
        self.forms: dict[str, ast.Import | ast.ImportFrom] = {}  # extern object -> the import statement (first seen)
        todo, scanned = [ENTRY], set()
        while todo:
            name = todo.pop()
            if name in scanned or _not_exported(name):
                continue
            scanned.add(name)
            mod = self.load(name)  # (loading resolves its imports, which may load others: scanned later)
            for node in ast.walk(mod.tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    todo += self._modules_of(node, mod)
            todo += _parents(name)
        missing = [k for k in trims if k[0] not in self.mods]
        if missing:
            raise PgolfError(f"bundle: registry module {missing[0][0]} is not reachable from {ENTRY}")

    def _absolute(self, node: ast.ImportFrom, mod: Module) -> str:
        if not node.level:
            return node.module or ""
        base = mod.package.split(".")[:len(mod.package.split(".")) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def _modules_of(self, node, mod: Module) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names if a.name.split(".")[0] == "pgolf"]
        base = self._absolute(node, mod)
        if base.split(".")[0] != "pgolf":
            return []
        return [base] + [f"{base}.{a.name}" for a in node.names if module_path(f"{base}.{a.name}")]

    def load(self, name: str) -> Module:
        if name in self.mods:
            return self.mods[name]
        path = module_path(name)
        if path is None:
            raise PgolfError(f"bundle: no module {name}")
        tree = ast.parse(path.read_text(), filename=str(path))
        mod = Module(name, path, tree)
        self.mods[name] = mod
        for (m, table), keys in self.trims.items():
            if m == name:
                _trim(tree, table, keys, name)
        binder = Binder.of(tree.body)
        for imp in binder.imports:
            links = self.link_of(imp, mod)
            if links is not None:
                mod.links.update(dict(links))
                continue
            if isinstance(imp, ast.ImportFrom) and imp.module == "__future__":
                continue
            for i, alias in enumerate(import_aliases(imp)):
                obj, extra = extern_object(imp, i)
                mod.externs[alias] = ("ext", obj)
                self.forms.setdefault(obj, imp)
                if extra:
                    self.loads.setdefault(obj, {}).setdefault(name, set()).add(extra)
        mod.own = binder.names - set(mod.links) - set(mod.externs)
        return mod

    def link_of(self, node, mod: Module) -> list[tuple[str, tuple]] | None:
        """[(alias, target)] of a pgolf import statement; None for any other import."""
        if isinstance(node, ast.Import):
            names = [a for a in node.names if a.name.split(".")[0] == "pgolf"]
            if not names:
                return None
            if len(names) != len(node.names):
                raise PgolfError(f"bundle: {mod.name}: mixed pgolf / third-party import on line {node.lineno}")
            return [(a.asname or "pgolf", self._module_target(a.name if a.asname else "pgolf")) for a in names]
        base = self._absolute(node, mod)
        if base.split(".")[0] != "pgolf":
            return None
        if _not_exported(base):
            return [(a.asname or a.name, ("cut", base)) for a in node.names]
        return [(a.asname or a.name, self.member(("mod", base), a.name)) for a in node.names]

    def _module_target(self, name: str) -> tuple:
        return ("cut", name) if _not_exported(name) else ("mod", name)

    def member(self, target: tuple, attr: str) -> tuple:
        """What `module.attr` is: a module's own name, a name it imported, or a submodule."""
        name = target[1]
        mod = self.load(name)
        if attr in mod.own:
            return ("sym", name, attr)
        if attr in mod.links:
            return mod.links[attr]
        if attr in mod.externs:
            return mod.externs[attr]
        sub = f"{name}.{attr}"
        if module_path(sub):
            return self._module_target(sub)
        raise PgolfError(f"bundle: {name} has no {attr!r}")


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _trim(tree: ast.Module, table: str, keys: set[str], module: str) -> None:
    for stmt in tree.body:
        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                and stmt.targets[0].id == table and isinstance(stmt.value, ast.Dict)):
            literal = [k for k in stmt.value.keys if isinstance(k, ast.Constant)]
            if len(literal) < len(stmt.value.keys):  # `**other` or a computed key: entries it cannot see
                raise PgolfError(f"bundle: {module}.{table} has a key that is not a literal; it cannot be trimmed")
            unknown = keys - {k.value for k in literal}
            if unknown:
                raise PgolfError(f"bundle: {module}.{table} has no entry {sorted(unknown)[0]!r}")
            pairs = [(k, v) for k, v in zip(literal, stmt.value.values) if k.value in keys]
            stmt.value.keys, stmt.value.values = [k for k, _ in pairs], [v for _, v in pairs]
            return
    raise PgolfError(f"bundle: {module} has no registry table {table} (a dict literal)")
