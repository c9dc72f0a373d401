"""What is trained in GoT, as NNX filters: the one place the optimizer, the gradients and the tests read it.

GoT's recipe (paper, "Training recipe"): the reasoner is trained with LoRA on its decoder projections,
with the token embeddings, the LM head and the decoder's RMSNorms trained fully; its vision tower is
frozen; the two SSGM projectors and the UNet are trained fully; the VAE is frozen. ``nnx.LoRAParam``
subclasses ``nnx.Param``, so the frozen base weights of adapted projections are
``nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))`` and a bare ``nnx.Param`` filter would train them too.

* ``"lora"`` (:func:`trainable_filter` when the model's options have ``lora_rank > 0``): the recipe above.
* ``"full"`` (no LoRA in the options, e.g. a small demo reasoner trained from scratch): every reasoner
  parameter outside the vision tower, plus projectors and UNet.

Use: ``nnx.Optimizer(model, tx, wrt=trainable_filter(model.options))``,
``nnx.split(model, trainable_filter(opts), ...)``, ``nnx.state(model, frozen_filter(opts))``.
"""

from __future__ import annotations

from flax import nnx

from got_jax.models.options import ModelOptions

MODES = ("lora", "full")

# reasoner paths (under GoT's ``reasoner``) trained fully in LoRA mode
FULLY_TRAINED_IN_LORA = ("embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm", "norm")


def _under(part: str, *names: str):
    """Variables whose path starts with GoT part ``part`` and contains each of ``names``."""

    def match(path, _value) -> bool:
        keys = [str(getattr(p, "key", p)) for p in path]
        return bool(keys) and keys[0] == part and all(n in keys for n in names)

    return match


def _reasoner_fully_trained_in_lora():
    """Embeddings, LM head (absent when tied), decoder RMSNorms and the final norm, not the vision tower."""

    def match(path, _value) -> bool:
        keys = [str(getattr(p, "key", p)) for p in path]
        if len(keys) < 2 or keys[0] != "reasoner" or keys[1] == "visual":
            return False
        return any(k in FULLY_TRAINED_IN_LORA for k in keys[1:-1])

    return match


def base_weights():
    """Parameters that are not LoRA adapters (``nnx.LoRAParam`` subclasses ``nnx.Param``)."""
    return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def trainable_filter(options: ModelOptions | str):
    """The filter of GoT's trainable parameters for ``options`` (or a mode ``"lora"`` / ``"full"``)."""
    mode = options if isinstance(options, str) else options.reasoner_training()
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}; known {MODES}")
    fully = nnx.Any(_under("projector"), _under("pooled_projector"), _under("unet"))
    if mode == "lora":
        reasoner = nnx.Any(nnx.All(nnx.LoRAParam, _under("reasoner")),
                           nnx.All(base_weights(), _reasoner_fully_trained_in_lora()))
    else:
        reasoner = nnx.All(_under("reasoner"), nnx.Not(_under("reasoner", "visual")))
    return nnx.All(nnx.Param, nnx.Any(reasoner, nnx.All(base_weights(), fully)))


def frozen_filter(options: ModelOptions | str):
    """Every parameter that :func:`trainable_filter` leaves out (vision tower, VAE, LoRA base weights...)."""
    return nnx.All(nnx.Param, nnx.Not(trainable_filter(options)))
