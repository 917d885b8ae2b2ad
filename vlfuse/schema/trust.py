"""What vlfuse does with values it did not get from the caller: data read from files someone else may
have written (a saved folder, a checkpoint, a cache folder, a shared study storage) is never interpolated,
and secrets in storage URLs are masked wherever a URL is printed or written.

- ``refuse_interpolation``: a ``${...}`` anywhere in values read from a file is an error naming the key and
  the file (OmegaConf would otherwise resolve it: ``${oc.env:HF_TOKEN}`` reads the loader's environment).
- ``refuse_resolvers``: in the user's own YAML and overrides, ``${other.key}`` between config keys stays
  allowed, but a resolver (``${oc.env:...}``, ``${oc.decode:...}``, any ``${name:...}``) is refused, so no
  environment value reaches ``config.yaml``, ``summary.json``, a saved model, its card or a tracker
  without the user writing it there literally.
- ``mask_url``: a URL with its user name, password and secret query parameters replaced by ``***``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from vlfuse.schema.fields import ConfigError

# A resolver call inside an interpolation: ``${name:`` or ``${dotted.name:`` (OmegaConf's grammar: a
# resolver name is dotted identifiers followed by a colon; a key interpolation has no colon).
_RESOLVER = re.compile(r"\$\{\s*[A-Za-z_][\w.]*\s*:")
# Query parameters of a storage URL that carry a secret (libpq's, SQLAlchemy drivers', tokens).
SECRET_QUERY_KEYS = ("password", "sslpassword", "passwd", "pwd", "token", "secret", "key", "sslkey")


def leaves(values: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of nested dicts and lists as ``(dotted key, value)``; a key holding ``${`` is a leaf
    too (keys are checked as well as values)."""
    if isinstance(values, dict):
        for key, value in values.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(key, str) and "${" in key:
                yield dotted, key
            yield from leaves(value, dotted)
    elif isinstance(values, (list, tuple)):
        for i, value in enumerate(values):
            yield from leaves(value, f"{prefix}[{i}]")
    else:
        yield prefix, values


def refuse_interpolation(values: Any, source: str, prefix: str = "") -> None:
    """Raises if any key or string value of ``values`` (read from ``source``, a file) holds ``${``.

    Raises:
        ConfigError: naming the first such key and the file.
    """
    for key, value in leaves(values, prefix):
        if isinstance(value, str) and "${" in value:
            raise ConfigError(
                f"{source}: {key or 'a value'} holds an interpolation ({_short(value)}): values read from a "
                "file are data and are never resolved; this file was not written by vlfuse, or was edited"
            )


def refuse_resolvers(values: Any, source: str) -> None:
    """Raises if a string of ``values`` (the user's YAML or overrides) calls an OmegaConf resolver.

    Raises:
        ConfigError: naming the key, the source and what to write instead.
    """
    for key, value in leaves(values):
        if isinstance(value, str) and _RESOLVER.search(value):
            raise ConfigError(
                f"config key '{key}' (from {source}) calls a resolver ({_short(value)}): vlfuse resolves "
                "only ${other.key} between config keys, so that no environment value or secret is written "
                "into config.yaml, summary.json, a saved model or a tracker; write the value itself (a token "
                "belongs in HF_TOKEN or `hf auth login`, never in a config)"
            )


def _short(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def mask_url(url: str) -> str:
    """``url`` as it may be printed or saved: user name and password, and query parameters that carry a
    secret (``password=``, ``sslpassword=``, ``token=``...), replaced by ``***``; a string that is no URL
    is returned as ``<storage>`` when it could hold a secret (an ``@`` or a ``=``) and as is otherwise."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a malformed netloc)
    except ValueError:
        return "<storage>" if ("@" in url or "=" in url) else url
    netloc = parts.netloc
    if "@" in netloc:
        host = netloc.rsplit("@", 1)[1]
        netloc = f"***@{host}" if parts.password is None else f"***:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        pairs = [(k, "***" if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs]
        query = urlencode(pairs, safe="*/:")
    if "://" not in url:
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    # Rebuilt by hand: urlunsplit drops the empty host of ``sqlite:////abs/path``.
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


__all__ = ["SECRET_QUERY_KEYS", "leaves", "mask_url", "refuse_interpolation", "refuse_resolvers"]
