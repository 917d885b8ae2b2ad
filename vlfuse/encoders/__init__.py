from vlfuse.encoders.base import EncoderOutput
from vlfuse.encoders.image import ImageEncoder
from vlfuse.encoders.text import TextEncoder, resolve_text_encoder_name

__all__ = ["EncoderOutput", "ImageEncoder", "TextEncoder", "resolve_text_encoder_name"]
