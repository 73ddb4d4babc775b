from .chunk import gla_chunked
from .interface import gated_linear_attention
from .naive import gla_recurrent

__all__ = ["gated_linear_attention", "gla_chunked", "gla_recurrent"]
