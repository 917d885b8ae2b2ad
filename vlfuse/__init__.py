"""vlfuse: vision-language fusion over timm and transformers encoders, frozen or end-to-end."""

from vlfuse.config import load_config
from vlfuse.model import VLFuseModel
from vlfuse.schema import Config, ConfigError
from vlfuse.tasks import TASKS, Task, get_task

__all__ = ["TASKS", "Config", "ConfigError", "Task", "VLFuseModel", "get_task", "load_config"]
__version__ = "0.1.0"
