"""The study's statistics: learning rates and modes chosen on the selection split, intervals over seeds,
and the decision "practically equivalent to the best, worse, or undecided" with a stated margin.

Honest selection: a (mode, size)'s rate is the one with the best mean over seeds on the selection split
(held-out train rows, or ``study.validation_split``); the mode is chosen on the same split, at the chosen
rates. The report split's numbers are read after everything is chosen, reported for every mode, and
decide nothing (where they disagree with the decision beyond the margin, the report says so).

The decision between a mode and the best one at a size is Benavoli et al.'s Bayesian paired t-test ("Time
for a change", JMLR 2017) on the paired differences over seeds (seed k of one mode against seed k of the
other: the same data subset, the same order): with n seeds, mean difference d and standard deviation s,
the posterior of the mean difference is Student's t with n - 1 degrees of freedom, location d and scale
s / sqrt(n), and with the region of practical equivalence ``study.rope`` (in the metric's units) it gives
P(worse: below -rope), P(practically equivalent: within +-rope) and P(better: above rope). The seeds are
independent replications evaluated on one fixed held-out set, not cross-validation folds, so no
correlation correction is applied (baycomp's ``CorrelatedTTest`` applies Nadeau and Bengio's for folds;
``tests/test_study.py`` checks these probabilities against baycomp's ``Posterior`` with that correlation
set to 0). Written here with scipy rather than through baycomp because baycomp exposes the uncorrected
posterior only through a class outside its public ``__all__``, and treats a zero variance as certainty.

Two guards a reviewer would ask for:

- **No certainty from a discrete metric.** Where every seed gives the same difference (common with
  accuracy on a few hundred examples), the sample standard deviation is 0 and any test would claim
  certainty. The standard deviation used is at least ``resolution / sqrt(6)``: each of the two values is
  a multiple of the metric's resolution (one example's worth, ``1 / count``), and a uniform rounding error
  of variance resolution^2 / 12 each bounds what equal observed differences can tell.
- **One seed is never evidence.** With fewer than two paired seeds there is no posterior: the decision is
  "undecided", never "equivalent".

The recommendation for a size is the cheapest mode (by ``study.cost``: training time by default, or peak
memory, inference time per example, trainable parameters) that is practically equivalent to the best
with probability at least ``study.confidence`` (the best counts as equivalent to itself); where a cheaper
mode is undecided, the size is "undecided" and the report says how many seeds would likely decide
(``seeds_to_decide``: the same mean and spread, more seeds).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
from scipy import stats

from vlfuse.study.curves import fit_curves
from vlfuse.study.labels import frozen_label, mode_of
from vlfuse.study.pareto import pareto_fronts

DECISION_NAME = (
    "Bayesian paired t-test over seeds with a region of practical equivalence (Benavoli et al. 2017)"
)
DEFAULT_RESOLUTION = 1e-3  # a metric's resolution where the split's example count is not known
MOST_SEEDS = 100  # seeds_to_decide looks no further


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


def difference_posterior(
    diffs: list[float], rope: float, confidence: float, resolution: float = DEFAULT_RESOLUTION
) -> dict[str, float]:
    """The posterior of the mean paired difference (module docstring): its mean, the ``confidence``
    interval, and P(worse), P(practically equivalent), P(better) for the margin ``rope``. NaN
    probabilities with fewer than two pairs."""
    x = np.asarray(diffs, dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    if n < 2:
        nan = float("nan")
        return {"n": n, "mean": mean, "std": nan, "low": nan, "high": nan, "p_worse": nan,
                "p_equivalent": nan, "p_better": nan}  # fmt: skip
    std = float(x.std(ddof=1))
    used = max(std, resolution / math.sqrt(6))
    posterior = stats.t(df=n - 1, loc=mean, scale=used / math.sqrt(n))
    p_worse, p_better = float(posterior.cdf(-rope)), float(posterior.sf(rope))
    low, high = posterior.ppf([(1 - confidence) / 2, (1 + confidence) / 2])
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "std_used": used,
        "low": float(low),
        "high": float(high),
        "p_worse": p_worse,
        "p_equivalent": max(0.0, 1.0 - p_worse - p_better),
        "p_better": p_better,
    }


def decide(posterior: dict[str, float], probability: float) -> str:
    """``equivalent``, ``worse``, ``better`` (each when its probability reaches ``probability``) or
    ``undecided`` (always with fewer than two seeds)."""
    if posterior["n"] < 2:
        return "undecided"
    for outcome in ("equivalent", "worse", "better"):
        if posterior[f"p_{outcome}"] >= probability:
            return outcome
    return "undecided"


def seeds_to_decide(
    posterior: dict[str, float], rope: float, probability: float, most: int = MOST_SEEDS
) -> int | None:
    """How many seeds would likely decide an undecided comparison: the fewest at which the same mean
    difference and spread would reach ``probability`` for the outcome its mean points to (within the
    margin: equivalent; beyond it: worse or better); None when even ``most`` would not (a mean at the
    margin's edge) or there is no spread to extrapolate from (one seed)."""
    if posterior["n"] < 2:
        return None
    mean, std = posterior["mean"], posterior["std_used"]
    for n in range(posterior["n"] + 1, most + 1):
        t = stats.t(df=n - 1, loc=mean, scale=std / math.sqrt(n))
        worse, better = t.cdf(-rope), t.sf(rope)
        if max(worse, better, 1 - worse - better) >= probability:
            return n
    return None


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
        chosen[group] = {"rates": means, "lr": best, "edge": rate_edge(best, list(means))}
    return chosen


def rate_edge(lr: float, tried: list[float]) -> str | None:
    """``highest`` or ``lowest`` when ``lr`` is at that end of the rates ``tried`` (two or more): the
    best rate may lie beyond the grid."""
    if len(tried) < 2:
        return None
    return "highest" if lr == max(tried) else "lowest" if lr == min(tried) else None


def size_rows(records: list[dict[str, Any]]) -> dict[float, float]:
    """Each configured size as train rows (the median over its trials; the size itself where no trial
    says): counts and fractions are put on one scale before anything is ordered."""
    rows: dict[float, list[float]] = defaultdict(list)
    for r in records:
        if r.get("train_rows"):
            rows[r["size"]].append(r["train_rows"])
    return {r["size"]: float(np.median(rows[r["size"]])) if rows[r["size"]] else r["size"] for r in records}


def summarize(
    records: list[dict[str, Any]],
    confidence: float,
    rope: float,
    target: float | None = None,
    cost: str = "time",
) -> dict[str, Any]:
    """The study's result from its finished trials: per (mode, size) the chosen rate, both splits' means
    and intervals at that rate, and the costs; per size the comparisons with the best mode and the
    recommendation (or "undecided"); per tuned mode the size from which it is better than the frozen one;
    the learning curves (``vlfuse.study.curves``). Sizes are ordered by train rows throughout."""
    chosen = choose_rates(records)
    rows_of = size_rows(records)
    rows = []
    for (mode, size), choice in chosen.items():
        at_rate = sorted(
            (r for r in records if (r["mode"], r["size"], r["lr"]) == (mode, size, choice["lr"])),
            key=lambda r: r["seed"],
        )
        counts = [r.get("selection_count") for r in at_rate if r.get("selection_count")]
        rows.append(
            {
                "mode": mode,
                "size": size,
                "train_rows": rows_of[size],
                "lr": choice["lr"],
                "lr_edge": choice["edge"],
                "selection_by_rate": choice["rates"],
                "seeds": [r["seed"] for r in at_rate],
                "selection_values": [r["selection"] for r in at_rate],
                "report_values": [r["report"] for r in at_rate],
                "resolution": 1.0 / max(counts) if counts else DEFAULT_RESOLUTION,
                "selection": mean_ci(_finite([r["selection"] for r in at_rate]), confidence),
                "best_steps": [r.get("best_step") for r in at_rate],
                **mean_ci(_finite([r["report"] for r in at_rate]), confidence),
                "cost": _mean_cost(at_rate),
            }
        )
    rows.sort(key=lambda r: (r["train_rows"], r["mode"]))
    sizes = sorted({r["size"] for r in rows}, key=lambda s: rows_of[s])
    decisions = [_decide_size(rows, size, rope, confidence, cost) for size in sizes]
    return {
        "rows": rows,
        "decisions": decisions,
        "overtakes_frozen": _overtakes(rows, sizes, rope, confidence),
        "curves": fit_curves(rows, target, decisions, rope),
        "rule": DECISION_NAME,
        "cost": cost,
        "total_by_mode": _totals(records),
        "pareto": pareto_fronts(rows, sizes),
        "rope": rope,
        "probability": confidence,
    }


def _totals(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per mode, what the whole study spent on it, tuning included (every rate, size and seed): trials,
    wall time and training time."""
    totals: dict[str, dict[str, float]] = defaultdict(
        lambda: {"trials": 0, "wall_time_s": 0.0, "train_time_s": 0.0}
    )
    for r in records:
        t = totals[r["mode"]]
        t["trials"] += 1
        t["wall_time_s"] += r.get("cost", {}).get("wall_time_s") or 0.0
        t["train_time_s"] += r.get("cost", {}).get("train_time_s") or 0.0
    return dict(totals)


def _mean_cost(records: list[dict[str, Any]]) -> dict[str, float]:
    keys = sorted({k for r in records for k in r.get("cost", {})})
    return {k: float(np.mean([r["cost"][k] for r in records if k in r["cost"]])) for k in keys}


def _paired(a: dict[str, Any], b: dict[str, Any], split: str) -> list[float]:
    """``a - b`` on ``split`` (``selection`` or ``report``) over the seeds both finished."""
    va = dict(zip(a["seeds"], a[f"{split}_values"]))
    vb = dict(zip(b["seeds"], b[f"{split}_values"]))
    common = [s for s in va if s in vb and _finite([va[s], vb[s]]) == [va[s], vb[s]]]
    return [va[s] - vb[s] for s in common]


# study.cost -> the cost field it orders by (then training time, then trainable parameters)
COST_KEYS = {
    "time": "train_time_s",
    "memory": "peak_memory_mb",
    "inference": "inference_ms_per_example",
    "params": "trainable",
}


def cost_order(cost: str):
    """A sort key for rows, cheapest first, by ``study.cost`` (a missing figure sorts last)."""

    def key(row: dict[str, Any]) -> tuple[float, float, float]:
        c = row["cost"]
        return (
            c.get(COST_KEYS[cost], math.inf),
            c.get("train_time_s", c.get("wall_time_s", math.inf)),
            c.get("trainable", math.inf),
        )

    return key


def _decide_size(
    rows: list[dict[str, Any]], size: float, rope: float, probability: float, cost: str
) -> dict[str, Any]:
    """One size's decision on the selection split: each mode against the best, then the recommendation."""
    here = [r for r in rows if r["size"] == size and math.isfinite(r["selection"]["mean"])]
    result: dict[str, Any] = {
        "size": size,
        "train_rows": next((r["train_rows"] for r in rows if r["size"] == size), None),
    }
    if not here:
        return {**result, "best": None, "recommended": None, "status": "no finished trial", "modes": {}}
    best = max(here, key=lambda r: r["selection"]["mean"])
    resolution = max(r["resolution"] for r in here)
    modes = {}
    for r in sorted(here, key=cost_order(cost)):
        if r is best:
            modes[r["mode"]] = {"decision": "best", "lr": r["lr"]}
            continue
        post = difference_posterior(_paired(r, best, "selection"), rope, probability, resolution)
        decision = decide(post, probability)
        report = difference_posterior(_paired(r, best, "report"), rope, probability, resolution)
        modes[r["mode"]] = {
            "decision": decision,
            "lr": r["lr"],
            "selection": post,
            "report": {k: report[k] for k in ("n", "mean", "low", "high")},
            "seeds_to_decide": seeds_to_decide(post, rope, probability) if decision == "undecided" else None,
        }
    recommended, undecided = None, []
    for r in sorted(here, key=cost_order(cost)):
        decision = modes[r["mode"]]["decision"]
        if decision in ("best", "equivalent", "better"):
            recommended = r
            break
        if decision == "undecided":
            undecided.append(r["mode"])
    status = "undecided" if undecided else "decided"
    result.update(
        best=best["mode"],
        recommended=recommended["mode"] if status == "decided" else None,
        provisional=recommended["mode"],
        lr=recommended["lr"],
        status=status,
        undecided=undecided,
        modes=modes,
        report_disagrees=_report_disagreement(recommended, best, modes, rope),
    )
    return result


def _report_disagreement(
    recommended: dict[str, Any], best: dict[str, Any], modes: dict[str, Any], rope: float
) -> str | None:
    """What the report split says against the decision, beyond the margin: the recommended mode behind
    the best by more than ``rope`` there, or another mode ahead of the best by more than it."""
    notes = []
    if recommended is not best:
        gap = modes[recommended["mode"]]["report"]["mean"]
        if math.isfinite(gap) and gap < -rope:
            notes.append(f"{recommended['mode']} is behind {best['mode']} by {-gap:.4f} on the report split")
    for mode, info in modes.items():
        gap = info.get("report", {}).get("mean", float("nan"))
        if mode != recommended["mode"] and math.isfinite(gap) and gap > rope:
            notes.append(f"{mode} is ahead of {best['mode']} by {gap:.4f} on the report split")
    return "; ".join(notes) or None


def _overtakes(
    rows: list[dict[str, Any]], sizes: list[float], rope: float, probability: float
) -> dict[str, dict[str, Any]]:
    """Per mode that tunes an encoder: the smallest size from which on it is better than the frozen mode
    (``none``) by more than the margin with probability ``probability``, at that size and at every larger
    one run (on the selection split). ``upper_bound``: that size is the smallest run, so it may overtake
    earlier. With ``study.encoders``, each pair against its own frozen mode. Empty when no frozen mode
    was run."""
    frozen = {(r["mode"], r["size"]): r for r in rows if mode_of(r["mode"]) == "none"}
    result = {}
    for mode in sorted({r["mode"] for r in rows if mode_of(r["mode"]) != "none"}):
        base = frozen_label(mode)  # the frozen mode of the same towers
        if not any(key[0] == base for key in frozen):
            continue
        better = []
        for size in sizes:
            row = next((r for r in rows if r["mode"] == mode and r["size"] == size), None)
            if row is None or (base, size) not in frozen:
                better.append(False)
                continue
            against = frozen[(base, size)]
            resolution = max(row["resolution"], against["resolution"])
            post = difference_posterior(_paired(row, against, "selection"), rope, probability, resolution)
            better.append(decide(post, probability) == "better")
        since = next((i for i in range(len(sizes)) if all(better[i:])), None)
        result[mode] = {
            "size": sizes[since] if since is not None else None,
            "train_rows": next(r["train_rows"] for r in rows if r["size"] == sizes[since])
            if since is not None
            else None,
            "upper_bound": since == 0,
            "better_at": [s for s, b in zip(sizes, better) if b],
        }
    return result
