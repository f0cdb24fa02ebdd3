"""The flattened code specialised to the configuration it bakes in (pgolf.script.bundle).

An exported script runs one configuration: CONFIG, changed at run time only by the official
environment overrides (record.ENV: data paths, seed, iterations, wall clock). So every read of any
other config field is a constant, and `specialise` writes it as one, then folds what became constant
(pgolf.script.fold): the branches of the switches the configuration leaves off go, and with them the
classes and functions only those branches used (the bundle's reachability drops them afterwards).

What counts as a read of the baked configuration (`Kind`s, inferred scope by scope as Python resolves
names): a parameter annotated `Config` or a section class (`cfg: ModelConfig`; mypy holds the
annotations to their callers), a local every assignment of which is such a value (`m = cfg.model`,
`t, q = cfg.train, cfg.quant`), an attribute chain from those, and `self.<attr>` where every
assignment of `<attr>` on an instance of the class's family (its bases and subclasses in the script)
is one such value (`self.cfg = cfg`, `self.gate = cfg.attn_gate`). A constant local or attribute is
substituted too, and so is a parameter that every call gives the same value: of a module-level
function called only by its name, or of a class's own `__init__` when the class is only constructed
by its name (`Rotary(64, 16, 10000.0, 1.0)`; `type(x)(...)` counts for every class it fits). Such a
parameter of a function that nothing reads after folding leaves the signature and the calls.
Anything else is left as it is.

What keeps a field from being a constant: the environment overrides; any store to the field through
a section or through an object of unknown type (`model.cfg.doc_mask = ...` switches a field for a
while: it stays a read); `dataclasses.replace` of it. A construction of another Config, an attribute
written by a computed name (`setattr(x, name, v)` outside `record.apply_env`, which writes only the
ENV fields) or through `__dict__`: no field is a constant and nothing is specialised.
Also folded: `hasattr(self, "a")` when nothing in the script can ever set `a` on that family.
"""
from __future__ import annotations

import ast
from typing import Callable

from pgolf.config import Config
from pgolf.script import fold as F
from pgolf.script.facts import (ANY_CLASS, Baked, Call, Family, Kind, Store, const, literal_functions, module_constants,
                                fits, passes_through, plain_class)
from pgolf.script.scopes import Binder
from pgolf.script.walker import Walker

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
                       constants=module_constants(self.stmts), param_facts=self.param_facts)
            w.returns = literal_functions(self.stmts)
            for s in self.stmts:
                w.visit(s)
            if not (w.changed | self._fold()):
                break
        while drop_unread_parameters(self.stmts, self.param_facts):
            self._fold()  # (a local that only filled a dropped argument is unread now)
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
        decorated by anything but a wrapper that passes the arguments through). The same for a
        parameter of a class's own `__init__` (keyed by the class) and the calls of the class, when
        the class is only ever called by its name (no subclass, no decorator, a plain metaclass) and
        nothing calls an `__init__` by attribute but `super().__init__` (which reaches a base)."""
        by_callee: dict[str, list[Call]] = {}
        for c in calls:
            by_callee.setdefault(c.callee, []).append(c)
        out = {}
        ctor_calls_safe = self._constructed_by_name_only()
        for s in self.stmts:
            name = getattr(s, "name", None)
            if name is None or name in escaped or name not in by_callee:
                continue
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not all(passes_through(d) for d in s.decorator_list):
                    continue
                fn, skip = s, 0
            elif isinstance(s, ast.ClassDef) and ctor_calls_safe and not s.decorator_list and not s.keywords \
                    and all(plain_class(b) for b in s.bases):
                init = [m for m in s.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))
                        and m.name == "__init__"]
                if len(init) != 1 or init[0].decorator_list or {"__new__", "__init__"} & Binder.of(
                        [m for m in s.body if m is not init[0]]).names:
                    continue
                fn, skip = init[0], 1
                # `type(x)(...)` may construct this class too, unless its arguments cannot bind here
                extra = [c for c in by_callee.get(ANY_CLASS, []) if c.starred or _binds(fn.args, c, skip)]
                by_callee[name] = by_callee[name] + extra
            else:
                continue
            a = fn.args
            positional = (a.posonlyargs + a.args)[skip:]
            defaults = dict(zip([p.arg for p in positional][len(positional) - len(a.defaults):], a.defaults))
            defaults.update({p.arg: d for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None})
            for i, p in enumerate(positional + a.kwonlyargs):
                kinds: list[Kind | None] = []
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

    def _constructed_by_name_only(self) -> bool:
        """Whether the only calls of an `__init__` by attribute are `super().__init__(...)`, and no
        instance is made from `x.__class__` (a class constructed with arguments no call by its name
        shows; `type(x)(...)` is collected as a call of any class, ANY_CLASS)."""
        for s in self.stmts:
            for n in ast.walk(s):
                if isinstance(n, ast.Attribute) and n.attr == "__class__":
                    return False
                if isinstance(n, ast.Attribute) and n.attr == "__init__" and not (
                        isinstance(n.value, ast.Call) and isinstance(n.value.func, ast.Name)
                        and n.value.func.id == "super"):
                    return False
        return True

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


def drop_unread_parameters(stmts: list[ast.stmt], param_facts: dict[tuple[str, str], Kind]) -> bool:
    """Take out of a module-level function a parameter that every call gives the same value (a
    parameter fact) and that nothing in the function reads any more, and the argument out of every
    call, where each call's argument has no effect (a literal, a name, an attribute read). The calls
    are all by the function's name (a parameter fact says so), so they are the ones found here.
    Returns whether anything was dropped."""
    dropped = False
    fns = {s.name: s for s in stmts if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))}
    calls: dict[str, list[ast.Call]] = {}
    for s in stmts:
        for n in ast.walk(s):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in fns:
                calls.setdefault(n.func.id, []).append(n)
    for name, fn in fns.items():
        names = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
        if {"locals", "vars", "eval", "exec"} & names:
            continue
        a = fn.args
        for p in list(a.posonlyargs + a.args + a.kwonlyargs):
            if (name, p.arg) not in param_facts or p.arg in names:
                continue
            positional = a.posonlyargs + a.args
            i = positional.index(p) if p in positional else None
            first_default = len(positional) - len(a.defaults)
            if i is None:
                default = a.kw_defaults[a.kwonlyargs.index(p)]
            else:
                default = a.defaults[i - first_default] if i >= first_default else None
            if default is not None and not F.pure(default):
                continue  # (a default is evaluated when the function is defined)
            found = []  # (call, what to remove) for every call
            for c in calls.get(name, []):
                if any(isinstance(x, ast.Starred) for x in c.args) or any(k.arg is None for k in c.keywords):
                    break
                arg = c.args[i] if i is not None and i < len(c.args) else None
                kw = next((k for k in c.keywords if k.arg == p.arg), None)
                value = arg if arg is not None else kw.value if kw is not None else None
                if value is not None and not F.pure(value):
                    break
                found.append((c, arg, kw))
            else:
                for c, arg, kw in found:
                    if arg is not None:
                        c.args.remove(arg)
                    if kw is not None:
                        c.keywords.remove(kw)
                if i is not None:
                    if i >= first_default:
                        del a.defaults[i - first_default]
                    (a.posonlyargs if p in a.posonlyargs else a.args).remove(p)
                else:
                    j = a.kwonlyargs.index(p)
                    del a.kwonlyargs[j], a.kw_defaults[j]
                dropped = True
    return dropped


def _binds(args: ast.arguments, call: Call, skip: int) -> bool:
    """Whether a call's arguments (no starred ones) bind to these parameters, the first `skip` bound
    already (`self`)."""
    rest = (args.posonlyargs + args.args)[skip:]
    trimmed = ast.arguments(posonlyargs=[], args=rest, vararg=args.vararg, kwonlyargs=args.kwonlyargs,
                            kw_defaults=args.kw_defaults, kwarg=args.kwarg,
                            defaults=args.defaults[max(0, len(args.defaults) - len(rest)):])
    fake = ast.Call(func=ast.Constant(None), args=[ast.Constant(None) for _ in call.args],
                    keywords=[ast.keyword(arg=k, value=ast.Constant(None)) for k in call.keywords])
    return fits(trimmed, fake)


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
