"""One readable `train_gpt.py` from pgolf's own modules: the record pipeline, flattened for a config.

`build(cfg)` starts from `pgolf.export.record` and takes every pgolf module it can reach
(imports at module level and inside functions), then:
1. trims the registries by the configuration (`registries`): the TTT runner table keeps the one
   runner the config uses, the codec table the codecs it names, so the other methods' code is
   unreachable;
2. rewrites each module onto one global namespace (pgolf.script.scopes): pgolf imports are removed,
   `module.attr` and import aliases become the names they refer to, module-level names that collide
   between modules get the module's name as a prefix;
3. keeps only the top-level statements the entry `main` reaches (functions and classes as a whole),
   and the third-party imports they use; an import of a module that is never exported (the lab,
   the CLI, this exporter) inside a kept function becomes `raise RuntimeError(...)`;
4. orders the modules so every name a module's top level uses is defined above it, and writes them
   out with a banner each (`ast.unparse`: comments are gone, docstrings stay; code bytes are counted on
   the minified form anyway), the configuration as the literal `CONFIG`, and `main(CONFIG)` under
   `if __name__ == "__main__"`. CONFIG holds every field's value, read into attribute sections
   (`_values_config`), when no kept code names a config class; otherwise it is built from the
   dataclasses, with the fields that differ from their defaults.
The result imports only the standard library and third-party packages, and is deterministic: the
same pgolf sources and config give the same bytes in every process.
"""
from __future__ import annotations

import ast
import builtins
import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass

import pgolf
from pgolf.config import Config
from pgolf.errors import PgolfError
from pgolf.script import closure as C
from pgolf.script.closure import ENTRY, ENTRY_FUNCTION, Closure, Module, extern_object
from pgolf.script.facts import CONFIG_MODULE
from pgolf.script.specialise import methods_by_name, specialise
from pgolf.script.scopes import Binder, Rewriter, external_attrs, import_aliases, is_placeholder, placeholder

RESERVED = {"CONFIG"}  # the names the script itself adds


def registries(cfg: Config) -> dict[tuple[str, str], set[str]]:
    """The tables whose entries a configuration can reach; the script keeps only those entries."""
    from pgolf.artifact.codecs import codecs_for
    from pgolf.eval.ttt import runner_key

    return {("pgolf.eval.ttt", "RUNNERS"): {runner_key(cfg)},
            ("pgolf.artifact.codecs", "CODECS"): codecs_for(cfg.quant)}


# --------------------------------------------------------------------------- statements
@dataclass
class Stmt:
    module: str
    node: ast.stmt
    binds: set[str]  # placeholders it defines
    refs: set[str]  # placeholders it uses (function annotations excluded)
    eager: set[str]  # placeholders used when the statement runs (not inside function bodies)


def _skip(stmt: ast.stmt) -> bool:
    """Module-level statements a script never needs: `__all__` and `if __name__ == "__main__":`."""
    if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in stmt.targets):
        return True
    return (isinstance(stmt, ast.If) and isinstance(stmt.test, ast.Compare)
            and isinstance(stmt.test.left, ast.Name) and stmt.test.left.id == "__name__")


def _refs(node: ast.AST, eager_only: bool = False) -> set[str]:
    """Placeholders loaded in `node`; function annotations never count (they are not evaluated)."""
    out: set[str] = set()

    def walk(n: ast.AST, in_function: bool) -> None:
        if isinstance(n, ast.Name) and is_placeholder(n.id) and not (eager_only and in_function):
            out.add(n.id)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for d in getattr(n, "decorator_list", []):
                walk(d, in_function)
            for d in n.args.defaults + [d for d in n.args.kw_defaults if d is not None]:
                walk(d, in_function)
            body = n.body if isinstance(n.body, list) else [n.body]
            for b in body:
                walk(b, True)
            return
        if isinstance(n, ast.AnnAssign) and in_function:
            for part in (n.target, n.value):
                if part is not None:
                    walk(part, in_function)
            return
        for child in ast.iter_child_nodes(n):
            walk(child, in_function)

    walk(node, False)
    return out


def _binds(stmt: ast.stmt) -> set[str]:
    b = Binder.of([stmt])
    return {n for n in b.names if is_placeholder(n)}


def _rewrite(closure: Closure, mod: Module) -> tuple[list[Stmt], list[str], dict[str, set[str]]]:
    """A module's kept-able statements on placeholders, its docstring lines, and the shadow sets."""
    rw = Rewriter(mod.name, mod.own, mod.links, mod.externs, lambda n: closure.link_of(n, mod), closure.member)
    stmts, doc = [], []
    body = mod.tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc, body = body[0].value.value.strip().splitlines(), body[1:]
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)) or _skip(stmt):
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                links = closure.link_of(stmt, mod) or []
                cut = [t for _, t in links if t[0] == "cut"]
                if cut:
                    raise PgolfError(f"bundle: {mod.name} imports {cut[0][1]} at module level, which is not exported")
            continue
        try:
            node = rw.visit(stmt)
        except ValueError as e:
            raise PgolfError(f"bundle: {e}") from None
        stmts.append(Stmt(mod.name, node, _binds(node), _refs(node), _refs(node, eager_only=True)))
    return stmts, doc, rw.shadows


# --------------------------------------------------------------------------- the script
def _reachable(stmts: list[Stmt], roots: set[str]) -> list[Stmt]:
    """The statements the roots need: those defining a reached placeholder, and side-effect
    statements (they bind nothing) of modules that are kept anyway."""
    reached, kept = set(roots), set()
    changed = True
    while changed:
        changed = False
        kept_mods = {s.module for i, s in enumerate(stmts) if i in kept}
        for i, s in enumerate(stmts):
            if i in kept:
                continue
            if (s.binds & reached) or (not s.binds and s.module in kept_mods):
                kept.add(i)
                reached |= s.refs
                changed = True
    return [s for i, s in enumerate(stmts) if i in kept]


_NAMED_ACCESS = ("getattr", "hasattr", "setattr", "delattr")


def _names_used(node: ast.AST, strings: bool) -> set[str]:
    """Attribute names `node` may use: its attribute reads (not of third-party modules: torch.load is
    never a method here) and strings (with `strings` False, only the constant names of getattr & co)."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and not (isinstance(n.value, ast.Name) and n.value.id.startswith("ext:")):
            out.add(n.attr)
        elif strings and isinstance(n, ast.Constant) and isinstance(n.value, str):
            out.add(n.value)
        elif not strings and isinstance(n, ast.Call) and isinstance(n.func, ast.Name) \
                and n.func.id in _NAMED_ACCESS and len(n.args) > 1 and isinstance(n.args[1], ast.Constant):
            out.add(str(n.args[1].value))
    return out


def _prune_methods(kept: list[Stmt], strings: bool = True) -> bool:
    """Drop the methods of kept classes that nothing in the script can call: no attribute (and, with
    `strings`, no string) of that name in the code that can run, not a dunder, not a name the class's
    outside bases define (the framework may call those: `forward`, `step`, ...). The code that can run
    is everything but the methods, and the methods found callable so far (a least fixed point: a
    method only another uncallable method calls goes too). Returns whether anything was dropped."""
    classes = {ph: s.node for s in kept if isinstance(s.node, ast.ClassDef) for ph in s.binds}
    protect: dict[str, set[str] | None] = {}  # None: a base whose attributes cannot be listed

    def outside(ph: str, seen: frozenset = frozenset()) -> set[str] | None:
        """What the outside bases of `ph` and of its script bases define."""
        attrs: set[str] | None = set()
        for b in classes[ph].bases:
            if isinstance(b, ast.Name) and b.id in classes:
                found = outside(b.id, seen | {ph}) if b.id not in seen else set()
            else:
                found = external_attrs(b)
            attrs = None if found is None or attrs is None else attrs | found
        return attrs

    for ph in classes:
        protect[ph] = outside(ph)
    pending: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
    used: set[str] = set()
    for s in kept:
        if isinstance(s.node, ast.ClassDef):
            guarded = protect.get(s.node.name)
            for m in s.node.body:
                if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and not m.name.startswith("__") \
                        and guarded is not None and m.name not in guarded:
                    pending.append(m)
                else:
                    used |= _names_used(m, strings)
            for part in s.node.bases + s.node.keywords + s.node.decorator_list:
                used |= _names_used(part, strings)
        else:
            used |= _names_used(s.node, strings)
    grew = True
    while grew:
        live = [m for m in pending if m.name in used]
        grew = bool(live)
        for m in live:
            used |= _names_used(m, strings)
        pending = [m for m in pending if m not in live]
    dead = {id(m) for m in pending}
    dropped = False
    for s in kept:
        if isinstance(s.node, ast.ClassDef) and any(id(m) in dead for m in s.node.body):
            s.node.body = [m for m in s.node.body if id(m) not in dead] or [ast.Pass()]
            s.refs, s.eager, dropped = _refs(s.node), _refs(s.node, eager_only=True), True
    return dropped


def _order(stmts: list[Stmt], entry: str) -> list[str]:
    """Modules in an order where each one's top level only uses names defined above it: the
    reading order (dependencies first, from the entry), constrained by the eager uses."""
    defined = {ph: s.module for s in stmts for ph in s.binds}
    deps: dict[str, set[str]] = {}
    eager: dict[str, set[str]] = {}
    for s in stmts:
        deps.setdefault(s.module, set()).update(defined[r] for r in s.refs if r in defined)
        eager.setdefault(s.module, set()).update(defined[r] for r in s.eager if r in defined)
    reading: list[str] = []

    def visit(m: str, seen: set[str]) -> None:
        seen.add(m)
        for d in sorted(deps.get(m, ())):
            if d not in seen:
                visit(d, seen)
        reading.append(m)

    seen: set[str] = set()
    for m in [entry] + sorted(deps):
        if m not in seen:
            visit(m, seen)
    out: list[str] = []
    while len(out) < len(reading):
        ready = [m for m in reading if m not in out and all(d in out or d == m for d in eager.get(m, ()))]
        if not ready:
            raise PgolfError(f"bundle: module-level import cycle among {sorted(set(reading) - set(out))}")
        out.append(ready[0])
    return out


def _final_names(stmts: list[Stmt], externs: dict[str, str], shadows: dict[str, set[str]]) -> dict[str, str]:
    """A global name for every kept placeholder: its own name (a third-party import: its alias), unless
    two modules' names collide (then each takes its module's name as a prefix: `quantize_validate`,
    `gpt_validate`), it is a builtin's, or a local variable where it is used would capture it."""
    symbols = sorted({ph for s in stmts for ph in s.binds})
    own = {ph: externs.get(ph, ph.rpartition(":")[2]) for ph in list(externs) + symbols}
    count: dict[str, int] = {}
    for name in own.values():
        count[name] = count.get(name, 0) + 1
    ext_names = set(externs.values())
    taken = set(RESERVED) | ext_names
    out: dict[str, str] = dict(externs)
    for ph in symbols:
        module, name = ph.rpartition(":")[0], own[ph]
        cand = name
        if count[name] > 1 or hasattr(builtins, name) or name in taken or name in shadows.get(ph, ()):
            short = module.rsplit(".", 1)[-1]
            cand = f"_{short}{name}" if name.startswith("_") else f"{short}_{name}"
            while cand in taken or cand in shadows.get(ph, ()) or cand in own.values():
                cand += "_"
        taken.add(cand)
        out[ph] = cand
    return out


class _Rename(ast.NodeTransformer):
    def __init__(self, names: dict[str, str]):
        self.names = names

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if is_placeholder(node.id):
            node.id = self.names[node.id]
        return node

    def visit_Global(self, node: ast.Global) -> ast.AST:
        node.names = [self.names.get(n, n) for n in node.names]
        return node

    def _def(self, node):
        if is_placeholder(node.name):
            node.name = self.names[node.name]
        for a in (node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                  + [node.args.vararg, node.args.kwarg]) if hasattr(node, "args") else []:
            if a is not None and a.annotation is not None and self._dangling(a.annotation):
                a.annotation = None  # names a class the script leaves out (annotations are never run)
        if getattr(node, "returns", None) is not None and self._dangling(node.returns):
            node.returns = None
        self.generic_visit(node)
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _def

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST | None:
        if self._dangling(node.annotation):  # a local's annotation naming a class the script leaves out
            if node.value is None:
                return None
            return self.visit(ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node))
        self.generic_visit(node)
        return node

    def _dangling(self, ann: ast.AST) -> bool:
        return any(isinstance(n, ast.Name) and is_placeholder(n.id) and n.id not in self.names for n in ast.walk(ann))


def _extern_statement(obj: str, name: str, form: ast.stmt, loads: set[str]) -> list[str]:
    """The import line(s) that bind `name` to the third-party object `obj`."""
    if isinstance(form, ast.ImportFrom):
        mod, _, attr = obj.rpartition(".")
        return [f"from {mod} import {attr}" + (f" as {name}" if name != attr else "")]
    if loads:  # `import a.b` binds `a` and loads a.b
        if name != obj:
            raise PgolfError(f"bundle: cannot rename the plain import of {obj}")
        return [f"import {m}" for m in sorted(loads)]
    return [f"import {obj}" + (f" as {name}" if name != obj else "")]


def _banner(path: str, doc: list[str]) -> str:
    head = f"# {'-' * 10} {path} "
    lines = [head + "-" * max(0, 100 - len(head))]
    lines += [f"# {line}".rstrip() for line in doc]
    return "\n".join(lines)


def canonical(cfg: Config) -> Config:
    """The configuration a script bakes in: the run's, with the run-specific fields (seed, data
    paths: pgolf.runs.config_key leaves them out too) at fixed defaults, so every seed of one
    configuration exports the same script (and the same code bytes). SEED, DATA_PATH and
    TOKENIZER_PATH set them when it runs."""
    c = copy.deepcopy(cfg)
    c.train.seed = Config().train.seed
    c.data.path, c.data.tokenizer = "./data", ""
    return c


def baked_config(cfg: Config) -> Config:
    """The configuration a script of `cfg` runs: `canonical(cfg)` read back through `Config.from_dict`
    (which checks every field's type and domain and turns ints into floats where a field is a float),
    as the script would read it."""
    c = canonical(cfg)
    return Config.from_dict(c.to_dict(), where=f"the configuration of {c.preset}")


def config_source(cfg: Config, names: dict[str, str]) -> str:
    """`CONFIG = Config(...)`: the baked configuration built from the dataclasses (`names`: their
    names in the script), only the fields that differ from their defaults, a section a line. No
    names: no config class is in the script, and CONFIG holds the values (`_values_source`)."""
    if not names:
        return _values_source(cfg)
    defaults = Config()
    lines = [f"CONFIG = {names.get('Config', 'Config')}(preset={cfg.preset!r},"]
    for f in dataclasses.fields(Config):
        section = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(section) or isinstance(section, type):
            continue
        default = dataclasses.asdict(getattr(defaults, f.name))
        diff = [f"{k}={v!r}" for k, v in dataclasses.asdict(section).items()
                if default[k] != v or type(default[k]) is not type(v)]
        if diff:
            cls = type(section).__name__
            lines += _wrapped(f"    {f.name}={names.get(cls, cls)}(", diff, "),")
    lines.append(")")
    return "\n".join(lines)


def _values_source(cfg: Config) -> str:
    """`CONFIG = Config({...})`: every field's value, a section a line."""
    lines = [f"CONFIG = {VALUES_NAME}({{"]
    for key, value in cfg.to_dict().items():
        if isinstance(value, dict):
            lines += _wrapped(f"    {key!r}: {{", [f"{k!r}: {v!r}" for k, v in value.items()], "},")
        else:
            lines.append(f"    {key!r}: {value!r},")
    lines.append("})")
    return "\n".join(lines)


def _wrapped(head: str, items: list[str], close: str) -> list[str]:
    """`head`, the items joined by ", ", then `close`, as lines of about 110 columns at most (the
    continuation lines indented by 8)."""
    row, rows = head, []
    for item in items:
        if len(row) + len(item) + 2 > 110:
            rows.append(row.rstrip())
            row = " " * 8
        row += item + ", "
    return rows + [row.rstrip(", ") + close]


def _header(cfg: Config) -> str:
    from pgolf.eval.ttt import method_label
    from pgolf.runs import config_key

    return f'''"""train_gpt.py: a Parameter Golf record script, generated by pgolf {pgolf.__version__} from the
preset {cfg.preset!r} (configuration {config_key(cfg.to_dict())}).

It trains under the wall clock, calibrates GPTQ inside the training reserve, quantises and writes the
artifact, loads the artifact alone and scores it with test-time training ({method_label(cfg)}), and
prints one JSON line last (val_bpb, bytes_total, ...). The code is pgolf's own, flattened into one
file: only the modules and functions this configuration reaches. The configuration is CONFIG at the end.

    torchrun --standalone --nproc_per_node=8 train_gpt.py

Environment overrides: DATA_PATH (shards; tokenizer.model inside unless TOKENIZER_PATH is set),
TOKENIZER_PATH, SEED, RUN_ID (the output folder runs/RUN_ID), ITERATIONS, MAX_WALLCLOCK_SECONDS
(0 = no wall-clock cap).
"""'''


@dataclass(frozen=True)
class Script:
    text: str  # the readable train_gpt.py
    files: list[str]  # the pgolf files it holds code of
    unspecialised: list[str]  # why the code could not be specialised to the configuration ([]: it was)


def _sources_key() -> str:
    h = hashlib.sha256()
    for path in sorted(C.PACKAGE_DIR.rglob("*.py")):
        h.update(str(path.relative_to(C.PACKAGE_DIR)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def script_key(cfg: Config) -> str:
    """What the script of `cfg` depends on, hashed: the canonical configuration and pgolf's sources."""
    return hashlib.sha256((json.dumps(canonical(cfg).to_dict(), sort_keys=True) + _sources_key()).encode()).hexdigest()


@dataclass(frozen=True)
class Body:
    code: str  # the imports and the flattened modules
    files: list[str]
    entry: str  # the global name of record.main
    config_names: dict[str, str]  # the config classes' names in the script
    unspecialised: list[str]  # why the code could not be specialised to the configuration ([]: it was)


_BODIES: dict[str, Body] = {}  # per baked configuration and pgolf sources


def build(cfg: Config, specialised: bool = True) -> Script:
    """The exported script for `cfg` (baked as `baked_config(cfg)`): its header, the flattened code
    specialised to that configuration (built once per configuration and pgolf sources), CONFIG and
    the entry. `specialised=False`: the flattened code as it is (what the specialisation is checked
    against)."""
    cfg = baked_config(cfg)
    key = json.dumps([cfg.to_dict(), specialised], sort_keys=True) + _sources_key()
    if key not in _BODIES:
        _BODIES[key] = _flatten(cfg, specialised)
    body = _BODIES[key]
    config = config_source(cfg, body.config_names)
    parts = [_header(cfg), body.code,
             ("# The configuration: the fields that differ from the defaults of the dataclasses above.\n"
              if body.config_names else "# The configuration: every field's value.\n") + config,
             f"if __name__ == \"__main__\":\n    {body.entry}(CONFIG)"]
    return Script("\n\n\n".join(parts) + "\n", body.files, body.unspecialised)


CONFIG_CLASS = placeholder(("sym", "pgolf.config", "Config"))  # CONFIG is built from it


def _kept(stmts: list[Stmt], root: str, strings: bool = True) -> list[Stmt]:
    roots = {root, CONFIG_CLASS} & {ph for s in stmts for ph in s.binds} | {root}
    kept = _reachable(stmts, roots)
    while _prune_methods(kept, strings):
        kept = _reachable(stmts, roots)
    return kept


def _env_fields(closure: Closure) -> set[tuple[str, str]]:
    """The (section, field)s the entry's `ENV` table lets the environment set, read from its source
    (the bundle never imports the entry: it imports the bundle); none when it has no table."""
    for stmt in closure.mods[ENTRY].tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "ENV" for t in stmt.targets):
            return {tuple(v[:2]) for v in ast.literal_eval(stmt.value).values()}  # (section, field, least)
    return set()  # an entry without the table lets the environment change nothing


def _flatten(cfg: Config, specialised: bool) -> Body:
    closure = Closure(registries(cfg))
    env = _env_fields(closure)  # read before the rewrite renames the entry's names
    stmts: list[Stmt] = []
    docs: dict[str, list[str]] = {}
    shadows: dict[str, set[str]] = {}
    for name in sorted(closure.mods):
        found, doc, sh = _rewrite(closure, closure.mods[name])
        stmts += found
        docs[name] = doc
        for ph, hidden in sh.items():
            shadows.setdefault(ph, set()).update(hidden)
    root = placeholder(("sym", ENTRY, ENTRY_FUNCTION))
    kept = _kept(stmts, root)  # what the script can run at all: the specialisation reasons over it
    blocked = ["not asked for"]
    if specialised:
        def external(b):
            return external_attrs(b, instance=True)

        blocked = specialise([s.node for s in kept], cfg, env, external)
        for s in kept:
            s.binds, s.refs, s.eager = _binds(s.node), _refs(s.node), _refs(s.node, eager_only=True)
        # Methods are called by the attribute names in the code that can run, and by strings wherever a
        # getattr with a computed name may reach an object of the script: try without the strings, and
        # keep that when what is left has no such getattr (then no string names a method it can call).
        saved = [(s, s.node, list(s.node.body), s.refs, s.eager) for s in kept if isinstance(s.node, ast.ClassDef)]
        trial = _kept(kept, root, strings=False)  # (pruning only takes methods out of class bodies)
        if methods_by_name([s.node for s in trial], cfg, env, external):
            for st, cls, class_body, refs, eager in saved:
                cls.body, st.refs, st.eager = class_body, refs, eager
            trial = _kept(kept, root)
        kept = trial
        kept = _values_config(kept)
    _drop_bare_annotations(kept)
    used = set().union(*(s.refs for s in kept)) if kept else set()
    externs = {}  # placeholder -> the alias its import statement binds
    for ph in sorted(p for p in used if p.startswith("ext:")):
        form = closure.forms[ph[4:]]
        aliases = import_aliases(form)
        externs[ph] = next(aliases[i] for i in range(len(aliases)) if extern_object(form, i)[0] == ph[4:])
    names = _final_names(kept, externs, shadows)
    renamer = _Rename(names)
    imports = set()
    for ph in externs:  # `import a.b` lines only from the modules whose kept code uses `a`
        users = {s.module for s in kept if ph in s.refs}
        loads = set().union(*(m for mod, m in closure.loads.get(ph[4:], {}).items() if mod in users))
        imports |= set(_extern_statement(ph[4:], names[ph], closure.forms[ph[4:]], loads))
    parts = ["from __future__ import annotations", "\n".join(sorted(imports))]
    order = _order(kept, ENTRY)
    for module in order:
        code = [ast.unparse(ast.fix_missing_locations(renamer.visit(s.node))) for s in kept if s.module == module]
        path = closure.mods[module].path.relative_to(C.PACKAGE_DIR.parent)
        parts.append(_banner(str(path), docs[module]) + "\n" + "\n\n".join(code))
    files = sorted(str(closure.mods[m].path.relative_to(C.PACKAGE_DIR.parent)) for m in order)
    config_names = {k.rpartition(":")[2]: v for k, v in names.items() if k.startswith("pgolf.config:")}
    if not any(s.module == CONFIG_MODULE for s in kept):  # CONFIG holds the values (_values_config)
        parts.append(VALUES_CONFIG)
        config_names = {}
    return Body("\n\n\n".join(parts), files, names[root], config_names, blocked)


VALUES_NAME = "Config"  # the class CONFIG is made of when the script holds the values alone
VALUES_CONFIG = f'''# {'-' * 10} the configuration {'-' * 72}
class {VALUES_NAME}:
    """A configuration section: its fields as attributes, read from the nested dict CONFIG holds."""

    def __init__(self, fields):
        for key, value in fields.items():
            setattr(self, key, {VALUES_NAME}(value) if isinstance(value, dict) else value)

    def to_dict(self):
        return {{k: v.to_dict() if isinstance(v, {VALUES_NAME}) else v for k, v in vars(self).items()}}'''


_ANNOTATED_BASES = ("NamedTuple", "TypedDict", "Protocol")  # bases that read a class's annotations


def _drop_bare_annotations(kept: list[Stmt]) -> None:
    """`name: T` without a value in a plain class body (no decorator such as @dataclass, no base that
    reads annotations) only documents an attribute, such as a torch buffer for the type checker: it does
    nothing when the script runs, so the script leaves it out."""
    for s in kept:
        cls = s.node
        if not isinstance(cls, ast.ClassDef) or cls.decorator_list \
                or any(ast.unparse(b).endswith(_ANNOTATED_BASES) for b in cls.bases):
            continue
        body = [b for b in cls.body if not (isinstance(b, ast.AnnAssign) and b.value is None and b.simple)]
        if len(body) < len(cls.body):
            cls.body = body or [ast.Pass()]
            s.refs, s.eager = _refs(cls), _refs(cls, eager_only=True)


def _values_config(kept: list[Stmt]) -> list[Stmt]:
    """When, after specialisation, no code outside pgolf.config names a config class (only CONFIG is
    built from them), the script holds the configuration as values: every field once, as a nested
    dict read into attribute sections (VALUES_CONFIG), instead of the dataclasses' defaults and a
    diff against them. What the code does with it is the same: attribute reads and writes, `type()` of
    a value (record.apply_env), `to_dict()` in the dataclasses' field order (the log, config.json)."""
    if any(ph.startswith(CONFIG_MODULE + ":") for s in kept if s.module != CONFIG_MODULE for ph in s.refs):
        return kept
    if any(ph.rpartition(":")[2] == VALUES_NAME for s in kept if s.module != CONFIG_MODULE for ph in s.binds):
        return kept  # (the name is someone else's)
    return [s for s in kept if s.module != CONFIG_MODULE]
