"""Python's name scopes, as far as the amalgamation needs them (pgolf.script.bundle).

When modules are flattened into one file, every reference to another module's name (through an
import, `from pgolf.x import y as z`, or an attribute of an imported module, `C.compress`) must
become the one global name that thing gets in the file, and every module-level name of a module
must become its own global name, without touching local variables that happen to share a name.
`Rewriter` does that for one module: each Name is resolved through the scopes that enclose it
(function, lambda and comprehension scopes; a class body only for names used directly in it;
`global` declarations), the way Python resolves it.

Resolved names are written as placeholders, `pgolf.model.gpt:GPT` for a module's own name and
`ext:torch.nn.functional` for a third-party import (not identifiers: the bundler replaces them by
final names once it knows which ones the script keeps and which of those collide).
"""
from __future__ import annotations

import ast
import builtins
import functools
import importlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

Target = tuple  # ("sym", module, name) | ("mod", module) | ("ext", object path) | ("cut", module)
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp, ast.SetComp,
          ast.DictComp, ast.GeneratorExp)


def placeholder(target: Target) -> str:
    if target[0] == "sym":
        return f"{target[1]}:{target[2]}"
    if target[0] == "ext":
        return f"ext:{target[1]}"
    raise ValueError(target)


def is_placeholder(name: str) -> bool:
    return ":" in name


def import_aliases(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The names an import statement binds."""
    if isinstance(node, ast.Import):
        return [a.asname or a.name.split(".")[0] for a in node.names]
    return [a.asname or a.name for a in node.names]


class Binder(ast.NodeVisitor):
    """The names one scope binds (its own body only, not nested scopes), its `global` names and its
    import statements."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.globals: set[str] = set()
        self.imports: list[ast.Import | ast.ImportFrom] = []

    @classmethod
    def of(cls, body: list[ast.stmt], args: ast.arguments | None = None) -> "Binder":
        b = cls()
        if args is not None:
            b.names |= {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
            b.names |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
        for stmt in body:
            b.visit(stmt)
        return b

    def visit_Name(self, node: ast.Name) -> None:
        if not isinstance(node.ctx, ast.Load):
            self.names.add(node.id)

    def _scope(self, node) -> None:  # a nested scope binds its name here and nothing else
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            # ... except `(x := ...)` inside a comprehension, which binds x in the enclosing scope
            self.names |= {n.target.id for n in ast.walk(node) if isinstance(n, ast.NamedExpr)}
        elif not isinstance(node, ast.Lambda):
            self.names.add(node.name)
        for d in getattr(node, "decorator_list", []):
            self.visit(d)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scope
    visit_Lambda = visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _scope

    def visit_Import(self, node) -> None:
        self.imports.append(node)
        self.names |= set(import_aliases(node))

    visit_ImportFrom = visit_Import

    def visit_Global(self, node: ast.Global) -> None:
        self.globals |= set(node.names)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.names.add(node.name)
        self.generic_visit(node)

    def visit_MatchAs(self, node) -> None:
        if node.name:
            self.names.add(node.name)
        self.generic_visit(node)


@dataclass
class Scope:
    kind: str  # module | function | class | comprehension
    names: set[str]  # bound here
    links: dict[str, Target] = field(default_factory=dict)  # names bound here by pgolf imports
    globals: set[str] = field(default_factory=set)


class Rewriter(ast.NodeTransformer):
    """Rewrites one module's statements onto placeholders (see the module docstring).

    `links`: the module's module-level pgolf imports (alias -> target); `own`: its module-level
    names; `externs`: its module-level third-party aliases -> ("ext", object path);
    `link_of(node)` resolves a pgolf import statement to [(alias, target)] (None: not pgolf);
    `member(target, attr)` resolves an attribute of a module target.
    Records, per placeholder, the local names in scope where it is used (`shadows`), so the final
    global name can avoid being captured by a local variable.
    """

    def __init__(self, module: str, own: set[str], links: dict[str, Target], externs: dict[str, Target],
                 link_of: Callable, member: Callable):
        self.module, self.own, self.externs = module, own, externs
        self.link_of, self.member = link_of, member
        self.stack = [Scope("module", set(own) | set(links) | set(externs), dict(links))]
        self.shadows: dict[str, set[str]] = {}

    # ---- resolution
    def lookup(self, name: str) -> Target | None:
        """The target a name refers to here; None for a local, a builtin or an unknown name."""
        inner = True
        for scope in reversed(self.stack[1:]):
            if scope.kind == "class" and not inner:
                continue  # a class body is not an enclosing scope of its methods
            inner = False
            if name in scope.globals:
                break
            if name in scope.links:
                return scope.links[name]
            if name in scope.names:
                return None
        top = self.stack[0]
        if name in top.links:
            return top.links[name]
        if name in self.externs:
            return self.externs[name]
        if name in self.own:
            return ("sym", self.module, name)
        return None

    def _local_names(self) -> set[str]:
        out: set[str] = set()
        for scope in self.stack[1:]:
            out |= scope.names
        return out

    def _use(self, target: Target, node: ast.expr) -> str:
        if target[0] == "mod":
            raise ValueError(f"{self.module}, line {node.lineno}: module {target[1]} used as a value "
                             "(only its attributes can be flattened)")
        if target[0] == "cut":
            raise ValueError(f"{self.module}, line {node.lineno}: uses {target[1]}, which is not exported")
        ph = placeholder(target)
        self.shadows.setdefault(ph, set()).update(self._local_names())
        return ph

    def visit_Name(self, node: ast.Name) -> ast.AST:
        target = self.lookup(node.id)
        if target is None:
            return node
        return ast.copy_location(ast.Name(id=self._use(target, node), ctx=node.ctx), node)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        chain: list[str] = []
        base: ast.expr = node
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        target = self.lookup(base.id) if isinstance(base, ast.Name) else None
        if target is None or target[0] != "mod":
            self.generic_visit(node)
            return node
        # `mod.attr...`: follow module attributes until a name that is not a module
        rest = chain[::-1]
        while rest and target[0] == "mod":
            target = self.member(target, rest.pop(0))
        if target[0] == "mod":
            raise ValueError(f"{self.module}, line {node.lineno}: module {target[1]} used as a value")
        out: ast.Name | ast.Attribute = ast.Name(id=self._use(target, node), ctx=ast.Load() if rest else node.ctx)
        for attr in rest:
            out = ast.Attribute(value=out, attr=attr, ctx=ast.Load())
        if rest:
            out.ctx = node.ctx
        return ast.copy_location(out, node)

    # ---- statements
    def visit_Global(self, node: ast.Global) -> ast.AST:
        node.names = [placeholder(("sym", self.module, n)) if n in self.own else n for n in node.names]
        return node

    def body(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        """A statement list: pgolf imports removed (a non-exported one becomes a raise that ends
        the block), everything else rewritten; never empty."""
        out: list[ast.stmt] = []
        for stmt in stmts:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                links = self.link_of(stmt)
                if links is not None:
                    cut = [t for _, t in links if t[0] == "cut"]
                    if cut:
                        out.append(_raise_not_exported(cut[0][1], stmt))
                        break
                    continue
                if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
                    continue
            new = self.visit(stmt)
            if new is None:
                continue
            out.extend(new if isinstance(new, list) else [new])
        return out or [ast.Pass()]

    def _enter(self, kind: str, body: list[ast.stmt], args: ast.arguments | None = None) -> None:
        b = Binder.of(body, args)
        links: dict[str, Target] = {}
        for imp in b.imports:
            for alias, target in self.link_of(imp) or []:
                links[alias] = target
        self.stack.append(Scope(kind, b.names - set(links), links, b.globals))

    def _args_outside(self, args: ast.arguments) -> None:
        """Defaults and annotations are evaluated in the enclosing scope."""
        args.defaults = [self.visit(d) for d in args.defaults]
        args.kw_defaults = [self.visit(d) if d is not None else None for d in args.kw_defaults]
        for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
            if a is not None and a.annotation is not None:
                a.annotation = self.visit(a.annotation)

    def _define(self, name: str) -> str:
        return placeholder(("sym", self.module, name)) if len(self.stack) == 1 else name

    def visit_FunctionDef(self, node):
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        self._args_outside(node.args)
        if node.returns is not None:
            node.returns = self.visit(node.returns)
        node.name = self._define(node.name)
        self._enter("function", node.body, node.args)
        node.body = self.body(node.body)
        self.stack.pop()
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda):
        self._args_outside(node.args)
        self._enter("function", [], node.args)
        node.body = self.visit(node.body)
        self.stack.pop()
        return node

    def visit_ClassDef(self, node: ast.ClassDef):
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        node.bases = [self.visit(b) for b in node.bases]
        node.keywords = [self.visit(k) for k in node.keywords]
        node.name = self._define(node.name)
        self._enter("class", node.body)
        node.body = self.body(node.body)
        self.stack.pop()
        return node

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp) -> ast.AST:
        first = node.generators[0]
        first.iter = self.visit(first.iter)  # evaluated in the enclosing scope
        targets: set[str] = set()
        for g in node.generators:
            targets |= {n.id for n in ast.walk(g.target) if isinstance(n, ast.Name)}
        self.stack.append(Scope("comprehension", targets))
        for i, g in enumerate(node.generators):
            g.target = self.visit(g.target)
            if i:
                g.iter = self.visit(g.iter)
            g.ifs = [self.visit(c) for c in g.ifs]
        for attr in ("elt", "key", "value"):
            if hasattr(node, attr):
                setattr(node, attr, self.visit(getattr(node, attr)))
        self.stack.pop()
        return node

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for name, value in ast.iter_fields(node):  # statement lists go through body()
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                setattr(node, name, self.body(value))
            elif isinstance(value, list):
                setattr(node, name, [self.visit(v) if isinstance(v, ast.AST) else v for v in value])
            elif isinstance(value, ast.AST):
                setattr(node, name, self.visit(value))
        return node


def external_attrs(base: ast.expr, instance: bool = False) -> set[str] | None:
    """Attribute names of a base class from outside the script (torch.nn.Module, Exception, ...),
    which the framework may call on a subclass; with `instance`, also the attributes the class and
    its bases declare or set on `self` in their source (`training`, `param_groups`). None when the
    base (or, with `instance`, its source) cannot be looked up."""
    parts: list[str] = []
    node = base
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    found = _class_attrs(".".join([node.id] + parts), instance)
    return None if found is None else set(found)


def outside_class(base: ast.expr) -> type | None:
    """The class a base from outside the script names (`ext:torch.nn.Module`, a builtin), if any."""
    parts: list[str] = []
    node = base
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    return _outside_class(".".join([node.id] + parts)) if isinstance(node, ast.Name) else None


@functools.lru_cache(maxsize=None)
def _outside_class(dotted: str) -> type | None:
    obj: Any = None
    if dotted.startswith("ext:"):
        parts = dotted[4:].split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for attr in parts[i:]:
                obj = getattr(obj, attr, None)
            break
    elif "." not in dotted:
        obj = getattr(builtins, dotted, None)
    return obj if isinstance(obj, type) else None


@functools.lru_cache(maxsize=None)
def _class_attrs(dotted: str, instance: bool) -> frozenset[str] | None:
    obj = _outside_class(dotted)
    if obj is None:
        return None
    out = set(dir(obj))
    if instance:
        for k in obj.__mro__:
            out |= set(k.__dict__.get("__annotations__", {}))
            if k.__module__ == "builtins":
                continue
            try:
                out |= set(re.findall(r"\bself\.(\w+)\s*(?::[^=\n]*)?=(?!=)", inspect.getsource(k)))
            except (OSError, TypeError):
                return None
    return frozenset(out)


def _raise_not_exported(module: str, at: ast.stmt) -> ast.stmt:
    msg = f"{module} is not part of this exported script"
    node = ast.Raise(exc=ast.Call(func=ast.Name(id="RuntimeError", ctx=ast.Load()),
                                  args=[ast.Constant(msg)], keywords=[]), cause=None)
    return ast.copy_location(node, at)
