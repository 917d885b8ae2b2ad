"""Loading a run's config: the schema (``vlfuse.schema``) merged from YAML and ``key=value`` overrides,
then the checks that need the task registry: ``model.task`` names a known task, the task accepts the
fusion head and the settings, and a recipe gets a config of its own task.

The schema itself (the config sections, their documentation and validation) is ``vlfuse.schema``; this
module loads configs into it: ``load_config``, ``load_cli_config`` (with ``--help`` and
``--print-config``), ``section_from_dict``, and the generated config reference.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from vlfuse.data.subsets import HOLDOUT
from vlfuse.schema import Config, ConfigError, shown_yaml, top_only, validate
from vlfuse.schema.reference import cli_help, reference, reference_markdown
from vlfuse.schema.trust import refuse_interpolation, refuse_resolvers
from vlfuse.tasks import TASKS, check_task_fusion, get_task, task_name


def _describe_allowed(schema: Any, key: str) -> str:
    """The keys allowed next to ``key`` (a dotted path), for an unknown-key message."""
    node = schema
    for part in key.split(".")[:-1]:
        if not dataclasses.is_dataclass(node):
            return ""
        node = getattr(node, part, None)
    if dataclasses.is_dataclass(node):
        return "allowed keys here: " + ", ".join(f.name for f in dataclasses.fields(node))
    return ""


# Each tower's mapping that is written for one encoder (dropped when another encoder is named).
ENCODER_SPECIFIC = {"model.image_encoder": "kwargs", "model.text_encoder": "config_overrides"}


def _replaced(base: Any, layer: Any, emptied: Sequence[str] = ()) -> Any:
    """``base`` prepared for merging ``layer``: the mappings ``layer`` replaces are emptied first.

    - ``model.image_encoder.kwargs`` and ``model.text_encoder.config_overrides`` are encoder-specific (a
      tiny CNN's ``output_stride``, a BERT config's ``hidden_dropout_prob``): when a layer names another
      encoder, the earlier ones are dropped rather than handed to an encoder they were not written for
      (what the layer gives for the new encoder is kept).
    - ``key={}`` on the command line empties that mapping (a non-empty ``key={...}`` merges entry by
      entry, as a config file does).
    """
    for tower, specific in ENCODER_SPECIFIC.items():
        name = OmegaConf.select(layer, f"{tower}.name")
        if name is not None and name != OmegaConf.select(base, f"{tower}.name"):
            base = base.copy()
            OmegaConf.update(base, f"{tower}.{specific}", {}, merge=False)
    for key in emptied:
        if isinstance(OmegaConf.select(base, key), DictConfig):
            base = base.copy()
            OmegaConf.update(base, key, {}, merge=False)
    return base


def _merge(base: Any, other: Any, source: str, emptied: Sequence[str] = ()) -> Any:
    try:
        return OmegaConf.merge(_replaced(base, other, emptied), other)
    except ConfigKeyError as err:
        key = err.full_key or str(err.key)
        allowed = _describe_allowed(Config(), key)
        raise ConfigError(f"unknown config key '{key}' (from {source}); {allowed}") from None
    except OmegaConfBaseException as err:
        key = err.full_key or str(err.key)
        msg = str(err).split("\n")[0]
        raise ConfigError(f"bad value for config key '{key}' (from {source}): {msg}") from None


def _is_empty_mapping(node: Any, override: str) -> bool:
    value = OmegaConf.select(node, override.split("=", 1)[0].strip())
    return isinstance(value, DictConfig) and len(value) == 0


def _parse_override(override: str) -> Any:
    """One ``key=value`` override as a config node (the value parsed as YAML)."""
    try:
        node = OmegaConf.from_dotlist([override])
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        first = str(err).splitlines()[0]
        raise ConfigError(
            f"could not parse the override {override!r} ({first}); values are YAML: quote one "
            "that holds brackets or colons inside a list, e.g. \"data.eval_split=[val,'test[:500]']\""
        ) from None
    if glued := _glued_keys(OmegaConf.to_container(node)):
        raise ConfigError(
            f"the override {override!r} reads {glued[0]!r} as one key with no value: YAML needs a space "
            f"after a mapping's colon, e.g. {{{glued[0].replace(':', ': ', 1)}}}"
        )
    return node


def _glued_keys(value: Any) -> list[str]:
    """Keys of a parsed mapping written ``{key:value}`` (YAML reads that as the key ``key:value``, valued
    None): almost always a missing space."""
    if isinstance(value, dict):
        own = [k for k, v in value.items() if isinstance(k, str) and ":" in k and v is None]
        return own + [k for v in value.values() for k in _glued_keys(v)]
    if isinstance(value, list):
        return [k for v in value for k in _glued_keys(v)]
    return []


def merge_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: Config | None = None,
) -> Config:
    """A ``Config`` checked against the schema: defaults < ``base`` < YAML file < ``key=value`` overrides.

    Only the schema is checked here (keys, types, choices, ranges); ``vlfuse.config.load_config`` adds
    the checks that need the task registry.

    Raises:
        ConfigError: for an unknown key, a wrong type or an invalid value, naming the key.
        FileNotFoundError: if ``path`` does not exist.
    """
    cfg = OmegaConf.structured(base if base is not None else Config())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = OmegaConf.load(path)
        refuse_resolvers(OmegaConf.to_container(loaded, resolve=False), str(path))
        cfg = _merge(cfg, loaded, str(path))
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like key=value (e.g. train.lr=3e-4); got {bad}")
    if overrides:
        parsed = [_parse_override(o) for o in overrides]
        emptied = [
            o.split("=", 1)[0].strip()
            for o, node in zip(overrides, parsed, strict=True)
            if _is_empty_mapping(node, o)
        ]
        dotlist = OmegaConf.merge(*parsed)
        refuse_resolvers(OmegaConf.to_container(dotlist, resolve=False), "command line")
        cfg = _merge(cfg, dotlist, "command line", emptied)
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


def section_from_dict(cls: type, values: dict[str, Any], source: str, prefix: str = "") -> Any:
    """Builds a config section (e.g. ``ModelConfig``) from a plain dict read from the file ``source``,
    validated like a config file; nothing in it is interpolated.

    Raises:
        ConfigError: a ``${`` anywhere in ``values`` (``refuse_interpolation``), or a key or value the
            schema refuses, naming the key (under ``prefix``) and ``source``.
    """
    refuse_interpolation(values, source, prefix)
    merged = _merge(OmegaConf.structured(cls()), OmegaConf.create(values), source)
    obj = OmegaConf.to_object(merged)
    validate(obj)
    return obj


def check_combinations(cfg: Config) -> None:
    """Settings that are valid alone but not together, the task's own refusals included.

    Raises:
        ConfigError: naming the keys.
    """
    cfg.model.task = task_name(cfg.model.task)  # a former name (classification, matching) is accepted
    task = get_task(cfg.model.task)
    check_task_fusion(task.name, cfg.model.fusion.name)
    if cfg.train.cache_features and not task.feature_cache:
        served = ", ".join(name for name, cls in TASKS.items() if cls.feature_cache)
        raise ConfigError(
            f"train.cache_features=true is implemented for model.task={served} only (not {task.name}); "
            "turn it off"
        )
    if cfg.train.cache_features and cfg.model.trainable_encoders == "all" and not top_only(cfg.model):
        raise ConfigError(
            "train.cache_features=true needs a frozen encoder or a tower that trains only its last "
            "blocks, but model.trainable_encoders=all trains both whole; use none, image or text, "
            "model.image_encoder.tuning=last_blocks or model.text_encoder.tuning=last_blocks (or lora with "
            "lora.last_blocks), or turn the cache off"
        )
    if cfg.train.cache_features and cfg.data.hflip_prob > 0:
        raise ConfigError(
            "train.cache_features=true cannot be combined with random flips "
            f"(data.hflip_prob={cfg.data.hflip_prob}): cached features are computed once from unaugmented "
            "inputs; set data.hflip_prob=0 or turn the cache off"
        )
    if cfg.data.streaming and not cfg.train.max_steps:
        raise ConfigError(
            "data.streaming=true needs train.max_steps: a stream has no length to count epochs in"
        )
    if cfg.data.streaming and cfg.train.cache_features:
        raise ConfigError(
            "data.streaming=true cannot be combined with train.cache_features=true (the cache stores every "
            "example's features, which a stream too big for the disk cannot); turn one off"
        )
    check_row_parts(cfg)
    task.check_config(cfg)


def check_row_parts(cfg: Config) -> None:
    """``data.holdout`` / ``data.train_subset`` and the evaluation split ``holdout``."""
    if cfg.data.train_subset is not None and cfg.data.train_subset <= 0:
        raise ConfigError(f"invalid value {cfg.data.train_subset!r} for 'data.train_subset'; must be > 0")
    if cfg.data.streaming and (cfg.data.holdout or cfg.data.train_subset is not None):
        raise ConfigError(
            "data.holdout and data.train_subset draw rows of a split loaded whole; data.streaming=true "
            "reads it as a stream (use a sliced split, e.g. data.train_split=train[:1000])"
        )
    splits = cfg.data.eval_split if isinstance(cfg.data.eval_split, list) else [cfg.data.eval_split]
    if HOLDOUT in splits and not cfg.data.holdout:
        raise ConfigError(
            f"data.eval_split names {HOLDOUT!r}, the train split's held-out rows, but data.holdout is 0; "
            "set data.holdout (a row count, or a fraction of at most 1)"
        )


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: Config | None = None,
) -> Config:
    """Builds a validated ``Config``: schema defaults < ``base`` < YAML file < ``key=value`` overrides.

    Args:
        path: a YAML file with any subset of the keys.
        overrides: dotted ``key=value`` strings, values parsed as YAML (``data.eval_split=[testA,testB]``).
        base: defaults to start from instead of the schema's (e.g. a recipe's embedded default).

    Raises:
        ConfigError: for an unknown key, a wrong type, an invalid value or a combination the task
            refuses, naming the key.
        FileNotFoundError: if ``path`` does not exist.
    """
    cfg = merge_config(path, overrides, base)
    check_combinations(cfg)
    return cfg


# The configs that ship inside the package (recipes/configs links here): `vlfuse configs` lists them.
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> dict[str, Path]:
    """Every shipped config by name (``grounding/refcoco_frozen``: its path under ``SHIPPED_CONFIGS``
    without ``.yaml``), sorted."""
    return {
        p.relative_to(SHIPPED_CONFIGS).with_suffix("").as_posix(): p
        for p in sorted(SHIPPED_CONFIGS.rglob("*.yaml"))
    }


def find_config(name: str | Path) -> Path:
    """``name`` as a config file: a file that exists (a path wins), else a shipped config by name
    (``grounding/refcoco_frozen``, with or without ``.yaml``).

    Raises:
        ConfigError: neither a file nor a shipped config (the closest shipped names listed).
    """
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_configs()
    key = str(name).removesuffix(".yaml").removeprefix("recipes/configs/")
    if key in shipped:
        return shipped[key]
    close = difflib.get_close_matches(key, list(shipped), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ConfigError(
        f"no config file {str(name)!r} and no shipped config of that name ({hint}`vlfuse configs` lists them)"
    )


HELP_FLAGS = ("-h", "--help")
PRINT_CONFIG_FLAG = "--print-config"


def parse_cli(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Splits ``[--config FILE] [key=value ...]`` into the file and the overrides."""
    config_path = None
    overrides: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c"):
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file path")
            config_path = args[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}; usage: [--config FILE] [key=value ...]")
        else:
            overrides.append(arg)
        i += 1
    return config_path, overrides


def load_cli_config(
    argv: Sequence[str],
    default_config: str | Path,
    default_overrides: Sequence[str] = (),
    task: str | None = None,
    prog: str | None = None,
) -> Config:
    """A recipe's config from ``[--config FILE] [key=value ...]``: with no ``--config``, ``default_config``
    plus ``default_overrides``; the command line's overrides always apply last.

    Args:
        task: the task the recipe trains; a config of another task is refused.

    Raises:
        ConfigError: as ``load_config``, or for a config of another task (naming both tasks and the recipe
            that trains the config's task).
    """
    args = list(argv)
    if any(a in HELP_FLAGS for a in args):
        print(cli_help(load_config(default_config, default_overrides), default_config, prog))
        raise SystemExit(0)
    print_only = PRINT_CONFIG_FLAG in args
    config_path, overrides = parse_cli([a for a in args if a != PRINT_CONFIG_FLAG])
    if config_path is None:
        cfg = load_config(default_config, [*default_overrides, *overrides])
    else:
        cfg = load_config(find_config(config_path), overrides)
    if task is not None and cfg.model.task != task_name(task):
        source = config_path or default_config
        raise ConfigError(
            f"{get_task(task).recipe} trains model.task={task_name(task)}, but the config ({source} and the "
            f"command line) has model.task={cfg.model.task}: run {get_task(cfg.model.task).recipe} for it"
        )
    if print_only:  # the resolved config, and nothing written or trained
        print(shown_yaml(cfg), end="")
        raise SystemExit(0)
    return cfg


__all__ = [
    "check_combinations",
    "cli_help",
    "find_config",
    "load_cli_config",
    "load_config",
    "merge_config",
    "parse_cli",
    "reference",
    "reference_markdown",
    "section_from_dict",
    "shipped_configs",
]
