"""What the study's report compares: a mode, or with ``study.encoders`` a pair of towers and a mode,
written ``<encoders>/<mode>`` (a cell's ``label``)."""

from __future__ import annotations


def mode_of(label: str) -> str:
    """The mode part of a label (``<encoders>/<mode>`` or ``<mode>``)."""
    return label.rpartition("/")[2]


def frozen_label(label: str) -> str:
    """The label of the frozen mode (``none``) with the same towers as ``label``."""
    encoders = label.rpartition("/")[0]
    return f"{encoders}/none" if encoders else "none"
