"""Constant folding and dead code, on Python's AST (pgolf.script.specialise substitutes, this folds).

Once the baked configuration's values stand as literals in the code, `fold_block` evaluates what is
now constant, the way Python would at run time: unary and binary operators, comparisons (`in` over a
tuple of literals included), `and` / `or`, `not`, conditional expressions. A statement whose test is
constant keeps only the branch that runs (`if`, `while`, `for` over an empty literal, `assert`), and
what follows a `return` / `raise` / `break` / `continue` in the same block goes. `drop_dead_locals`
removes assignments of side-effect-free values to local names nothing reads.

Nothing here knows about configurations: every fold is a plain fact of Python, and an expression
that raises, or whose result would be large, is left as it is.
"""
from __future__ import annotations

import ast
import operator
from typing import Any, Callable

NO: Any = object()  # "not a constant"
Op = Callable[..., Any]
_UNARY: dict[type, Op] = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_,
                          ast.Invert: operator.invert}
_BINARY: dict[type, Op] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
                           ast.Pow: operator.pow, ast.BitAnd: operator.and_, ast.BitOr: operator.or_,
                           ast.BitXor: operator.xor, ast.LShift: operator.lshift, ast.RShift: operator.rshift}
_COMPARE: dict[type, Op] = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
                            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
                            ast.NotIn: lambda a, b: a not in b}
SCALARS = (bool, int, float, str, type(None))
_BLOCK_ENDS = (ast.Return, ast.Raise, ast.Break, ast.Continue)


def literal(value: Any) -> ast.expr:
    """The expression of a constant: negative numbers as `-x` (so that `(-1) ** 2` and `(-1).real`
    keep their parentheses when unparsed), tuples and lists of literals as tuples / lists."""
    if isinstance(value, (tuple, list)):
        elts = [literal(v) for v in value]
        return ast.Tuple(elts=elts, ctx=ast.Load()) if isinstance(value, tuple) else ast.List(elts=elts, ctx=ast.Load())
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (value < 0 or str(value).startswith("-")):
        return ast.UnaryOp(op=ast.USub(), operand=ast.Constant(-value))
    return ast.Constant(value)


def value_of(node: ast.AST) -> Any:
    """The value of a literal expression (constants, signed numbers, tuples of literals), else NO."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = value_of(node.operand)
        return NO if v is NO or isinstance(v, (str, bool)) or v is None else _UNARY[type(node.op)](v)
    if isinstance(node, ast.Tuple):
        vals = [value_of(e) for e in node.elts]
        return NO if any(v is NO for v in vals) else tuple(vals)
    return NO


def small(v: Any) -> bool:
    """A value worth writing back as a literal (not a 10,000-digit power or a long string)."""
    if isinstance(v, tuple):
        return len(v) <= 16 and all(small(x) for x in v)
    if isinstance(v, bool) or v is None:
        return True
    if isinstance(v, int):
        return abs(v) < 2 ** 63
    if isinstance(v, float):
        return v == v  # no NaN (it has no literal)
    return isinstance(v, str) and len(v) <= 80


def pure(node: ast.AST) -> bool:
    """An expression that can be dropped without changing what the program does: literals, names,
    attribute reads of names (pgolf has no property with side effects), and operators over those."""
    if isinstance(node, (ast.Constant, ast.Name)):
        return True
    if isinstance(node, ast.Attribute):
        return pure(node.value)
    if isinstance(node, (ast.Tuple, ast.List)):
        return all(pure(e) for e in node.elts)
    if isinstance(node, ast.UnaryOp):
        return pure(node.operand)
    if isinstance(node, ast.BoolOp):
        return all(pure(v) for v in node.values)
    if isinstance(node, ast.Compare):
        return pure(node.left) and all(pure(c) for c in node.comparators)
    return False


class _Fold(ast.NodeTransformer):
    """Bottom-up expression folding; `truth` marks the expressions whose value only counts as a truth
    value (tests), where `x and False` is False when x is pure."""

    def __init__(self) -> None:
        self.changed = False

    def _new(self, node: ast.expr, like: ast.AST) -> ast.expr:
        self.changed = True
        return ast.copy_location(node, like)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        v = value_of(node.operand)
        if v is NO or (isinstance(node.op, (ast.USub, ast.UAdd)) and isinstance(node.operand, ast.Constant)
                       and not isinstance(v, bool)):
            return node  # (-3 is already a literal)
        try:
            out = _UNARY[type(node.op)](v)
        except Exception:  # noqa: BLE001 - a fold that would raise is left to run time
            return node
        return self._new(literal(out), node) if small(out) else node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        a, b = value_of(node.left), value_of(node.right)
        strings = isinstance(a, str) and isinstance(b, str) and isinstance(node.op, ast.Add)
        if a is NO or b is NO or type(node.op) not in _BINARY \
                or not (strings or all(isinstance(x, (int, float)) for x in (a, b))):
            return node  # (numbers, and str + str: str % tuple is formatting, and str * int can grow)
        if isinstance(node.op, ast.Pow) and abs(b) > 64:
            return node
        try:
            out = _BINARY[type(node.op)](a, b)
        except Exception:  # noqa: BLE001
            return node
        return self._new(literal(out), node) if small(out) else node

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        vals = [value_of(node.left)] + [container(c) for c in node.comparators]
        for op, a, b in zip(node.ops, vals, vals[1:]):  # left to right, as Python: a False link ends it
            if a is NO or b is NO:
                return node
            if isinstance(op, (ast.Is, ast.IsNot)):
                if not (a is None or b is None or all(isinstance(x, bool) for x in (a, b))):
                    return node  # (identity of other literals is CPython's business)
                ok = (a is b) == isinstance(op, ast.Is)
            else:
                try:
                    ok = bool(_COMPARE[type(op)](a, b))
                except Exception:  # noqa: BLE001
                    return node
            if not ok:  # the operands after this one are never evaluated
                return self._new(ast.Constant(False), node)
        return self._new(ast.Constant(True), node)

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        is_and = isinstance(node.op, ast.And)
        values = list(node.values)
        while len(values) > 1:  # a leading constant decides or drops out
            v = value_of(values[0])
            if v is NO:
                break
            if bool(v) != is_and:  # `False and x` is False, `True or x` is True
                return self._new(values[0], node)
            values.pop(0)
        if len(values) == 1:
            return self._new(values[0], node)
        if len(values) < len(node.values):
            node.values = values
            self.changed = True
        return node

    def visit_IfExp(self, node: ast.IfExp) -> ast.AST:
        self.generic_visit(node)
        node.test = self.truth(node.test)
        v = value_of(node.test)
        if v is NO:
            return node
        return self._new(node.body if v else node.orelse, node)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        """f-string parts whose value is a literal become text: f"{'lora'}_{n}" -> f"lora_{n}"."""
        self.generic_visit(node)
        parts: list[ast.expr | str] = []  # (a str: literal text)
        for part in node.values:
            text = _formatted(part)
            if text is not None and parts and isinstance(parts[-1], str):
                parts[-1] += text
            else:
                parts.append(text if text is not None else part)
        values = [ast.Constant(p) if isinstance(p, str) else p for p in parts]
        if [ast.dump(p) for p in values] == [ast.dump(p) for p in node.values]:
            return node
        self.changed = True
        if all(isinstance(p, str) for p in parts):
            return ast.copy_location(ast.Constant("".join(p for p in parts if isinstance(p, str))), node)
        node.values = values
        return node

    def truth(self, test: ast.expr) -> ast.expr:
        """Fold a test, where only its truth value counts (`x and False` -> False for a pure x)."""
        node = self.visit(test)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            node.operand = self.truth(node.operand)
            v = value_of(node.operand)
            return self._new(ast.Constant(not v), node) if v is not NO else node
        if isinstance(node, ast.BoolOp):
            node.values = [self.truth(v) for v in node.values]
            deciding = not isinstance(node.op, ast.And)  # the value that decides: False for and, True for or
            for v in node.values:
                c = value_of(v)
                if c is not NO and bool(c) == deciding and all(pure(x) for x in node.values):
                    return self._new(ast.Constant(deciding), node)
            kept = [v for v in node.values if value_of(v) is NO or bool(value_of(v)) == deciding]
            if len(kept) < len(node.values):
                node.values = kept or [ast.Constant(not deciding)]
                self.changed = True
                return node.values[0] if len(node.values) == 1 else node
        return node


_CONVERSIONS: dict[int, Callable[[Any], Any]] = {-1: lambda v: v, ord("s"): str, ord("r"): repr, ord("a"): ascii}


def _formatted(part: ast.expr) -> str | None:
    """The text of one f-string part when it is a literal (text, or a formatted literal), else None."""
    if isinstance(part, ast.Constant) and isinstance(part.value, str):
        return part.value
    if not isinstance(part, ast.FormattedValue):
        return None
    v = value_of(part.value)
    spec = "" if part.format_spec is None else _formatted_spec(part.format_spec)
    if v is NO or spec is None or part.conversion not in _CONVERSIONS:
        return None
    try:
        return format(_CONVERSIONS[part.conversion](v), spec)
    except Exception:  # noqa: BLE001
        return None


def _formatted_spec(spec: ast.expr) -> str | None:
    texts = [p.value for p in spec.values if isinstance(p, ast.Constant) and isinstance(p.value, str)] \
        if isinstance(spec, ast.JoinedStr) else []
    return "".join(texts) if isinstance(spec, ast.JoinedStr) and len(texts) == len(spec.values) else None


def container(node: ast.expr) -> Any:
    """The value of a comparator: a literal, or a list / set of literals (`x in [...]`)."""
    if isinstance(node, (ast.List, ast.Set)):
        vals = [value_of(e) for e in node.elts]
        return NO if any(v is NO for v in vals) else (vals if isinstance(node, ast.List) else set(vals))
    return value_of(node)


class _Statements:
    """Statement-level folding over every statement list of a tree."""

    def __init__(self) -> None:
        self.expr = _Fold()

    def block(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for i, stmt in enumerate(stmts):
            out.extend(self.stmt(stmt))
            if out and isinstance(out[-1], _BLOCK_ENDS):
                if i < len(stmts) - 1:  # the rest of the block never runs
                    self.expr.changed = True
                break
        return out

    def stmt(self, node: ast.stmt) -> list[ast.stmt]:
        if isinstance(node, (ast.If, ast.While)):
            node.test = self.expr.truth(node.test)
            v = value_of(node.test)
            if v is not NO and (isinstance(node, ast.If) or not v):
                self.expr.changed = True
                return self.block(node.body if v else node.orelse)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            node.iter = self.expr.visit(node.iter)
            v = container(node.iter)
            if v is not NO and not v:
                self.expr.changed = True
                return self.block(node.orelse)
        elif isinstance(node, ast.Assert):
            node.test = self.expr.truth(node.test)
            v = value_of(node.test)
            if v is not NO and v:
                self.expr.changed = True
                return []
        elif isinstance(node, ast.Expr) and value_of(node.value) is not NO and not docstring(node.value):
            self.expr.changed = True
            return []
        self._fields(node)
        return [node]

    def _fields(self, node: ast.AST) -> None:
        for name, value in ast.iter_fields(node):
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                new = self.block(value)
                setattr(node, name, new or ([ast.Pass()] if name in ("body", "finalbody") else []))
            elif isinstance(value, list):
                for v in value:
                    self._sub(v)
                setattr(node, name, [self.expr.visit(v) if isinstance(v, ast.expr) else v for v in value])
            elif isinstance(value, ast.expr):
                setattr(node, name, self.expr.visit(value))
            elif isinstance(value, ast.AST):
                self._fields(value)

    def _sub(self, node: Any) -> None:
        """Blocks inside the non-expression parts of a statement (handlers, match cases, with items)."""
        if isinstance(node, ast.AST) and not isinstance(node, ast.expr):
            self._fields(node)


def docstring(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def fold_block(stmts: list[ast.stmt]) -> tuple[list[ast.stmt], bool]:
    """`stmts` folded (every nested block too); whether anything changed."""
    s = _Statements()
    out = s.block(stmts)
    return out, s.expr.changed


def fold_inside(node: ast.stmt) -> bool:
    """Fold the blocks and expressions inside one statement (a function, a class), which stays;
    whether anything changed."""
    s = _Statements()
    s._fields(node)
    return s.expr.changed


def _loads(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def drop_dead_locals(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Remove `x = <pure>` (and `a, b = <pure tuple>`) from `fn`'s own body when nothing in `fn`
    (nested scopes included) reads any of the names; whether anything was removed."""
    loads = _loads(fn)
    declared = {n for s in ast.walk(fn) if isinstance(s, (ast.Global, ast.Nonlocal)) for n in s.names}
    if {"locals", "vars", "eval", "exec"} & loads:
        return False
    changed = False

    def dead(target: ast.expr) -> bool:
        if isinstance(target, ast.Name):
            return target.id not in loads and target.id not in declared
        if isinstance(target, (ast.Tuple, ast.List)):
            return all(dead(e) for e in target.elts)
        return False

    def block(stmts: list[ast.stmt]) -> list[ast.stmt]:
        nonlocal changed
        out = []
        for s in stmts:
            if isinstance(s, ast.Assign) and pure(s.value) and all(dead(t) for t in s.targets):
                changed = True
                continue
            if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for name, value in ast.iter_fields(s):
                    if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                        setattr(s, name, block(value) or [ast.Pass()])
            out.append(s)
        return out

    fn.body = block(fn.body) or [ast.Pass()]
    return changed
