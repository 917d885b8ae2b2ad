"""The study's statistics: learning rates chosen on the selection split, confidence intervals over seeds,
the test that tells two modes apart, and the recommendation.

Honest selection: a (mode, size)'s rate is the one with the best mean over seeds on the selection split
(held-out train rows, or ``study.validation_split``); the report split's numbers are read for that rate
only, after it is chosen, and never compared across rates.

Two modes at one size are "indistinguishable" when a two-sided paired t-test over the seeds they share
(``scipy.stats.ttest_rel``; seed k of one mode paired with seed k of the other: same data, same order)
does not reject equal means at level ``1 - confidence``. The recommendation for a size is the cheapest
mode (fewest trainable parameters, then least mean wall time: wall time is noisy on small runs and
counts a feature cache's first build) indistinguishable from the best one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
from scipy import stats

TEST_NAME = "two-sided paired t-test over seeds (scipy.stats.ttest_rel)"


def _finite(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def mean_ci(values: list[float], confidence: float) -> dict[str, float]:
    """Mean, sample standard deviation and the ``confidence`` interval of the mean (Student's t with
    ``n - 1`` degrees of freedom); NaN where ``n < 2`` leaves no spread to estimate."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    if n < 2:
        return {"n": n, "mean": mean, "std": float("nan"), "low": float("nan"), "high": float("nan")}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}


def paired_p_value(a: list[float], b: list[float]) -> float:
    """The two-sided paired t-test's p-value for equal means of ``a`` and ``b`` (paired by position).

    With fewer than two pairs there is nothing to test (NaN). Where every difference is the same the test
    is undefined: equal runs (all differences zero) are indistinguishable (1.0), a constant non-zero
    difference is told apart (0.0).
    """
    if len(a) < 2:
        return float("nan")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if np.allclose(diff, diff[0], rtol=0, atol=1e-12):
        return 1.0 if abs(diff[0]) <= 1e-12 else 0.0
    return float(stats.ttest_rel(a, b).pvalue)


def choose_rates(records: list[dict[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    """Per (mode, size): each rate's mean selection metric over seeds and the chosen rate (the best
    mean; a rate with a diverged or unfinished seed counts as minus infinity)."""
    by_rate: dict[tuple[str, float], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        value = r["selection"]
        by_rate[(r["mode"], r["size"])][r["lr"]].append(
            value if value is not None and math.isfinite(value) else -math.inf
        )
    chosen = {}
    for group, rates in by_rate.items():
        means = {lr: float(np.mean(v)) for lr, v in sorted(rates.items())}
        best = max(means, key=lambda lr: means[lr])
        chosen[group] = {"rates": means, "lr": best}
    return chosen


def summarize(records: list[dict[str, Any]], confidence: float) -> dict[str, Any]:
    """The study's result from its finished trials: per (mode, size) the chosen rate and the report
    split's mean and interval at that rate, with costs; per size the recommendation; per tuned mode the
    size at which it overtakes the frozen one."""
    chosen = choose_rates(records)
    rows = []
    for (mode, size), choice in sorted(chosen.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        at_rate = sorted(
            (r for r in records if (r["mode"], r["size"], r["lr"]) == (mode, size, choice["lr"])),
            key=lambda r: r["seed"],
        )
        row = {
            "mode": mode,
            "size": size,
            "train_rows": at_rate[0].get("train_rows") if at_rate else None,
            "lr": choice["lr"],
            "selection_by_rate": choice["rates"],
            "seeds": [r["seed"] for r in at_rate],
            "report_values": [r["report"] for r in at_rate],
            **mean_ci(_finite([r["report"] for r in at_rate]), confidence),
            "cost": _mean_cost(at_rate),
        }
        rows.append(row)
    alpha = 1 - confidence
    sizes = sorted({r["size"] for r in rows})
    recommendation = [_recommend(rows, size, alpha) for size in sizes]
    return {
        "rows": rows,
        "recommendation": recommendation,
        "overtakes_frozen": _overtakes(rows, sizes, alpha),
        "test": TEST_NAME,
        "alpha": alpha,
    }


def _mean_cost(records: list[dict[str, Any]]) -> dict[str, float]:
    keys = sorted({k for r in records for k in r.get("cost", {})})
    return {k: float(np.mean([r["cost"][k] for r in records if k in r["cost"]])) for k in keys}


def _paired(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[float], list[float]]:
    """The report values of two rows on the seeds both finished."""
    va = dict(zip(a["seeds"], a["report_values"]))
    vb = dict(zip(b["seeds"], b["report_values"]))
    common = [s for s in va if s in vb and _finite([va[s], vb[s]]) == [va[s], vb[s]]]
    return [va[s] for s in common], [vb[s] for s in common]


def _recommend(rows: list[dict[str, Any]], size: float, alpha: float) -> dict[str, Any]:
    here = [r for r in rows if r["size"] == size and math.isfinite(r["mean"])]
    if not here:
        return {"size": size, "best": None, "recommended": None, "indistinguishable": [], "p_values": {}}
    best = max(here, key=lambda r: r["mean"])
    p_values = {r["mode"]: paired_p_value(*_paired(best, r)) for r in here if r is not best}
    # a mode is as good as the best unless the test tells them apart; with nothing to test (one seed)
    # only the best itself is kept
    same = [best] + [r for r in here if r is not best and p_values[r["mode"]] >= alpha]
    cheapest = min(
        same, key=lambda r: (r["cost"].get("trainable", math.inf), r["cost"].get("wall_time_s", 0))
    )
    return {
        "size": size,
        "train_rows": best.get("train_rows"),
        "best": best["mode"],
        "recommended": cheapest["mode"],
        "lr": cheapest["lr"],
        "indistinguishable": sorted(r["mode"] for r in same),
        "p_values": p_values,
    }


def _overtakes(rows: list[dict[str, Any]], sizes: list[float], alpha: float) -> dict[str, float | None]:
    """Per mode that tunes an encoder: the smallest size at which its mean beats the frozen mode's and
    the test tells them apart (None if it never does within the sizes run, or no frozen mode was run)."""
    frozen = {r["size"]: r for r in rows if r["mode"] == "none"}
    if not frozen:
        return {}
    result: dict[str, float | None] = {}
    for mode in sorted({r["mode"] for r in rows} - {"none"}):
        result[mode] = None
        for size in sizes:
            row = next((r for r in rows if r["mode"] == mode and r["size"] == size), None)
            base = frozen.get(size)
            if row is None or base is None or not row["mean"] > base["mean"]:
                continue
            if paired_p_value(*_paired(row, base)) < alpha:
                result[mode] = size
                break
    return result
