"""Reading and writing checkpoint tensors, and the declarative name mapping used both ways."""

from got_jax.checkpoint.errors import CheckpointError
from got_jax.checkpoint.mapping import (CONV2D, CONV3D, IDENTITY, LINEAR, Hook, MappingTable, Rule,
                                        export_state, load_into_abstract)
from got_jax.checkpoint.tensor_io import (TensorSource, open_bin, open_safetensors, open_tensor_folder,
                                          write_safetensors)

__all__ = [
    "CheckpointError", "Hook", "Rule", "MappingTable", "IDENTITY", "LINEAR", "CONV2D", "CONV3D",
    "load_into_abstract", "export_state", "TensorSource", "open_safetensors", "open_bin",
    "open_tensor_folder", "write_safetensors",
]
