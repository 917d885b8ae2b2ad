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

import optuna
import pytest
from conftest import tiny_config
from test_recipes import ROOT, SMALL_DATA

from vlfuse.study import run_study
from vlfuse.study.grid import Cell, cells, lr_grid
from vlfuse.study.stats import choose_rates, mean_ci, paired_p_value, summarize

WORKER = Path(__file__).parent / "study_worker.py"


# ------------------------------------------------------------------------------------------- statistics
def test_the_interval_is_students_t_over_seeds():
    # mean 0.6, sample std 0.1; t(0.975, df=2) = 4.302652729911275 (tables), half width 4.3027 * 0.1 / sqrt(3)
    ci = mean_ci([0.5, 0.6, 0.7], 0.95)
    assert ci["mean"] == pytest.approx(0.6) and ci["std"] == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert (ci["low"], ci["high"]) == pytest.approx((0.6 - half, 0.6 + half))
    assert math.isnan(mean_ci([0.5], 0.95)["low"])  # one seed: no interval


def test_the_paired_test_against_a_hand_computation():
    a, b = [0.5, 0.6, 0.7], [0.45, 0.50, 0.71]
    # differences 0.05, 0.10, -0.01: mean d, sample std s, t = d / (s / sqrt(3)) with 2 degrees of freedom,
    # whose two-sided p-value has the closed form 1 - |t| / sqrt(2 + t^2)
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 3
    s = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = mean / (s / math.sqrt(3))
    assert paired_p_value(a, b) == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-9)
    assert paired_p_value(a, a) == 1.0  # identical runs: indistinguishable
    assert paired_p_value([0.5, 0.6], [0.4, 0.5]) == 0.0  # a constant gap: told apart
    assert math.isnan(paired_p_value([0.5], [0.4]))


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
    row = summarize(records, 0.95)["rows"][0]
    assert row["lr"] == 1e-3 and row["mean"] == pytest.approx(0.1)  # the report split, at the chosen rate
    # changing only the report split's numbers changes no choice
    swapped = [{**r, "report": 1.0 - r["report"]} for r in records]
    assert choose_rates(swapped) == choose_rates(records)
    assert summarize(swapped, 0.95)["rows"][0]["lr"] == 1e-3
    # a diverged seed (no metric) sinks its rate
    diverged = [{**r, "selection": None} if (r["lr"], r["seed"]) == (1e-3, 0) else r for r in records]
    assert choose_rates(diverged)[("none", 100)]["lr"] == 3e-3


def test_the_recommendation_is_the_cheapest_mode_not_told_apart_from_the_best():
    records = []
    for seed, (frozen, small_all, big_all) in enumerate(
        [(0.50, 0.52, 0.80), (0.55, 0.50, 0.86), (0.52, 0.56, 0.83)]
    ):
        records += [
            _record("none", 100, seed, 1e-3, 0.5, frozen, trainable=10),
            _record("all", 100, seed, 1e-4, 0.5, small_all, trainable=100),
            _record("none", 1000, seed, 1e-3, 0.5, frozen, trainable=10),
            _record("all", 1000, seed, 1e-4, 0.5, big_all, trainable=100),
        ]
    result = summarize(records, 0.95)
    small, big = result["recommendation"]
    # at 100 rows end-to-end's mean is higher (0.5267 vs 0.5233) but the paired test cannot tell them
    # apart: the cheaper frozen mode is recommended
    assert small["best"] == "all" and small["recommended"] == "none"
    assert small["p_values"]["none"] > 0.05 and sorted(small["indistinguishable"]) == ["all", "none"]
    # at 1000 rows end-to-end is told apart (differences 0.30, 0.31, 0.31)
    assert big["best"] == big["recommended"] == "all" and big["p_values"]["none"] < 0.05
    assert result["overtakes_frozen"] == {"all": 1000}


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


def test_another_grid_in_the_same_storage_is_refused(tmp_path):
    from vlfuse.study import StudyError
    from vlfuse.study.engine import open_study

    cfg = tiny_config(*STUDY, f"train.output_dir={tmp_path}")
    open_study(cfg, cells(cfg))
    other = tiny_config(*STUDY, "study.seeds=[0,1,2]", f"train.output_dir={tmp_path}")
    with pytest.raises(StudyError, match="was started with another grid"):
        open_study(other, cells(other))


# --------------------------------------------------------------------------------------------- storage
def _worker(out: Path, storage: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(WORKER), str(out), storage, *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_workers_complete_the_grid_once(out: Path, storage: str) -> None:
    workers = [_worker(out, storage, "--seconds", "0.5") for _ in range(2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    starts = _events(out)
    assert len(starts) == 8 and set(starts.values()) == {1}, starts  # every cell, each once
    workers_seen = {json.loads(line)["worker"] for line in (out / "trials.jsonl").read_text().splitlines()}
    assert len(workers_seen) == 2  # both took part
    study = optuna.load_study(study_name=out.name, storage=_sqlalchemy(storage))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 8
    assert json.loads((out / "study.json").read_text())["summary"]["overtakes_frozen"] == {"all": 10.0}


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
def test_a_killed_workers_trial_runs_again_and_the_study_completes(tmp_path):
    out, storage = tmp_path / "killed", f"sqlite:///{tmp_path / 'killed.db'}"
    hang = Cell("all", 20.0, 1, 1e-4)
    victim = _worker(out, storage, "--seconds", "0.05", "--hang", hang.folder)
    deadline = time.time() + 120
    while time.time() < deadline and hang.key not in (
        _events(out) if (out / "trials.jsonl").exists() else {}
    ):
        time.sleep(0.1)
    assert hang.key in _events(out), "the worker never reached the cell"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    time.sleep(3)  # past study.grace_period=2: the trial's heartbeat is stale
    survivor = _worker(out, storage, "--seconds", "0.05")
    log = survivor.communicate(timeout=300)[0]
    assert survivor.returncode == 0, log
    assert json.loads(log.strip().splitlines()[-1]) == {"trials": 8, "complete": True}
    starts = _events(out)
    assert starts[hang.key] == 2 and sum(starts.values()) == 9  # the killed cell ran again, no other did
    study = optuna.load_study(study_name=out.name, storage=storage)
    states = Counter(t.state.name for t in study.trials)
    assert states == {"COMPLETE": 8, "FAIL": 1}


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
    assert "## Recommendation" in run.stdout
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
    from vlfuse.study import LaunchError

    cfg = tiny_config(
        *STUDY,
        "study.modes=[none]",
        "study.train_sizes=[16]",
        "study.seeds=[0]",
        f"study.launch={sys.executable} -c 'import sys; sys.exit(7)'",
        f"train.output_dir={tmp_path}",
    )
    with pytest.raises(LaunchError, match="exit status 7"):
        run_study(cfg)
    study = optuna.load_study(study_name=tmp_path.name, storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL"]  # queued again the next time the study runs


def test_a_storage_password_is_never_printed_or_saved(tmp_path):
    from vlfuse.study.engine import shown_url, storage_url
    from vlfuse.study.grid import trial_config

    cfg = tiny_config(*STUDY, "study.storage=postgresql://me:s3cret@db-host/studies")
    assert storage_url(cfg).startswith("postgresql+psycopg://me:s3cret@")  # psycopg 3, as installed
    assert shown_url(storage_url(cfg)) == "postgresql+psycopg://***:***@db-host/studies"
    assert trial_config(cfg, cells(cfg)[0], tmp_path).study.storage is None  # a run's config.yaml
