"""`pgolf check DIR [--vs BPB_MEAN,STD,N | --vs RECORD_DIR]`: the pre-submission checks.

One line per condition on stderr (PASS / FAIL and the facts); the JSON last on stdout says `ok` and
each condition's `ok` and `detail`, and when any fails the exit status is 2 (after the JSON, one
`pgolf: error:` line). Every figure is recomputed from the folder's files, never taken from
submission.json:
- bytes        per seed: the artifact's size on disk + the code bytes of train_gpt.py (minified,
               brotli, base85 stub: pgolf.script.codebytes) <= 16,000,000;
- imports      one script that imports only the standard library and the packages in
               requirements.txt (never pgolf, never a file beside it);
- network      no network module, no URL and no absolute path in the code (as far as the AST tells);
- seeds        at least three seeds, each with its own log, and no two logs of the same run;
- train_time   per seed, from the log: the training loop + GPTQ calibration <= 600 s;
- eval_time    per seed, from the log: the TTT timer (`total_eval_time`, as the records) <= 600 s;
- legality     each seed's trace (artifacts/seed<S>/trace*.npz) passes `pgolf.eval.legality.audit_trace`:
               every token scored once, every update after the tokens it used were scored;
- claims       every score and byte figure submission.json carries agrees with the logs and files, to
               the precision it is written with: per seed (val_bpb, val_loss, bytes_total,
               bytes_model, bytes_code, artifact_bytes) and over the seeds (val_bpb / val_loss mean
               and std, bytes_total and bytes_model of the largest seed, artifact_bytes_max / _mean,
               bytes_code, bytes_code_raw);
- significance with --vs: the challenge's rule against the current record (>= 0.005 nats better,
               one-sided Welch p < 0.01, pgolf.significance, the code of `pgolf stats`).
A per-seed condition fails, never passes, on a folder without seed logs: no seeds, nothing shown.
"""
from __future__ import annotations

import ast
import decimal
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgolf.errors import PgolfError

LIMIT_BYTES = 16_000_000
TIME_LIMIT_S = 600.0
MIN_SEEDS = 3
NETWORK = {"socket", "http", "urllib", "urllib2", "urllib3", "requests", "httpx", "aiohttp", "ftplib", "smtplib",
           "huggingface_hub", "boto3", "paramiko", "websocket", "websockets"}
LOG = re.compile(r"train_seed(\d+)\.log$")
SEED_LINE = re.compile(r"^\s*train\.seed: (\d+)\s*$", re.M)
TRAIN_LINE = re.compile(r"train_time: (\d+)ms step: (\d+)/(\d+)\s*$", re.M)
GPTQ_LINE = re.compile(r"^GPTQ:collected \d+ Hessians in ([\d.]+)s", re.M)
EVAL_LINE = re.compile(r"^total_eval_time:\s*([\d.]+)s", re.M)
FINAL_LINE = re.compile(r"^quantized_ttt\S* val_loss:\s*([\d.]+) val_bpb:\s*([\d.]+)", re.M)
STEP_LINE = re.compile(r"^\d+/\d+ train_loss: .*$", re.M)
URL = re.compile(r"^(https?|ftp|s3|gs)://")
ABS_PATH = re.compile(r"^(/|~/)[\w.-]+(/[\w.-]*)*$")


@dataclass
class SeedLog:
    seed: int
    path: Path
    text: str
    train_ms: float | None = None
    gptq_s: float = 0.0
    eval_s: float | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    curve: list[str] = field(default_factory=list)


def read_log(path: Path) -> SeedLog:
    text = path.read_text(errors="replace")
    m = SEED_LINE.search(text) or LOG.search(path.name)
    assert m is not None, path  # callers pass only train_seed<S>.log files
    log = SeedLog(int(m.group(1)), path, text)
    if (t := TRAIN_LINE.findall(text)):
        log.train_ms = float(t[-1][0])
    log.gptq_s = sum(float(x) for x in GPTQ_LINE.findall(text))
    if (e := EVAL_LINE.findall(text)):
        log.eval_s = float(e[-1])
    if (f := FINAL_LINE.findall(text)):
        log.val_loss, log.val_bpb = float(f[-1][0]), float(f[-1][1])
    log.curve = STEP_LINE.findall(text)
    return log


NO_LOGS = "no seed logs to check (train_seed<S>.log)"  # a per-seed condition never passes on no seeds


class Report:
    def __init__(self) -> None:
        self.lines: list[tuple[str, bool, str]] = []

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.lines.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", file=sys.stderr, flush=True)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.lines)


# --------------------------------------------------------------------------- the conditions
def artifacts(folder: Path, seed: int) -> list[Path]:
    """The artifact files of a seed (a folder named *.ptz is not one)."""
    return sorted(p for p in (folder / "artifacts" / f"seed{seed}").glob("*.ptz") if p.is_file())


def check_bytes(folder: Path, logs: list[SeedLog], rep: Report) -> dict[int, int]:
    from pgolf.script.codebytes import measure

    code = measure((folder / "train_gpt.py").read_text())["code_bytes"]
    totals, bad = {}, []
    for log in logs:
        arts = artifacts(folder, log.seed)
        if len(arts) != 1:
            bad.append(f"seed {log.seed}: {len(arts)} artifacts in artifacts/seed{log.seed}/ (need exactly one .ptz)")
            continue
        totals[log.seed] = arts[0].stat().st_size + code
        if totals[log.seed] > LIMIT_BYTES:
            bad.append(f"seed {log.seed}: {totals[log.seed]:,} B = {arts[0].name} {arts[0].stat().st_size:,} + code "
                       f"{code:,} > {LIMIT_BYTES:,} by {totals[log.seed] - LIMIT_BYTES:,}")
    if bad:
        detail = "; ".join(bad)
    elif not totals:
        detail = f"code {code:,} B; {NO_LOGS}"
    else:
        detail = f"code {code:,} B; totals " + ", ".join(f"seed {s}: {t:,}" for s, t in totals.items()) + \
            f" <= {LIMIT_BYTES:,}"
    rep.add("bytes", not bad and bool(totals), detail)
    return totals


def requirement_names(folder: Path) -> set[str]:
    names = set()
    path = folder / "requirements.txt"
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        line = line.strip()
        if line.startswith("# optional:"):
            line = line.split(":", 1)[1]
        elif line.startswith("#") or not line:
            continue
        names.add(_norm(re.split(r"[=<>!~\[; ]", line.strip(), maxsplit=1)[0]))
    return names


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_imports(folder: Path, tree: ast.Module, rep: Report) -> None:
    from pgolf.export.submission import distribution_of, third_party_imports

    source = ast.unparse(tree)
    local = {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if p.is_dir()}
    wanted = requirement_names(folder)
    bad = []
    for name in sorted(third_party_imports(source)):
        if name == "pgolf" or name in local:
            bad.append(f"imports {name} ({'pgolf itself' if name == 'pgolf' else 'a file beside the script'}): "
                       "the script must stand alone")
            continue
        dist = distribution_of(name)
        if not ({_norm(name)} | ({_norm(dist)} if dist else set())) & wanted:
            bad.append(f"imports {name}, which requirements.txt does not list")
    rep.add("imports", not bad, "; ".join(bad) if bad else
            "train_gpt.py imports only the standard library and requirements.txt's packages")


def _docstrings(tree: ast.Module) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            out.add(id(first.value))
    return out


def check_network(tree: ast.Module, rep: Report) -> None:
    bad = []
    docs = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            tops = [x.split(".")[0] for x in names]
            bad += [f"line {node.lineno}: imports {n} (network)" for n in tops if n in NETWORK]
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if URL.match(node.value) or ABS_PATH.match(node.value):
                bad.append(f"line {node.lineno}: {node.value!r} (a fixed URL or absolute path; data paths come "
                           "from DATA_PATH / TOKENIZER_PATH)")
    rep.add("network", not bad, "; ".join(bad[:3]) if bad else
            "no network module, no fixed URL or absolute path (file access through the data paths and the run folder)")


def check_seeds(logs: list[SeedLog], folder: Path, rep: Report) -> None:
    bad = []
    for log in logs:
        m = LOG.search(log.path.name)
        assert m is not None  # check() reads only the logs named train_seed<S>.log
        named = int(m.group(1))
        if named != log.seed:
            bad.append(f"{log.path.name} is the log of seed {log.seed}")
    seeds = sorted({log.seed for log in logs})
    if len(seeds) < MIN_SEEDS:
        bad.append(f"{len(seeds)} distinct seed(s) ({', '.join(map(str, seeds)) or 'none'}); at least {MIN_SEEDS}")
    for i, a in enumerate(logs):
        for b in logs[i + 1:]:
            if a.text == b.text or (a.curve and a.curve == b.curve):
                bad.append(f"{a.path.name} and {b.path.name} are the same run (identical training curve)")
    arts: dict[str, list[int]] = {}
    for log in logs:
        for p in artifacts(folder, log.seed):
            arts.setdefault(hashlib.sha256(p.read_bytes()).hexdigest(), []).append(log.seed)
    bad += [f"seeds {', '.join(map(str, s))} have the same artifact" for s in arts.values() if len(s) > 1]
    rep.add("seeds", not bad, "; ".join(bad) if bad else
            f"{len(seeds)} distinct seeds ({', '.join(map(str, seeds))}), each with its own log and artifact")


def check_times(logs: list[SeedLog], rep: Report) -> None:
    if not logs:
        rep.add("train_time", False, NO_LOGS)
        rep.add("eval_time", False, NO_LOGS)
        return
    bad, facts = [], []
    for log in logs:
        if log.train_ms is None:
            bad.append(f"seed {log.seed}: no 'train_time: ...ms step: ...' line in {log.path.name}")
            continue
        total = log.train_ms / 1000 + log.gptq_s
        facts.append(f"seed {log.seed}: {total:.1f}")
        if total > TIME_LIMIT_S:
            bad.append(f"seed {log.seed}: training {log.train_ms / 1000:.1f} s + GPTQ calibration {log.gptq_s:.1f} s "
                       f"= {total:.1f} s > {TIME_LIMIT_S:.0f}")
    rep.add("train_time", not bad, "; ".join(bad) if bad else "training + calibration " + ", ".join(facts) + " s")
    bad, facts = [], []
    for log in logs:
        if log.eval_s is None:
            bad.append(f"seed {log.seed}: no 'total_eval_time:' line in {log.path.name}")
        elif log.eval_s > TIME_LIMIT_S:
            bad.append(f"seed {log.seed}: evaluation {log.eval_s:.1f} s > {TIME_LIMIT_S:.0f} ({log.path.name})")
        else:
            facts.append(f"seed {log.seed}: {log.eval_s:.1f}")
    rep.add("eval_time", not bad, "; ".join(bad) if bad else "TTT evaluation " + ", ".join(facts) + " s")


def check_legality(folder: Path, logs: list[SeedLog], rep: Report) -> None:
    from pgolf.eval.legality import audit_trace
    from pgolf.eval.trace import load_trace

    if not logs:
        rep.add("legality", False, NO_LOGS)
        return
    bad, facts = [], []
    for log in logs:
        d = folder / "artifacts" / f"seed{log.seed}"
        try:
            trace = load_trace(d / "trace.npz")
        except (FileNotFoundError, OSError, KeyError, ValueError) as e:
            bad.append(f"seed {log.seed}: no readable trace in {d} ({type(e).__name__})")
            continue
        audit = audit_trace(trace, trace.num_targets or None)
        if audit["ok"]:
            facts.append(f"seed {log.seed}: {audit['tokens']:,} tokens scored once, {audit['updates']:,} updates")
        else:
            bad.append(f"seed {log.seed}: {audit['violations'][0]}")
    rep.add("legality", not bad, "; ".join(bad) if bad else "; ".join(facts))


def check_claims(folder: Path, logs: list[SeedLog], totals: dict[int, int], rep: Report) -> None:
    """Every score and byte figure submission.json carries, per seed and over the seeds, against the
    same figure recomputed from the logs and files (to the precision the claim is written with)."""
    from pgolf.script.codebytes import measure

    try:
        sub = json.loads((folder / "submission.json").read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        rep.add("claims", False, f"submission.json unreadable ({type(e).__name__})")
        return
    claimed = sub.get("seed_results") if isinstance(sub, dict) else None
    if not isinstance(claimed, dict):
        rep.add("claims", False, "submission.json has no seed_results object (seed -> its results)")
        return
    if not logs:
        rep.add("claims", False, NO_LOGS)
        return
    code = measure((folder / "train_gpt.py").read_text())
    bad = []
    for log in logs:
        c = claimed.get(str(log.seed))
        if c is None:
            bad.append(f"seed {log.seed} missing from submission.json")
            continue
        if not isinstance(c, dict):
            bad.append(f"seed {log.seed}: its seed_results entry is a JSON {type(c).__name__}, not an object")
            continue
        if not _agrees(c.get("val_bpb"), log.val_bpb):
            bad.append(f"seed {log.seed}: val_bpb {c.get('val_bpb')!r} claimed, {log.val_bpb} in the log")
        if "val_loss" in c and not _agrees(c["val_loss"], log.val_loss):
            bad.append(f"seed {log.seed}: val_loss {c['val_loss']!r} claimed, {log.val_loss} in the log")
        if log.seed in totals and _number(c.get("bytes_total")) != totals[log.seed]:
            bad.append(f"seed {log.seed}: {c.get('bytes_total')} bytes claimed, {totals[log.seed]:,} from the files")
        if log.seed in totals:
            files = {"artifact_bytes": totals[log.seed], "bytes_model": totals[log.seed] - code["code_bytes"],
                     "bytes_code": code["code_bytes"]}
            bad += [f"seed {log.seed}: {k} {c[k]!r} claimed, {v:,} from the files"
                    for k, v in files.items() if k in c and _number(c[k]) != v]
    extra = sorted(set(claimed) - {str(log.seed) for log in logs})
    bad += [f"seed {s} in submission.json has no log" for s in extra]
    bad += [f"{k} {sub[k]!r} claimed, {v} {where}" for k, v, where in _headline(logs, totals, code)
            if k in sub and not _agrees(sub[k], v)]
    rep.add("claims", not bad, "; ".join(bad) if bad else "submission.json agrees with the logs and the files")


def _headline(logs: list[SeedLog], totals: dict[int, int], code: dict[str, int]) -> list[tuple[str, Any, str]]:
    """(field, value, where from) of the figures over the seeds that submission.json may carry: the
    mean and std of the logged scores, the largest seed's bytes, the script's bytes."""
    from pgolf.significance import mean_std

    out: list[tuple[str, Any, str]] = []
    for key in ("val_bpb", "val_loss"):
        values = [getattr(log, key) for log in logs]
        if None not in values:  # else the seed's own claim has failed already
            m, s = mean_std(values)
            out += [(key, m, f"from the logs (mean of {len(values)} seeds)"), (f"{key}_std", s, "from the logs")]
    out += [("bytes_code", code["code_bytes"], "from train_gpt.py"),
            ("bytes_code_raw", code["code_bytes_raw"], "from train_gpt.py")]
    if totals and len(totals) == len(logs):
        t = list(totals.values())
        out += [("bytes_total", max(t), "from the files (largest seed)"),
                ("artifact_bytes_max", max(t), "from the files"),
                ("artifact_bytes_mean", sum(t) / len(t), "from the files"),
                ("bytes_model", max(t) - code["code_bytes"], "from the files (largest seed)")]
    return out


LOG_DIGITS = 1e-8  # the logs write scores with 8 decimals


def _agrees(claimed: Any, actual: float | None) -> bool:
    """Whether a claimed figure is `actual` to the precision it is written with (1.0811 claims 4
    decimals, 987009 a whole number) and the logs'; a null claim agrees only with no figure (the std
    of one seed)."""
    x = _number(claimed)
    if x is None or actual is None:
        return claimed is None and actual is None
    if not math.isfinite(x):
        return False
    exponent = decimal.Decimal(repr(claimed)).as_tuple().exponent  # of the number as written: 987009 is whole
    assert isinstance(exponent, int)  # finite
    return abs(x - actual) <= 0.5 * 10.0 ** exponent + LOG_DIGITS


def _number(x: Any) -> float | None:
    """A JSON number (not a bool, a string or null) as a float."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def parse_vs(vs: str) -> Path | tuple[float, float, int]:
    """`--vs` as given: a record folder, or BPB_MEAN,STD,N (a finite mean > 0, a finite std >= 0,
    a whole n >= 2), checked before any check runs."""
    path = Path(vs)
    if path.is_dir():
        return path
    try:
        mean, std, n = (float(x) for x in vs.split(","))
    except ValueError:
        raise PgolfError(f"--vs {vs!r}: expected BPB_MEAN,STD,N or a record folder") from None
    if not (0 < mean < math.inf and 0 <= std < math.inf and n >= 2 and n == int(n)):
        raise PgolfError(f"--vs {vs!r}: expected a mean > 0, a std >= 0 (finite) and a whole N >= 2")
    return mean, std, int(n)


def reference(vs: Path | tuple[float, float, int], ratio: float) -> tuple[float, float, int, str]:
    """(mean, std, n) of the reference in nats/token: `BPB_MEAN,STD,N` (converted with this
    submission's own nats-per-bit ratio, the same validation bytes) or a record folder's logs."""
    if isinstance(vs, Path):
        path = vs
        logged = [read_log(p).val_loss for p in sorted(path.glob("train_seed*.log"))
                  if LOG.search(p.name) and p.is_file()]
        losses = [x for x in logged if x is not None]
        if len(losses) < 2:
            try:
                sub = json.loads((path / "submission.json").read_text())
                losses = [float(r["val_loss"]) for r in sub["seed_results"].values()]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                losses = []
        if len(losses) < 2:
            raise PgolfError(f"--vs {vs}: need the final val_loss of >= 2 seeds (train_seed*.log or submission.json)")
        from pgolf.significance import mean_std

        m, s = mean_std(losses)
        assert s is not None  # >= 2 values
        return m, s, len(losses), f"{path.name} ({len(losses)} seeds)"
    mean, std, n = vs
    return mean * ratio, std * ratio, n, f"{mean} +- {std} BPB (n={n})"


def check_significance(logs: list[SeedLog], vs: Path | tuple[float, float, int], rep: Report) -> None:
    from pgolf.significance import mean_std, welch_from_stats

    ours = [(log.val_loss, log.val_bpb) for log in logs if log.val_loss is not None and log.val_bpb is not None]
    if len(ours) < 2:
        rep.add("significance", False, "fewer than 2 seeds with a final val_loss in their logs")
        return
    ratio = sum(loss / bpb for loss, bpb in ours) / len(ours)  # nats per bit-per-byte: same validation set
    ref_m, ref_s, ref_n, label = reference(vs, ratio)
    m, s = mean_std([loss for loss, _ in ours])
    assert s is not None  # >= 2 values
    res = welch_from_stats(ref_m, ref_s, ref_n, m, s, len(ours))
    rep.add("significance", res["significant"],
            f"{res['delta_nats']:.5f} nats better than {label} (need > {res['min_delta_nats']}), one-sided Welch "
            f"p = {res['p_value']:.4g} ({'<' if res['significant'] else '>='} {res['alpha']})")


# --------------------------------------------------------------------------- the whole check
def check(folder: str | Path, vs: str | None = None) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise PgolfError(f"{folder}: not a folder")
    ref = parse_vs(vs) if vs else None
    rep = Report()
    script = folder / "train_gpt.py"
    missing = [n for n in ("train_gpt.py", "submission.json", "README.md", "requirements.txt")
               if not (folder / n).is_file()]
    logs = [read_log(p) for p in sorted(folder.iterdir()) if LOG.search(p.name) and p.is_file()]
    rep.add("files", not missing and bool(logs), f"missing {', '.join(missing)}" if missing else
            (f"{len(logs)} seed logs" if logs else "no train_seed<S>.log"))
    if not script.is_file():
        raise PgolfError(f"{script}: not found; nothing more to check")
    try:
        tree = ast.parse(script.read_text(), filename=str(script))
    except UnicodeDecodeError:
        raise PgolfError(f"{script}: not UTF-8 text") from None
    except SyntaxError as e:
        raise PgolfError(f"{script}: not valid Python (line {e.lineno}: {e.msg})") from None
    totals = check_bytes(folder, logs, rep)
    check_imports(folder, tree, rep)
    check_network(tree, rep)
    check_seeds(logs, folder, rep)
    check_times(logs, rep)
    check_legality(folder, logs, rep)
    check_claims(folder, logs, totals, rep)
    if ref is not None:
        check_significance(logs, ref, rep)
    return {"folder": str(folder), "ok": rep.ok,
            "checks": {name: {"ok": ok, "detail": detail} for name, ok, detail in rep.lines},
            "seeds": [log.seed for log in logs], "bytes_total": totals}


def cmd_check(args: Any) -> dict[str, Any]:
    """A check that finds failures is a result, not a usage error: its JSON (ok false) is still the
    last stdout line, then one `pgolf: error:` line sums it up and the exit status is 2."""
    res = check(args.folder, args.vs)
    if not res["ok"]:
        print(json.dumps(res), flush=True)
        failed = [f"{name}: {c['detail']}" for name, c in res["checks"].items() if not c["ok"]]
        raise PgolfError(f"{res['folder']}: {len(failed)} of {len(res['checks'])} checks failed (first: {failed[0]})")
    return res
