"""Seed statistics and the challenge's significance rule.

A new record must beat the previous one by at least 0.005 nats/token at p < 0.01
(docs/records/record-stack.md §0). With A the reference runs and B the new ones, we test the
*shifted* one-sided hypothesis on per-seed validation losses (nats/token):

    H0: mu_A - mu_B <= 0.005      against      H1: mu_A - mu_B > 0.005

with Welch's t-test (unequal variances): `scipy.stats.ttest_ind(a - 0.005, b, equal_var=False,
alternative="greater")`. `significant` is `p_value < 0.01`. Subtracting the margin from A's values
leaves the variances alone and moves the null from "no difference" to "a difference of 0.005".

Metrics are `result.json` keys. `val_bpb` is a run's latest score: the trainer's, replaced by the
artifact's once `pgolf quantize` has evaluated it (which keeps the trainer's as `val_bpb_prequant`),
the TTT score once `pgolf eval --ttt` has adapted that artifact over every token its score had (a
record run's is its TTT score too: what a record reports), and the trainer's again once
`pgolf quantize --no-eval` has replaced that artifact unscored;
`quant_val_bpb` and `ttt_val_bpb` are the quantised and test-time-trained scores. `val_bpb_prequant`
falls back to `val_bpb` for a run that was never quantised.

A stage metric missing from the flat keys comes from the run's latest stage of that name
(`pgolf.runs` stages: `pre-quant`, `quantised`, `ttt`) that scored the run's current artifact (or
final_model.pt), e.g. `quant_val_bpb` of a run only trained is the score of the trainer's own export;
a run whose artifact was replaced unscored has none, so its score never sits beside another file's bytes.

Losses (nats/token) come from the key with "bpb" replaced by "loss" (`val_loss`, `ttt_val_loss`,
`val_loss_prequant`) when the run recorded it, else from the stage the score came from, otherwise the
metric is converted with the run's own bytes-per-token ratio (`val_loss / val_bpb`).

Scores compare like with like only on the same tokens: `metric_tokens` is the number of tokens a run's
score was measured on (from its stage, else the flat `*_tokens` key). `compare` and `pgolf stats` report
the token counts of both groups and warn loudly (stderr, `warnings` in the JSON, `equal_tokens: false`)
when they differ, e.g. a TTT score on 4,096 tokens against one on the whole validation set.

`pgolf stats` reads every directory a pattern matches; the ones it cannot use (not finished, failed,
interrupted, unreadable, without the metric) are listed with the reason under `skipped` in the result
and on stderr. One pattern is one configuration: runs of several `config_key`s under one pattern are
refused unless `--pool` is given.
"""
from __future__ import annotations

import fnmatch
import glob
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, TypeGuard

from pgolf.errors import PgolfError
from pgolf.runs import RunDir, artifact_sha256
from pgolf.significance import ALPHA, MIN_DELTA_NATS, mean_std, welch  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import pandas

# ---- numbers: the pure statistics live in the core (pgolf.significance), `pgolf check` uses them too


def _present(v: Any) -> TypeGuard[float | int | str]:
    return v is not None and v == v  # not None, not NaN (DataFrame rows)


def _quantised(result: dict[str, Any]) -> bool:
    return _present(result.get("quant_val_bpb")) or _present(result.get("val_bpb_prequant"))


# The stage (pgolf.runs) each stage metric is the latest score of.
STAGE_OF = {"val_bpb_prequant": "pre-quant", "quant_val_bpb": "quantised", "ttt_val_bpb": "ttt"}


def _flat_value(result: dict[str, Any], metric: str) -> Any:
    v = result.get(metric)
    if not _present(v) and metric == "val_bpb_prequant" and not _quantised(result):
        v = result.get("val_bpb")
    return v


def _recorded_stages(result: dict[str, Any]) -> list[dict[str, Any]]:
    st = result.get("stages")
    return [s for s in st if isinstance(s, dict) and _present(s.get("val_bpb"))] if isinstance(st, list) else []


def source_stage(result: dict[str, Any], metric: str = "val_bpb") -> dict[str, Any] | None:
    """The stage a run's `metric` was scored in: the latest stage with that very score (of the metric's
    stage name, for a stage metric), or for a stage metric missing from the flat keys the latest stage
    of its name; None when the run recorded no such stage."""
    name = STAGE_OF.get(metric)
    candidates = [s for s in _recorded_stages(result) if name is None or s.get("name") == name]
    v = _flat_value(result, metric)
    if not _present(v):
        candidates = _of_current_artifact(result, candidates)
        return candidates[-1] if name and candidates else None
    return next((s for s in reversed(candidates) if float(s["val_bpb"]) == float(v)), None)


def _of_current_artifact(result: dict[str, Any], candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stages among `candidates` that scored what the run holds now: final_model.pt, or its current
    `artifact` (the sha256 of the latest stage naming that file), never an artifact since replaced, whose
    score beside the new artifact's bytes would compare nothing."""
    sha = artifact_sha256(result)
    if sha is None:
        return candidates
    return [s for s in candidates if s.get("weights") != "artifact" or s.get("artifact_sha256") == sha]


def metric_value(result: dict[str, Any], metric: str = "val_bpb") -> float | None:
    """One run's `metric` (None when absent); see the module notes for `val_bpb_prequant` and stages."""
    v = _flat_value(result, metric)
    if not _present(v) and metric in STAGE_OF:
        st = source_stage(result, metric)
        v = st["val_bpb"] if st else None
    return float(v) if _present(v) else None


def metric_tokens(result: dict[str, Any], metric: str = "val_bpb") -> int | None:
    """How many tokens the run's `metric` was scored on (None when the run did not record it)."""
    st = source_stage(result, metric)
    n = st.get("tokens") if st else None
    if not _present(n) and "bpb" in metric:
        n = result.get(metric.replace("bpb", "tokens"))
        if not _present(n) and metric == "val_bpb_prequant" and not _quantised(result):
            n = result.get("val_tokens")
    return int(n) if _present(n) else None


def loss_nats(result: dict[str, Any], metric: str = "val_bpb") -> float:
    """One run's nats/token for `metric` (see the module notes)."""
    where = result.get("run_dir", "run")
    value = metric_value(result, metric)
    if value is None:
        raise PgolfError(f"{where}: result.json has no {metric!r}")
    loss = result.get(metric.replace("bpb", "loss")) if "bpb" in metric else None
    if not _present(loss) and metric == "val_bpb_prequant" and not _quantised(result):
        loss = result.get("val_loss")
    if not _present(loss):
        st = source_stage(result, metric)
        loss = st.get("val_loss") if st else None
    if _present(loss):
        return float(loss)
    if not _present(result.get("val_loss")) or not result.get("val_bpb"):
        raise PgolfError(f"{where}: needs val_loss and val_bpb to convert {metric!r} to nats/token")
    return value * float(result["val_loss"]) / float(result["val_bpb"])


# ---- run groups

def select_runs(pattern: str, runs_root: str | Path = "runs",
                metric: str = "val_bpb") -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(result.json of every finished run with `metric` whose directory name under `runs_root` matches
    `pattern`, [{run_dir, reason}] of every other matching directory).

    A pattern with a `/` is a path glob instead (`runs/*pr1855*`, `/data/runs/sweep-*`)."""
    root = Path(runs_root)
    if "/" in pattern:
        candidates, where = sorted(Path(p) for p in glob.glob(pattern)), pattern
    else:
        if not root.is_dir():
            raise PgolfError(f"{root}: runs root not found "
                             f"(pass --runs-root DIR, or a path glob such as DIR/{pattern})")
        # hidden folders (.jobs: sweep specs, .failed: retired attempts) hold no runs, as glob's `*` agrees
        candidates = sorted(p for p in root.iterdir() if fnmatch.fnmatchcase(p.name, pattern)
                            and not p.name.startswith("."))
        where = f"{root}/{pattern}"
    runs, skipped = [], []
    for p in (c for c in candidates if c.is_dir()):
        try:
            result = RunDir(p).result()
        except PgolfError as e:
            result = {"status": f"unreadable ({e})"}
        reason = _skip_reason(result, metric)
        if reason:
            skipped.append({"run_dir": str(p), "reason": reason})
        else:
            runs.append({**result, "run_dir": str(p), "run_id": p.name})
    if not runs:
        why = f" (skipped {len(skipped)}: {skipped[0]['run_dir']}: {skipped[0]['reason']}, ...)" if skipped else ""
        raise PgolfError(f"{where}: matches no finished run with {metric!r}{why}")
    return runs, skipped


def _skip_reason(result: dict[str, Any], metric: str) -> str | None:
    if not result:
        return "no result.json (running, or stopped before it finished)"
    if result.get("status") != "finished":
        error = result.get("error")
        return f"status {result.get('status')}" + (f": {error}" if error else "")
    if metric_value(result, metric) is None:
        return f"result.json has no {metric!r}"
    return None


def check_one_configuration(runs: list[dict[str, Any]], where: str) -> None:
    """Seeds are pooled only within one configuration (`config_key`): a glob that also caught another
    configuration would mix two experiments into one mean."""
    keys: dict[str, list[str]] = {}
    for r in runs:
        keys.setdefault(str(r.get("config_key")), []).append(r["run_id"])
    if len(keys) > 1:
        shown = "; ".join(f"{k}: {len(v)} run(s), e.g. {v[0]}" for k, v in keys.items())
        raise PgolfError(f"{where}: matches {len(keys)} configurations ({shown}); narrow the pattern, or give "
                         "--pool to pool them")


def summarize(results: list[dict[str, Any]], metric: str = "val_bpb", label: str = "") -> dict[str, Any]:
    """Seed mean and std of `metric` and of its nats/token over one group of runs."""
    vals = [metric_value(r, metric) for r in results]
    if None in vals:
        missing = [r.get("run_id") for r, v in zip(results, vals) if v is None]
        raise PgolfError(f"{missing[0]}: result.json has no {metric!r}")
    nats = [loss_nats(r, metric) for r in results]
    m, s = mean_std([v for v in vals if v is not None])
    ln, ls = mean_std(nats)
    return {"label": label, "n": len(results), "runs": [r.get("run_id") for r in results],
            "seeds": [r.get("seed") for r in results],
            "config_keys": sorted({str(r.get("config_key")) for r in results}),
            "metric": metric, "mean": m, "std": s, "loss_mean": ln, "loss_std": ls,
            "tokens": token_counts(results, metric), "stages": stage_names(results, metric),
            "total_bytes_mean": _mean_or_none(r.get("total_bytes") for r in results),
            "total_bytes_runs": sum(_present(r.get("total_bytes")) for r in results)}


def stage_names(results: list[dict[str, Any]], metric: str = "val_bpb") -> list[str]:
    """The distinct stages (pre-quant, quantised, ttt; "?" where no stage says) the runs' `metric` came from."""
    names = {(source_stage(r, metric) or {}).get("name") or "?" for r in results}
    return sorted(names)


def stage_warning(groups: dict[str, list[str]], metric: str) -> str | None:
    """A loud sentence when the scores of `groups` ({label: stage_names}) come from different stages (a
    TTT score against an unquantised one): `val_bpb` is each run's latest score, whatever it scored."""
    known = {n for names in groups.values() for n in names if n != "?"}
    if len(known) <= 1:
        return None
    shown = "; ".join(f"{label}: {', '.join(names)}" for label, names in groups.items())
    return (f"{metric} comes from different scoring stages ({shown}): these scores do not compare like with "
            "like (choose one stage's metric: val_bpb_prequant, quant_val_bpb or ttt_val_bpb)")


def token_counts(results: list[dict[str, Any]], metric: str = "val_bpb") -> list[int | None]:
    """The distinct token counts the runs' `metric` was scored on (None: a run that did not record it)."""
    counts = {metric_tokens(r, metric) for r in results}
    return sorted(c for c in counts if c is not None) + ([None] if None in counts else [])


def token_warning(groups: dict[str, list[int | None]], metric: str) -> str | None:
    """A loud sentence when the scores of `groups` ({label: token_counts}) were not all measured on the same
    number of tokens (a known count against an unknown one is not a difference)."""
    known = {n for counts in groups.values() for n in counts if n is not None}
    if len(known) <= 1:
        return None
    shown = "; ".join(f"{label}: {', '.join(f'{n:,}' if n else '?' for n in c)}" for label, c in groups.items())
    return (f"{metric} was scored on different numbers of tokens ({shown}): these scores do not compare like "
            "with like (score them on the same tokens, e.g. the same data.val_max_tokens)")


def _mean_or_none(values: Iterable[Any]) -> float | None:
    v = [float(x) for x in values if x is not None and x == x]
    return sum(v) / len(v) if v else None


def compare(a_results: list[dict[str, Any]], b_results: list[dict[str, Any]], metric: str = "val_bpb",
            a_label: str = "A", b_label: str = "B") -> dict[str, Any]:
    """The challenge criterion for B (new) against A (reference)."""
    a = summarize(a_results, metric, a_label)
    b = summarize(b_results, metric, b_label)
    test = welch([loss_nats(r, metric) for r in a_results], [loss_nats(r, metric) for r in b_results])
    warning = token_warning({a_label: a["tokens"], b_label: b["tokens"]}, metric)
    mixed = stage_warning({a_label: a["stages"], b_label: b["stages"]}, metric)
    return {"a": a, "b": b, "metric": metric, "delta_metric": a["mean"] - b["mean"], **test,
            "test": f"one-sided Welch: H0 mu_A - mu_B <= {MIN_DELTA_NATS} nats/token, reject at p < {ALPHA}",
            "equal_tokens": warning is None, "warnings": [w for w in (warning, mixed) if w]}


# ---- DataFrames (pgolf.lab.registry.load())

def by_config(df: "pandas.DataFrame", metric: str = "val_bpb", key: str = "config_key") -> "pandas.DataFrame":  # noqa: F821
    """One row per configuration: runs, seed mean/std of `metric`, of its nats/token and of the bytes."""
    import pandas as pd

    rows = []
    for k, g in _with_metric(df, metric, key).groupby(key, sort=False):
        s = summarize(g.to_dict("records"), metric, str(k))
        rows.append({key: k, "preset": _first(g, "preset"), "n": s["n"], "seeds": s["seeds"],
                     f"{metric}_mean": s["mean"], f"{metric}_std": s["std"],
                     "loss_mean": s["loss_mean"], "loss_std": s["loss_std"], "tokens": s["tokens"],
                     "total_bytes": s["total_bytes_mean"]})
    cols = [key, "preset", "n", "seeds", f"{metric}_mean", f"{metric}_std", "loss_mean", "loss_std", "tokens",
            "total_bytes"]
    return pd.DataFrame(rows, columns=cols).sort_values(f"{metric}_mean", ignore_index=True)


def _with_metric(df: "pandas.DataFrame", metric: str, key: str) -> "pandas.DataFrame":  # noqa: F821
    """The rows (runs) that have `metric` (an empty frame with a `key` column when there are none)."""
    import pandas as pd

    if not len(df) or key not in df.columns:
        return pd.DataFrame(columns=[key])
    return df[[metric_value(r, metric) is not None for r in df.to_dict("records")]]


def _first(g: "pandas.DataFrame", col: str) -> Any:  # noqa: F821
    return g[col].iloc[0] if col in g.columns else None


def pairwise(df: "pandas.DataFrame", metric: str = "val_bpb", key: str = "config_key",  # noqa: F821
             reference: str | None = None) -> "pandas.DataFrame":  # noqa: F821
    """The criterion for every pair of configurations with >= 2 seeds, B the one with the lower mean.

    With `reference` (a config key or preset name), only pairs with that configuration as A.
    """
    import pandas as pd

    groups = []
    for k, g in _with_metric(df, metric, key).groupby(key, sort=False):
        if len(g) >= 2:
            groups.append((str(k), _first(g, "preset"), g.to_dict("records")))
    rows = []
    for i, (ka, pa, ra) in enumerate(groups):
        for kb, pb, rb in groups[i + 1:]:
            c = compare(ra, rb, metric, ka, kb)
            if c["delta_nats"] < 0:  # orient so that B is the better one
                c = compare(rb, ra, metric, kb, ka)
                (ka2, pa2), (kb2, pb2) = (kb, pb), (ka, pa)
            else:
                (ka2, pa2), (kb2, pb2) = (ka, pa), (kb, pb)
            if reference and reference not in (ka2, pa2):
                continue
            rows.append({"a": ka2, "a_preset": pa2, "b": kb2, "b_preset": pb2, "n_a": c["a"]["n"],
                         "n_b": c["b"]["n"], "delta_nats": c["delta_nats"], f"delta_{metric}": c["delta_metric"],
                         "p_value": c["p_value"], "significant": c["significant"], "equal_tokens": c["equal_tokens"]})
    cols = ["a", "a_preset", "b", "b_preset", "n_a", "n_b", "delta_nats", f"delta_{metric}", "p_value", "significant",
            "equal_tokens"]
    return pd.DataFrame(rows, columns=cols)


def seed_note(df: "pandas.DataFrame", metric: str = "val_bpb", key: str = "config_key",  # noqa: F821
              labels: dict[str, str] | None = None) -> str:
    """Why `pairwise` has fewer rows than pairs of configurations ("" when every one has >= 2 seeds): the
    test needs at least 2 seeds on each side. `labels`: {config key: how to name it}."""
    counts = {str(k): len(g) for k, g in _with_metric(df, metric, key).groupby(key, sort=False)}
    few = {k: n for k, n in counts.items() if n < 2}
    if not counts:
        return f"no finished run has {metric!r}: nothing to compare yet"
    if not few:
        return "" if len(counts) > 1 else "only one configuration: nothing to compare it with yet"
    named = ", ".join(f"{(labels or {}).get(k, k)} ({n} seed)" for k, n in few.items())
    return (f"the significance test needs at least 2 seeds per configuration; too few: {named}. "
            "More seeds: `pgolf sweep notebooks/train.ipynb --seeds 1 2 3 ...`")


# ---- CLI

def cmd_stats(args: Any) -> dict[str, Any]:
    """`pgolf stats A_GLOB [--vs B_GLOB] [--metric M] [--runs-root DIR] [--pool]`."""
    groups, skipped = {}, []
    for label, pattern in (("a", args.a_glob), ("b", args.b_glob)):
        if not pattern:
            continue
        runs, skips = select_runs(pattern, args.runs_root, args.metric)
        for s in skips:
            print(f"pgolf stats: skipped {s['run_dir']}: {s['reason']}", file=sys.stderr)
        skipped += [{**s, "group": label} for s in skips]
        if not args.pool:
            check_one_configuration(runs, pattern)
        groups[label] = runs
    a_runs = groups["a"]
    if "b" not in groups:
        import pandas as pd

        table = by_config(pd.DataFrame(a_runs), args.metric)
        a = summarize(a_runs, args.metric, args.a_glob)
        warning = token_warning({args.a_glob: a["tokens"]}, args.metric)
        mixed = stage_warning({args.a_glob: a["stages"]}, args.metric)
        return _warned({"a": a, "b": None, "delta_nats": None, "p_value": None, "significant": False,
                        "metric": args.metric, "groups": _json_records(table), "skipped": skipped,
                        "equal_tokens": warning is None, "warnings": [w for w in (warning, mixed) if w]})
    b_runs = groups["b"]
    overlap = {r["run_id"] for r in a_runs} & {r["run_id"] for r in b_runs}
    if overlap:
        raise PgolfError(f"run {sorted(overlap)[0]} matches both {args.a_glob!r} and {args.b_glob!r}")
    return _warned({**compare(a_runs, b_runs, args.metric, args.a_glob, args.b_glob), "skipped": skipped})


def _json_records(table: "pandas.DataFrame") -> list[dict[str, Any]]:  # noqa: F821
    """A table's rows for the JSON result: a missing value (NaN, e.g. the std of a one-run group) is None."""
    return [{k: v if _present(v) else None for k, v in row.items()} for row in table.to_dict("records")]


def _warned(out: dict[str, Any]) -> dict[str, Any]:
    for w in out["warnings"]:
        print(f"pgolf stats: WARNING: {w}", file=sys.stderr)
    return out
