"""`pgolf export RUN [RUN...] --out DIR [--name N --author A --github-id G]`: a records/ folder.

The runs are record runs of ONE configuration (the seeds of a submission), made by the record
pipeline (`python -m pgolf.export.record`, or an exported `train_gpt.py`): their logs are the
records' one-process logs, and each holds the `train_gpt.py` that made it. The folder:

    train_gpt.py          the runs' script (identical in every run: same code, same configuration)
    submission.json       the fields the accepted records carry (name, author, github_id, date,
                          val_bpb / val_loss mean and std, per-seed results and bytes, blurb)
    README.md             results per seed, the configuration as a diff against its preset, the
                          compliance facts taken from the runs' records and audited traces
    requirements.txt      the script's third-party imports, pinned as the runs used them
    train_seed<S>.log     each seed's log
    artifacts/            each seed's artifact and eval trace, git-ignored inside the folder (for
                          `pgolf check` and reviewers, not for the PR)

The folder is written beside DIR and renamed into place when complete.
"""
from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from pgolf.config import Config
from pgolf.errors import PgolfError
from pgolf.fileio import check_output, staged_dir
from pgolf.runs import config_key, resolve

GITIGNORE = "*\n!.gitignore\n"
OPTIONAL = "# optional: "  # a requirements.txt comment naming a package the script uses only when installed


# --------------------------------------------------------------------------- the runs
def load_runs(paths: list[str]) -> list[dict[str, Any]]:
    """Each run's result, config, script and files, checked: finished record runs of one configuration."""
    runs: list[dict[str, Any]] = []
    for p in paths:
        run = resolve(p)
        res = run.result()
        if res.get("status") != "finished":
            raise PgolfError(f"{run.path}: not a finished run")
        if res.get("pipeline") != "record":
            raise PgolfError(f"{run.path}: not a record run (a submission's logs come from the one-process record "
                             f"pipeline: python -m pgolf.export.record --config {run.file('config.json')} --seed S)")
        _check_fields(run.file("result.json"), res)
        for name in ("train.log", "train_gpt.py", Path(res["artifact"]).name):
            if not run.file(name).is_file():
                raise PgolfError(f"{run.file(name)}: missing (the record run is incomplete)")
        if not _trace_files(run.path):
            raise PgolfError(f"{run.path}: no trace.npz (the record run is incomplete)")
        config = run.config()
        runs.append({"run": run, "result": res, "config": config, "key": config_key(config),
                     "seed": int(res["seed"]), "script": run.file("train_gpt.py").read_text(),
                     "artifact": run.file(Path(res["artifact"]).name)})
    if not runs:
        raise PgolfError("pgolf export: give at least one run")
    keys = sorted({r["key"] for r in runs})
    if len(keys) > 1:
        a = next(r for r in runs if r["key"] == keys[0])
        b = next(r for r in runs if r["key"] == keys[1])
        raise PgolfError(f"runs of different configurations: {a['run'].path} (config {keys[0]}) and "
                         f"{b['run'].path} (config {keys[1]}); a submission is the seeds of one configuration")
    seen: dict[int, Path] = {}
    for r in runs:
        if r["seed"] in seen:
            raise PgolfError(f"{r['run'].path} and {seen[r['seed']]} both have seed {r['seed']}")
        seen[r["seed"]] = r["run"].path
        if r["script"] != runs[0]["script"]:
            raise PgolfError(f"{r['run'].path}/train_gpt.py differs from {runs[0]['run'].path}/train_gpt.py "
                             "(the runs were made by different code)")
    return sorted(runs, key=lambda r: r["seed"])


# what the folder is written from: a record run's result.json fields and the JSON type each must have
RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("seed", "steps", "total_bytes", "model_bytes", "code_bytes", "code_bytes_raw"), (int,)),
    **dict.fromkeys(("train_seconds", "val_bpb_prequant", "quant_val_bpb", "ttt_val_bpb", "ttt_val_loss",
                     "ttt_eval_seconds"), (int, float)),
    **dict.fromkeys(("artifact", "preset", "ttt_method"), (str,)), "eval_time": (dict,)}


def _check_fields(path: Path, res: dict[str, Any]) -> None:
    """A finished record result holds every field the folder is written from, each of its JSON type."""
    for key, types in RESULT_FIELDS.items():
        if key not in res:
            raise PgolfError(f"{path}: no {key!r} (not a complete record result)")
        v = res[key]
        if not isinstance(v, types) or isinstance(v, bool):
            want = {int: "an integer", str: "a string", dict: "an object"}.get(types[0], "a number")
            raise PgolfError(f"{path}: {key} is {v!r}, expected {want}")
    if not isinstance(res["eval_time"].get("total_seconds"), (int, float)):
        raise PgolfError(f"{path}: eval_time.total_seconds is {res['eval_time'].get('total_seconds')!r}, "
                         "expected a number")


def _trace_files(folder: Path) -> list[Path]:
    one = folder / "trace.npz"
    return [one] if one.is_file() else sorted(folder.glob("trace.rank*.npz"))


# --------------------------------------------------------------------------- requirements
def third_party_imports(script: str) -> dict[str, str]:
    """Top-level names of the packages a script imports, outside the standard library, with how:
    "module" (at module level), "function" (inside a function) or "guarded" (only inside
    `try: ... except ImportError`, so the script runs without it)."""
    rank = {"guarded": 0, "function": 1, "module": 2}
    out: dict[str, str] = {}

    def visit(node: ast.AST, how: str) -> None:
        names: list[str] = []
        child: ast.AST
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [(node.module or "").split(".")[0]]
        for n in names:
            if (n and n not in sys.stdlib_module_names and n != "__future__"
                    and rank[how] >= rank.get(out.get(n, ""), -1)):
                out[n] = how
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and how == "module":
            how = "function"
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for child in node.body:
                visit(child, "guarded")
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, how)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, how)

    visit(ast.parse(script), "module")
    return out


def _catches_import_error(h: ast.ExceptHandler) -> bool:
    names = [h.type] if not isinstance(h.type, ast.Tuple) else h.type.elts
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


def distribution_of(name: str) -> str | None:
    """The installed distribution that provides the import name, or None."""
    dists = _packages().get(name)
    return sorted(dists)[0] if dists else None


@functools.cache
def _packages() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def requirements(script: str, envs: list[dict[str, Any]]) -> str:
    """requirements.txt: every third-party package the script imports, at the version the runs used
    (their env.json) or else the installed one. Packages it imports only inside try/except
    ImportError, and packages not installed here (flash_attn on a CPU machine), are listed as
    `# optional:` lines, which `pgolf check` accepts."""
    ran: dict[str, str] = {}
    for env in envs:
        ran.update({k.lower(): v for k, v in (env.get("versions") or {}).items()})
    lines = ["# Python packages train_gpt.py imports (generated by pgolf export).",
             "# python-minifier and brotli also set the code bytes the script counts: keep these versions."]
    optional = []
    for name, how in sorted(third_party_imports(script).items()):
        dist = distribution_of(name)
        if dist is None:  # not installed where the runs were exported, e.g. flash_attn on a CPU machine
            optional.append(f"{OPTIONAL}{name}")
            continue
        version = ran.get(dist.lower()) or importlib.metadata.version(dist)
        pin = f"{dist}=={version.split('+', 1)[0]}"  # no local label (2.9.1+cu128): PyPI has no such build
        if how == "guarded":  # imported inside try/except ImportError: the script runs without it
            optional.append(f"{OPTIONAL}{pin}")
        else:
            lines.append(pin)
    return "\n".join(lines + optional) + "\n"


# --------------------------------------------------------------------------- the README
def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in d.items() if isinstance(sec, dict) for k, v in sec.items()}


def config_diff(cfg: Config) -> tuple[str, list[tuple[str, Any, Any]]]:
    """(base, [(field, value, base value)]): the configuration against its preset (or the defaults)."""
    from pgolf.script.bundle import canonical
    from pgolf.presets import PRESETS, get_preset

    base_name = cfg.preset if cfg.preset in PRESETS else "defaults"
    base = get_preset(cfg.preset) if cfg.preset in PRESETS else Config()
    a, b = _flat(canonical(cfg).to_dict()), _flat(canonical(base).to_dict())
    return base_name, [(k, a[k], b[k]) for k in a if a[k] != b[k]]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float | None:
    from pgolf.significance import mean_std
    return mean_std(values)[1]


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def readme(name: str, runs: list[dict[str, Any]], audits: dict[int, dict], sub: dict[str, Any],
           cfg: Config) -> str:
    res = [r["result"] for r in runs]
    base, diff = config_diff(cfg)
    std = sub.get("val_bpb_std")
    lines = [f"# {name}", "",
             f"**val_bpb: {sub['val_bpb']:.5f}** ({len(runs)}-seed mean" + (f", std {std:.5f}" if std else "") +
             f") | **{sub['bytes_total']:,} bytes** (largest seed) | {sub['hardware']} | generated by pgolf from "
             f"`{cfg.preset}` (config `{runs[0]['key']}`)", "", "## Results", "",
             "| Seed | Steps | ms/step | Pre-quant val_bpb | Quantized val_bpb | **Post-TTT val_bpb** | Artifact bytes "
             "| Train s | Eval s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res:
        lines.append(f"| {r['seed']} | {r['steps']:,} | {1000 * r['train_seconds'] / max(r['steps'], 1):.1f} "
                     f"| {r['val_bpb_prequant']:.5f} | {r['quant_val_bpb']:.5f} | **{r['ttt_val_bpb']:.5f}** "
                     f"| {r['total_bytes']:,} | {r['train_seconds']:.1f} | {r['ttt_eval_seconds']:.1f} |")
    lines.append(f"| **Mean** | {_mean([r['steps'] for r in res]):,.0f} | "
                 f"{_mean([1000 * r['train_seconds'] / max(r['steps'], 1) for r in res]):.1f} "
                 f"| {_mean([r['val_bpb_prequant'] for r in res]):.5f} "
                 f"| {_mean([r['quant_val_bpb'] for r in res]):.5f} "
                 f"| **{sub['val_bpb']:.5f}** | {_mean([r['total_bytes'] for r in res]):,.0f} "
                 f"| {_mean([r['train_seconds'] for r in res]):.1f} "
                 f"| {_mean([r['ttt_eval_seconds'] for r in res]):.1f} |")
    lines += ["", "Artifact bytes = the compressed model + the code bytes of `train_gpt.py` "
              f"({res[0]['code_bytes']:,} B: minified with python-minifier, brotli q11, base85 in the two-line "
              f"exec stub, as PR #1855 counts; {res[0]['code_bytes_raw']:,} B readable).", "",
              "## Configuration", ""]
    if diff:
        lines += [f"`{base}` with these changes:", "", "| field | value | " + base + " |", "|---|---|---|"]
        lines += [f"| `{k}` | `{v!r}` | `{b!r}` |" for k, v, b in diff]
    else:
        lines.append(f"`{base}` as it is.")
    lines += ["", "Everything else is in `train_gpt.py` (CONFIG at the end: the fields that differ from pgolf's "
              "defaults). Environment overrides: DATA_PATH, TOKENIZER_PATH, SEED, RUN_ID, ITERATIONS, "
              "MAX_WALLCLOCK_SECONDS (0 = no cap).", "", "## Compliance", ""]
    lines += _compliance(runs, audits)
    lines += ["", "## Reproducing", "", "```bash", "pip install -r requirements.txt",
              "DATA_PATH=./data/datasets/fineweb10B_sp%d TOKENIZER_PATH=./data/tokenizers/<tokenizer>.model \\"
              % cfg.model.vocab_size, "SEED=%d torchrun --standalone --nproc_per_node=8 train_gpt.py" % res[0]["seed"],
              "```", "",
              "`pgolf check .` re-checks this folder (bytes from the files, times from the logs, the traces).",
              "", "## Files", "",
              "- `train_gpt.py`: the whole pipeline (training, GPTQ, compression, evaluation, TTT), pgolf's code "
              "flattened into one file for this configuration",
              "- " + ", ".join(f"`train_seed{r['seed']}.log`" for r in res) + ": the runs' logs",
              "- `submission.json`, `requirements.txt`",
              "- `artifacts/` (git-ignored): each seed's artifact and per-token evaluation trace"]
    return "\n".join(lines) + "\n"


def _compliance(runs: list[dict[str, Any]], audits: dict[int, dict]) -> list[str]:
    res = [r["result"] for r in runs]
    limit = res[0].get("limit", 16_000_000)
    calib = [r.get("calibration") or {} for r in res]
    lines = [f"- **Artifact size**: model + code <= {limit:,} bytes for every seed (largest "
             f"{max(r['total_bytes'] for r in res):,}).",
             "- **Training <= 600 s**: training loop " + ", ".join(f"{r['train_seconds']:.1f}" for r in res) + " s"]
    if any(calib):
        spent = [c.get("calibration_data_seconds", 0) + c.get("hessian_seconds", 0) for c in calib]
        reserve = calib[0].get("reserve_seconds", 0)
        within = all(c.get("within_reserve") for c in calib)
        lines[-1] += ("; GPTQ calibration (training shards only) " + ", ".join(f"{s:.1f}" for s in spent) +
                      f" s, {'inside' if within else 'NOT inside'} the {reserve:g} s the loop leaves free")
    lines[-1] += "."
    lines += ["- **Evaluation <= 600 s**: the TTT timer (as the records time it) " +
              ", ".join(f"{r['ttt_eval_seconds']:.1f}" for r in res) + " s; the whole evaluation (load, quantized "
              "score, warm-up, TTT) " + ", ".join(f"{r['eval_time']['total_seconds']:.1f}" for r in res) + " s.",
              "- **Score before update, single pass** (Issue #1017 conditions 3-4): each seed's per-token trace "
              "(`artifacts/seed<S>/trace*.npz`) audited by `pgolf.eval.legality.audit_trace`: " +
              "; ".join(f"seed {s}: {'ok' if a['ok'] else 'VIOLATIONS'} ({a['tokens']:,} tokens, {a['updates']:,} "
                        f"updates)" for s, a in audits.items()) + ".",
              "- **Full normalized distribution** (condition 2): every scored row comes from a log-softmax over the "
              "whole vocabulary, checked on every scoring path (`EvalStream.score`).",
              f"- **TTT method**: {res[0].get('ttt_method')}; its compile warm-up runs on random tokens, never on "
              "validation data.",
              f"- **Seeds**: {len(res)} distinct seeds ({', '.join(str(r['seed']) for r in res)}), one run each."]
    return lines


# --------------------------------------------------------------------------- the folder
def _hardware(envs: list[dict[str, Any]], res: dict[str, Any]) -> str:
    cuda = (envs[0].get("cuda") or {}) if envs else {}
    gpus = cuda.get("gpus") or []
    if gpus:
        return f"{res.get('world_size', 1)}x{gpus[0]}"
    return str(res.get("device", "cpu"))


def submission_json(name: str, author: str, github_id: str, blurb: str, runs: list[dict[str, Any]],
                    envs: list[dict[str, Any]]) -> dict[str, Any]:
    res = [r["result"] for r in runs]
    bpb, loss = [r["ttt_val_bpb"] for r in res], [r["ttt_val_loss"] for r in res]
    total = [r["total_bytes"] for r in res]
    versions = (envs[0].get("versions") or {}) if envs else {}
    return {
        "author": author, "github_id": github_id, "name": name, "blurb": blurb,
        "date": time.strftime("%Y-%m-%d"), "track": "10min_16mb",
        "val_loss": _mean(loss), "val_bpb": _mean(bpb), "val_loss_std": _std(loss), "val_bpb_std": _std(bpb),
        "seeds": [r["seed"] for r in res],
        "seed_results": {str(r["seed"]): {
            "val_loss": r["ttt_val_loss"], "val_bpb": r["ttt_val_bpb"], "artifact_bytes": r["total_bytes"],
            "bytes_total": r["total_bytes"], "bytes_model": r["model_bytes"], "bytes_code": r["code_bytes"],
            "steps": r["steps"], "step_avg_ms": round(1000 * r["train_seconds"] / max(r["steps"], 1), 1),
            "train_time_s": round(r["train_seconds"], 2), "eval_time_s": r["ttt_eval_seconds"]} for r in res},
        "artifact_bytes_mean": round(_mean(total)), "artifact_bytes_max": max(total), "bytes_total": max(total),
        "bytes_code": res[0]["code_bytes"], "bytes_code_raw": res[0]["code_bytes_raw"],
        "hardware": _hardware(envs, res[0]), "pytorch_version": versions.get("torch"),
        "technique_summary": f"pgolf preset {res[0]['preset']} (config {runs[0]['key']}), TTT {res[0]['ttt_method']}",
    }


def export(paths: list[str], out: str | Path, *, name: str | None = None, author: str = "", github_id: str = "",
           blurb: str = "") -> dict[str, Any]:
    from pgolf.eval.legality import audit_trace
    from pgolf.eval.trace import load_trace

    out = check_output(out, "--out", kind="dir")  # before any work
    if out.is_dir() and any(out.iterdir()):
        raise PgolfError(f"--out {out}: exists and is not empty (choose a new --out)")
    runs = load_runs(paths)
    cfg = Config.from_dict(runs[0]["config"], where=str(runs[0]["run"].file("config.json")))
    envs = [r["run"].read_json("env.json") for r in runs if r["run"].file("env.json").is_file()]
    name = name or f"pgolf {cfg.preset}"
    audits = {}
    for r in runs:
        trace = _trace_files(r["run"].path)[0]
        path = trace if trace.name == "trace.npz" else trace.with_name("trace.npz")
        audits[r["seed"]] = audit_trace(load_trace(path), r["result"].get("val_tokens"))
    sub = submission_json(name, author, github_id, blurb or f"{name}: {cfg.preset} through pgolf's record pipeline",
                          runs, envs)
    with staged_dir(out) as tmp:  # beside `out`, renamed into place when complete (an empty `out` replaced)
        (tmp / "train_gpt.py").write_text(runs[0]["script"])
        (tmp / "requirements.txt").write_text(requirements(runs[0]["script"], envs))
        (tmp / "submission.json").write_text(json.dumps(sub, indent=2) + "\n")
        (tmp / "README.md").write_text(readme(name, runs, audits, sub, cfg))
        (tmp / "artifacts").mkdir()
        (tmp / "artifacts" / ".gitignore").write_text(GITIGNORE)
        for r in runs:
            shutil.copyfile(r["run"].file("train.log"), tmp / f"train_seed{r['seed']}.log")
            dest = tmp / "artifacts" / f"seed{r['seed']}"
            dest.mkdir()
            shutil.copyfile(r["artifact"], dest / r["artifact"].name)
            for t in _trace_files(r["run"].path):
                shutil.copyfile(t, dest / t.name)
    return {"out": str(out), "seeds": sub["seeds"], "val_bpb": sub["val_bpb"], "val_bpb_std": sub["val_bpb_std"],
            "bytes_total": sub["bytes_total"], "code_bytes": sub["bytes_code"], "code_bytes_raw": sub["bytes_code_raw"],
            "config_key": runs[0]["key"], "legal": all(a["ok"] for a in audits.values())}


def cmd_export(args: Any) -> dict[str, Any]:
    return export(args.runs, args.out, name=args.name, author=args.author, github_id=args.github_id,
                  blurb=args.blurb)

