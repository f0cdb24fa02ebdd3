"""The flattened code specialised to the configuration it bakes in (pgolf.export.bundle).

An exported script runs one configuration: CONFIG, changed at run time only by the official
environment overrides (record.ENV: data paths, seed, iterations, wall clock). So every read of any
other config field is a constant, and `specialise` writes it as one, then folds what became constant
(pgolf.export.fold): the branches of the switches the configuration leaves off go, and with them the
classes and functions only those branches used (the bundle's reachability drops them afterwards).

What counts as a read of the baked configuration (`Kind`s, inferred scope by scope as Python resolves
names): a parameter annotated `Config` or a section class (`cfg: ModelConfig`; mypy holds the
annotations to their callers), a local every assignment of which is such a value (`m = cfg.model`,
`t, q = cfg.train, cfg.quant`), an attribute chain from those, and `self.<attr>` where every
assignment of `<attr>` on an instance of the class's family (its bases and subclasses in the script)
is one such value (`self.cfg = cfg`, `self.gate = cfg.attn_gate`). A constant local or attribute is
substituted too. Anything else is left as it is.

What keeps a field from being a constant: the environment overrides; any store to the field through
a section or through an object of unknown type (`model.cfg.doc_mask = ...` switches a field for a
while: it stays a read); `dataclasses.replace` of it. A construction of another Config, an attribute
written by a computed name (`setattr(x, name, v)` outside `record.apply_env`, which writes only the
ENV fields) or through `__dict__`: no field is a constant and nothing is specialised.
Also folded: `hasattr(self, "a")` when nothing in the script can ever set `a` on that family.
"""
from __future__ import annotations

import ast
import dataclasses
import typing
from typing import Any, Callable

from pgolf.config import Config
from pgolf.export import fold as F
from pgolf.export.scopes import Binder, is_placeholder

ENV_WRITER = "pgolf.export.record:apply_env"  # its getattr / setattr reach the ENV fields, which stay reads
CONFIG_MODULE = "pgolf.config"
COPIES = {"ext:dataclasses.replace", "ext:copy.replace"}  # a copy with fields changed
REGISTERS = ("register_buffer", "register_parameter", "add_module", "register_module")
PURE_BUILTINS = {"int": int, "float": float, "bool": bool, "abs": abs, "min": min, "max": max, "len": len,
                 "round": round}
SEQUENCE_USES = ("len", "tuple", "sorted", "set", "min", "max", "any", "all", "sum")  # a tuple does as well as a list

Kind = tuple  # ("config",) | ("section", name) | ("inst", class placeholder) | ("const", repr, value)


def const(value: Any) -> Kind:
    return ("const", repr(value), value)


class Baked:
    """The configuration's values, and which fields can change at run time."""

    def __init__(self, cfg: Config, env_fields: set[tuple[str, str]]):
        hints = typing.get_type_hints(Config)
        self.values: dict[str, dict[str, Any]] = {"": {}}  # section -> field -> value ("": Config's own)
        self.classes = {f"{CONFIG_MODULE}:Config": ("config",)}
        for f in dataclasses.fields(Config):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
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
                for t in (m.targets if isinstance(m, ast.Assign) else [m.target] if isinstance(m, ast.AnnAssign) else []):
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


@dataclasses.dataclass
class Call:
    callee: str  # a module-level function's placeholder
    args: list[Kind | None]
    keywords: dict[str, Kind | None]
    starred: bool  # *args or **kwargs: which parameter gets what is not known


@dataclasses.dataclass
class Scope:
    kind: str  # function | class | comprehension
    facts: dict[str, Kind | None]  # names bound here -> what they are (None: not known)
    cls: str | None = None  # a class scope: its placeholder


class Walker(ast.NodeTransformer):
    """One pass over the script: `collect` records every attribute store (and what blocks the
    specialisation); otherwise reads of constants are replaced by literals."""

    def __init__(self, baked: Baked, family: Family, attr_facts: dict[tuple[str, str], Kind],
                 never_set: Callable[[str, str], bool], collect: bool, constants: dict[str, Any] | None = None,
                 param_facts: dict[tuple[str, str], Kind] | None = None):
        self.baked, self.family, self.attr_facts = baked, family, attr_facts
        self.constants = constants or {}  # module-level names bound once to a literal
        self.param_facts = param_facts or {}  # (function, parameter) -> what every call passes
        self.returns: dict[str, tuple[ast.FunctionDef, Any]] = {}  # functions that return a literal
        self.calls: list[Call] = []  # calls of module-level functions by name
        self.site_cache: dict[int, tuple[ast.AST, dict[str, list]]] = {}
        self.escaped: set[str] = set()  # module-level names used otherwise than called
        self.never_set, self.collect = never_set, collect
        self.stack: list[Scope] = []
        self.function: list[str] = []  # enclosing top-level function / class names
        self.stores: list[Store] = []
        self.opaque: list[str] = []  # why nothing can be specialised
        self.methods_by_name = False  # whether getattr / hasattr may reach a method by a computed name
        self.changed = False

    # ---- what an expression is
    def lookup(self, name: str) -> Kind | None:
        inner = True
        for scope in reversed(self.stack):
            if scope.kind == "class" and not inner:
                continue
            inner = False
            if name in scope.facts:
                return scope.facts[name]
        return None

    def bound(self, name: str) -> bool:
        """Whether a local scope binds `name` (else it is a global or a builtin)."""
        inner = True
        for scope in reversed(self.stack):
            if scope.kind == "class" and not inner:
                continue
            inner = False
            if name in scope.facts:
                return True
        return False

    def kind(self, node: ast.expr) -> Kind | None:
        if isinstance(node, ast.Name):
            return self.lookup(node.id)
        if isinstance(node, ast.Attribute):
            base = self.kind(node.value)
            if base is None:
                return None
            if base[0] in ("config", "section"):
                return self.baked.member(base, node.attr)
            if base[0] == "inst":
                return self.attr_facts.get((base[1], node.attr))
            return None
        if self._getattr_field(node):  # getattr(cfg.quant, "attn_bits")
            return self.kind(ast.Attribute(value=node.args[0], attr=node.args[1].value, ctx=ast.Load()))
        v = F.value_of(node)
        return const(v) if v is not F.NO else None

    def _getattr_field(self, node: ast.expr) -> bool:
        """`getattr(<config or section>, "<a field>")`."""
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and not self.bound("getattr") and len(node.args) == 2 and not node.keywords
                and isinstance(F.value_of(node.args[1]), str)):
            return False
        base = self.kind(node.args[0])
        return base is not None and base[0] in ("config", "section") \
            and node.args[1].value in self.baked.values["" if base[0] == "config" else base[1]]

    # ---- scopes
    def _method_class(self, node) -> str | None:
        if not self.stack or self.stack[-1].kind != "class" or not self.stack[-1].cls:
            return None
        if any(isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod") for d in node.decorator_list):
            return None
        return self.stack[-1].cls

    def _annotation(self, ann: ast.expr | None) -> Kind | None:
        return self.baked.classes.get(ann.id) if isinstance(ann, ast.Name) else None

    def _function_scope(self, node, args: ast.arguments, body: list[ast.stmt]) -> Scope:
        sites: dict[str, list] = {}
        params = args.posonlyargs + args.args
        cls = self._method_class(node) if not isinstance(node, ast.Lambda) else None
        for i, a in enumerate(params + args.kwonlyargs + [x for x in (args.vararg, args.kwarg) if x]):
            if i == 0 and cls and a in params:
                sites.setdefault(a.arg, []).append(("kind", ("inst", cls)))
            else:
                kind = self._annotation(a.annotation)
                if kind is None and not self.stack and not isinstance(node, ast.Lambda):
                    kind = self.param_facts.get((node.name, a.arg))  # what every call passes
                sites.setdefault(a.arg, []).append(("kind", kind))
        for name, found in self._sites(node, body).items():
            sites.setdefault(name, []).extend(found)
        scope = Scope("function", {n: None for n in sites})
        self.stack.append(scope)
        for _ in range(len(sites) + 1):  # to a fixed point (a local may be defined through another)
            new = {n: self._site_kind(s) for n, s in sites.items()}
            if new == scope.facts:
                break
            scope.facts = new
        self.stack.pop()
        return scope

    def _sites(self, node: ast.AST, body: list[ast.stmt]) -> dict[str, list]:
        """The binding sites of a scope's own body (cached: a pass does not change the code it reads)."""
        if id(node) not in self.site_cache:
            found: dict[str, list] = {}
            _binding_sites(body, found)
            self.site_cache[id(node)] = (node, found)
        return self.site_cache[id(node)][1]

    def _site_kind(self, sites: list) -> Kind | None:
        kinds = []
        for s in sites:
            if s[0] == "kind":
                kinds.append(s[1])
            elif s[0] == "value":
                kinds.append(self.kind(s[1]))
            else:
                return None
        return kinds[0] if kinds and all(k is not None and k == kinds[0] for k in kinds) else None

    def visit_FunctionDef(self, node):
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        self._outside_args(node.args)
        if node.returns is not None:
            node.returns = self.visit(node.returns)
        scope = self._function_scope(node, node.args, node.body)
        self.function.append(node.name)
        self.stack.append(scope)
        node.body = [self.visit(s) for s in node.body]
        self.stack.pop()
        self.function.pop()
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda):
        self._outside_args(node.args)
        self.stack.append(self._function_scope(node, node.args, []))
        node.body = self.visit(node.body)
        self.stack.pop()
        return node

    def _outside_args(self, args: ast.arguments) -> None:
        args.defaults = [self.visit(d) for d in args.defaults]
        args.kw_defaults = [self.visit(d) if d is not None else None for d in args.kw_defaults]

    def visit_ClassDef(self, node: ast.ClassDef):
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        node.bases = [self.visit(b) for b in node.bases]
        sites = self._sites(node, node.body)
        self.function.append(node.name)
        self.stack.append(Scope("class", {n: None for n in sites}, node.name if is_placeholder(node.name) else None))
        node.body = [self.visit(s) for s in node.body]
        self.stack.pop()
        self.function.pop()
        return node

    def _comprehension(self, node):
        first = node.generators[0]
        first.iter = self._sequence(first.iter)  # evaluated in the enclosing scope
        names = {n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}
        self.stack.append(Scope("comprehension", {n: None for n in names}))
        for i, g in enumerate(node.generators):
            if i:
                g.iter = self._sequence(g.iter)
            g.ifs = [self.visit(c) for c in g.ifs]
        for attr in ("elt", "key", "value"):
            if hasattr(node, attr):
                setattr(node, attr, self.visit(getattr(node, attr)))
        self.stack.pop()
        return node

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension

    # ---- reads
    def _literal(self, node: ast.expr, sequences: bool = False) -> ast.expr | None:
        if self.collect or not (isinstance(node, (ast.Name, ast.Attribute)) or self._getattr_field(node)):
            return None  # (a literal is one already)
        k = self.kind(node)
        if k is None or k[0] != "const":
            return None
        v = k[2]
        if isinstance(v, list):
            if not sequences:
                return None  # a list may be mutated or compared by identity: only read-only uses
            v = tuple(v)
        self.changed = True
        return ast.copy_location(F.literal(v), node)

    def _sequence(self, node: ast.expr) -> ast.expr:
        return self._literal(node, sequences=True) or self.visit(node)

    def visit_Name(self, node: ast.Name):
        if isinstance(node.ctx, ast.Load):
            if self.collect and is_placeholder(node.id) and not getattr(node, "_callee", False) \
                    and not self.bound(node.id):
                self.escaped.add(node.id)
            return self._literal(node) or node
        return node

    def visit_Attribute(self, node: ast.Attribute):
        if isinstance(node.ctx, ast.Load):
            lit = self._literal(node)
            if lit is not None:
                return lit
        elif self.collect and not isinstance(node.ctx, ast.Load):
            self.stores.append(Store(self.kind(node.value), node.attr, None))
        if node.attr == "__dict__" and not getattr(node, "_read_only", False):
            self._block("an object's __dict__ is used")
        node.value = self.visit(node.value)
        return node

    def visit_Compare(self, node: ast.Compare):
        node.left = self.visit(node.left)
        node.comparators = [self._sequence(c) if isinstance(op, (ast.In, ast.NotIn)) else self.visit(c)
                            for op, c in zip(node.ops, node.comparators)]
        operands = [node.left] + node.comparators
        named = [i for i, x in enumerate(operands) if self._constant_name(x)]
        if named and not self.collect and all(i in named or F.value_of(x) is not F.NO or F._container(x) is not F.NO
                                              for i, x in enumerate(operands)):
            # a module constant decides a comparison of literals: `"sparse" in ATTN_GATES`
            operands = [F.literal(self.constants[x.id]) if i in named else x for i, x in enumerate(operands)]
            node.left, node.comparators = operands[0], operands[1:]
            self.changed = True
        return node

    def _constant_name(self, node: ast.expr) -> bool:
        return isinstance(node, ast.Name) and node.id in self.constants and not self.bound(node.id)

    def _pure_builtin(self, node: ast.Call) -> ast.expr | None:
        """`int(2048.0)`, `max(1, 4)`, `len((1, 2))`: a builtin of literals, evaluated."""
        func = node.func
        if self.collect or not isinstance(func, ast.Name) or func.id not in PURE_BUILTINS or self.bound(func.id) \
                or node.keywords:
            return None
        args = [F._container(a) for a in node.args]
        if any(a is F.NO for a in args):
            return None
        try:
            out = PURE_BUILTINS[func.id](*args)
        except Exception:  # noqa: BLE001 - left to fail at run time, as it would
            return None
        if F.value_of(F.literal(out)) is F.NO or not F._small(out):
            return None
        self.changed = True
        return ast.copy_location(F.literal(out), node)

    def visit_For(self, node):
        node.iter = self._sequence(node.iter)
        node.target = self.visit(node.target)
        node.body = [self.visit(s) for s in node.body]
        node.orelse = [self.visit(s) for s in node.orelse]
        return node

    visit_AsyncFor = visit_For

    def visit_If(self, node):
        node.test = self._sequence(node.test)
        node.body = [self.visit(s) for s in node.body]
        node.orelse = [self.visit(s) for s in node.orelse]
        return node

    def visit_Assign(self, node: ast.Assign):
        if self.collect:
            for t in node.targets:
                for target, value in _pairs(t, node.value):
                    if isinstance(target, ast.Attribute):
                        self.stores.append(Store(self.kind(target.value), target.attr,
                                                 self.kind(value) if value is not None else None))
                        target._recorded = True
        node.value = self.visit(node.value)
        node.targets = [self._target(t) for t in node.targets]
        return node

    def _target(self, t: ast.expr) -> ast.expr:
        if isinstance(t, ast.Attribute) and getattr(t, "_recorded", False):
            t.value = self.visit(t.value)
            return t
        if isinstance(t, (ast.Tuple, ast.List)):
            t.elts = [self._target(e) for e in t.elts]
            return t
        return self.visit(t)

    def visit_Call(self, node: ast.Call):
        func = node.func
        name = func.id if isinstance(func, ast.Name) and not self.bound(func.id) else None
        if self.collect and name and is_placeholder(name):
            func._callee = True
            starred = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
            self.calls.append(Call(name, [self.kind(a) for a in node.args],
                                   {k.arg: self.kind(k.value) for k in node.keywords if k.arg}, starred))
        if self._config_getattr(func):
            self._block("a method of the Config is called by a computed name")
        if name in ("setattr", "delattr") and node.args:
            attr = F.value_of(node.args[1]) if len(node.args) > 1 else F.NO
            if isinstance(attr, str):
                if self.collect:
                    value = self.kind(node.args[2]) if name == "setattr" and len(node.args) > 2 else None
                    self.stores.append(Store(self.kind(node.args[0]), attr, value))
            elif not self.function or self.function[0] != ENV_WRITER:
                self._block(f"{name} with a computed attribute name")
        elif name in ("hasattr", "getattr") and len(node.args) >= 2 and isinstance(F.value_of(node.args[1]), str):
            base = self.kind(node.args[0])
            if name == "hasattr" and not self.collect and base and base[0] == "inst" \
                    and self.never_set(base[1], node.args[1].value):
                self.changed = True
                return ast.copy_location(ast.Constant(False), node)
        elif name in ("hasattr", "getattr") and len(node.args) >= 2 and not self._fields_only(node.args[0]) \
                and self.function[:1] != [ENV_WRITER]:  # (its names are ENV's sections and fields)
            self.methods_by_name = True  # a computed name on an object that may have methods of the script
        elif name in COPIES or (isinstance(func, ast.Name) and func.id in self.baked.classes):
            self._copied(node)
        elif isinstance(func, ast.Attribute) and func.attr in REGISTERS and node.args:
            attr = F.value_of(node.args[0])  # torch.nn.Module's ways of setting an attribute by name
            if not isinstance(attr, str):
                self._block(f"{func.attr} with a computed name")
            elif self.collect:
                self.stores.append(Store(self.kind(func.value), attr, None))
        elif isinstance(func, ast.Attribute) and func.attr in ("__setattr__", "__delattr__"):
            self._block(f"{func.attr} is called")
        elif isinstance(func, ast.Attribute) and func.attr in ("items", "keys", "values", "get") \
                and isinstance(func.value, ast.Attribute) and func.value.attr == "__dict__":
            func.value._read_only = True
        elif isinstance(func, ast.Attribute) and func.attr in ("from_dict", "load", "with_overrides") \
                and isinstance(func.value, ast.Name) and func.value.id in self.baked.classes:
            self._block(f"a configuration is made with {func.attr}")
        if name in SEQUENCE_USES and len(node.args) == 1 and not node.keywords:
            node.args = [self._sequence(node.args[0])]
        else:
            self.generic_visit(node)
        return self._literal(node) or self._isinstance(node, name) or self._pure_builtin(node) \
            or self._constant_call(node, name) or node

    def _isinstance(self, node: ast.Call, name: str | None) -> ast.expr | None:
        """`isinstance(cfg, Config)`: the Config and its sections are the only instances of their
        classes, so a value known to be one of them is an instance of its own class alone."""
        if self.collect or name != "isinstance" or len(node.args) != 2 or node.keywords:
            return None
        k = self.kind(node.args[0])
        classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
        if k is None or k[0] not in ("config", "section") or \
                not all(isinstance(c, ast.Name) and c.id in self.baked.classes for c in classes):
            return None
        self.changed = True
        return ast.copy_location(ast.Constant(any(self.baked.classes[c.id] == k for c in classes)), node)

    def _constant_call(self, node: ast.Call, name: str | None) -> ast.expr | None:
        """A call of a module-level function whose whole body is `return <literal>`, with arguments
        that have no effect and fit its parameters: the literal."""
        if self.collect or name not in self.returns or not all(F.pure(a) for a in node.args) \
                or not all(k.arg and F.pure(k.value) for k in node.keywords):
            return None
        fn, value = self.returns[name]
        if not _fits(fn.args, node):
            return None
        self.changed = True
        return ast.copy_location(F.literal(value), node)

    def _fields_only(self, node: ast.expr) -> bool:
        """An object whose attributes a computed name can only read, never call as a method of the
        script: a third-party module, a config section (plain fields), the Config (its sections; a
        call of what a computed getattr of it returns is refused in visit_Call), or a section picked
        by name (`getattr(cfg, section)`)."""
        if isinstance(node, ast.Name) and node.id.startswith("ext:"):
            return True
        if self._config_getattr(node):
            return True
        k = self.kind(node)
        return k is not None and k[0] in ("section", "config")

    def _config_getattr(self, node: ast.expr) -> bool:
        """`getattr(<the Config>, <computed>)`."""
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
            and not self.bound("getattr") and len(node.args) >= 2 and F.value_of(node.args[1]) is F.NO \
            and (self.kind(node.args[0]) or ("",))[0] == "config"

    def _copied(self, node: ast.Call) -> None:
        """`replace(x, f=...)` or a section class called: a config object whose fields are not CONFIG's."""
        if not self.collect:
            return
        if isinstance(node.func, ast.Name) and node.func.id in self.baked.classes:
            self._block(f"{node.func.id.rpartition(':')[2]} is constructed")
            return
        base = self.kind(node.args[0]) if node.args else None
        sections = ([base[1] if base[0] == "section" else ""] if base and base[0] in ("config", "section")
                    else list(self.baked.values))
        for kw in node.keywords:
            for s in sections:
                if kw.arg is None:
                    self.baked.dynamic |= {(s, f) for f in self.baked.values[s]}
                elif kw.arg in self.baked.values[s]:
                    self.baked.dynamic.add((s, kw.arg))

    def visit_Constant(self, node: ast.Constant):
        return node

    def _block(self, why: str) -> None:
        if self.collect:
            self.opaque.append(why)


def _pairs(target: ast.expr, value: ast.expr | None) -> list[tuple[ast.expr, ast.expr | None]]:
    """(target, its value) for an assignment, through tuple unpacking of a tuple of the same length."""
    if isinstance(target, (ast.Tuple, ast.List)):
        same = isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts) \
            and not any(isinstance(e, ast.Starred) for e in target.elts + value.elts)
        return [p for i, t in enumerate(target.elts) for p in _pairs(t, value.elts[i] if same else None)]
    return [(target, value)]


def _binding_sites(body: list[ast.stmt], sites: dict[str, list]) -> None:
    """Every binding of a name in one scope's own body: ("value", expr) for a plain assignment,
    ("unknown",) for any other (loops, augmented assignment, imports, with, except, def, del, ...);
    a name a nested scope declares `nonlocal` is unknown too."""

    def add(name: str, site: tuple) -> None:
        sites.setdefault(name, []).append(site)

    def target(t: ast.expr, value: ast.expr | None) -> None:
        for node, v in _pairs(t, value):
            if isinstance(node, ast.Name):
                add(node.id, ("value", v) if v is not None else ("unknown",))
            elif isinstance(node, ast.Starred):
                target(node.value, None)

    class V(ast.NodeVisitor):
        def visit_Assign(self, n: ast.Assign) -> None:
            for t in n.targets:
                target(t, n.value)
            self.visit(n.value)

        def visit_AnnAssign(self, n: ast.AnnAssign) -> None:
            if n.value is not None:
                target(n.target, n.value)
                self.visit(n.value)

        def visit_Name(self, n: ast.Name) -> None:
            if not isinstance(n.ctx, ast.Load):
                add(n.id, ("unknown",))  # for / with / del / augmented targets

        def visit_NamedExpr(self, n: ast.NamedExpr) -> None:
            add(n.target.id, ("unknown",))
            self.visit(n.value)

        def _nested(self, n) -> None:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                add(n.name, ("unknown",))
            for sub in ast.walk(n):
                if isinstance(sub, ast.Nonlocal):
                    for name in sub.names:
                        add(name, ("unknown",))
                if isinstance(sub, ast.NamedExpr) and isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp,
                                                                     ast.GeneratorExp)):
                    add(sub.target.id, ("unknown",))

        visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _nested
        visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _nested

        def _import(self, n) -> None:
            for a in n.names:
                add((a.asname or a.name).split(".")[0], ("unknown",))

        visit_Import = visit_ImportFrom = _import

        def visit_ExceptHandler(self, n: ast.ExceptHandler) -> None:
            if n.name:
                add(n.name, ("unknown",))
            self.generic_visit(n)

        def visit_Global(self, n) -> None:
            for name in n.names:
                add(name, ("unknown",))

        visit_Nonlocal = visit_Global

        def visit_MatchAs(self, n) -> None:
            if n.name:
                add(n.name, ("unknown",))
            self.generic_visit(n)

        visit_MatchStar = visit_MatchAs

    v = V()
    for s in body:
        v.visit(s)


class Specialiser:
    """The state of the passes over one script."""

    def __init__(self, stmts: list[ast.stmt], baked: Baked, external: Callable[[ast.expr], set[str] | None]):
        self.stmts, self.baked, self.external = stmts, baked, external
        self.attr_facts: dict[tuple[str, str], Kind] = {}
        self.param_facts: dict[tuple[str, str], Kind] = {}
        self.stores: list[Store] = []
        self.opaque: list[str] = []
        self.methods_by_name = True  # (known after _collect)

    def run(self, max_rounds: int = 12) -> list[str]:
        """Specialise `stmts` in place; returns why nothing could be specialised ([] when it was)."""
        for _ in range(max_rounds):
            self.family = Family(self.stmts, self.external)
            self._collect()
            if self.opaque:
                return self.opaque
            w = Walker(self.baked, self.family, self.attr_facts, self._never_set, collect=False,
                       constants=_module_constants(self.stmts), param_facts=self.param_facts)
            w.returns = _literal_functions(self.stmts)
            for s in self.stmts:
                w.visit(s)
            if not (w.changed | self._fold()):
                break
        return []

    def _collect(self) -> None:
        """Stores and blocks, with the attribute and parameter facts to a fixed point."""
        self.attr_facts, self.param_facts = {}, {}
        sites: dict = {}  # binding sites per scope, for the walks over the same code
        for _ in range(16):
            dynamic = set(self.baked.dynamic)
            w = Walker(self.baked, self.family, self.attr_facts, self._never_set, collect=True,
                       param_facts=self.param_facts)
            w.site_cache = sites
            for s in self.stmts:
                w.visit(s)
            self.opaque, self.stores, self.methods_by_name = w.opaque, w.stores, w.methods_by_name
            if self.opaque:
                self.baked.everything_dynamic()
                return
            for st in self.stores:
                self._dynamic(st)
            facts, params = self._attr_facts(), self._param_facts(w.calls, w.escaped)
            if facts == self.attr_facts and params == self.param_facts and dynamic == self.baked.dynamic:
                return
            self.attr_facts, self.param_facts = facts, params
        self.opaque = ["the attribute facts do not settle"]

    def _dynamic(self, st: Store) -> None:
        """The fields a store can change."""
        b = self.baked
        if st.base is None:  # an object of unknown type: any section's field of that name
            b.dynamic |= {(s, st.attr) for s in b.sections_with(st.attr)}
        elif st.base[0] == "section":
            b.dynamic.add((st.base[1], st.attr))
        elif st.base[0] == "config":
            if st.attr in b.values and st.attr:
                b.dynamic |= {(st.attr, f) for f in b.values[st.attr]}
            else:
                b.dynamic.add(("", st.attr))

    def _attr_facts(self) -> dict[tuple[str, str], Kind]:
        by_attr: dict[str, list[Store]] = {}
        for st in self.stores:
            by_attr.setdefault(st.attr, []).append(st)
        out = {}
        for k in self.family.nodes:
            group = self.family.group(k)
            for attr, stores in by_attr.items():
                if not self._own_attr(group, attr):
                    continue
                mine = [st for st in stores if st.base is None or (st.base[0] == "inst" and st.base[1] in group)]
                if any(st.base is None for st in mine) or not mine:
                    continue
                kinds = [st.value for st in mine]
                if kinds[0] is not None and all(x == kinds[0] for x in kinds):
                    out[(k, attr)] = kinds[0]
        return out

    def _param_facts(self, calls: list[Call], escaped: set[str]) -> dict[tuple[str, str], Kind]:
        """A parameter of a module-level function is what every call of it passes (a config section,
        a literal), when the function is only ever called by its name (never passed on, stored or
        decorated by anything but a wrapper that passes the arguments through)."""
        by_callee: dict[str, list[Call]] = {}
        for c in calls:
            by_callee.setdefault(c.callee, []).append(c)
        out = {}
        for s in self.stmts:
            if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) or s.name in escaped \
                    or s.name not in by_callee or not all(_passes_through(d) for d in s.decorator_list):
                continue
            a = s.args
            positional = a.posonlyargs + a.args
            defaults = dict(zip([p.arg for p in positional][len(positional) - len(a.defaults):], a.defaults))
            defaults.update({p.arg: d for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None})
            for i, p in enumerate(positional + a.kwonlyargs):
                kinds = []
                for c in by_callee[s.name]:
                    if c.starred:
                        kinds.append(None)
                    elif i < len(positional) and i < len(c.args):
                        kinds.append(c.args[i])
                    elif p.arg in c.keywords:
                        kinds.append(c.keywords[p.arg])
                    elif p.arg in defaults and F.value_of(defaults[p.arg]) is not F.NO:
                        kinds.append(const(F.value_of(defaults[p.arg])))
                    else:
                        kinds.append(None)
                if kinds and kinds[0] is not None and all(k == kinds[0] for k in kinds):
                    out[(s.name, p.arg)] = kinds[0]
        return out

    def _own_attr(self, group: set[str], attr: str) -> bool:
        """An attribute only stores in the script set (`self.a = ...`, setattr, register_buffer): no
        class member, nothing an outside base defines or sets on its instances."""
        if attr.startswith("__"):
            return False
        for c in group:
            outside = self.family.outside[c]
            if outside is None or attr in outside or attr in self.family.members[c]:
                return False
        return True

    def _never_set(self, k: str, attr: str) -> bool:
        group = self.family.group(k)
        if not self._own_attr(group, attr):
            return False
        return not any(st.attr == attr and (st.base is None or (st.base[0] == "inst" and st.base[1] in group))
                       for st in self.stores)

    def _fold(self) -> bool:
        changed = False
        for s in self.stmts:
            changed |= F.fold_inside(s)
            for n in ast.walk(s):
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    changed |= F.drop_dead_locals(n)
        return changed


PASS_THROUGH = ("ext:torch.no_grad", "ext:torch.inference_mode", "ext:contextlib.contextmanager",
                "ext:functools.lru_cache", "ext:functools.cache")


def _passes_through(decorator: ast.expr) -> bool:
    """A decorator whose wrapper calls the function with the arguments it was given."""
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    parts = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    return isinstance(node, ast.Name) and ".".join([node.id] + parts) in PASS_THROUGH


def _literal_functions(stmts: list[ast.stmt]) -> dict[str, tuple[ast.FunctionDef, Any]]:
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
        body = s.body[1:] if s.body and isinstance(s.body[0], ast.Expr) and F._docstring(s.body[0].value) else s.body
        if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
            v = F.value_of(body[0].value)
            if v is not F.NO:
                out[s.name] = (s, v)
    return out


def _fits(args: ast.arguments, call: ast.Call) -> bool:
    """Whether a call's arguments bind to these parameters without a TypeError."""
    positional = [a.arg for a in args.posonlyargs + args.args]
    if any(isinstance(a, ast.Starred) for a in call.args) or (len(call.args) > len(positional) and not args.vararg):
        return False
    given = set(positional[:len(call.args)])
    names = positional[len(args.posonlyargs):] + [a.arg for a in args.kwonlyargs]
    for k in call.keywords:
        if k.arg in given or (k.arg not in names and not args.kwarg):
            return False
        given.add(k.arg)
    required = positional[:len(positional) - len(args.defaults)] + \
        [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None]
    return all(r in given for r in required)


def _module_constants(stmts: list[ast.stmt]) -> dict[str, Any]:
    """Module-level names bound once, to a literal (a number, a string, a tuple of those), and never
    declared `global` anywhere."""
    count: dict[str, int] = {}
    values: dict[str, Any] = {}
    for s in stmts:
        for name in Binder.of([s]).names:
            count[name] = count.get(name, 0) + 1
        if isinstance(s, (ast.Assign, ast.AnnAssign)) and s.value is not None:
            targets = s.targets if isinstance(s, ast.Assign) else [s.target]
            v = F.value_of(s.value)
            if len(targets) == 1 and isinstance(targets[0], ast.Name) and v is not F.NO:
                values[targets[0].id] = v
    declared = {n for s in stmts for x in ast.walk(s) if isinstance(x, ast.Global) for n in x.names}
    return {k: v for k, v in values.items() if count.get(k) == 1 and k not in declared and is_placeholder(k)}


def specialise(stmts: list[ast.stmt], cfg: Config, env_fields: set[tuple[str, str]],
               external: Callable[[ast.expr], set[str] | None]) -> list[str]:
    """Substitute and fold `stmts` (top-level statements on placeholders) for `cfg`, in place.
    Returns why the code could not be specialised, if it could not ([] otherwise)."""
    return Specialiser(stmts, Baked(cfg, env_fields), external).run()


def methods_by_name(stmts: list[ast.stmt], cfg: Config, env_fields: set[tuple[str, str]],
                    external: Callable[[ast.expr], set[str] | None]) -> bool:
    """Whether a getattr / hasattr with a computed name in `stmts` may reach an object of the script
    (one that has methods), not only a third-party module or a config section."""
    sp = Specialiser(stmts, Baked(cfg, env_fields), external)
    sp.family = Family(stmts, external)
    sp._collect()
    return sp.methods_by_name or bool(sp.opaque)
