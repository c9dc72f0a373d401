"""How a model is built and run: dtypes, attention kernel, rematerialisation and LoRA, in one frozen value.

Every model of got-jax (:class:`~got_jax.got.model.GoT`, the Qwen2.5-VL reasoner and its vision tower, the
SDXL UNet and VAE, and their layers) takes one :class:`ModelOptions` instead of ``dtype`` / ``param_dtype`` /
``attention_impl`` keyword arguments threaded by hand. The default is inference as released: float32
everywhere, the ``"auto"`` attention (exact XLA on CPU), no remat, no LoRA.

* ``dtype``: compute dtype (activations, matmul inputs); ``param_dtype``: storage dtype of parameters
  (float32 master weights with ``dtype=bfloat16`` for mixed-precision training).
* ``attention_impl``: the attention kernel of every model, by name (:mod:`got_jax.models.attention`):
  ``"auto"`` (default: cuDNN fused attention on GPU, Pallas flash attention on TPU, the exact XLA path
  elsewhere), ``"xla"``, ``"cudnn"``, ``"pallas"``, or an SDXL kernel added with
  :func:`got_jax.models.sdxl.register_attention` (the reasoner then uses ``"xla"``).
* ``remat``: ``"none"``, ``"full"`` (recompute the whole block in the backward pass) or ``"dots"`` (save
  the results of matmuls without batch dimensions, recompute the rest:
  ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``). Applied with ``nnx.remat`` to the reasoner's
  decoder layers, the vision blocks and the UNet's transformer and resnet blocks (:func:`remat_call`).
* ``conv_weight_grad``: how the SDXL convolutions' kernel gradients are computed: ``"auto"`` (one matmul per
  kernel tap on the CPU, where XLA's kernel-gradient convolution is slow; XLA's convolution elsewhere),
  ``"xla"`` or ``"matmul"`` (:mod:`got_jax.models.sdxl.conv`). Forward values never change.
* LoRA (``lora_rank > 0``): trainable low-rank adapters on the reasoner's decoder projections named in
  ``lora_targets`` (PEFT's module names; the short names ``q, k, v, o, gate, up, down`` are accepted).
  Output ``base(x) + scale * B(A(dropout(x)))`` with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)``
  with ``use_rslora``), as PEFT. ``lora_rank=0`` builds the model without adapters (inference unchanged).

:meth:`ModelOptions.reasoner_training` says how the reasoner is trained (``"lora"`` when adapters exist,
``"full"`` otherwise); :mod:`got_jax.train.trainable` turns that into the optimizer's filter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REMAT_POLICIES = ("none", "full", "dots")
# PEFT's module names of the reasoner's decoder projections (= our module names)
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SHORT = {n.split("_")[0]: n for n in DECODER_PROJECTIONS}


def _dtype(value, what: str) -> np.dtype:
    try:
        return np.dtype(jnp.dtype(value))
    except TypeError:
        raise ValueError(f"ModelOptions.{what}: not a dtype: {value!r}") from None


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Build / run options shared by all got-jax models (see the module docstring)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"
    remat: str = "none"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DECODER_PROJECTIONS
    use_rslora: bool = False
    conv_weight_grad: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "dtype", _dtype(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", _dtype(self.param_dtype, "param_dtype"))
        if self.conv_weight_grad not in ("auto", "xla", "matmul"):
            raise ValueError(f"ModelOptions.conv_weight_grad must be 'auto', 'xla' or 'matmul', got "
                             f"{self.conv_weight_grad!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelOptions.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        rank = 0 if self.lora_rank is None else int(self.lora_rank)
        if rank < 0:
            raise ValueError(f"ModelOptions.lora_rank must be >= 0 (0 = no LoRA), got {self.lora_rank}")
        object.__setattr__(self, "lora_rank", rank)
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"ModelOptions.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        targets = (self.lora_targets,) if isinstance(self.lora_targets, str) else tuple(self.lora_targets)
        targets = tuple(_SHORT.get(t, t) for t in targets)
        unknown = [t for t in targets if t not in DECODER_PROJECTIONS]
        if unknown:
            raise ValueError(f"ModelOptions.lora_targets: unknown modules {unknown}; the reasoner's decoder has "
                             f"{DECODER_PROJECTIONS} (or short names {tuple(_SHORT)})")
        if rank and not targets:
            raise ValueError("ModelOptions: lora_rank > 0 but lora_targets is empty")
        object.__setattr__(self, "lora_targets", targets)
        object.__setattr__(self, "lora_alpha", float(self.lora_alpha))
        object.__setattr__(self, "lora_dropout", float(self.lora_dropout))

    @property
    def lora_scale(self) -> float:
        """``alpha / r`` (PEFT's default) or ``alpha / sqrt(r)`` (rsLoRA); 0 without LoRA."""
        if not self.lora_rank:
            return 0.0
        return self.lora_alpha / (self.lora_rank ** 0.5 if self.use_rslora else self.lora_rank)

    def lora_on(self, module_name: str) -> bool:
        """Whether the decoder projection ``module_name`` (e.g. ``"q_proj"``) gets an adapter."""
        return bool(self.lora_rank) and module_name in self.lora_targets

    def reasoner_training(self) -> str:
        """``"lora"`` (adapters trained, base frozen) when ``lora_rank > 0``, else ``"full"``."""
        return "lora" if self.lora_rank else "full"

    def replace(self, **changes) -> "ModelOptions":
        return dataclasses.replace(self, **changes)

    def without_lora(self) -> "ModelOptions":
        """The same options with no adapters (for a merged model)."""
        return dataclasses.replace(self, lora_rank=0)

    @classmethod
    def make(cls, options: "ModelOptions | None" = None, **legacy) -> "ModelOptions":
        """``options`` or the default, overridden by non-None legacy keywords (``dtype=...`` etc.)."""
        opts = options if options is not None else cls()
        changes = {k: v for k, v in legacy.items() if v is not None}
        return dataclasses.replace(opts, **changes) if changes else opts


DEFAULT_OPTIONS = ModelOptions()


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy of a remat option (None = save nothing, recompute all)."""
    if name == "full":
        return None
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"no checkpoint policy for remat={name!r}")


def remat_call(options: ModelOptions, fn: Callable, module: nnx.Module, *args):
    """``fn(module, *args)``, under ``nnx.remat`` with the options' policy unless ``remat == "none"``.

    Non-array arguments (None, Python ints) must be bound into ``fn`` by the caller (closure); ``args``
    are the arrays (pytrees of arrays) the block differentiates through.
    """
    if options.remat == "none":
        return fn(module, *args)
    return nnx.remat(fn, policy=remat_policy(options.remat), prevent_cse=True)(module, *args)
