"""data.streaming=true: a local parquet dataset read as a stream, split between processes and DataLoader
workers, shuffled in blocks, with bad rows counted and an exact position for resuming."""

import json

import datasets
import pytest
import torch
from conftest import TINY_MODEL, tiny_config
from helpers import write_sharded_grounding
from safetensors.torch import load_file
from test_recipes import launch

from vlfuse.data.examples import BadExample
from vlfuse.data.loading import DataError, stream_split
from vlfuse.data.streaming import stream_loader
from vlfuse.model import VLFuseModel
from vlfuse.schema import ConfigError
from vlfuse.tasks import get_task
from vlfuse.training import train
from vlfuse.training.data import build_stream

SEEN = "../tests/scripts/grounding_stream_seen.py"  # relative to recipes/


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """40 rows (1-2 unique expressions each) in 4 parquet shards."""
    return write_sharded_grounding(tmp_path_factory.mktemp("stream"), rows=40, shards=4)


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    """The same layout in 3 shards: 2 processes cannot each take whole shards."""
    return write_sharded_grounding(tmp_path_factory.mktemp("stream3"), rows=30, shards=3)


def stream_cfg(folder, *overrides):
    return tiny_config(
        f"data.dataset={folder}",
        "data.columns={image: image, text: text, box: box}",
        "data.streaming=true",
        "train.max_steps=4",
        "data.hflip_prob=0.0",
        *overrides,
    )


@pytest.fixture(scope="module")
def model():
    return VLFuseModel(tiny_config().model)


def map_style(folder, model):
    """The train split's map-style dataset (the same config, not streamed)."""
    cfg = stream_cfg(folder, "data.streaming=false")
    return get_task("grounding").build_dataset(cfg, model, "train", True)


def texts_of_pass(cfg, model, rank=0, world=1, workers=0):
    """The texts of one pass over process ``rank``'s part, read through the training loader (batch 1)."""
    dataset = build_stream(cfg, get_task("grounding"), model, rank, world)
    loader = stream_loader(dataset, 1, lambda examples: examples, workers)
    return [e.text for batch in loader for e in batch]


def test_unshuffled_stream_gives_the_map_style_examples_in_order(sharded, model):
    cfg = stream_cfg(sharded, "data.shuffle_buffer=1")
    streamed = list(build_stream(cfg, get_task("grounding"), model, 0, 1))
    plain = map_style(sharded, model)
    assert len(streamed) == len(plain) > 40  # rows with two expressions give two examples
    for i, example in enumerate(streamed):
        expected = plain[i]
        assert example.text == expected.text
        assert torch.equal(example.box, expected.box)
        assert torch.equal(example.original_box, expected.original_box)
        assert torch.equal(example.pixel_values, expected.pixel_values)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("layout", ["sharded", "three_shards"])
def test_two_processes_see_every_example_once_per_pass(layout, workers, request, model):
    folder = request.getfixturevalue(layout)
    cfg = stream_cfg(folder, "data.shuffle_buffer=8")
    plain = map_style(folder, model)
    ranks = [texts_of_pass(cfg, model, rank, 2, workers) for rank in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(plain.texts)
    assert all(len(r) == len(set(r)) for r in ranks)
    # Shuffled: not the stored order, and another order in the next epoch.
    one = texts_of_pass(cfg, model, workers=workers)
    assert sorted(one) == sorted(plain.texts) and one != plain.texts
    dataset = build_stream(cfg, get_task("grounding"), model, 0, 1)
    dataset.set_epoch(1)
    assert [e.text for e in dataset] != one


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_position_resumes_with_the_next_examples(sharded, model, workers, tmp_path):
    cfg = stream_cfg(sharded, "data.shuffle_buffer=8")  # several shuffled blocks per worker

    def loader():
        dataset = build_stream(cfg, get_task("grounding"), model, 0, 1)
        return stream_loader(dataset, 3, lambda examples: [e.text for e in examples], workers)

    straight = loader()
    batches = iter(straight)
    head = [next(batches) for _ in range(5)]
    torch.save(straight.state_dict(), tmp_path / "position.pt")
    rest = list(batches)
    assert rest and head
    resumed = loader()
    resumed.load_state_dict(torch.load(tmp_path / "position.pt", weights_only=True))
    assert list(resumed) == rest


def test_stream_slices_and_refusals(sharded):
    cfg = stream_cfg(sharded).data
    assert [len(r["text"]) > 0 for r in stream_split(cfg, "train[5:12]")] == [True] * 7
    first = next(iter(stream_split(cfg, "train[5:]")))
    assert first["text"][0].startswith("train row5-")
    assert isinstance(first["image"], dict) and first["image"]["bytes"]  # left undecoded
    with pytest.raises(DataError, match="from its start"):
        stream_split(cfg, "train[-5:]")
    with pytest.raises(DataError, match="no split 'tr'"):
        stream_split(cfg, "tr")
    with pytest.raises(ConfigError, match="train.max_steps"):
        tiny_config(f"data.dataset={sharded}", "data.streaming=true")
    with pytest.raises(ConfigError, match="train.cache_features"):
        stream_cfg(sharded, "train.cache_features=true")


@pytest.fixture(scope="module")
def with_bad_rows(tmp_path_factory):
    """12 rows in 2 shards; row 3 has damaged image bytes and row 8 no expression."""
    folder = write_sharded_grounding(tmp_path_factory.mktemp("bad"), rows=12, shards=2)
    for path in sorted((folder / "data").glob("train-*.parquet")):
        ds = datasets.Dataset.from_parquet(str(path))
        ds = ds.cast_column("image", datasets.Image(decode=False))

        def damage(row):
            n = int(row["text"][0].split("row")[1].split("-")[0]) if row["text"] else -1
            if n == 3:
                row["image"] = {"bytes": b"not an image", "path": None}
            if n == 8:
                row["text"] = []
            return row

        ds.map(damage).cast_column("image", datasets.Image()).to_parquet(str(path) + ".new")
        (path.parent / (path.name + ".new")).replace(path)
    return folder


def test_bad_streamed_rows_are_counted_not_raised(with_bad_rows, model, tmp_path):
    cfg = stream_cfg(with_bad_rows, "data.shuffle_buffer=1")
    examples = list(build_stream(cfg, get_task("grounding"), model, 0, 1))
    bad = [e for e in examples if isinstance(e, BadExample)]
    assert sorted(e.reason for e in bad) == ["bad_image", "missing_expression"]
    assert "cannot decode" in next(e.detail for e in bad if e.reason == "bad_image")
    # In training they are skipped and counted (2 of ~18 examples, so the bad fraction is raised).
    run = stream_cfg(
        with_bad_rows,
        "train.batch_size=4",
        "train.max_steps=8",
        "data.max_bad_fraction=0.5",
        "data.eval_split=validation",
        f"train.output_dir={tmp_path / 'run'}",
    )
    train(run)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["bad_rows"] >= 2 and summary["steps"] == 8


@pytest.mark.parametrize(
    "task, overrides",
    [
        ("retrieval", ["data.columns={image: image, text: captions}", "model.fusion.name=projection"]),
        ("classification", ["data.columns={image: image, question: question, answer: answer}"]),
        ("matching", ["data.columns={image: image, text: captions}"]),
    ],
)
def test_every_task_trains_on_a_stream(task, overrides, tmp_path, capsys):
    """The embedded dataset streamed (to_iterable_dataset, 8 shards) for the other tasks; classification
    builds its answer vocabulary from the stream's first rows."""
    cfg = tiny_config(
        f"model.task={task}",
        *overrides,
        "data.streaming=true",
        "data.shapes_train_size=48",
        "data.shapes_eval_size=8",
        "data.hflip_prob=0.0",
        "train.batch_size=8",
        "train.max_steps=3",
        f"train.output_dir={tmp_path}",
    )
    metrics = train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples"] == 24 and metrics["validation"]["bad_rows"] == 0
    assert (tmp_path / "checkpoints" / "step_3" / "stream_position_0.pt").is_file()
    out = capsys.readouterr().out
    assert "train split train: streamed (8 shard(s)" in out
    if task == "classification":
        assert "answer vocabulary from the first 48 rows of the stream" in out


def weights(folder):
    return load_file(str(folder / "final" / "model.safetensors"))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_stream_across_epochs(sharded, workers, tmp_path):
    """12 rows (12 to 24 examples) in batches of 4: a pass is 3 to 6 steps, so 10 steps cross at least one
    epoch; resuming from step 3 gives the uninterrupted run's weights bit for bit (it sees the same
    examples next)."""
    common = [
        "data.shuffle_buffer=5",
        "data.max_train_samples=12",
        f"data.num_workers={workers}",
        "data.eval_split=validation",
        "train.batch_size=4",
        "train.max_steps=10",
        "train.checkpoint_every=3",
        "train.keep_last=5",
        "model.trainable_encoders=all",
    ]
    train(stream_cfg(sharded, *common, f"train.output_dir={tmp_path / 'straight'}"))
    checkpoint = tmp_path / "straight" / "checkpoints" / "step_3"
    assert (checkpoint / "stream_position_0.pt").is_file()
    resumed = tmp_path / "resumed"
    train(stream_cfg(sharded, *common, f"train.output_dir={resumed}", f"train.resume_from={checkpoint}"))
    a, b = weights(tmp_path / "straight"), weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    # An epoch was crossed: the metrics record the pass the run ended in.
    last = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["epoch"] >= 1


def seen(folder, rank):
    return [json.loads(line) for line in (folder / f"seen_rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_stream_disjoint_parts_and_resume_where_they_stopped(sharded, tmp_path):
    """accelerate launch on 2 CPU processes (DDP): each process trains on its own shards (no example twice
    across them), and a run resumed from step 2 trains each process on the batches that the uninterrupted
    run trained on next, ending with the same weights."""
    args = [
        *TINY_MODEL,
        f"data.dataset={sharded}",
        "data.columns={image: image, text: text, box: box}",
        "data.eval_split=validation",
        "data.streaming=true",
        "data.shuffle_buffer=6",
        "data.hflip_prob=0.0",
        "train.batch_size=4",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.eval_every=2",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(SEEN, *args, f"train.output_dir={straight}", processes=2)
    checkpoint = straight / "checkpoints" / "step_2"
    launch(SEEN, *args, f"train.output_dir={resumed}", f"train.resume_from={checkpoint}", processes=2)
    texts = {rank: [t for batch in seen(straight, rank) for t in batch] for rank in (0, 1)}
    assert len(texts[0]) == len(texts[1]) == 16  # 4 steps x batch 4, within one pass of ~30 examples
    assert not set(texts[0]) & set(texts[1]) and all(len(set(t)) == 16 for t in texts.values())
    for rank in (0, 1):
        assert seen(resumed, rank) == seen(straight, rank)[2:]
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    peaks = json.loads((straight / "summary.json").read_text())["peak_memory_mb_per_process"]
    assert len(peaks) == 2 and all(p > 100 for p in peaks)  # each process's own peak RSS, in MiB
