"""Pure JAX functions: attention, Grassmann mixing, the local controls, their one-position
(streaming) `*_step` functions and their statistics. Imports JAX and NumPy only -- never Flax --
so it drops into any JAX code base.
"""

from grassjax.functional.attention import (
    attention_logits,
    attention_step,
    causal_average,
    causal_mask,
    scaled_dot_product_attention,
)
from grassjax.functional.grassmann import (
    GrassmannWeights,
    grassmann_mix,
    grassmann_mix_reference,
    grassmann_mix_step,
    grassmann_window_from_states,
    grassmann_window_size,
    init_grassmann_window,
    num_plucker_coords,
    offset_validity,
    plucker,
    plucker_norm,
    push_grassmann_window,
)
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

__all__ = [
    "GrassmannWeights",
    "attention_logits",
    "attention_step",
    "causal_average",
    "causal_conv_step",
    "causal_depthwise_conv",
    "causal_mask",
    "conv_window_from_states",
    "grassmann_mix",
    "grassmann_mix_reference",
    "grassmann_mix_step",
    "grassmann_window_from_states",
    "grassmann_window_size",
    "init_conv_window",
    "init_grassmann_window",
    "init_kv_window",
    "kv_window_from_states",
    "num_plucker_coords",
    "offset_validity",
    "plucker",
    "plucker_norm",
    "push_grassmann_window",
    "scaled_dot_product_attention",
    "sliding_window_attention",
    "sliding_window_attention_step",
    "sliding_window_mask",
]
