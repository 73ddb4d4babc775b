from .interface import mixed_attention
from .reference import mixed_attention_reference

__all__ = ["mixed_attention", "mixed_attention_reference"]
