import pytest

from vlfuse.config import ConfigError, load_config, parse_cli, to_yaml


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
