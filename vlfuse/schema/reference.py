"""The config's documentation, read from the schema itself: each key's default and the comment above its
field (``field_docs``), for a recipe's ``--help`` (``cli_help``) and the docs' config reference
(``reference_markdown``, ``docs/config-reference.md``)."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

from vlfuse.schema import Config

REFERENCE_HEADER = """# Config reference

Every key of the config, its default and its documentation, generated from the schema
(`vlfuse/schema/`, the comment above each field) by `vlfuse.config.reference_markdown()`;
`tests/test_docs.py` fails when this page and the schema disagree. The defaults are the schema's; each
recipe's default config sets some of them (`python recipes/<recipe>.py --help` shows that recipe's own).
Values are YAML on the command line: `key=value`, `key=[a,b]`, `key={a: 1}`, `key=null`.
"""


def reference_markdown(defaults: Config | None = None) -> str:
    """The config reference page: one table per section with each key, its default and its
    documentation (``docs/config-reference.md``)."""
    lines = [REFERENCE_HEADER]
    section = None
    for key, value, doc in reference(defaults or Config()):
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines += ["", f"## {section}", "", "| key | default | meaning |", "|---|---|---|"]
        escaped = doc.replace("|", "\\|")
        lines.append(f"| `{key}` | `{_inline(value)}` | {escaped} |")
    return "\n".join(lines) + "\n"


def _inline(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def cli_help(defaults: Config, default_config: str | Path, prog: str | None = None) -> str:
    """A recipe's ``--help``: its options, then every config key with this recipe's default and the
    schema's documentation of it. ``prog``: the command as typed (default: the script's name)."""
    prog = prog or (Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "recipe")
    lines = [
        f"usage: {prog} [--config FILE] [key=value ...] [--print-config] [-h]",
        "",
        f"  --config FILE    a YAML file of settings, or a shipped config's name (grounding/refcoco_frozen;"
        f" `vlfuse configs` lists them) (default: {default_config})",
        "  key=value        a dotted override, parsed as YAML (model.trainable_encoders=all train.lr=3e-4)",
        "  --print-config   print the resolved config (after --config and overrides) and exit (no training)",
        "  -h, --help       show this help and exit",
        "",
        "config keys (key = this recipe's default):",
    ]
    section = None
    for key, value, doc in reference(defaults):
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines += ["", f"{section}:"]
        lines.append(f"  {key} = {_inline(value)}")
        lines += [f"      {part}" for part in textwrap.wrap(doc, 96)]
    return "\n".join(lines)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: the comment lines right above it in the class's source (the schema
    documents itself there, one source of truth for ``--help`` and the docs)."""
    docs: dict[str, str] = {}
    comment: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            comment.append(text.lstrip("#").strip())
        elif ":" in text and not text.startswith(('"', "'", "@")):
            name = text.split(":", 1)[0].strip()
            if name.isidentifier():
                docs[name] = " ".join(comment)
            comment = []
        else:
            comment = []
    return docs


def reference(cfg: Any, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every leaf key of ``cfg`` (a config tree) as ``(dotted key, value, documentation)``, in schema
    order."""
    rows: list[tuple[str, Any, str]] = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows += reference(value, key + ".")
        else:
            rows.append((key, value, docs.get(f.name, "")))
    return rows
