"""Production sharding: the logical-axis rules every entry point passes to the library.

Parameters and activations carry *logical* axis names (``got_jax.sharding.LOGICAL_AXES``); the
rules below map each name to mesh axes of the ``(data, fsdp, tensor)`` mesh that entry points build
with ``got_jax.sharding.make_mesh(config.mesh_shape)``. Library code never picks rules itself: every
function that takes a ``mesh`` also needs ``rules`` (from a config: ``configs.sample``'s ``rules``
field, the training config, or :data:`RULES` directly in tests).

A name mapped to ``None`` is replicated. A mesh axis is used at most once per array, and a dimension
that the mesh axes do not divide stays replicated (``got_jax.sharding.logical_to_spec``).
"""

from __future__ import annotations

# Default mesh: all devices on ``fsdp`` (``-1`` takes the remaining devices).
MESH_SHAPE = (1, -1, 1)

RULES = (
    # Activations: batch split over every data-parallel axis (pure data parallelism and FSDP both
    # give each device its own examples); length and width replicated, so no collective is needed
    # inside a layer besides the tensor-parallel ones.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    # Attention heads of activations follow the head-sharded q/k/v weights (Megatron-style TP).
    ("activation_heads", "tensor"),
    # Weights: FSDP (ZeRO-3) over the model width, gathered per layer in the forward pass.
    ("embed", "fsdp"),
    # Tensor parallelism over the feed-forward width, query heads and vocabulary (column/row
    # parallel matmuls; 151k-row embedding and logits split over ``tensor``).
    ("mlp", "tensor"),
    ("heads", "tensor"),
    # Qwen2.5-VL has few KV heads (GQA, e.g. 4): replicate rather than split them unevenly.
    ("kv_heads", None),
    ("kv", None),
    ("vocab", "tensor"),
    # UNet / VAE convolutions: output channels over fsdp; input channels and the kernel window
    # replicated (a conv's input-channel split would need a reduction per conv).
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("conv_spatial", None),
    # Norm scales / biases are tiny: replicated.
    ("norm", None),
    # LoRA rank: not listed, so replicated (adapters are small).
)
