from .chunk import gated_delta_chunked
from .interface import gated_delta_rule
from .naive import gated_delta_recurrent

__all__ = ["gated_delta_rule", "gated_delta_chunked", "gated_delta_recurrent"]
