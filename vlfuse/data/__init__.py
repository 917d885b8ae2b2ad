"""Data: loading by ``data.dataset``, the shared example base, label preprocessing (box formats and ops,
VQA answers), box-aware transforms, the embedded dataset and the frozen-feature cache. Each task's own
dataset lives in its task module (``vlfuse.tasks``)."""

from vlfuse.data import shapes
from vlfuse.data.boxes import clip_box, convert_boxes, to_absolute_xyxy
from vlfuse.data.loading import DataError, available_splits, load_image, load_split

__all__ = [
    "DataError",
    "available_splits",
    "clip_box",
    "convert_boxes",
    "load_image",
    "load_split",
    "shapes",
    "to_absolute_xyxy",
]
