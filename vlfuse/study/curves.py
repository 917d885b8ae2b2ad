"""Learning curves: how much more data would change the answer.

Per mode, the metric on the selection split (every seed, at the chosen rate) is fitted against train rows
with the models Mahmood et al. compare ("How Much More Data Do I Need? Estimating Requirements for
Downstream Tasks", CVPR 2022), in the metric's units:

- ``power_law``: ``a - b * n^(-c)`` (the usual power law with an offset, ``b, c > 0``);
- ``arctan``: ``(2 / pi) * arctan(a * n + b) + c`` (saturating);
- ``logarithmic``: ``a + b * log(n)``.

The model is chosen by held-out fit: each model is fitted to every size but the largest and scored by
its error there (so it is chosen for how it extrapolates, the use it is put to); it is then refitted to
all sizes. A model with k parameters needs k distinct sizes to fit, k + 1 to be scored; with two sizes
only ``logarithmic`` can be fitted, and the curve is marked as not validated. The uncertainty band and the
rows needed for ``study.target`` come from refitting the chosen model to bootstrap resamples of the seeds
within each size (``BOOTSTRAP`` draws, seeded). Mahmood et al. found that such fits misestimate the data a
target needs, mostly by underestimating it: every figure beyond the largest size run is an extrapolation
and is labelled as one.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy.optimize import OptimizeWarning, brentq, curve_fit

BOOTSTRAP = 200
REACH = 100.0  # extrapolate up to this many times the largest size
GRID_POINTS = 60


def _power_law(u, a, b, c):
    return a - b * np.power(u, -c)


def _arctan(u, a, b, c):
    return 2 / np.pi * np.arctan(a * u + b) + c


def _logarithmic(u, a, b):
    return a + b * np.log(u)


# name -> (function of u = rows / largest rows, start values, bounds)
MODELS: dict[str, tuple[Any, list[float], tuple[list[float], list[float]]]] = {
    "power_law": (_power_law, [1.0, 0.5, 0.5], ([-np.inf, 0.0, 1e-3], [np.inf, np.inf, 5.0])),
    "arctan": (_arctan, [1.0, 0.0, 0.0], ([0.0, -np.inf, -np.inf], [np.inf, np.inf, np.inf])),
    "logarithmic": (_logarithmic, [0.5, 0.1], ([-np.inf, -np.inf], [np.inf, np.inf])),
}


def _fit(name: str, u: np.ndarray, y: np.ndarray, p0: list[float] | None = None) -> np.ndarray | None:
    fn, start, bounds = MODELS[name]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(fn, u, y, p0=p0 if p0 is not None else start, bounds=bounds, maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    return params if np.all(np.isfinite(params)) else None


def _n_params(name: str) -> int:
    return len(MODELS[name][1])


def choose_model(u: np.ndarray, y: np.ndarray) -> tuple[str | None, dict[str, float]]:
    """The model with the least squared error at the largest size when fitted to the others (each
    model's error returned), or, with too few sizes to score any, the one model that fits (None if none)."""
    sizes = np.unique(u)
    errors: dict[str, float] = {}
    held = u == sizes[-1]
    for name in MODELS:
        if len(sizes) - 1 < _n_params(name):
            continue
        params = _fit(name, u[~held], y[~held])
        if params is not None:
            errors[name] = float((MODELS[name][0](sizes[-1], *params) - y[held].mean()) ** 2)
    if errors:
        return min(errors, key=errors.get), errors
    fitting = [name for name in MODELS if len(sizes) >= _n_params(name)]
    return (fitting[-1] if fitting else None), errors


def rows_needed(fn, params: np.ndarray, target: float, largest: float) -> float | None:
    """The train rows at which the fitted curve reaches ``target`` (None if it does not within
    ``REACH`` times the largest size, or never: a curve that falls or saturates below it)."""
    lo, hi = 1.0 / largest, REACH

    def gap(u: float) -> float:
        return float(fn(u, *params)) - target

    if gap(hi) < 0:
        return None
    if gap(lo) >= 0:
        return lo * largest
    return brentq(gap, lo, hi) * largest


def fit_mode(
    points: list[tuple[float, float]], target: float | None, level: float = 0.9, seed: int = 0
) -> dict[str, Any] | None:
    """One mode's curve from ``(rows, value)`` points (several seeds per size): the chosen model, its
    parameters in rows (``a - b * rows^(-c)`` etc. with ``u = rows / largest``: ``scale`` is ``largest``),
    the fitted mean and a ``level`` band on a grid up to ``REACH`` times the largest size, and the rows
    needed for ``target`` (median and band over the bootstrap). None with fewer than two sizes."""
    rows = np.asarray([p[0] for p in points], dtype=float)
    y = np.asarray([p[1] for p in points], dtype=float)
    keep = np.isfinite(rows) & np.isfinite(y) & (rows > 0)
    rows, y = rows[keep], y[keep]
    if len(np.unique(rows)) < 2:
        return None
    largest = float(rows.max())
    u = rows / largest
    name, errors = choose_model(u, y)
    params = _fit(name, u, y) if name else None
    if params is None:
        return None
    fn = MODELS[name][0]
    grid = np.geomspace(u.min(), REACH, GRID_POINTS)
    curves, needed = _bootstrap(name, params, u, y, grid, target, largest, seed)
    low, high = (
        np.percentile(curves, [50 * (1 - level), 50 * (1 + level)], axis=0) if curves else (None, None)
    )
    result: dict[str, Any] = {
        "model": name,
        "validated": bool(errors),
        "held_out_error": errors,
        "params": [float(p) for p in params],
        "scale": largest,
        "grid_rows": (grid * largest).tolist(),
        "mean": fn(grid, *params).tolist(),
        "low": None if low is None else low.tolist(),
        "high": None if high is None else high.tolist(),
        "largest_rows": largest,
        "level": level,
    }
    if target is not None:
        point = rows_needed(fn, params, target, largest)
        finite = [n for n in needed if math.isfinite(n)]
        result["target"] = {
            "value": target,
            "rows": point,
            "extrapolated": point is None or point > largest,
            # "nearest": no interpolation between a finite draw and a never-reached (infinite) one
            "low": float(np.percentile(needed, 50 * (1 - level), method="nearest")) if needed else None,
            "high": float(np.percentile(needed, 50 * (1 + level), method="nearest")) if needed else None,
            "reached_in": len(finite) / len(needed) if needed else 0.0,
        }
    return result


def _bootstrap(
    name: str,
    params: np.ndarray,
    u: np.ndarray,
    y: np.ndarray,
    grid: np.ndarray,
    target: float | None,
    largest: float,
    seed: int,
) -> tuple[list[np.ndarray], list[float]]:
    """The chosen model refitted to ``BOOTSTRAP`` resamples of the seeds within each size: each refit's
    curve on ``grid``, and the rows it needs for ``target`` (infinite where never reached)."""
    fn = MODELS[name][0]
    rng = np.random.default_rng(seed)
    by_size = [np.flatnonzero(u == s) for s in np.unique(u)]
    curves, needed = [], []
    for _ in range(BOOTSTRAP):
        pick = np.concatenate([rng.choice(idx, size=len(idx), replace=True) for idx in by_size])
        boot = _fit(name, u[pick], y[pick], p0=list(params))
        if boot is None:
            continue
        curves.append(fn(grid, *boot))
        if target is not None:
            n = rows_needed(fn, boot, target, largest)
            needed.append(math.inf if n is None else n)
    return curves, needed


def fit_curves(
    rows: list[dict[str, Any]], target: float | None, decisions: list[dict[str, Any]], rope: float
) -> dict:
    """Every mode's curve (``fit_mode`` over its chosen rate's selection values at each size) and where,
    beyond the sizes run, another mode's fitted curve would pass the recommended one at the largest size
    by more than the margin (``changes``: the recommendation would change there; extrapolated)."""
    modes = sorted({r["mode"] for r in rows})
    curves = {}
    for mode in modes:
        points = [
            (r["train_rows"], v)
            for r in rows
            if r["mode"] == mode
            for v in r["selection_values"]
            if v is not None and math.isfinite(v)
        ]
        curves[mode] = fit_mode(points, target)
    changes = []
    last = next((d for d in reversed(decisions) if d.get("provisional")), None)
    if last is not None and curves.get(last["provisional"]):
        mine = curves[last["provisional"]]
        for mode, other in curves.items():
            if mode == last["provisional"] or other is None:
                continue
            for n in mine["grid_rows"]:
                if n <= mine["largest_rows"] or n <= other["largest_rows"]:
                    continue
                gap = _at(other, n) - _at(mine, n)
                if gap > rope:
                    checked = mine["validated"] and other["validated"]  # both chosen on a held-out size
                    changes.append(
                        {
                            "mode": mode,
                            "over": last["provisional"],
                            "rows": n,
                            "extrapolated": True,
                            "checked": checked,
                        }
                    )
                    break
    return {"modes": curves, "changes": changes}


def _at(curve: dict[str, Any], rows: float) -> float:
    fn = MODELS[curve["model"]][0]
    return float(fn(rows / curve["scale"], *curve["params"]))
