"""recipes/study.py: the grid, honest rate selection, the statistics, the storage (SQLite, PostgreSQL, a
killed worker) and the report."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import tiny_config
from test_recipes import ROOT, SMALL_DATA

from vlfuse.schema import ConfigError
from vlfuse.study import run_study
from vlfuse.study.grid import Cell, cells, lr_grid
from vlfuse.study.stats import choose_rates, difference_posterior, mean_ci, summarize

WORKER = Path(__file__).parent / "study_worker.py"


# ------------------------------------------------------------------------------------------- statistics
def test_the_interval_is_students_t_over_seeds():
    # mean 0.6, sample std 0.1; t(0.975, df=2) = 4.302652729911275 (tables), half width 4.3027 * 0.1 / sqrt(3)
    ci = mean_ci([0.5, 0.6, 0.7], 0.95)
    assert ci["mean"] == pytest.approx(0.6) and ci["std"] == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert (ci["low"], ci["high"]) == pytest.approx((0.6 - half, 0.6 + half))
    assert math.isnan(mean_ci([0.5], 0.95)["low"])  # one seed: no interval


def test_the_equivalence_probabilities_against_a_hand_computation_and_baycomp():
    """Two seeds: the posterior of the mean difference is Student's t with 1 degree of freedom (Cauchy),
    whose CDF is 1/2 + atan(z)/pi. Differences 0.002, 0.006: mean 0.004, sample std 0.002*sqrt(2), scale
    std/sqrt(2) = 0.002. P(worse) = P(d < -0.01) = 1/2 + atan(-7)/pi = 0.045167; P(better) = P(d > 0.01)
    = 1/2 - atan(3)/pi = 0.102416; P(equivalent) = 0.852416."""
    from baycomp.single import Posterior  # Benavoli et al.'s posterior, as baycomp computes it

    post = difference_posterior([0.002, 0.006], rope=0.01, confidence=0.95, resolution=1e-6)
    assert post["p_worse"] == pytest.approx(0.5 + math.atan(-7) / math.pi, abs=1e-9)
    assert post["p_better"] == pytest.approx(0.5 - math.atan(3) / math.pi, abs=1e-9)
    assert post["p_equivalent"] == pytest.approx(1 - post["p_worse"] - post["p_better"], abs=1e-12)
    # more seeds, against baycomp's posterior with no correlation correction (independent seeds)
    diffs = [0.004, -0.002, 0.006, 0.011, -0.004]
    mine = difference_posterior(diffs, rope=0.01, confidence=0.95, resolution=1e-6)
    theirs = Posterior(np.mean(diffs), np.var(diffs, ddof=1) / 5, 4, rope=0.01).probs()
    assert (mine["p_worse"], mine["p_equivalent"], mine["p_better"]) == pytest.approx(theirs, abs=1e-9)
    # the interval is the t interval of the mean difference (scipy.stats.t, as mean_ci)
    ci = mean_ci(diffs, 0.95)
    assert (mine["low"], mine["high"]) == pytest.approx((ci["low"], ci["high"]), abs=1e-12)


def _seeds(mode, size, values, trainable, selection_count=1000, lr=1e-3, rows=None):
    return [
        {
            **_record(mode, size, seed, lr, value, value, trainable),
            "selection_count": selection_count,
            "train_rows": rows if rows is not None else size,
        }
        for seed, value in enumerate(values)
    ]


def _decision(records, rope=0.01):
    (decision,) = summarize(records, 0.95, rope)["decisions"]
    return decision


def test_a_practically_equivalent_cheaper_mode_is_recommended():
    frozen = [0.800, 0.812, 0.790, 0.805, 0.797]
    tuned = [0.802, 0.815, 0.791, 0.806, 0.800]  # differences -0.002 -0.003 -0.001 -0.001 -0.003
    d = _decision(_seeds("none", 100, frozen, 10) + _seeds("all", 100, tuned, 100))
    assert d["best"] == "all" and d["status"] == "decided" and d["recommended"] == "none"
    assert d["modes"]["none"]["decision"] == "equivalent"
    assert d["modes"]["none"]["selection"]["p_equivalent"] > 0.999


def test_a_large_noisy_gap_on_two_seeds_is_undecided_with_the_seeds_that_would_decide():
    from baycomp.single import Posterior

    d = _decision(_seeds("none", 100, [0.50, 0.60], 10) + _seeds("all", 100, [0.60, 0.62], 100))
    info = d["modes"]["none"]
    # differences -0.10, -0.02: mean -0.06, scale 0.04; P(worse) = 1/2 + atan(1.25)/pi = 0.7855 < 0.95
    assert info["selection"]["p_worse"] == pytest.approx(0.5 + math.atan(1.25) / math.pi, abs=1e-9)
    assert d["status"] == "undecided" and d["recommended"] is None and d["provisional"] == "all"
    assert info["decision"] == "undecided" and d["undecided"] == ["none"]
    n = info["seeds_to_decide"]
    std = info["selection"]["std_used"]

    def decided(k):  # the same mean and spread over k seeds, by baycomp's posterior
        return max(Posterior(-0.06, std**2 / k, k - 1, rope=0.01).probs()) >= 0.95

    assert n is not None and decided(n) and not decided(n - 1)


def test_identical_differences_claim_no_certainty_and_one_seed_is_never_equivalent():
    # Every seed 2 points apart on 100 examples: a paired t-test's p would be 0. The spread used is at
    # least 0.01/sqrt(6) (the rounding of two values to a hundredth), so two seeds stay undecided.
    d = _decision(_seeds("none", 100, [0.70, 0.75], 10, 100) + _seeds("all", 100, [0.72, 0.77], 100, 100))
    post = d["modes"]["none"]["selection"]
    assert post["std"] == pytest.approx(0.0, abs=1e-12) and post["std_used"] == pytest.approx(
        0.01 / math.sqrt(6)
    )
    assert 0 < post["p_worse"] < 0.95 and post["p_equivalent"] > 0
    assert d["status"] == "undecided"
    # one seed: equal values, still no claim of equivalence
    one = _decision(_seeds("none", 100, [0.80], 10) + _seeds("all", 100, [0.801], 100))
    assert one["modes"]["none"]["decision"] == "undecided" and one["status"] == "undecided"
    assert one["modes"]["none"]["seeds_to_decide"] is None


def test_the_report_split_decides_nothing():
    records = _seeds("none", 100, [0.800, 0.812, 0.790], 10) + _seeds("all", 100, [0.802, 0.815, 0.791], 100)
    before = _decision(records)
    # the report split's values only: frozen 0.2 behind there
    changed = [{**r, "report": r["report"] - (0.2 if r["mode"] == "none" else 0.0)} for r in records]
    after = _decision(changed)
    keep = ("best", "recommended", "provisional", "lr", "status", "undecided")
    assert before["recommended"] == "none"
    assert {k: after[k] for k in keep} == {k: before[k] for k in keep}
    assert after["modes"]["none"]["selection"] == before["modes"]["none"]["selection"]
    assert before["report_disagrees"] is None
    assert after["report_disagrees"].startswith("none is behind all by 0.20")  # said, not acted on


def test_sizes_mixing_counts_and_fractions_are_ordered_by_rows_everywhere():
    # [1000, 0.5, 1.0, 5000] on a 12,000-row split: 1,000, 6,000, 12,000 and 5,000 rows
    rows = {1000.0: 1000, 0.5: 6000, 1.0: 12000, 5000.0: 5000}
    records = []
    for size, n in rows.items():
        gain = n / 12000
        records += _seeds("none", size, [0.5 + 0.01 * s for s in range(3)], 10, rows=n)
        records += _seeds("all", size, [0.45 + 0.3 * gain + 0.01 * s for s in range(3)], 100, rows=n)
    result = summarize(records, 0.95, 0.01)
    assert [r["train_rows"] for r in result["rows"]] == [1000, 1000, 5000, 5000, 6000, 6000, 12000, 12000]
    assert [d["size"] for d in result["decisions"]] == [1000.0, 5000.0, 0.5, 1.0]
    # all: 0.475 at 1,000 rows, 0.575 at 5,000, 0.6 at 6,000, 0.75 at 12,000; none: 0.51. Better by more
    # than the margin from 5,000 rows on (checked at every larger size), worse at 1,000.
    assert result["overtakes_frozen"]["all"]["size"] == 5000.0
    assert result["overtakes_frozen"]["all"]["upper_bound"] is False
    grid = result["curves"]["modes"]["all"]["grid_rows"]
    assert grid == sorted(grid) and grid[0] == pytest.approx(1000)


def test_overtaking_at_the_smallest_size_is_an_upper_bound_and_a_dip_is_not_overtaking():
    records = []
    for size, tuned in [(100, 0.7), (200, 0.5), (400, 0.8)]:
        records += _seeds("none", size, [0.6, 0.61, 0.6], 10) + _seeds(
            "all", size, [tuned, tuned + 0.01, tuned], 100
        )
    info = summarize(records, 0.95, 0.01)["overtakes_frozen"]["all"]
    assert info["size"] == 400.0 and info["better_at"] == [100.0, 400.0] and not info["upper_bound"]
    records = [r for r in records if r["size"] != 200]
    info = summarize(records, 0.95, 0.01)["overtakes_frozen"]["all"]
    assert info["size"] == 100.0 and info["upper_bound"]


def _record(mode, size, seed, lr, selection, report, trainable=10):
    return {
        "mode": mode,
        "size": size,
        "seed": seed,
        "lr": lr,
        "selection": selection,
        "report": report,
        "cost": {"trainable": trainable, "wall_time_s": 1.0},
    }


def test_the_rate_is_chosen_on_the_selection_split_and_never_on_the_report_split():
    records = [
        _record("none", 100, s, lr, sel, rep)
        for lr, sels, reps in [
            (1e-3, [0.6, 0.7, 0.8], [0.1, 0.1, 0.1]),
            (3e-3, [0.5, 0.6, 0.9], [0.9, 0.9, 0.9]),
        ]
        for s, sel, rep in zip(range(3), sels, reps)
    ]
    chosen = choose_rates(records)[("none", 100)]
    assert chosen["lr"] == 1e-3  # mean 0.70 against 0.6667 (3e-3 has the best single seed, not the best mean)
    assert chosen["rates"] == pytest.approx({1e-3: 0.7, 3e-3: 2 / 3})
    row = summarize(records, 0.95, 0.01)["rows"][0]
    assert row["lr"] == 1e-3 and row["mean"] == pytest.approx(0.1)  # the report split, at the chosen rate
    # changing only the report split's numbers changes no choice
    swapped = [{**r, "report": 1.0 - r["report"]} for r in records]
    assert choose_rates(swapped) == choose_rates(records)
    assert summarize(swapped, 0.95, 0.01)["rows"][0]["lr"] == 1e-3
    # a diverged seed (no metric) sinks its rate
    diverged = [{**r, "selection": None} if (r["lr"], r["seed"]) == (1e-3, 0) else r for r in records]
    assert choose_rates(diverged)[("none", 100)]["lr"] == 3e-3


# ------------------------------------------------------------------------------------------------ grid
def test_the_grid_has_one_cell_per_mode_size_seed_and_rate():
    cfg = tiny_config("study.modes=[none,lora,all]", "study.train_sizes=[0.5,200]", "study.seeds=[0,1]")
    grid = lr_grid(cfg)
    assert grid["none"] == [3e-5, 1e-4, 3e-4]  # train.lr 1e-4 x 0.3, 1, 3
    assert grid["all"] == [3e-6, 1e-5, 3e-5] and grid["lora"] == [3e-5, 1e-4, 3e-4]  # encoder_lr 1e-5
    keys = [c.key for c in cells(cfg)]
    assert len(keys) == len(set(keys)) == 3 * 2 * 2 * 3
    assert Cell.parse("lora|200|1|0.0001") == Cell("lora", 200.0, 1, 1e-4)


def _events(root: Path) -> Counter:
    lines = (root / "trials.jsonl").read_text().splitlines()
    return Counter(e["cell"] for e in map(json.loads, lines) if e["event"] == "start")


STUDY = [
    *SMALL_DATA,
    "data.shapes_train_size=60",
    "model.fusion.name=dense",
    "train.max_steps=2",
    "train.eval_every=2",
    "study.modes=[none,all]",
    "study.train_sizes=[16,40]",
    "study.seeds=[0,1]",
    "study.validation=12",
    "study.lr_grid={none: [0.001, 0.003], all: [0.001]}",
]


@pytest.fixture(scope="module")
def pretrained_towers(tmp_path_factory, bert_folder):
    """Overrides for towers with saved weights (the same for every seed, as pretrained towers are)."""
    import timm
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("resnet") / "weights.safetensors"
    save_file(timm.create_model("test_resnet", pretrained=False, num_classes=0).state_dict(), str(path))
    return [
        "model.image_encoder.pretrained=true",
        f"model.image_encoder.checkpoint={path}",
        f"model.text_encoder.name={bert_folder}",
        "model.text_encoder.pretrained=true",
    ]


def test_a_study_runs_every_cell_once_caches_frozen_towers_once_and_continues(
    tmp_path, capsys, pretrained_towers
):
    cfg = tiny_config(
        *STUDY,
        *pretrained_towers,
        f"train.output_dir={tmp_path / 'study'}",
        f"train.cache_dir={tmp_path / 'cache'}",
    )
    result = run_study(cfg)
    out = capsys.readouterr().out
    assert result["complete"] and result["trials"] == 12
    assert set(_events(tmp_path / "study").values()) == {1} and len(_events(tmp_path / "study")) == 12
    # 8 frozen trials (2 sizes x 2 rates x 2 seeds): each tower's cache of each split is computed once
    written = re.findall(r"feature cache written \((\w+) tower\): \S+/(\w+)-", out)
    assert sorted(written) == [
        ("image", "train"),
        ("image", "validation"),
        ("text", "train"),
        ("text", "validation"),
    ]
    # each frozen trial reads both towers for train, holdout (the train split's cache) and validation
    assert len(re.findall(r"feature cache reused", out)) == 8 * 6 - 4
    records = json.loads((tmp_path / "study" / "study.json").read_text())["records"]
    rows = {r["size"]: r["train_rows"] for r in records}
    assert rows == {16.0: 16, 40.0: 40}
    # running the finished study again trains nothing and rewrites the report
    (tmp_path / "study" / "study.md").unlink()
    again = run_study(cfg)
    assert again["trials"] == 12 and len(_events(tmp_path / "study")) == 12
    assert sum(_events(tmp_path / "study").values()) == 12
    assert (tmp_path / "study" / "study.md").is_file()


def test_a_study_refuses_to_report_on_the_split_it_chooses_on(tmp_path):
    from vlfuse.schema import ConfigError

    cfg = tiny_config(*STUDY, "study.validation_split=validation", f"train.output_dir={tmp_path}")
    with pytest.raises(ConfigError, match="chooses learning rates on"):
        run_study(cfg)


def _fake_train(calls, fail=(), hang=()):
    """A stand-in for training that writes what the report reads: a metric growing with size for
    end-to-end; a cell whose folder ends with one of ``fail`` raises, one of ``hang`` sleeps."""

    def fake_train(cfg, on_eval=None):
        out = Path(cfg.train.output_dir)
        cell = "/".join(out.parts[-4:])
        calls.append(cell)
        if any(cell.endswith(f) for f in fail):
            raise RuntimeError(f"a planted failure in {cell}")
        if any(cell.endswith(h) for h in hang):
            time.sleep(60)
        out.mkdir(parents=True, exist_ok=True)
        rows = int(cfg.data.train_subset)
        (out / "summary.json").write_text(json.dumps({"trainable_parameters": 1, "train_rows": rows}))
        value = 0.4 + (rows / 100 if cfg.model.trainable_encoders == "all" else 0.0) + 0.01 * cfg.train.seed
        (out / "final").mkdir()
        return {"holdout": {"acc@0.5": value, "count": 100}, "validation": {"acc@0.5": value}}

    return fake_train


def test_two_folders_of_the_same_name_on_one_storage_are_not_merged(tmp_path, monkeypatch):
    import vlfuse.study
    from vlfuse.study import StudyError

    calls = []
    monkeypatch.setattr(vlfuse.study, "train", _fake_train(calls))
    shared = f"study.storage=sqlite:///{tmp_path / 'shared.db'}"
    grid = "study.lr_grid={none: [0.001], all: [0.001]}"
    run_study(tiny_config(*STUDY, grid, shared, f"train.output_dir={tmp_path / 'a' / 'study'}"))
    assert len(calls) == 8
    with pytest.raises(StudyError, match=r"is written to .*a/study, not to .*b/study"):
        run_study(tiny_config(*STUDY, grid, shared, f"train.output_dir={tmp_path / 'b' / 'study'}"))
    # named explicitly, a study may be written from another path (a worker's mount point): nothing re-runs
    for folder in ("a", "b"):
        run_study(
            tiny_config(
                *STUDY, grid, shared, "study.name=shared", f"train.output_dir={tmp_path / folder / 'study'}"
            )
        )
    assert len(calls) == 16


def test_a_model_is_kept_only_while_it_can_still_be_recommended(tmp_path, monkeypatch):
    import vlfuse.study

    root = tmp_path / "study"
    runs, seen = [], []

    def fake_train(cfg, on_eval=None):
        out = Path(cfg.train.output_dir)
        # before this trial: every (none, size) whose four cells all ran has dropped its losing rate's
        # model (0.001: worse than 0.003 at every seed) and kept the winner's
        for size in (16, 40):
            group = [f"none/size_{size}/lr_{lr}/seed_{k}" for lr in (0.001, 0.003) for k in (0, 1)]
            if all(any(r.endswith(g) for r in runs) for g in group):
                base = root / "trials" / "none" / f"size_{size}"
                seen.append(
                    ((base / "lr_0.001/seed_0/final").exists(), (base / "lr_0.003/seed_0/final").exists())
                )
        runs.append(str(out))
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"trainable_parameters": 1, "train_rows": 16}))
        (out / "final").mkdir()
        value = 0.4 + 10 * (cfg.train.lr if cfg.model.trainable_encoders == "none" else cfg.train.encoder_lr)
        value += 0.01 * cfg.train.seed
        return {"holdout": {"acc@0.5": value, "count": 100}, "validation": {"acc@0.5": value}}

    monkeypatch.setattr(vlfuse.study, "train", fake_train)
    cfg = tiny_config(
        *STUDY, "study.lr_grid={none: [0.001, 0.003], all: [0.002]}", f"train.output_dir={root}"
    )
    run_study(cfg)
    assert len(runs) == 12
    assert seen and set(seen) == {(False, True)}, seen  # dropped while the study still ran
    # with study.keep_models nothing is deleted, during the study or after it
    kept = tmp_path / "kept"
    runs.clear()
    cfg = tiny_config(
        *STUDY,
        "study.lr_grid={none: [0.001, 0.003], all: [0.002]}",
        f"train.output_dir={kept}",
        "study.keep_models=true",
    )
    run_study(cfg)
    assert len(list(kept.glob("trials/*/*/*/*/final"))) == 12


def test_a_study_begun_before_a_setting_existed_continues_while_that_setting_keeps_its_default(
    tmp_path, monkeypatch
):
    import vlfuse.study
    from vlfuse.study import StudyError
    from vlfuse.study.engine import study_identity, study_name
    from vlfuse.study.storage import storage_url

    calls = []
    monkeypatch.setattr(vlfuse.study, "train", _fake_train(calls))
    base = [*STUDY, "study.lr_grid={none: [0.001], all: [0.001]}", f"train.output_dir={tmp_path}"]
    cfg = tiny_config(*base)
    assert run_study(cfg)["complete"] and len(calls) == 8
    # the identity an older vlfuse recorded: without lora.last_blocks (a setting added later)
    study = optuna.load_study(study_name=study_name(cfg), storage=storage_url(cfg))
    key = "model.image_encoder.lora.last_blocks"
    older = {k: v for k, v in study_identity(cfg)["config"].items() if k != key}
    study.set_user_attr("identity", {"fingerprint": "recorded-by-an-older-version", "config": older})
    again = run_study(cfg)  # continued: nothing runs again, the identity is brought up to date
    assert again["complete"] and len(calls) == 8
    assert study.user_attrs["identity"] == json.loads(json.dumps(study_identity(cfg), default=repr))
    # the new setting at another value is another config, named; so is any other key's change
    study.set_user_attr("identity", {"fingerprint": "recorded-by-an-older-version", "config": older})
    with pytest.raises(StudyError, match=rf"another config \({re.escape(key)}: '<unset>' -> 1\)"):
        run_study(tiny_config(*base, "model.image_encoder.lora.last_blocks=1"))
    with pytest.raises(StudyError, match=r"another config \(train\.max_steps: 2 -> 3\)"):
        run_study(tiny_config(*base, "train.max_steps=3"))
    assert len(calls) == 8


def test_another_config_is_refused_naming_the_key_and_a_grown_grid_runs_only_its_new_cells(
    tmp_path, monkeypatch
):
    import vlfuse.study
    from vlfuse.study import StudyError

    calls = []
    monkeypatch.setattr(vlfuse.study, "train", _fake_train(calls))
    base = [*STUDY, "study.lr_grid={none: [0.001], all: [0.001]}", f"train.output_dir={tmp_path}"]
    first = run_study(tiny_config(*base))
    assert first["complete"] and len(calls) == 8  # 2 modes x 2 sizes x 2 seeds
    # another budget under the same study: refused, naming the key, before anything runs
    with pytest.raises(StudyError, match=r"another config \(train\.max_steps: 2 -> 3\).*use another study"):
        run_study(tiny_config(*base, "train.max_steps=3"))
    # the same config with a third seed and a third size: only the 2 x 3 x 3 - 8 = 10 new cells run
    grown = run_study(tiny_config(*base, "study.seeds=[0,1,2]", "study.train_sizes=[16,40,28]"))
    assert len(calls) == 8 + 10 and len(set(calls)) == 18
    assert grown["complete"] and grown["trials"] == 18
    assert [d["train_rows"] for d in grown["summary"]["decisions"]] == [16, 28, 40]
    # the report says what the grid was changed to, and a smaller grid reports its own cells only
    shrunk = run_study(tiny_config(*base, "study.seeds=[0]"))
    assert len(calls) == 18 and shrunk["trials"] == 4


def test_a_failing_cell_is_retried_then_reported_while_the_others_complete(tmp_path, monkeypatch, capsys):
    import vlfuse.study

    calls = []
    broken = Cell("all", 40.0, 1, 0.001)
    monkeypatch.setattr(vlfuse.study, "train", _fake_train(calls, fail=[broken.folder]))
    cfg = tiny_config(
        *STUDY,
        "study.lr_grid={none: [0.001], all: [0.001]}",
        "study.max_retries=1",
        f"train.output_dir={tmp_path}",
    )
    result = run_study(cfg)
    assert calls.count(broken.folder) == 2  # the first run and one retry
    assert len(calls) == 8 + 1 and result["complete"] and result["trials"] == 7
    assert result["failed"] == {broken.key: f"RuntimeError: a planted failure in {broken.folder}"}
    report = (tmp_path / "study.md").read_text()
    assert "**1 of 8 cells failed**" in report and "a planted failure" in report
    out = capsys.readouterr().out
    assert f"study trial {broken.key} failed: RuntimeError: a planted failure" in out
    # running the command again runs nothing: the cell has used its retries
    again = run_study(cfg)
    assert len(calls) == 9 and again["failed"] == result["failed"]


def test_a_partial_report_deletes_no_model_and_a_trial_past_its_timeout_is_ended(tmp_path, monkeypatch):
    import vlfuse.study
    import vlfuse.study.engine as engine

    calls = []
    slow = Cell("none", 16.0, 1, 0.001)
    monkeypatch.setattr(vlfuse.study, "train", _fake_train(calls, hang=[slow.folder]))
    cfg = tiny_config(
        *STUDY,
        "study.lr_grid={none: [0.001], all: [0.001]}",
        "study.trial_timeout=1",
        "study.max_retries=0",
        f"train.output_dir={tmp_path}",
    )
    # a worker's view while other cells are still to run: here it runs only the first seed's cells
    real = engine.cells_to_run
    monkeypatch.setattr(engine, "cells_to_run", lambda *a: [k for k in real(*a) if Cell.parse(k).seed == 0])
    partial = run_study(cfg)
    assert not partial["complete"] and "**Partial**" in (tmp_path / "study.md").read_text()
    assert len(list(tmp_path.glob("trials/**/final"))) == 4  # nothing deleted: what is best may change
    monkeypatch.setattr(engine, "cells_to_run", real)
    start = time.perf_counter()
    result = run_study(cfg)
    assert time.perf_counter() - start < 30  # the 60 s sleep was ended after 1 s
    assert result["failed"] == {slow.key: "TrialTimeout: the trial ran past study.trial_timeout=1 s"}
    assert result["complete"] and len(list(tmp_path.glob("trials/**/final"))) == 2  # the recommended ones


# --------------------------------------------------------------------------------------------- storage
def _worker(out: Path, storage: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(WORKER), str(out), storage, *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_workers_complete_the_grid_once(out: Path, storage: str) -> None:
    workers = [_worker(out, storage, "--seconds", "0.5") for _ in range(2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(logs)  # whole logs: a worker's traceback
    starts = _events(out)
    assert len(starts) == 8 and set(starts.values()) == {1}, starts  # every cell, each once
    workers_seen = {json.loads(line)["worker"] for line in (out / "trials.jsonl").read_text().splitlines()}
    assert len(workers_seen) == 2  # both took part
    study = optuna.load_study(study_name=out.name, storage=_sqlalchemy(storage))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 8
    assert json.loads((out / "study.json").read_text())["summary"]["overtakes_frozen"]["all"]["size"] == 10.0


def _sqlalchemy(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_workers_share_a_sqlite_study(tmp_path):
    out = tmp_path / "sqlite-study"
    _two_workers_complete_the_grid_once(out, f"sqlite:///{tmp_path / 'shared.db'}")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_workers_share_a_postgresql_study(tmp_path, postgres_url):
    out = tmp_path / "pg-study"
    _two_workers_complete_the_grid_once(out, postgres_url)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_killed_workers_trial_runs_again_once_when_two_workers_restart_together(tmp_path, backend, request):
    out = tmp_path / "killed"
    storage = (
        f"sqlite:///{tmp_path / 'killed.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    name = f"killed-{backend}-{os.getpid()}-{time.time_ns()}"
    hang = Cell("all", 20.0, 1, 1e-4)
    victim = _worker(out, storage, "--seconds", "0.05", "--hang", hang.folder, f"study.name={name}")
    deadline = time.time() + 120
    while time.time() < deadline and hang.key not in (
        _events(out) if (out / "trials.jsonl").exists() else {}
    ):
        time.sleep(0.1)
    assert hang.key in _events(out), "the worker never reached the cell"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    time.sleep(3)  # past study.grace_period=2: the trial's heartbeat is stale
    # two workers restarted at once: the dead trial is failed and retried once, by one of them
    survivors = [_worker(out, storage, "--seconds", "0.05", f"study.name={name}") for _ in range(2)]
    logs = [w.communicate(timeout=300)[0] for w in survivors]
    assert [w.returncode for w in survivors] == [0, 0], "\n\n".join(logs)
    # the last to finish sees the whole study (the first may have left while the other still trained)
    last = [json.loads(log.strip().splitlines()[-1]) for log in logs]
    assert {"trials": 8, "complete": True} in last
    starts = _events(out)
    assert starts[hang.key] == 2 and sum(starts.values()) == 9  # the killed cell ran again, no other did
    study = optuna.load_study(study_name=name, storage=_sqlalchemy(storage))
    states = Counter(t.state.name for t in study.trials if "gave_way" not in t.user_attrs)
    assert states == {"COMPLETE": 8, "FAIL": 1}
    # a trial that gave way never touched its cell's folder: each finished cell's summary is there
    assert len(list(out.glob("trials/**/summary.json"))) == 8


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sqlite_workers_pop_each_waiting_trial_once(tmp_path, backend, request):
    """Two workers take trials at the same instant, 40 each, from 60 waiting ones: each waiting trial goes
    to one of them. Optuna's read-then-write on SQLite gave 8-10 of the 60 to both workers (3 runs of 3)
    before ``serialize_sqlite``; PostgreSQL locks the row (``FOR UPDATE``)."""
    storage = (
        f"sqlite:///{tmp_path / 'ask.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    )
    name = f"ask-{backend}-{os.getpid()}-{time.time_ns()}"
    out = tmp_path / "ask"
    first = _worker(out, storage, "--ask", "1", f"study.name={name}")  # creates the study and its tables
    assert first.wait(timeout=120) == 0, first.stdout.read()
    study = optuna.load_study(study_name=name, storage=_sqlalchemy(storage))
    for i in range(60):
        study.enqueue_trial({}, user_attrs={"i": i})
    at = time.time() + 8  # both processes started and connected by then
    workers = [_worker(out, storage, "--ask", "40", "--at", str(at), f"study.name={name}") for _ in range(2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(logs)
    taken = Counter(n for log in logs for n in json.loads(log.strip().splitlines()[-1]))
    assert sum(taken.values()) == 80 and max(taken.values()) == 1, taken.most_common(3)
    waiting = {t.number for t in study.trials if "i" in t.user_attrs}
    assert waiting <= set(taken)  # every waiting trial was taken (60 of the 80), none by both


# ---------------------------------------------------------------------------------------------- command
@pytest.mark.slow
def test_the_study_command_writes_the_report_the_plots_and_keeps_the_recommended_models(tmp_path):
    out = tmp_path / "cli"
    args = [*STUDY, f"train.output_dir={out}", f"train.cache_dir={tmp_path / 'cache'}"]
    run = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "study.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "## Decisions" in run.stdout
    for name in ("study.md", "study.json", "study_curves.png", "study_cost.png", "study.db"):
        assert (out / name).is_file(), name
    result = json.loads((out / "study.json").read_text())
    finals = sorted(out.glob("trials/**/final"))
    assert sorted(map(str, finals)) == sorted(result["recommended_models"])
    assert len(finals) == 2  # one per train size; every other trial's model is deleted
    card = (finals[0] / "README.md").read_text()
    assert "## Study (`recipes/study.py`" in card and "Recommended" in card


# ------------------------------------------------------------------------------------------------ pruning
def test_the_pruner_compares_a_trial_with_the_other_rates_of_its_own_mode_size_and_seed():
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from vlfuse.study.pruning import HopelessRatePruner

    keys = [c.key for c in [Cell("none", 100, s, lr) for s in (0, 1) for lr in (1e-3, 3e-3)]]
    keys += [Cell("all", 100, 0, 1e-4).key]
    dist = {"cell": CategoricalDistribution(keys)}
    study = optuna.create_study(direction="maximize")
    finished = Cell("none", 100, 0, 1e-3)
    study.add_trial(
        create_trial(
            params={"cell": finished.key}, distributions=dist, value=0.6, intermediate_values={10: 0.6}
        )
    )

    def judged(cell, value):
        trial = create_trial(
            state=TrialState.RUNNING,
            params={"cell": cell.key},
            distributions=dist,
            intermediate_values={10: value},
        )
        return HopelessRatePruner(margin=0.05).prune(study, trial)

    assert judged(Cell("none", 100, 0, 3e-3), 0.50)  # 0.10 behind the other rate, same mode/size/seed
    assert not judged(Cell("none", 100, 0, 3e-3), 0.57)  # within the margin
    assert not judged(Cell("none", 100, 1, 3e-3), 0.10)  # another seed: no finished peer
    assert not judged(Cell("all", 100, 0, 1e-4), 0.10)  # another mode is never compared


def test_a_pruned_rate_stops_early_and_is_never_chosen(tmp_path, monkeypatch):
    import vlfuse.study

    steps_run = []

    def fake_train(cfg, on_eval=None):
        good = cfg.train.lr == 0.001
        for step in (1, 2, 3):
            value = (0.6 if good else 0.3) + 0.01 * step
            metrics = {"holdout": {"acc@0.5": value}, "validation": {"acc@0.5": value}}
            steps_run.append((cfg.train.lr, step))
            if on_eval(step, metrics):
                break
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"trainable_parameters": 1, "train_rows": 10}))
        return metrics

    monkeypatch.setattr(vlfuse.study, "train", fake_train)
    # A worker's order of cells is seeded by its name (host and pid): fixed here, an order in which some
    # good rate finishes before the bad one of its group (in an order with every bad rate first, nothing
    # could be pruned).
    monkeypatch.setattr(vlfuse.study.engine, "WORKER", "pruning-test")
    cfg = tiny_config(*STUDY, "study.modes=[none]", "study.prune=true", f"train.output_dir={tmp_path}")
    result = run_study(cfg)
    records = json.loads((tmp_path / "study.json").read_text())["records"]
    pruned = [r for r in records if r["pruned"]]
    assert pruned and all(
        r["lr"] == 0.003 and r["pruned"] == 1 for r in pruned
    )  # stopped at the first evaluation
    assert len(steps_run) == 3 * len(records) - 2 * len(pruned)
    assert {row["lr"] for row in result["summary"]["rows"]} == {0.001}
    states = Counter(
        t.state.name
        for t in optuna.load_study(
            study_name=tmp_path.name, storage=f"sqlite:///{tmp_path / 'study.db'}"
        ).trials
    )
    assert states["PRUNED"] == len(pruned) and states["COMPLETE"] == len(records) - len(pruned)


def test_on_eval_stops_a_real_run_after_its_evaluation(tmp_path):
    from vlfuse.training import train

    seen = []

    def on_eval(step, metrics):
        seen.append((step, sorted(metrics)))
        return step >= 2

    cfg = tiny_config(*SMALL_DATA, "train.max_steps=6", "train.eval_every=2", f"train.output_dir={tmp_path}")
    metrics = train(cfg, on_eval=on_eval)
    assert seen == [(2, ["validation"])] and "validation" in metrics
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and (tmp_path / "final").is_dir()  # the run ends as usual, at step 2


# ------------------------------------------------------------------------------------- launched trials
@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_trial_can_run_in_two_processes_of_its_own(tmp_path, monkeypatch):
    from test_recipes import ACCELERATE

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    config = ROOT / "recipes/configs/accelerate/cpu_2proc.yaml"
    cfg = tiny_config(
        *STUDY,
        "study.modes=[none]",
        "study.train_sizes=[16]",
        "study.seeds=[0]",
        f"study.launch={ACCELERATE} launch --config_file {config}",
        f"train.output_dir={tmp_path / 'launched'}",
        f"train.cache_dir={tmp_path / 'cache'}",
    )
    result = run_study(cfg)
    assert result["complete"] and result["trials"] == 2  # two rates
    records = json.loads((tmp_path / "launched" / "study.json").read_text())["records"]
    for r in records:
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert summary["num_processes"] == 2
        assert r["selection"] is not None and r["report"] is not None and r["error"] is None


def test_a_launched_trial_that_fails_says_how(tmp_path):
    cfg = tiny_config(
        *STUDY,
        "study.modes=[none]",
        "study.train_sizes=[16]",
        "study.seeds=[0]",
        "study.lr_grid={none: [0.001]}",
        "study.max_retries=1",
        f"study.launch={sys.executable} -c 'import sys; sys.exit(7)'",
        f"train.output_dir={tmp_path}",
    )
    result = run_study(cfg)
    (error,) = result["failed"].values()
    assert error.startswith("LaunchError: the trial's launch failed (exit status 7)")
    study = optuna.load_study(study_name=tmp_path.name, storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]  # the trial and its one retry


def test_a_launched_trial_past_its_timeout_is_ended_with_its_processes(tmp_path):
    marker = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time; "
        f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(marker)!r}, 'w').write(str(c.pid)); time.sleep(120)"
    )
    cfg = tiny_config(
        *STUDY,
        "study.modes=[none]",
        "study.train_sizes=[16]",
        "study.seeds=[0]",
        "study.lr_grid={none: [0.001]}",
        "study.max_retries=0",
        "study.trial_timeout=3",
        f'study.launch={sys.executable} -c "{script}"',
        f"train.output_dir={tmp_path / 'study'}",
    )
    start = time.perf_counter()
    result = run_study(cfg)
    assert time.perf_counter() - start < 60
    (error,) = result["failed"].values()
    assert "study.trial_timeout=3 s" in error
    child = Path(f"/proc/{int(marker.read_text())}/status")
    time.sleep(0.5)
    # the launcher's own child was ended too: gone, or a zombie waiting for its new parent to reap it
    assert not child.exists() or "State:\tZ" in child.read_text()


def test_a_storage_password_is_never_printed_or_saved(tmp_path):
    from vlfuse.study.grid import trial_config
    from vlfuse.study.storage import shown_url, storage_url

    cfg = tiny_config(*STUDY, "study.storage=postgresql://me:s3cret@db-host/studies")
    assert storage_url(cfg).startswith("postgresql+psycopg://me:s3cret@")  # psycopg 3, as installed
    assert shown_url(storage_url(cfg)) == "postgresql+psycopg://***:***@db-host/studies"
    assert trial_config(cfg, cells(cfg)[0], tmp_path).study.storage is None  # a run's config.yaml


# ---------------------------------------------------------------------------------------- learning curves
def test_the_curve_fit_recovers_a_noisy_power_law_and_the_rows_a_target_needs():
    """y = 0.9 - 0.5 * n^-0.4 with noise of sd 0.002, 7 sizes from 50 to 3,200 rows, 5 seeds each. The
    power law is chosen by its error at the largest size, its parameters come back within 0.01 (a), 0.05
    (b) and 0.03 (c), and the rows needed for 0.88 (truth: (0.5 / 0.02)^(1 / 0.4) = 3,125) within 10%;
    for 0.89 (truth (0.5 / 0.01)^2.5 = 17,678, 5.5x beyond the largest size: an extrapolation) within 1.5x."""
    from vlfuse.study.curves import fit_mode

    a, b, c = 0.9, 0.5, 0.4
    rng = np.random.default_rng(0)
    points = [
        (n, a - b * n**-c + rng.normal(0, 0.002))
        for n in (50, 100, 200, 400, 800, 1600, 3200)
        for _ in range(5)
    ]
    fit = fit_mode(points, target=0.88)
    assert fit["model"] == "power_law" and fit["validated"]
    fa, fb_scaled, fc = fit["params"]
    assert fa == pytest.approx(a, abs=0.01) and fc == pytest.approx(c, abs=0.03)
    assert fb_scaled * fit["scale"] ** fc == pytest.approx(b, abs=0.05)
    assert fit["target"]["rows"] == pytest.approx(3125, rel=0.1) and not fit["target"]["extrapolated"]
    assert fit["target"]["low"] < fit["target"]["rows"] < fit["target"]["high"]
    far = fit_mode(points, target=0.89)["target"]
    assert far["extrapolated"] and 17678 / 1.5 < far["rows"] < 17678 * 1.5
    assert fit_mode(points, target=0.95)["target"]["rows"] is None  # above the asymptote: never reached
    # two sizes: only a two-parameter curve fits, and it is not validated
    two = fit_mode([p for p in points if p[0] in (400, 3200)], target=None)
    assert two["model"] == "logarithmic" and not two["validated"]


# ------------------------------------------------------------------------------------------- grid edges
def _peaked_at(best_lr):
    """A stand-in for training whose selection metric peaks at ``best_lr`` (in log rate)."""
    calls = []

    def fake_train(cfg, on_eval=None):
        lr = cfg.train.lr
        calls.append(lr)
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"trainable_parameters": 1, "train_rows": 16}))
        value = 0.8 - 0.1 * math.log10(lr / best_lr) ** 2 + 0.001 * cfg.train.seed
        return {"holdout": {"acc@0.5": value, "count": 100}, "validation": {"acc@0.5": value}}

    return fake_train, calls


@pytest.mark.parametrize(("limit", "chosen", "runs"), [(None, 0.003, 4), (1, 0.009, 6), (2, 0.009, 8)])
def test_a_rate_at_the_grids_edge_is_flagged_and_extend_grid_goes_beyond_it(
    tmp_path, monkeypatch, limit, chosen, runs
):
    import vlfuse.study

    fake, calls = _peaked_at(0.009)
    monkeypatch.setattr(vlfuse.study, "train", fake)
    extra = ["study.extend_grid=true", f"study.extend_limit={limit}"] if limit else []
    cfg = tiny_config(
        *STUDY,
        "study.modes=[none]",
        "study.train_sizes=[16]",
        "study.lr_grid={none: [0.001, 0.003]}",
        *extra,
        f"train.output_dir={tmp_path}",
    )
    result = run_study(cfg)
    (row,) = result["summary"]["rows"]
    assert len(calls) == runs and row["lr"] == chosen
    # no extension: 0.003 is the highest tried; one: 0.009 is, and the limit stops; two: 0.027 is worse
    # than 0.009, which is then inside the rates tried
    assert row["lr_edge"] == ("highest" if limit in (None, 1) else None)
    report = (tmp_path / "study.md").read_text()
    assert ("is the highest tried: its best rate may lie beyond the grid" in report) == (limit in (None, 1))
    assert result["complete"] and result["trials"] == runs


# ------------------------------------------------------------------------------------------- best step
def test_a_trial_is_read_at_its_best_held_out_step_and_the_report_split_at_that_step(tmp_path, monkeypatch):
    import vlfuse.study

    curve = {  # step: (selection, report): the selection metric peaks mid-run (over-fitting after it)
        10: (0.50, 0.40),
        20: (0.70, 0.65),
        30: (0.60, 0.62),
    }

    def fake_train(cfg, on_eval=None):
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"trainable_parameters": 1, "train_rows": 16}))
        with open(out / "metrics.jsonl", "w") as f:
            for step, (sel, rep) in curve.items():
                f.write(json.dumps({"step": step, "split": "holdout", "acc@0.5": sel, "count": 50}) + "\n")
                f.write(
                    json.dumps({"step": step, "split": "validation", "acc@0.5": rep, "miou": rep / 2}) + "\n"
                )
        return {"holdout": {"acc@0.5": 0.60, "count": 50}, "validation": {"acc@0.5": 0.62, "miou": 0.31}}

    monkeypatch.setattr(vlfuse.study, "train", fake_train)
    base = [
        *STUDY,
        "study.modes=[none]",
        "study.train_sizes=[16]",
        "study.seeds=[0]",
        "study.lr_grid={none: [0.001]}",
    ]
    result = run_study(tiny_config(*base, f"train.output_dir={tmp_path / 'best'}"))
    (record,) = json.loads((tmp_path / "best" / "study.json").read_text())["records"]
    assert (record["selection"], record["report"], record["best_step"]) == (0.70, 0.65, 20)
    assert (record["last_step"], record["last_selection"]) == (30, 0.60)
    assert record["report_metrics"]["miou"] == pytest.approx(0.325)  # every report metric at step 20
    assert result["summary"]["rows"][0]["best_steps"] == [20]
    # study.best_step=false: the last step, as the run returned it
    last = run_study(tiny_config(*base, "study.best_step=false", f"train.output_dir={tmp_path / 'last'}"))
    assert last["summary"]["rows"][0]["mean"] == 0.62 and last["summary"]["rows"][0]["best_steps"] == [None]


# ----------------------------------------------------------------------------------------------- budgets
def test_budget_steps_converts_an_epoch_config_to_the_same_steps_at_every_size(tmp_path, monkeypatch, capsys):
    import vlfuse.study

    steps = []

    def fake_train(cfg, on_eval=None):
        steps.append(cfg.train.max_steps)
        return _fake_train([])(cfg, on_eval)

    monkeypatch.setattr(vlfuse.study, "train", fake_train)
    cfg = tiny_config(
        *STUDY,
        "train.max_steps=null",
        "train.epochs=2",
        "study.lr_grid={none: [0.001], all: [0.001]}",
        f"train.output_dir={tmp_path}",
    )
    result = run_study(cfg)
    # 60 shapes rows less 12 held out: 48 rows, 6 batches of 8 per epoch, 2 epochs
    assert set(steps) == {12} and len(steps) == 8
    assert "train.epochs=2 becomes train.max_steps=12 for every trial" in capsys.readouterr().out
    assert result["budget"]["description"] == "12 steps of batch 8 for every mode and size"
    assert "**Budget.** 12 steps of batch 8 for every mode and size." in (tmp_path / "study.md").read_text()


def test_budget_samples_gives_every_trial_the_same_examples(tmp_path, monkeypatch):
    import vlfuse.study

    steps = []

    def fake_train(cfg, on_eval=None):
        steps.append(cfg.train.max_steps)
        return _fake_train([])(cfg, on_eval)

    monkeypatch.setattr(vlfuse.study, "train", fake_train)
    cfg = tiny_config(
        *STUDY,
        "study.budget=samples",
        "study.budget_samples=20",
        "study.lr_grid={none: [0.001], all: [0.001]}",
        f"train.output_dir={tmp_path}",
    )
    result = run_study(cfg)
    assert steps == [3] * 8  # 20 examples at batch 8: ceil(2.5) steps, every mode and size
    assert result["budget"]["description"] == "20 training samples for every trial (3 steps of batch 8)"
    with pytest.raises(ConfigError, match="study.budget=samples needs study.budget_samples"):
        tiny_config(*STUDY, "study.budget=samples")


def test_budget_flops_gives_every_mode_the_steps_its_flops_allow(tmp_path, monkeypatch, capsys):
    import torch

    import vlfuse.study
    from vlfuse.model import VLFuseModel
    from vlfuse.tasks import get_task
    from vlfuse.training.speed import count_flops

    steps = {}

    def fake_train(cfg, on_eval=None):
        steps.setdefault(cfg.model.trainable_encoders, set()).add(cfg.train.max_steps)
        return _fake_train([])(cfg, on_eval)

    monkeypatch.setattr(vlfuse.study, "train", fake_train)
    budget = 2e10
    cfg = tiny_config(
        *STUDY,
        "study.budget=flops",
        f"study.budget_flops={budget}",
        "study.lr_grid={none: [0.001], all: [0.001]}",
        f"train.output_dir={tmp_path}",
    )
    result = run_study(cfg)
    # the towers' forward on one batch of 8, counted here on the towers alone
    model = VLFuseModel(cfg.model).eval()
    task = get_task(cfg.model.task)
    rows = task.build_dataset(cfg, model, cfg.data.train_split, train=True)
    batch = task.collator(model, train=True)([rows[i] for i in range(8)])
    with torch.no_grad():
        towers = count_flops(lambda: model.image_encoder(batch["pixel_values"])) + count_flops(
            lambda: model.text_encoder(batch["input_ids"], batch["attention_mask"])
        )
    per_step = {mode: budget / n for mode, n in result["budget"]["steps"].items()}
    # frozen: the towers' forward plus the small head's forward and backward (a few % more);
    # end-to-end adds the towers' backward, about twice their forward (input and weight gradients)
    assert towers < per_step["none"] < 1.15 * towers
    assert 1.7 * towers < per_step["all"] - per_step["none"] < 2.2 * towers
    assert steps == {"none": {result["budget"]["steps"]["none"]}, "all": {result["budget"]["steps"]["all"]}}
    assert result["budget"]["steps"]["none"] > 2.5 * result["budget"]["steps"]["all"]
    assert "study.budget=flops: none costs" in capsys.readouterr().out
    assert "training FLOPs per trial: none " in (tmp_path / "study.md").read_text()


@pytest.mark.slow
def test_budget_seconds_gives_every_mode_the_same_training_time(tmp_path, pretrained_towers):
    """Frozen towers (the feature cache) run far more steps per second than end-to-end: with the same
    seconds each, the frozen trials train more steps, and every trial's training time is the budget
    within a factor of 2 (a calibration of 10 steps on a 2-core machine shared with the test runner)."""
    cfg = tiny_config(
        *STUDY,
        *pretrained_towers,
        "study.train_sizes=[40]",
        "study.seeds=[0]",
        "study.lr_grid={none: [0.001], all: [0.001]}",
        "study.budget=seconds",
        "study.budget_seconds=4",
        "study.calibration_steps=10",
        "train.eval_every=null",
        f"train.output_dir={tmp_path / 'study'}",
        f"train.cache_dir={tmp_path / 'cache'}",
    )
    result = run_study(cfg)
    steps = result["budget"]["steps"]
    assert steps["none"] > 1.5 * steps["all"]  # frozen: more steps in the same time
    for record in json.loads((tmp_path / "study" / "study.json").read_text())["records"]:
        summary = json.loads((Path(record["run_dir"]) / "summary.json").read_text())
        assert summary["steps"] == steps[record["mode"]]
        assert 2.0 <= summary["time_data_s"] + summary["time_step_s"] <= 8.0, record["cell"]


# ------------------------------------------------------------------------------------------------- costs
def test_the_cheapest_mode_is_the_cheapest_by_the_chosen_cost_and_the_study_totals_every_trial():
    frozen = [0.800, 0.812, 0.790, 0.805, 0.797]
    tuned = [0.802, 0.815, 0.791, 0.806, 0.800]  # practically equivalent (the first decision test)
    records = _seeds("none", 100, frozen, 10) + _seeds("all", 100, tuned, 100)
    for r in records:  # frozen: fewer parameters, but slower per trial here and slower at inference
        fast = r["mode"] == "all"
        r["cost"] = {
            "trainable": r["cost"]["trainable"],
            "train_time_s": 2.0 if fast else 5.0,
            "wall_time_s": 3.0 if fast else 6.0,
            "peak_memory_mb": 900.0 if fast else 500.0,
            "inference_ms_per_example": 1.0 if fast else 4.0,
        }
    expected = {"time": "all", "memory": "none", "inference": "all", "params": "none"}
    for cost, cheapest in expected.items():
        (d,) = summarize(records, 0.95, 0.01, cost=cost)["decisions"]
        assert d["status"] == "decided" and d["recommended"] == cheapest, cost
    totals = summarize(records, 0.95, 0.01)["total_by_mode"]
    assert totals == {
        "none": {"trials": 5, "wall_time_s": 30.0, "train_time_s": 25.0},
        "all": {"trials": 5, "wall_time_s": 15.0, "train_time_s": 10.0},
    }


# ---------------------------------------------------------------------------------------------- encoders
def test_a_study_over_encoder_pairs_compares_pair_and_mode_draws_pareto_and_grows_by_a_pair(
    tmp_path, monkeypatch
):
    import vlfuse.study
    from vlfuse.study import StudyError

    towers = []

    def fake_train(cfg, on_eval=None):
        image = cfg.model.image_encoder.name
        towers.append((image, cfg.model.image_encoder.kwargs, cfg.model.trainable_encoders))
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows, tuned = int(cfg.data.train_subset), cfg.model.trainable_encoders == "all"
        # the efficientnet pair is better and slower; end-to-end gains beyond 16 rows
        gain = (rows - 16) / 200 if tuned else 0.0
        value = (0.6 if "efficientnet" in image else 0.4) + gain + 0.001 * cfg.train.seed
        seconds = (2.0 if "efficientnet" in image else 1.0) * (3 if tuned else 1)
        summary = {"trainable_parameters": 1, "train_rows": rows, "time_data_s": 0.0, "time_step_s": seconds}
        (out / "summary.json").write_text(json.dumps(summary))
        return {"holdout": {"acc@0.5": value, "count": 1000}, "validation": {"acc@0.5": value}}

    monkeypatch.setattr(vlfuse.study, "train", fake_train)
    pairs = (
        "{res: {image_encoder: {name: test_resnet, kwargs: {output_stride: 8}}}, "
        "eff: {image_encoder: {name: test_efficientnet}}}"
    )
    base = [
        *STUDY,
        "study.lr_grid={none: [0.001], all: [0.001]}",
        "model.image_encoder.kwargs={output_stride: 16}",
        f"train.output_dir={tmp_path}",
    ]
    result = run_study(tiny_config(*base, f"study.encoders={pairs}"))
    assert len(towers) == 2 * 2 * 2 * 2  # pairs x modes x sizes x seeds
    assert ("test_resnet", {"output_stride": 8}, "none") in towers  # the pair's own settings
    assert ("test_efficientnet", {}, "all") in towers  # another tower: the config's kwargs dropped
    modes = {r["mode"] for r in result["summary"]["rows"]}
    assert modes == {"res/none", "res/all", "eff/none", "eff/all"}
    small, large = result["summary"]["decisions"]
    assert small["recommended"] == "eff/none" and large["recommended"] == "eff/all"
    small_front, large_front = result["summary"]["pareto"]
    # at 16 rows: res/none is cheapest (1 s), eff/none better at 2 s; eff/all only ties it at 6 s: off.
    # at 40 rows eff/all is better still (0.72 at 6 s); res/all (0.52 at 3 s) is beaten by eff/none.
    assert small_front["train_time_s"] == ["res/none", "eff/none"]
    assert large_front["train_time_s"] == ["res/none", "eff/none", "eff/all"]
    assert (tmp_path / "study_pareto.png").is_file()
    text = (tmp_path / "study.md").read_text()
    assert "`res`: image_encoder.name=test_resnet, image_encoder.kwargs.output_stride=8" in text
    assert "- 40 rows: train time: res/none, eff/none, eff/all;" in text
    assert result["summary"]["overtakes_frozen"]["eff/all"]["size"] == 40.0  # against eff/none only
    # a third pair added to the finished study runs only its cells; a changed pair is refused
    grown = pairs[:-1] + ", res16: {image_encoder: {name: test_resnet}}}"
    again = run_study(tiny_config(*base, f"study.encoders={grown}"))
    assert len(towers) == 16 + 8 and again["trials"] == 24
    changed = pairs.replace("output_stride: 8", "output_stride: 4")
    with pytest.raises(StudyError, match="ran the encoders pair 'res' with other settings"):
        run_study(tiny_config(*base, f"study.encoders={changed}"))
