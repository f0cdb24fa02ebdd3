"""code_bytes: the code a submission needs to run the artifact, counted as the records count it.

Which code. The entry modules below (the model's one forward, validation data and BPB, scoring,
and the artifact's decompression + dequantisation) plus every `pgolf` module they import at module
level, and the packages' `__init__.py` files (Python runs them on import). Imports inside functions
(CLI helpers, run-directory loading) are not followed: scoring an artifact never takes those paths.
Training and TTT code is not counted: unlike a record's single `train_gpt.py`, pgolf scores a
finished artifact; pass `extra` to count more modules.

How it is counted (record-stack.md §4.7, PR #1855): each file minified with python-minifier
(no local renaming, no literal hoisting, literal statements and asserts removed, single-line
preference), the files bundled into one Python program that installs them as importable modules,
that program compressed with brotli q11 and base85-encoded inside a two-line
`exec(brotli.decompress(base64.b85decode("...")))` stub. `code_bytes` is the stub's length;
`code_bytes_raw` the readable sources' total size.
"""
from __future__ import annotations

import ast
import base64
from pathlib import Path

import brotli

# The scoring path plus test-time training: the records count the whole script, TTT included (§4.7).
ENTRY_MODULES = ("pgolf.model.gpt", "pgolf.eval.bpb", "pgolf.eval.score", "pgolf.artifact.qstate",
                 "pgolf.model.lora", "pgolf.eval.ttt", "pgolf.eval.lora_ttt", "pgolf.eval.phased",
                 "pgolf.eval.sgd_ttt", "pgolf.eval.hedge")
ROOT = Path(__file__).resolve().parents[2]  # the repository root (holds pgolf/)

# Installs the bundled sources as modules: a meta-path finder over the dict S (P = packages).
_LOADER = '''import sys,importlib.abc as a,importlib.util as u
class _F(a.MetaPathFinder,a.Loader):
 def find_spec(self,n,p,t=None):
  return u.spec_from_loader(n,self,is_package=n in P) if n in S else None
 def create_module(self,spec):return None
 def exec_module(self,m):exec(compile(S[m.__name__],'<'+m.__name__+'>','exec'),m.__dict__)
sys.meta_path.insert(0,_F())
'''


def _module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _top_level_imports(path: Path, name: str) -> set[str]:
    """`pgolf` modules imported at module level (also inside top-level if/try), absolute names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", [])
            for h in getattr(node, "handlers", []):
                todo += h.body
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                mod = f"{base}.{mod}" if mod else base
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in found if m == "pgolf" or m.startswith("pgolf.")}


def module_closure(entry: tuple[str, ...] = ENTRY_MODULES, root: Path = ROOT) -> tuple[dict[str, Path], list[str]]:
    """{module name: file} for the entry modules, their module-level pgolf imports and parent
    packages; plus the entry modules that do not exist (yet)."""
    files: dict[str, Path] = {}
    missing = [m for m in entry if _module_file(m, root) is None]
    todo = [m for m in entry if m not in missing]
    while todo:
        name = todo.pop()
        if name in files:
            continue
        path = _module_file(name, root)
        if path is None:
            continue  # `from pkg import function`: not a module
        files[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += sorted(_top_level_imports(path, name))
    return dict(sorted(files.items())), missing


def minify(source: str, filename: str = "<src>") -> str:
    import python_minifier

    return python_minifier.minify(source, filename=filename, rename_locals=False, hoist_literals=False,
                                  remove_literal_statements=True, remove_asserts=True,
                                  prefer_single_line=True)


_MINIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> minified source


def _minified(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _MINIFIED:
        _MINIFIED[key] = minify(path.read_text(), str(path))
    return _MINIFIED[key]


def bundle(files: dict[str, Path]) -> str:
    """One program: the loader plus every module's minified source."""
    sources = {name: _minified(path) for name, path in files.items()}
    packages = sorted(n for n, p in files.items() if p.name == "__init__.py")
    # A set literal in sorted order: the repr of a set follows string hashing, which changes with every
    # process (PYTHONHASHSEED), and so did the compressed size by tens of bytes.
    return f"S={sources!r}\nP={{{','.join(map(repr, packages))}}}\n" + _LOADER


def wrap(source: str) -> str:
    """The self-extracting stub (brotli q11 + base85, as PR #1855)."""
    packed = base64.b85encode(brotli.compress(source.encode(), quality=11)).decode()
    return f'import brotli,base64\nexec(brotli.decompress(base64.b85decode("{packed}")))\n'


def unwrap(stub: str) -> str:
    """The inverse of `wrap` (for tests and audits): the bundled program's source."""
    packed = stub.split('b85decode("', 1)[1].split('")', 1)[0]
    return brotli.decompress(base64.b85decode(packed)).decode()


def code_bytes(entry: tuple[str, ...] = ENTRY_MODULES, extra: tuple[str, ...] = (), root: Path = ROOT) -> dict:
    """code_bytes (wrapped), code_bytes_raw (readable sources), the minified size and the file list."""
    files, missing = module_closure(tuple(entry) + tuple(extra), root)
    program = bundle(files)
    stub = wrap(program)
    return {
        "code_bytes": len(stub.encode()),
        "code_bytes_raw": sum(p.stat().st_size for p in files.values()),
        "code_bytes_minified": len(program.encode()),
        "code_files": [str(p.relative_to(root)) for p in files.values()],
        "code_missing": missing,
        "wrapper": stub,
    }
