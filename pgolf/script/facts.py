"""What the specialisation knows (pgolf.script.specialise): the baked values, the script's classes,
what an expression is (`Kind`), and the facts read off the code without running it: the binding sites
of each scope, module-level constants, functions that return a literal, how a call binds.
"""
from __future__ import annotations

import ast
import dataclasses
import typing
from typing import Any, Callable

from pgolf.config import Config
from pgolf.script import fold as F
from pgolf.script.scopes import Binder, is_placeholder, outside_class

CONFIG_MODULE = "pgolf.config"
Kind = tuple  # ("config",) | ("section", name) | ("inst", class placeholder) | ("const", repr, value)


def const(value: Any) -> Kind:
    return ("const", repr(value), value)


class Baked:
    """The configuration's values, and which fields can change at run time."""

    def __init__(self, cfg: Config, env_fields: set[tuple[str, str]]):
        hints = typing.get_type_hints(Config)
        self.values: dict[str, dict[str, Any]] = {"": {}}  # section -> field -> value ("": Config's own)
        self.classes: dict[str, Kind] = {f"{CONFIG_MODULE}:Config": ("config",)}
        for f in dataclasses.fields(Config):
            tp = hints[f.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                self.values[f.name] = dataclasses.asdict(getattr(cfg, f.name))
                self.classes[f"{CONFIG_MODULE}:{tp.__name__}"] = ("section", f.name)
            else:
                self.values[""][f.name] = getattr(cfg, f.name)
        self.env = set(env_fields)
        self.dynamic = set(env_fields)

    def sections_with(self, attr: str) -> list[str]:
        return [s for s, fields in self.values.items() if attr in fields]

    def member(self, kind: Kind, attr: str) -> Kind | None:
        """What `<kind>.attr` is, for a config or a section."""
        section = "" if kind[0] == "config" else kind[1]
        if kind[0] == "config" and attr in self.values and attr:
            return ("section", attr)
        fields = self.values.get(section, {})
        if attr not in fields or (section, attr) in self.dynamic:
            return None
        v = fields[attr]
        ok = isinstance(v, F.SCALARS) or (isinstance(v, list) and all(isinstance(x, F.SCALARS) for x in v))
        return const(v) if ok and v == v else None

    def everything_dynamic(self) -> None:
        self.dynamic |= {(s, f) for s, fields in self.values.items() for f in fields}


class Family:
    """The script's classes: bases, members, and what outside bases define."""

    def __init__(self, stmts: list[ast.stmt], external: Callable[[ast.expr], set[str] | None]):
        self.nodes = {s.name: s for s in stmts if isinstance(s, ast.ClassDef) and is_placeholder(s.name)}
        self.bases = {k: [b.id for b in n.bases if isinstance(b, ast.Name) and b.id in self.nodes]
                      for k, n in self.nodes.items()}
        self.members: dict[str, set[str]] = {}
        self.outside: dict[str, set[str] | None] = {}  # attributes outside bases define (None: unknown)
        for k, n in self.nodes.items():
            own = set()
            for m in n.body:
                if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    own.add(m.name)
                targets = m.targets if isinstance(m, ast.Assign) else [m.target] if isinstance(m, ast.AnnAssign) else []
                for t in targets:
                    own |= {x.id for x in ast.walk(t) if isinstance(x, ast.Name)}
            self.members[k] = own
            outside: set[str] | None = set()
            for b in n.bases:
                if isinstance(b, ast.Name) and b.id in self.nodes:
                    continue
                attrs = external(b)
                outside = None if attrs is None or outside is None else outside | attrs
            self.outside[k] = outside

    def ancestors(self, k: str) -> set[str]:
        out, todo = set(), [k]
        while todo:
            for b in self.bases.get(todo.pop(), []):
                if b not in out:
                    out.add(b)
                    todo.append(b)
        return out

    def group(self, k: str) -> set[str]:
        """The classes whose methods can run on an instance of k: its subclasses and all their bases."""
        below = {d for d in self.nodes if k in self.ancestors(d)} | {k}
        return set().union(*({d} | self.ancestors(d) for d in below))


@dataclasses.dataclass
class Store:
    base: Kind | None
    attr: str
    value: Kind | None


ANY_CLASS = "*"  # the callee of `type(x)(...)`: the class of x, not known


@dataclasses.dataclass
class Call:
    callee: str  # a module-level function's or class's placeholder (or ANY_CLASS)
    args: list[Kind | None]
    keywords: dict[str, Kind | None]
    starred: bool  # *args or **kwargs: which parameter gets what is not known


@dataclasses.dataclass
class Scope:
    kind: str  # function | class | comprehension
    facts: dict[str, Kind | None]  # names bound here -> what they are (None: not known)
    cls: str | None = None  # a class scope: its placeholder


def pairs(target: ast.expr, value: ast.expr | None) -> list[tuple[ast.expr, ast.expr | None]]:
    """(target, its value) for an assignment, through tuple unpacking of a tuple of the same length."""
    if isinstance(target, (ast.Tuple, ast.List)):
        elts = value.elts if isinstance(value, (ast.Tuple, ast.List)) else []
        same = len(elts) == len(target.elts) and not any(isinstance(e, ast.Starred) for e in target.elts + elts)
        return [p for i, t in enumerate(target.elts) for p in pairs(t, elts[i] if same else None)]
    return [(target, value)]


def binding_sites(body: list[ast.stmt], sites: dict[str, list]) -> None:
    """Every binding of a name in one scope's own body: ("value", expr) for a plain assignment,
    ("unknown",) for any other (loops, augmented assignment, imports, with, except, def, del, ...);
    a name a nested scope declares `nonlocal` is unknown too."""

    def add(name: str, site: tuple) -> None:
        sites.setdefault(name, []).append(site)

    def target(t: ast.expr, value: ast.expr | None) -> None:
        for node, v in pairs(t, value):
            if isinstance(node, ast.Name):
                add(node.id, ("value", v) if v is not None else ("unknown",))
            elif isinstance(node, ast.Starred):
                target(node.value, None)

    comprehensions = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)

    def visit(n: ast.AST) -> None:
        if isinstance(n, (ast.Assign, ast.AnnAssign)):
            if n.value is not None:
                for t in n.targets if isinstance(n, ast.Assign) else [n.target]:
                    target(t, n.value)
                visit(n.value)
            return
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda) + comprehensions):
            if not isinstance(n, (ast.Lambda,) + comprehensions):
                add(n.name, ("unknown",))  # a nested scope binds its name here, and nothing else ...
            for sub in ast.walk(n):  # ... but for `nonlocal` names and `(x := ...)` in a comprehension
                if isinstance(sub, ast.Nonlocal):
                    for name in sub.names:
                        add(name, ("unknown",))
                if isinstance(sub, ast.NamedExpr) and isinstance(n, comprehensions):
                    add(sub.target.id, ("unknown",))
            return
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            add(n.id, ("unknown",))  # for / with / del / augmented targets
        elif isinstance(n, ast.NamedExpr):
            add(n.target.id, ("unknown",))
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            for a in n.names:
                add((a.asname or a.name).split(".")[0], ("unknown",))
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            for name in n.names:
                add(name, ("unknown",))
        elif isinstance(n, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and n.name:
            add(n.name, ("unknown",))
        for child in ast.iter_child_nodes(n):
            visit(child)

    for s in body:
        visit(s)


PASS_THROUGH = ("ext:torch.no_grad", "ext:torch.inference_mode", "ext:contextlib.contextmanager",
                "ext:functools.lru_cache", "ext:functools.cache")


def passes_through(decorator: ast.expr) -> bool:
    """A decorator whose wrapper calls the function with the arguments it was given."""
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    return isinstance(node, ast.Name) and ".".join([node.id] + parts) in PASS_THROUGH


def literal_functions(stmts: list[ast.stmt]) -> dict[str, tuple[ast.FunctionDef, Any]]:
    """Module-level functions, bound once and undecorated, whose body is `return <literal>`."""
    count: dict[str, int] = {}
    for s in stmts:
        for name in Binder.of([s]).names:
            count[name] = count.get(name, 0) + 1
    declared = {n for s in stmts for x in ast.walk(s) if isinstance(x, ast.Global) for n in x.names}
    out = {}
    for s in stmts:
        if not isinstance(s, ast.FunctionDef) or s.decorator_list or count.get(s.name) != 1 or s.name in declared:
            continue
        body = s.body[1:] if s.body and isinstance(s.body[0], ast.Expr) and F.docstring(s.body[0].value) else s.body
        if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
            v = F.value_of(body[0].value)
            if v is not F.NO:
                out[s.name] = (s, v)
    return out


def fits(args: ast.arguments, call: ast.Call) -> bool:
    """Whether a call's arguments bind to these parameters without a TypeError."""
    positional = [a.arg for a in args.posonlyargs + args.args]
    if any(isinstance(a, ast.Starred) for a in call.args) or (len(call.args) > len(positional) and not args.vararg):
        return False
    given = set(positional[:len(call.args)])
    names = positional[len(args.posonlyargs):] + [a.arg for a in args.kwonlyargs]
    for k in call.keywords:
        if k.arg is None or k.arg in given or (k.arg not in names and not args.kwarg):
            return False
        given.add(k.arg)
    required = positional[:len(positional) - len(args.defaults)] + \
        [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None]
    return all(r in given for r in required)


def module_constants(stmts: list[ast.stmt]) -> dict[str, Any]:
    """Module-level names bound once, to a literal (a number, a string, a tuple of those, which may
    unpack a tuple constant bound above it: `("auto", *KERNELS)`), and never declared `global` anywhere."""
    count: dict[str, int] = {}
    values: dict[str, Any] = {}
    for s in stmts:
        for name in Binder.of([s]).names:
            count[name] = count.get(name, 0) + 1
    declared = {n for s in stmts for x in ast.walk(s) if isinstance(x, ast.Global) for n in x.names}
    for s in stmts:
        if isinstance(s, (ast.Assign, ast.AnnAssign)) and s.value is not None:
            targets = s.targets if isinstance(s, ast.Assign) else [s.target]
            v = F.value_of(_unpacked(s.value, values))
            own = targets[0].id if len(targets) == 1 and isinstance(targets[0], ast.Name) else None
            if own is not None and v is not F.NO and count.get(own) == 1 and own not in declared:
                values[own] = v
    return {k: v for k, v in values.items() if is_placeholder(k)}


def _unpacked(node: ast.expr, tuples: dict[str, Any]) -> ast.expr:
    """A tuple display with `*NAME` of known tuple constants written out (else `node` itself)."""
    if not isinstance(node, ast.Tuple) or not any(isinstance(e, ast.Starred) for e in node.elts):
        return node
    elts: list[ast.expr] = []
    for e in node.elts:
        if not isinstance(e, ast.Starred):
            elts.append(e)
        elif isinstance(e.value, ast.Name) and isinstance(tuples.get(e.value.id), tuple):
            elts += [F.literal(x) for x in tuples[e.value.id]]
        else:
            return node
    return ast.Tuple(elts=elts, ctx=ast.Load())


def plain_class(base: ast.expr) -> bool:
    """A base from outside the script whose metaclass is `type` itself (torch.nn.Module, Exception):
    calling a subclass runs `__new__` and the subclass's `__init__` with the call's arguments, as a
    plain class does (an Enum's or an ABC's metaclass may do otherwise)."""
    cls = outside_class(base)
    return cls is not None and type(cls) is type
