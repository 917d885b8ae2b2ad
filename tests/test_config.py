import pytest

from vlfuse.config import load_cli_config, load_config, parse_cli
from vlfuse.schema import ConfigError, to_yaml


def test_defaults_match_design():
    cfg = load_config()
    assert cfg.model.trainable_encoders == "none"
    assert cfg.data.box_format == "xyxy"
    assert cfg.train.mixed_precision == "no"
    assert cfg.data.columns == {"image": "image", "text": "text", "box": "box"}


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  trainable_encoders: image\ntrain:\n  lr: 0.5\n  epochs: 3\n")
    cfg = load_config(path, ["train.lr=3e-4", "data.eval_split=[testA,testB]"])
    assert cfg.model.trainable_encoders == "image"
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.epochs == 3
    assert cfg.data.eval_split == ["testA", "testB"]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.trainable_encoders=some", "'model.trainable_encoders'; allowed: none, image, text, all"),
        ("train.not_a_key=1", "'train.not_a_key'"),
        ("train.epochs=many", "'train.epochs'"),
        ("data.box_format=xyzw", "'data.box_format'; allowed: xyxy, xywh, cxcywh"),
        ("model.fusion.name=magic", "'model.fusion.name'; allowed: concat, transformer, dense"),
        ("train.batch_size=0", "'train.batch_size'; must be >= 1"),
        ("data.eval_split=[]", "'data.eval_split'"),
    ],
)
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert needle in str(err.value)


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  image_encoder:\n    nam: resnet18\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "model.image_encoder.nam" in str(err.value) and "bad.yaml" in str(err.value)
    assert "allowed keys here: name, pretrained" in str(err.value)


def test_parse_cli_and_yaml_round_trip(tmp_path):
    path, overrides = parse_cli(["--config", "x.yaml", "train.lr=1", "model.trainable_encoders=all"])
    assert path == "x.yaml" and overrides == ["train.lr=1", "model.trainable_encoders=all"]
    with pytest.raises(ConfigError):
        parse_cli(["--lr", "3"])
    cfg = load_config(overrides=["train.seed=7"])
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(to_yaml(cfg))
    assert load_config(dumped) == cfg


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.task=retrieval"], "retrieval needs fusion.name=projection"),
        (["model.fusion.name=projection"], "projection serves retrieval only"),
        (["model.task=classification", "model.fusion.name=projection"], "projection serves retrieval only"),
        (
            ["model.task=matching", "train.cache_features=true"],
            "model.task=grounding, retrieval, vqa only \\(not itm\\)",
        ),
        (["model.task=classification", "data.hflip_prob=0.5"], "data.hflip_prob=0.5 with model.task"),
        (["model.task=vqe"], "'model.task'; allowed: grounding, retrieval, vqa, itm"),
    ],
)
def test_task_combinations_are_checked(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=overrides)


def test_unparsable_override_is_a_config_error():
    with pytest.raises(
        ConfigError, match="could not parse the override 'data.eval_split=\\[val,test\\[:5\\]\\]'"
    ):
        load_config(overrides=["train.lr=1e-3", "data.eval_split=[val,test[:5]]"])
    assert load_config(overrides=["data.eval_split=[val,'test[:5]']"]).data.eval_split == ["val", "test[:5]"]


def test_split_slices(tmp_path):
    import datasets

    from vlfuse.data.loading import DataError, load_split, parse_split

    assert parse_split("test") == ("test", None)
    assert parse_split("test[1000:]") == ("test", slice(1000, None))
    assert parse_split("validation[:-5]") == ("validation", slice(None, -5))
    with pytest.raises(DataError, match="name\\[start:stop\\]"):
        parse_split("test[a:b]")
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"x": list(range(10))}).to_parquet(
        str(folder / "data" / "test-00000-of-00001.parquet")
    )
    cfg = load_config(overrides=[f"data.dataset={folder}"]).data
    assert load_split(cfg, "test[7:]")["x"] == [7, 8, 9]
    assert load_split(cfg, "test[:-8]")["x"] == [0, 1]
    with pytest.raises(DataError, match="selects no rows"):
        load_split(cfg, "test[20:]")
    with pytest.raises(DataError, match="has no split 'train'"):
        load_split(cfg, "train[:2]")


SHAPES = "recipes/configs/grounding/shapes.yaml"


@pytest.mark.parametrize(
    "tower, mapping, default, other, given",
    [
        # shapes.yaml's tiny CNN runs at output_stride 8; a user's encoder must not get it by accident
        ("image_encoder", "kwargs", {"output_stride": 8}, "resnet18", ("output_stride", 16)),
        # its tiny BERT has no dropout; another text encoder's config may not even have these attributes
        (
            "text_encoder",
            "config_overrides",
            {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
            "openai/clip-vit-base-patch32",
            ("hidden_dropout_prob", 0.2),
        ),
    ],
)
def test_another_encoder_does_not_inherit_the_default_configs_encoder_settings(
    tower, mapping, default, other, given
):
    def settings(*overrides):
        return getattr(
            getattr(load_cli_config(list(overrides), SHAPES, task="grounding").model, tower), mapping
        )

    assert settings() == default
    assert settings(f"model.{tower}.name={other}") == {}
    key, value = given
    assert settings(f"model.{tower}.name={other}", f"model.{tower}.{mapping}.{key}={value}") == {key: value}
    same = load_config(SHAPES).model
    assert (
        settings(f"model.{tower}.name={getattr(same, tower).name}") == default
    )  # the same encoder keeps them
    # a file naming another encoder drops them too (the schema default has none, shapes.yaml has some)
    assert getattr(getattr(load_config(SHAPES, [f"model.{tower}.name={other}"]).model, tower), mapping) == {}


def test_an_empty_mapping_on_the_command_line_empties_it():
    emptied = load_cli_config(["model.image_encoder.kwargs={}"], SHAPES, task="grounding")
    assert emptied.model.image_encoder.kwargs == {}
    # a non-empty mapping merges entry by entry, as before (existing commands keep working)
    columns = load_cli_config(["data.columns={image: img, text: caption}"], SHAPES, task="grounding")
    assert columns.data.columns == {"image": "img", "text": "caption", "box": "box"}
    one = load_cli_config(["data.columns.image=img"], SHAPES, task="grounding")
    assert one.data.columns == {"image": "img", "text": "text", "box": "box"}


def test_recipe_help_lists_every_key_with_its_default_and_doc():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "recipes" / "grounding.py"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("usage: grounding.py [--config FILE] [key=value ...] [--print-config] [-h]")
    # the recipe's own default and the schema's comment for the key
    assert "  model.trainable_encoders = all\n      none: fusion + head only over frozen encoders" in out
    from vlfuse.config import reference
    from vlfuse.schema import Config

    for key, _, _ in reference(Config()):
        assert f"  {key} = " in out, key


def test_print_config_prints_the_resolved_config_and_writes_nothing(tmp_path, capsys):
    import yaml

    out_dir = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  fusion:\n    dim: 48\n")
    with pytest.raises(SystemExit) as exit_info:
        load_cli_config(
            ["--config", str(config), "--print-config", f"train.output_dir={out_dir}", "train.lr=3e-4"],
            config,
        )
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 3e-4 and printed["model"]["fusion"]["dim"] == 48
    assert printed["train"]["output_dir"] == str(out_dir)
    assert not out_dir.exists()


def test_a_mapping_override_without_a_space_after_its_colon_is_refused():
    # YAML reads {output_stride:16} as the key "output_stride:16" with no value: silently wrong otherwise
    with pytest.raises(ConfigError, match=r"reads 'output_stride:16' as one key.*\{output_stride: 16\}"):
        load_config(None, ["model.image_encoder.kwargs={output_stride:16}"])
    assert load_config(
        None, ["model.image_encoder.kwargs={output_stride: 16}"]
    ).model.image_encoder.kwargs == {"output_stride": 16}
