"""vlfuse: vision-language fusion over timm and transformers encoders, frozen or end-to-end."""

from vlfuse.config import Config, ConfigError, load_config
from vlfuse.model import VLFuseModel

__all__ = ["Config", "ConfigError", "VLFuseModel", "load_config"]
__version__ = "0.1.0"
