"""GPU kernels for prefix-sharing attention (see kernels/README.md).

Importing this package imports Triton.  On a machine without a GPU set
``TRITON_INTERPRET=1`` *before* the import to run the kernels in Triton's CPU
interpreter.  :mod:`kernels.reference` needs only PyTorch.
"""

from .prefix_attention import merge_attention_states, prefix_shared_decode_attention
from .prefix_groups import PrefixGroupPlan, grouped_decode_attention, plan_prefix_groups

__all__ = [
    "prefix_shared_decode_attention",
    "merge_attention_states",
    "grouped_decode_attention",
    "plan_prefix_groups",
    "PrefixGroupPlan",
]
