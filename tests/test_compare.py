import json

import pytest
from conftest import TINY_MODEL
from test_recipes import SMALL_DATA, launch


@pytest.mark.slow
def test_compare_recipe_two_modes(tmp_path):
    out = tmp_path / "cmp"
    result = launch(
        "compare.py",
        "--config",
        "recipes/configs/grounding/shapes.yaml",
        *TINY_MODEL,
        *SMALL_DATA,
        "compare.modes=[none,all]",
        "train.max_steps=4",
        "train.eval_every=2",
        f"train.output_dir={out}",
    )
    assert "| none |" in result.stdout and "| all |" in result.stdout
    comparison = json.loads((out / "comparison.json").read_text())
    assert [r["mode"] for r in comparison["runs"]] == ["none", "all"] and comparison["metric"] == "acc@0.5"
    table = (out / "comparison.md").read_text().splitlines()
    for run in comparison["runs"]:
        records = [
            json.loads(line) for line in (out / run["mode"] / "metrics.jsonl").read_text().splitlines()
        ]
        summary = json.loads((out / run["mode"] / "summary.json").read_text())
        assert run["metrics"] == records[-1]  # the numbers are the run's own
        assert [p["step"] for p in run["curve"]] == [r["step"] for r in records] == [2, 4]
        assert run["trainable_parameters"] == summary["trainable_parameters"]
        assert run["train_samples_per_s"] == summary["train_samples_per_s"]
        (row,) = [line for line in table if line.startswith(f"| {run['mode']} |")]
        assert f"{records[-1]['miou']:.4f}" in row and f"{summary['trainable_parameters']:,}" in row
    frozen, e2e = comparison["runs"]
    assert frozen["trainable_parameters"] < e2e["trainable_parameters"]
    png = (out / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_compare_computes_each_frozen_towers_cache_once(tmp_path, capsys):
    import re

    from accelerate.state import AcceleratorState
    from conftest import tiny_config

    from vlfuse.compare import run_comparison

    cfg = tiny_config(
        *SMALL_DATA,
        "model.fusion.name=dense",
        "compare.modes=[none,text,image,all]",
        "train.max_steps=2",
        "train.cache_features=true",
        f"train.cache_dir={tmp_path / 'cache'}",
        f"train.output_dir={tmp_path / 'cmp'}",
    )
    AcceleratorState._reset_state(True)
    result = run_comparison(cfg)
    AcceleratorState._reset_state(True)
    events = re.findall(r"feature cache (written|reused) \((\w+) tower\)", capsys.readouterr().out)
    # none writes both towers' features for train + validation; text and image reuse what they freeze;
    # all caches nothing
    assert sorted(events) == sorted(
        [("written", "image")] * 2
        + [("written", "text")] * 2
        + [("reused", "image")] * 2
        + [("reused", "text")] * 2
    )
    assert len(list((tmp_path / "cache").iterdir())) == 4
    assert [r["mode"] for r in result["runs"]] == ["none", "text", "image", "all"]
    # each mode's model card carries the comparison table
    for run in result["runs"]:
        card = (tmp_path / "cmp" / run["mode"] / "final" / "README.md").read_text()
        assert "## Comparison (`recipes/compare.py`, split `validation`)" in card
        for other in result["runs"]:
            assert (
                f"| {other['mode']} | {other['metrics']['acc@0.5']:.4f} | {other['trainable_parameters']:,} |"
                in card
            )


def test_plotting_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    import matplotlib

    from vlfuse.compare import plot_comparison

    matplotlib.use("svg")  # a backend of the caller's (a notebook's would be inline)
    result = {
        "metric": "acc@0.5",
        "split": "validation",
        "task": "grounding",
        "runs": [{"mode": "none", "curve": [{"time_s": t, "acc@0.5": 0.2 * t} for t in (1.0, 2.0)]}],
    }
    plot_comparison(result, tmp_path / "plot.png")
    assert matplotlib.get_backend() == "svg"
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
