"""The challenge's significance rule, as pure statistics (docs/records/record-stack.md §0).

A new record must beat the previous one by at least 0.005 nats/token at p < 0.01. With A the
reference and B the new runs, the *shifted* one-sided hypothesis on per-seed losses (nats/token)

    H0: mu_A - mu_B <= 0.005      against      H1: mu_A - mu_B > 0.005

is tested with Welch's t-test (unequal variances): subtracting the margin from A's mean leaves the
variances alone and moves the null from "no difference" to "a difference of 0.005". `pgolf stats`
(pgolf.lab.stats, from run groups) and `pgolf check --vs` (from a submission's logs, or a record
given as mean, std and n) both use `welch_from_stats`.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

from pgolf.errors import PgolfError

MIN_DELTA_NATS = 0.005
ALPHA = 0.01


def mean_std(values: Iterable[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    v = [float(x) for x in values]
    if not v:
        raise PgolfError("no values to average")
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def welch_from_stats(mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float, n_b: int,
                     min_delta: float = MIN_DELTA_NATS, alpha: float = ALPHA) -> dict[str, Any]:
    """Does B beat A by more than `min_delta`? One-sided Welch test on nats/token (lower is better),
    from each group's mean, sample standard deviation and size."""
    from scipy import stats as st

    if n_a < 2 or n_b < 2:
        raise PgolfError(f"the significance test needs at least 2 runs per group (got {n_a} and {n_b})")
    res = st.ttest_ind_from_stats(mean_a - min_delta, std_a, n_a, mean_b, std_b, n_b, equal_var=False,
                                  alternative="greater")
    p, t = float(res.pvalue), float(res.statistic)
    va, vb = std_a ** 2 / n_a, std_b ** 2 / n_b
    df = (va + vb) ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1)) if va + vb > 0 else None
    # without any spread t is +-infinity and df undefined: None (JSON holds neither); p is still 0 or 1
    return {"delta_nats": mean_a - mean_b, "t": t if math.isfinite(t) else None, "df": df,
            "p_value": p if math.isfinite(p) else None, "significant": bool(p < alpha),
            "min_delta_nats": min_delta, "alpha": alpha}


def welch(a: Iterable[float], b: Iterable[float], min_delta: float = MIN_DELTA_NATS,
          alpha: float = ALPHA) -> dict[str, Any]:
    """`welch_from_stats` over two lists of per-seed losses (nats/token)."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2:
        raise PgolfError(f"the significance test needs at least 2 runs per group (got {len(a)} and {len(b)})")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    assert sa is not None and sb is not None  # both groups have >= 2 values (checked above)
    return welch_from_stats(ma, sa, len(a), mb, sb, len(b), min_delta, alpha)
