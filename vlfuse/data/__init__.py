"""Data: loading by ``data.dataset``, column mapping, box formats, transforms, the embedded dataset and the
frozen-feature cache."""

from vlfuse.data import shapes
from vlfuse.data.grounding import GroundingCollator, GroundingDataset, clip_box, to_absolute_xyxy
from vlfuse.data.loading import DataError, available_splits, load_image, load_split

__all__ = [
    "DataError",
    "GroundingCollator",
    "GroundingDataset",
    "available_splits",
    "clip_box",
    "load_image",
    "load_split",
    "shapes",
    "to_absolute_xyxy",
]
