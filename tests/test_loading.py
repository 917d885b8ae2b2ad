"""Loading is a trust boundary: the caller decides about custom code, Hub ids reach the Hub with the
caller's arguments, LoRA merges and exports through peft."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_model_config
from PIL import Image

import vlfuse.hub as hub
from vlfuse.model import VLFuseModel
from vlfuse.schema import ConfigError
from vlfuse.training import build_model

IMAGES = [Image.new("RGB", (50, 40), (200, 30, 30)), Image.new("RGB", (30, 60), (20, 20, 200))]
TEXTS = ["the red circle", "the lowest shape"]


def _plant_custom_code(folder: Path, marker: Path) -> None:
    """Makes a saved model's text tower ask for custom code (transformers' ``auto_map``) whose import
    writes ``marker``, and records ``trust_remote_code: true`` in the saved config."""
    meta = json.loads((folder / "vlfuse_config.json").read_text())
    meta["model"]["text_encoder"]["trust_remote_code"] = True
    (folder / "vlfuse_config.json").write_text(json.dumps(meta))
    text = folder / "text_encoder"
    config = json.loads((text / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_planted.PlantedConfig",
        "AutoModel": "modeling_planted.PlantedModel",
    }
    (text / "config.json").write_text(json.dumps(config))
    (text / "configuration_planted.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('the planted module ran')\n"
        "from transformers import BertConfig\n\n\n"
        "class PlantedConfig(BertConfig):\n    pass\n"
    )
    (text / "modeling_planted.py").write_text(
        "from transformers import BertModel\n\n"
        "from .configuration_planted import PlantedConfig\n\n\n"
        "class PlantedModel(BertModel):\n    config_class = PlantedConfig\n"
    )


@pytest.fixture
def saved(tmp_path):
    model = VLFuseModel(tiny_model_config("model.fusion.name=concat"))
    return model, model.save_pretrained(tmp_path / "saved")


def test_a_saved_folder_cannot_turn_on_custom_code(saved, tmp_path, capsys):
    model, folder = saved
    marker = tmp_path / "marker.txt"
    _plant_custom_code(folder, marker)
    loaded = VLFuseModel.from_pretrained(folder)
    out = capsys.readouterr().out
    assert not marker.exists(), "loading ran the folder's code without the caller's consent"
    assert "saved with model.text_encoder.trust_remote_code=True; using the caller's" in out
    assert "asks for custom code (configuration_planted.PlantedConfig, modeling_planted.PlantedModel)" in out
    assert "not run" in out
    assert loaded.config.text_encoder.trust_remote_code is False
    torch.testing.assert_close(loaded.predict(IMAGES, TEXTS), model.predict(IMAGES, TEXTS))
    # the same folder through a recipe's model.init_from: the user's own config value decides
    cfg = tiny_config(f"model.init_from={folder}")
    assert cfg.model.text_encoder.trust_remote_code is False
    build_model(cfg)
    assert not marker.exists()
    # the caller allows it: the folder's code runs
    trusted = VLFuseModel.from_pretrained(folder, trust_remote_code=True)
    assert marker.read_text() == "the planted module ran"
    assert type(trusted.text_encoder.model.config).__name__ == "PlantedConfig"


def test_loaded_model_is_in_eval_mode(saved):
    _, folder = saved
    loaded = VLFuseModel.from_pretrained(folder)
    assert not loaded.training and not any(m.training for m in loaded.modules())


def test_a_dotted_hub_id_reaches_the_hub_with_the_callers_arguments(saved, monkeypatch, tmp_path):
    model, folder = saved
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    loaded = VLFuseModel.from_pretrained(
        "someone/vlfuse-grounding-v1.5",
        revision="v2",
        token="hf_secret",
        cache_dir=tmp_path / "cache",
        local_files_only=True,
        force_download=True,
    )
    ((repo_id, kwargs),) = calls
    assert repo_id == "someone/vlfuse-grounding-v1.5"
    assert kwargs["revision"] == "v2" and kwargs["token"] == "hf_secret"
    assert kwargs["cache_dir"] == tmp_path / "cache"
    assert kwargs["local_files_only"] is True and kwargs["force_download"] is True
    assert "*.py" not in kwargs["allow_patterns"] and "vlfuse_config.json" in kwargs["allow_patterns"]
    torch.testing.assert_close(loaded.predict(IMAGES, TEXTS), model.predict(IMAGES, TEXTS))
    VLFuseModel.from_pretrained("Qwen2.5-0.5B")  # a legacy id without an owner is an id too
    assert calls[-1][0] == "Qwen2.5-0.5B"


def test_a_missing_path_that_is_no_hub_id_names_both_readings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ folder here
    with pytest.raises(FileNotFoundError, match=r"not a folder .*runs/grounding/final.*not a Hub model id"):
        VLFuseModel.from_pretrained("runs/grounding/final")


def test_a_path_that_looks_local_is_never_a_hub_id(saved, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kw: calls.append(repo_id))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()  # a typo'd run folder whose first part exists
    for name in ("outputs/final", "./final", "~/no-such-vlfuse-model", tmp_path / "runs" / "final"):
        with pytest.raises(
            FileNotFoundError, match=r"does not exist \(a path that looks local is never read"
        ):
            VLFuseModel.from_pretrained(name)
    assert calls == []  # nothing asked of the Hub


def test_an_unreachable_hub_id_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # HF_HUB_OFFLINE=1 in the tests: huggingface_hub refuses at once
    with pytest.raises(FileNotFoundError, match=r"no folder of that name here, and the Hub model repository"):
        VLFuseModel.from_pretrained("someone/not-downloaded", local_files_only=True)


# ------------------------------------------------------------------------------------------------- LoRA
def _randomize_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad():  # non-zero updates, as after training
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)


def test_lora_on_an_embedding_and_a_linear_target_merges_and_exports_for_peft(tmp_path, bert_folder):
    from accelerate.state import AcceleratorState
    from peft import PeftModel
    from test_recipes import SMALL_DATA
    from transformers import AutoModel

    from vlfuse.training import train

    trained = {}

    def keep_predictions(accelerator, model):
        model = accelerator.unwrap_model(model).eval()
        trained["learning"] = model.trainable_parameter_names()
        trained["boxes"] = model.predict(IMAGES, TEXTS)
        trained["tokens"] = model.text_encoder.tokenize(TEXTS)

    AcceleratorState._reset_state(True)
    train(
        tiny_config(
            *SMALL_DATA,
            f"model.text_encoder.name={bert_folder}",
            "model.text_encoder.pretrained=true",
            "model.trainable_encoders=text",
            "model.text_encoder.tuning=lora",
            "model.text_encoder.lora.target_modules=[word_embeddings,query]",
            "train.encoder_lr=0.05",
            "train.max_steps=3",
            f"train.output_dir={tmp_path / 'run'}",
        ),
        on_end=keep_predictions,
    )
    AcceleratorState._reset_state(True)
    assert any("word_embeddings.lora_embedding_A" in n for n in trained["learning"])
    assert any("query.lora_A" in n for n in trained["learning"])
    folder = tmp_path / "run" / "final"
    loaded = VLFuseModel.from_pretrained(folder)
    assert not loaded.text_encoder.has_adapters  # merged into plain layers
    torch.testing.assert_close(loaded.predict(IMAGES, TEXTS), trained["boxes"], atol=1e-5, rtol=1e-5)
    # peft's own loader takes the exported adapter onto the tower's base model
    adapter = folder / "adapters" / "text_encoder"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    peft_tower = PeftModel.from_pretrained(AutoModel.from_pretrained(bert_folder), str(adapter)).eval()
    with torch.no_grad():
        from_peft = peft_tower(**trained["tokens"]).last_hidden_state
        merged = loaded.text_encoder.model(**trained["tokens"]).last_hidden_state
        base = AutoModel.from_pretrained(bert_folder).eval()(**trained["tokens"]).last_hidden_state
    torch.testing.assert_close(from_peft, merged, atol=1e-5, rtol=1e-5)
    assert (from_peft - base).abs().max() > 1e-3  # the trained adapter really changes the tower


def test_lora_on_a_cnn_exports_for_peft_onto_the_timm_model(tmp_path):
    import timm
    from peft import PeftModel

    model = VLFuseModel(
        tiny_model_config(
            "model.trainable_encoders=image", "model.image_encoder.tuning=lora", "model.fusion.name=concat"
        )
    )
    base_state = {
        k.removeprefix("image_encoder.model."): v.clone()
        for k, v in model.state_dict().items()
        if k.startswith("image_encoder.model.") and "lora_" not in k
    }
    _randomize_adapters(model)
    folder = model.save_pretrained(tmp_path / "saved")
    base = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    base.load_state_dict({k.replace(".base_layer.", "."): v for k, v in base_state.items()})
    peft_tower = PeftModel.from_pretrained(base, str(folder / "adapters" / "image_encoder")).eval()
    loaded = VLFuseModel.from_pretrained(folder)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            peft_tower.forward_features(pixels),
            loaded.image_encoder.model.forward_features(pixels),
            atol=1e-5,
            rtol=1e-5,
        )


def test_an_unmergeable_lora_target_is_refused_at_start_naming_the_module():
    # peft cannot merge an adapter into a grouped (depthwise) convolution
    with pytest.raises(ConfigError, match=r"model.image_encoder.lora.target_modules: module '.*conv_dw'"):
        VLFuseModel(
            tiny_model_config(
                "model.image_encoder.name=test_efficientnet",
                "model.trainable_encoders=image",
                "model.image_encoder.tuning=lora",
                "model.image_encoder.lora.target_modules=[blocks.3.0.conv_dw]",
                "model.image_encoder.lora.r=128",  # peft needs r divisible by the groups
                "model.fusion.name=concat",
            )
        )
