"""Pure JAX functions: attention, Grassmann mixing and their statistics.

This subpackage imports JAX and NumPy only -- never Flax -- so it can be
dropped into any JAX code base.
"""

from grassjax.functional.attention import (
    attention_logits,
    causal_average,
    causal_mask,
    scaled_dot_product_attention,
)
from grassjax.functional.grassmann import (
    grassmann_mix,
    grassmann_mix_reference,
    num_plucker_coords,
    offset_validity,
    plucker,
    plucker_norm,
)

__all__ = [
    "attention_logits",
    "causal_average",
    "causal_mask",
    "grassmann_mix",
    "grassmann_mix_reference",
    "num_plucker_coords",
    "offset_validity",
    "plucker",
    "plucker_norm",
    "scaled_dot_product_attention",
]

from grassjax.functional.decode import (
    attention_step,
    grassmann_mix_step,
    grassmann_window_from_states,
    grassmann_window_size,
    init_grassmann_window,
    push_grassmann_window,
)

__all__ += [
    "attention_step",
    "grassmann_mix_step",
    "grassmann_window_from_states",
    "grassmann_window_size",
    "init_grassmann_window",
    "push_grassmann_window",
]

from grassjax.functional.local import (
    causal_conv_step,
    causal_depthwise_conv,
    conv_window_from_states,
    init_conv_window,
    init_kv_window,
    kv_window_from_states,
    sliding_window_attention,
    sliding_window_attention_step,
    sliding_window_mask,
)

__all__ += [
    "causal_conv_step",
    "causal_depthwise_conv",
    "conv_window_from_states",
    "init_conv_window",
    "init_kv_window",
    "kv_window_from_states",
    "sliding_window_attention",
    "sliding_window_attention_step",
    "sliding_window_mask",
]
