"""``study.md``: the study's result written as a paper's results section would give it: the rule and its
margin, the variance sources, the table, per size the decision with its probability and differences (or
"undecided" and the seeds that would likely decide), where tuning overtakes the frozen towers, and how much
more data would change the answer (extrapolated, and said so)."""

from __future__ import annotations

import math
from typing import Any

from vlfuse.study.labels import frozen_label

COST_COLUMNS = {
    "train_time_s": "train time (s)",
    "peak_memory_mb": "peak memory (MiB)",
    "inference_ms_per_example": "inference (ms/example)",
    "trainable": "trainable params",
    "train_samples_per_s": "train samples/s",
    "final_bytes": "saved model (MiB)",
}
# study.cost, as the rule names it
COST_NAMES = {
    "time": "training time per trial, evaluation and saving excluded",
    "memory": "peak memory",
    "inference": "inference time per example",
    "params": "trainable parameters",
}


def num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def rows_label(rows: float | None, size: float | None = None) -> str:
    """``1,000 rows`` (with the configured size when it was a fraction: ``1,000 rows (0.5)``)."""
    if rows is None or not math.isfinite(rows):
        return f"size {size:g}" if size is not None else "-"
    label = f"{rows:,.0f} rows"
    return label + (f" ({size:g})" if size is not None and size <= 1 else "")


def _cost(key: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if key == "trainable":
        return f"{value:,.0f}"
    if key == "final_bytes":
        return f"{value / 2**20:.1f}"
    if key == "inference_ms_per_example":
        return f"{value:.2f}"
    return f"{value:.1f}"


def _interval(low: float, high: float) -> str:
    return f"[{num(low)}, {num(high)}]"


def results_table(result: dict[str, Any]) -> list[str]:
    """Per (train rows, mode): the chosen rate, the selection split's and the report split's mean and
    interval over seeds, the seeds, the costs."""
    level = f"{result['confidence']:.0%} CI"
    head = [
        "train rows",
        "mode",
        "lr",
        f"{result['selection_split']} mean {level}",
        f"{result['report_split']} mean {level}",
        "seeds",
        "best steps",
        *COST_COLUMNS.values(),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["summary"]["rows"]:
        sel = r["selection"]
        cells = [
            rows_label(r["train_rows"], r["size"]),
            r["mode"],
            f"{r['lr']:.3g}" + (f" ({r['lr_edge']} tried)" if r.get("lr_edge") else ""),
            f"{num(sel['mean'])} {_interval(sel['low'], sel['high'])}",
            f"{num(r['mean'])} {_interval(r['low'], r['high'])}",
            str(r["n"]),
            ", ".join(str(s) for s in r.get("best_steps", []) if s is not None) or "-",
            *[_cost(k, r["cost"].get(k)) for k in COST_COLUMNS],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _against_best(mode: str, info: dict[str, Any], best: str, rope: float) -> str:
    post = info["selection"]
    if post["n"] < 2:
        return f"{mode}: one paired seed, no claim either way"
    return (
        f"{mode} - {best} = {num(post['mean'])} {_interval(post['low'], post['high'])}; "
        f"P(worse) {post['p_worse']:.2f}, P(within ±{rope:g}) {post['p_equivalent']:.2f}, "
        f"P(better) {post['p_better']:.2f}: **{info['decision']}**"
    )


def decision_lines(result: dict[str, Any]) -> list[str]:
    summary = result["summary"]
    rope, probability = summary["rope"], summary["probability"]
    lines = []
    for d in summary["decisions"]:
        where = rows_label(d.get("train_rows"), d["size"])
        if d["best"] is None:
            lines.append(f"- **{where}**: no finished trial")
            continue
        if d["status"] == "decided":
            head = f"- **{where}: {d['recommended']}** (lr {d['lr']:.3g})"
            why = (
                f"the best mean on `{result['selection_split']}`"
                if d["recommended"] == d["best"]
                else f"practically equivalent to {d['best']}, the best, with probability >= {probability:g}"
            )
            head += f": {why}, and the cheapest such mode."
        else:
            waits = [
                f"{m} (about {d['modes'][m]['seeds_to_decide']} seeds would decide)"
                if d["modes"][m]["seeds_to_decide"]
                else f"{m} (more than 100 seeds: its mean sits at the margin)"
                for m in d["undecided"]
            ]
            head = (
                f"- **{where}: undecided.** {d['best']} has the best mean; cheaper {', '.join(waits)} may or "
                f"may not be within ±{rope:g} of it. Until decided, the cheapest mode shown equivalent is "
                f"{d['provisional']} (lr {d['lr']:.3g})."
            )
        lines.append(head)
        for mode, info in d["modes"].items():
            if info["decision"] != "best":
                lines.append(f"  - {_against_best(mode, info, d['best'], rope)}")
        for r in result["summary"]["rows"]:
            if r["size"] == d["size"] and r.get("lr_edge"):
                lines.append(
                    f"  - {r['mode']}'s chosen rate {r['lr']:.3g} is the {r['lr_edge']} tried: its best rate "
                    "may lie beyond the grid (`study.extend_grid=true` tries further)."
                )
        if d.get("report_disagrees"):
            lines.append(f"  - The report split disagrees beyond the margin: {d['report_disagrees']}.")
    return lines


def overtake_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for mode, info in result["summary"]["overtakes_frozen"].items():
        frozen = frozen_label(mode)
        if info["size"] is None:
            at = ", ".join(f"{s:g}" for s in info["better_at"])
            lines.append(
                f"- {mode} is not better than {frozen} (frozen) by more than the margin from any size on"
                + (f" (better at size {at} only)" if at else "")
            )
        elif info["upper_bound"]:
            lines.append(
                f"- {mode} is better than {frozen} (frozen) at every size run, from the smallest "
                f"({rows_label(info['train_rows'])}): it may overtake at fewer rows (not run)"
            )
        else:
            lines.append(
                f"- {mode} is better than {frozen} (frozen) from {rows_label(info['train_rows'])} on "
                "(at that size and every larger one)"
            )
    return lines


def curve_lines(result: dict[str, Any]) -> list[str]:
    curves = result["summary"]["curves"]
    lines = []
    for mode, c in curves["modes"].items():
        if c is None:
            lines.append(f"- {mode}: too few sizes to fit a curve")
            continue
        name = c["model"].replace("_", " ")
        fit = (
            f"{name} (chosen by its error at the largest size when fitted to the others)"
            if c["validated"]
            else f"{name} (too few sizes to check it on a held-out size)"
        )
        line = f"- {mode}: {fit}"
        target = c.get("target")
        if target:
            if target["rows"] is None:
                line += f"; {num(target['value'])} is not reached within 100x the largest size"
            else:
                band = (
                    f"{c['level']:.0%} band {target['low']:,.0f}-{target['high']:,.0f}"
                    if target["high"] and math.isfinite(target["high"])
                    else "band open-ended"
                )
                kind = "extrapolated" if target["extrapolated"] else "within the sizes run"
                line += (
                    f"; reaches {num(target['value'])} at about {target['rows']:,.0f} rows ({band}; {kind})"
                )
        lines.append(line)
    for change in curves["changes"]:
        lines.append(
            f"- Extrapolated: at about {change['rows']:,.0f} rows {change['mode']} would be ahead of "
            f"{change['over']} by more than the margin, and the recommendation would change"
            + (
                "."
                if change.get("checked")
                else " (from curves not checked on a held-out size: run more sizes)."
            )
        )
    return lines


def failed_lines(result: dict[str, Any]) -> list[str]:
    """The cells that failed after their retries, each with its error (none: nothing)."""
    failed = result.get("failed") or {}
    if not failed:
        return []
    errors = "; ".join(f"`{cell}`: {error}" for cell, error in list(failed.items())[:10])
    return [
        "",
        f"**{len(failed)} of {len(result['cells'])} cells failed** (after study.max_retries retries; left "
        f"out of everything below): {errors}",
    ]


def total_lines(result: dict[str, Any]) -> list[str]:
    """Per mode, the whole study's time on it, every rate, size and seed included (tuning is a cost)."""
    totals = result["summary"].get("total_by_mode", {})
    return [
        f"- {mode}: {t['trials']:.0f} trials, {t['wall_time_s'] / 60:.1f} min wall time "
        f"({t['train_time_s'] / 60:.1f} min of training compute)"
        for mode, t in totals.items()
    ] or ["- nothing finished"]


def pareto_lines(result: dict[str, Any]) -> list[str]:
    """Per size, the modes (pairs and modes) no other beats on both the selection mean and a cost."""
    names = {
        "train_time_s": "train time",
        "inference_ms_per_example": "inference time",
        "peak_memory_mb": "memory",
    }
    lines = []
    for front in result["summary"].get("pareto", []):
        parts = [f"{names[k]}: {', '.join(front[k]) or '-'}" for k in names]
        lines.append(f"- {rows_label(front['train_rows'], front['size'])}: " + "; ".join(parts))
    return lines


def _flat(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [f"{prefix}={tree}"]
    return [item for k, v in tree.items() for item in _flat(v, f"{prefix}.{k}" if prefix else str(k))]


def tower_lines(result: dict[str, Any]) -> list[str]:
    """With ``study.encoders``: each pair's settings (what it overrides in ``model``)."""
    pairs = result.get("config", {}).get("study", {}).get("encoders") or {}
    if not pairs:
        return []
    named = [f"`{name}`: {', '.join(_flat(pair)) or 'the config as it is'}" for name, pair in pairs.items()]
    return [
        "**Towers.** Each label is `<encoders>/<mode>`; the encoder pairs (each overrides `model`): "
        + "; ".join(named)
        + ". Every pair is compared with every other and each mode by the same rule.",
        "",
    ]


def rule_lines(result: dict[str, Any]) -> list[str]:
    """The rule the decisions follow, the step read, and the budget."""
    s = result["summary"]
    return [
        f"**Rule.** The learning rate of each mode and size, and the mode, are chosen on split "
        f"`{result['selection_split']}` (no image of it is trained on). At each size every mode is compared "
        f"with the one of best mean by a {s['rule']}: the paired difference over seeds, its "
        f"{result['confidence']:.0%} interval, and the probabilities that the mode is worse, practically "
        f"equivalent (within ±{s['rope']:g}, `study.rope`) or better. Recommended: the cheapest mode "
        f"({COST_NAMES[s['cost']]}) practically equivalent to the best with probability >= "
        f"{s['probability']:g}; one seed is never evidence of equivalence. Split `{result['report_split']}` "
        "is reported for every mode and decides nothing."
        + (
            " Each trial is read at its evaluation with the best selection metric (`best steps`; "
            "the report split at that same evaluation), not at its last step."
            if result.get("best_step")
            else ""
        ),
        "",
        *tower_lines(result),
        *(
            [f"**Budget.** {result['budget']['description']}.", ""]
            if result.get("budget", {}).get("description")
            else []
        ),
    ]


def study_markdown(result: dict[str, Any]) -> str:
    sources = result.get("variance_sources", {})
    lines = [
        f"# Study: which mode for this data? ({result['task']}, {result['metric']})",
        "",
        *rule_lines(result),
        "**Variance.** Varied between seeds: "
        + (", ".join(sources.get("varied", [])) or "nothing")
        + ". Fixed: "
        + (", ".join(sources.get("fixed", [])) or "nothing")
        + ".",
        f"{result['trials']} finished trials ({len(result['cells'])} cells).",
        *failed_lines(result),
        *(
            []
            if result["complete"]
            else [
                "",
                "**Partial**: some trials are still running on other workers, or wait to be retried; "
                "running the command again finishes the study and rewrites this report. Until then no "
                "trained model is deleted.",
            ]
        ),
        "",
        *results_table(result),
        "",
        "## Decisions",
        "",
        *decision_lines(result),
        "",
        "## Pareto fronts (metric on the selection split against each cost; `study_pareto.png`)",
        "",
        *pareto_lines(result),
        "",
        "## What the study cost",
        "",
        *total_lines(result),
        "",
        "## Where tuning overtakes frozen towers",
        "",
        *(overtake_lines(result) or ["- no frozen mode (none) in the study"]),
        "",
        "## How much more data",
        "",
        "Learning curves fitted per mode to the selection split over seeds (`study_curves.png`); beyond the "
        "largest size run, every number is an extrapolation (such fits tend to underestimate the data a "
        "target needs: Mahmood et al., CVPR 2022).",
        "",
        *curve_lines(result),
    ]
    return "\n".join(lines) + "\n"
