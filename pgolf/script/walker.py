"""One pass over the flattened script (pgolf.script.specialise): names resolved scope by scope to what
they are (`Kind`), and either the facts collected (every attribute store, every call of a module-level
function, what blocks the specialisation) or the reads of constants written as literals.
"""
from __future__ import annotations

import ast
from typing import Any, Callable

from pgolf.script import fold as F
from pgolf.script.facts import ANY_CLASS, Baked, Call, Family, Kind, Scope, Store, binding_sites, const, fits, pairs
from pgolf.script.scopes import is_placeholder

ENV_WRITER = "pgolf.export.record:apply_env"  # its getattr / setattr reach the ENV fields, which stay reads
COPIES = {"ext:dataclasses.replace", "ext:copy.replace"}  # a copy with fields changed
REGISTERS = ("register_buffer", "register_parameter", "add_module", "register_module")
PURE_BUILTINS: dict[str, Callable[..., Any]] = {"int": int, "float": float, "bool": bool, "abs": abs, "min": min,
                                                "max": max, "len": len, "round": round}
SEQUENCE_USES = ("len", "tuple", "sorted", "set", "min", "max", "any", "all", "sum")  # a tuple does as well as a list


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
        self.callees: set[int] = set()  # ids of the Name nodes that are called
        self.recorded: set[int] = set()  # ids of assignment targets whose store is recorded
        self.read_only: set[int] = set()  # ids of `x.__dict__` nodes only read (`.items()`)
        self.never_set, self.collect = never_set, collect
        self.stack: list[Scope] = []
        self.function: list[str] = []  # enclosing top-level function / class names
        self.stores: list[Store] = []
        self.opaque: list[str] = []  # why nothing can be specialised
        self.methods_by_name = False  # whether getattr / hasattr may reach a method by a computed name
        self.changed = False

    # ---- what an expression is
    def _binding_scope(self, name: str) -> Scope | None:
        """The innermost scope that binds `name` as Python resolves it (an enclosing class body is skipped)."""
        inner = True
        for scope in reversed(self.stack):
            if scope.kind == "class" and not inner:
                continue
            inner = False
            if name in scope.facts:
                return scope
        return None

    def lookup(self, name: str) -> Kind | None:
        scope = self._binding_scope(name)
        return scope.facts[name] if scope is not None else None

    def bound(self, name: str) -> bool:
        """Whether a local scope binds `name` (else it is a global or a builtin)."""
        return self._binding_scope(name) is not None

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
        field = self._getattr_field(node)
        if field is not None:  # getattr(cfg.quant, "attn_bits")
            return self.kind(ast.Attribute(value=field[0], attr=field[1], ctx=ast.Load()))
        v = F.value_of(node)
        return const(v) if v is not F.NO else None

    def _getattr_field(self, node: ast.expr) -> tuple[ast.expr, str] | None:
        """(object, field) of `getattr(<config or section>, "<a field>")`, else None."""
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and not self.bound("getattr") and len(node.args) == 2 and not node.keywords):
            return None
        name, base = F.value_of(node.args[1]), self.kind(node.args[0])
        if isinstance(name, str) and base is not None and base[0] in ("config", "section") \
                and name in self.baked.values["" if base[0] == "config" else base[1]]:
            return node.args[0], name
        return None

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
                elif kind is None and cls and len(self.stack) == 1 and node.name == "__init__":
                    kind = self.param_facts.get((cls, a.arg))  # what every construction passes
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
            binding_sites(body, found)
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
        if self.collect or not (isinstance(node, (ast.Name, ast.Attribute)) or self._getattr_field(node) is not None):
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
            if self.collect and is_placeholder(node.id) and id(node) not in self.callees \
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
        if node.attr == "__dict__" and id(node) not in self.read_only:
            self._block("an object's __dict__ is used")
        node.value = self.visit(node.value)
        return node

    def visit_Compare(self, node: ast.Compare):
        node.left = self.visit(node.left)
        node.comparators = [self._sequence(c) if isinstance(op, (ast.In, ast.NotIn)) else self.visit(c)
                            for op, c in zip(node.ops, node.comparators)]
        operands = [node.left] + node.comparators
        if not self.collect and len(node.ops) == 1 and isinstance(node.ops[0], (ast.Is, ast.IsNot)):
            for x, other in ((node.left, node.comparators[0]), (node.comparators[0], node.left)):
                k = self.kind(x)
                if F.value_of(other) is None and k is not None and k[0] in ("config", "section"):
                    self.changed = True  # the configuration and its sections are never None
                    return F.literal(isinstance(node.ops[0], ast.IsNot))
        named = [i for i, x in enumerate(operands) if self._constant_name(x)]
        if named and not self.collect and all(i in named or F.value_of(x) is not F.NO or F.container(x) is not F.NO
                                              for i, x in enumerate(operands)):
            # a module constant decides a comparison of literals: `"sparse" in ATTN_GATES`
            operands = [F.literal(self.constants[x.id]) if i in named and isinstance(x, ast.Name) else x
                        for i, x in enumerate(operands)]
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
        args = [F.container(a) for a in node.args]
        if any(a is F.NO for a in args):
            return None
        try:
            out = PURE_BUILTINS[func.id](*args)
        except Exception:  # noqa: BLE001 - left to fail at run time, as it would
            return None
        if F.value_of(F.literal(out)) is F.NO or not F.small(out):
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
                for target, value in pairs(t, node.value):
                    if isinstance(target, ast.Attribute):
                        self.stores.append(Store(self.kind(target.value), target.attr,
                                                 self.kind(value) if value is not None else None))
                        self.recorded.add(id(target))
        node.value = self.visit(node.value)
        node.targets = [self._target(t) for t in node.targets]
        return node

    def _target(self, t: ast.expr) -> ast.expr:
        if isinstance(t, ast.Attribute) and id(t) in self.recorded:
            t.value = self.visit(t.value)
            return t
        if isinstance(t, (ast.Tuple, ast.List)):
            t.elts = [self._target(e) for e in t.elts]
            return t
        return self.visit(t)

    def visit_Call(self, node: ast.Call):
        func = node.func
        name = func.id if isinstance(func, ast.Name) and not self.bound(func.id) else None
        made = isinstance(func, ast.Call) and isinstance(func.func, ast.Name) and func.func.id == "type" \
            and not self.bound("type") and len(func.args) == 1 and not func.keywords
        if self.collect and ((name and is_placeholder(name)) or made):
            if name:
                self.callees.add(id(func))
            starred = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
            # `type(x)(...)`: a construction of x's class, whichever it is (ANY_CLASS)
            self.calls.append(Call(name or ANY_CLASS, [self.kind(a) for a in node.args],
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
                    and self.never_set(base[1], F.value_of(node.args[1])):
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
            self.read_only.add(id(func.value))
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
        return ast.copy_location(ast.Constant(any(isinstance(c, ast.Name) and self.baked.classes[c.id] == k
                                                  for c in classes)), node)

    def _constant_call(self, node: ast.Call, name: str | None) -> ast.expr | None:
        """A call of a module-level function whose whole body is `return <literal>`, with arguments
        that have no effect and fit its parameters: the literal."""
        if self.collect or name not in self.returns or not all(F.pure(a) for a in node.args) \
                or not all(k.arg and F.pure(k.value) for k in node.keywords):
            return None
        fn, value = self.returns[name]
        if not fits(fn.args, node):
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
