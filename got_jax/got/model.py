"""The GoT model: Qwen2.5-VL reasoner + Semantic-Spatial Guidance Module + SDXL UNet / VAE.

:class:`GoT` holds the five parts under the names of a converted checkpoint's parameter tree
(``reasoner``, ``projector``, ``pooled_projector``, ``unet``, ``vae``; loaders in
:mod:`got_jax.got.checkpoint`), built from the converted folder's ``config.json``. Its
methods are the pure, jit-able pieces of the released ``GenCot.generate``:

* :meth:`GoT.semantic_guidance` - ``projector(H)``, the null context ``projector(zeros)`` and the
  pooled ``text_embeds = mean_over_tokens(pooled_projector(H))`` from the 64 query-token hidden states;
* :meth:`GoT.encode_mode` - VAE distribution mode of images in ``[-1, 1]`` (no scaling factor, as released);
* :meth:`GoT.layout_latents` - the mean of the modes of a prompt's layout canvases (one per box);
* :meth:`GoT.guided_noise` - one UNet call on the batch of four guidance branches and the four-way
  classifier-free combination ``e = e4 + g*(e2-e3) + c*(e1-e2) + i*(e3-e4)``;
* :meth:`GoT.decode` - latents -> images in ``[0, 1]`` (``latents / scaling_factor``, VAE, ``x/2+0.5``).

All images are NHWC. The sampling loop itself lives in :mod:`got_jax.got.pipeline`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from got_jax import sharding
from got_jax.checkpoint import orbax_io
from got_jax.models import sdxl
from got_jax.models.options import DEFAULT_OPTIONS, ModelOptions
from got_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from got_jax.models.qwen2_5_vl.lora import materialize
from got_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

PARTS = ("reasoner", "projector", "pooled_projector", "unet", "vae")  # attribute names = checkpoint parts


def make_projector(in_features: int, out_features: int, *, options: ModelOptions = DEFAULT_OPTIONS,
                   rngs: nnx.Rngs) -> nnx.Linear:
    """An SSGM projector: ``nnx.Linear`` with logical names (embed, mlp) on the kernel."""
    return nnx.Linear(in_features, out_features, dtype=options.dtype, param_dtype=options.param_dtype, rngs=rngs,
                      kernel_init=sharding.param_init(nnx.initializers.lecun_normal(), "embed", "mlp"),
                      bias_init=sharding.param_init(nnx.initializers.zeros_init(), "mlp"))


@dataclasses.dataclass(frozen=True)
class GoTConfig:
    """Typed view of a converted GoT folder's ``config.json`` (the dict is kept in ``raw``)."""

    reasoner: Qwen2_5_VLConfig
    unet: sdxl.UNetConfig
    vae: sdxl.VAEConfig
    context_dim: int  # projector output = UNet cross-attention dim (2048)
    pooled_dim: int  # pooled projector output = SDXL text_embeds dim (1280)
    scheduler: Mapping[str, Any] = dataclasses.field(compare=False)  # not part of hash / eq (a dict)
    raw: Mapping[str, Any] = dataclasses.field(compare=False)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "GoTConfig":
        missing = [k for k in ("reasoner", "unet", "vae") if k not in cfg]
        if missing:
            raise ValueError(f"GoT config lacks sections {missing} (has {sorted(cfg)}); convert the weights with "
                             "convert/got_checkpoint.py")
        reasoner = Qwen2_5_VLConfig.from_hf_config(cfg["reasoner"])
        unet = sdxl.UNetConfig.from_diffusers(dict(cfg["unet"]))
        vae = sdxl.VAEConfig.from_diffusers(dict(cfg["vae"]))
        hidden = reasoner.text.hidden_size
        proj = cfg.get("projectors", {})
        context_dim = int(proj.get("projector", {}).get("out_features", unet.cross_attention_dim))
        pooled_dim = int(proj.get("pooled_projector", {}).get(
            "out_features", unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim))
        for name in ("projector", "pooled_projector"):
            if name in proj and int(proj[name]["in_features"]) != hidden:
                raise ValueError(f"config projectors.{name}.in_features={proj[name]['in_features']} but the reasoner's "
                                 f"hidden_size is {hidden}")
        if context_dim != unet.cross_attention_dim:
            raise ValueError(f"projector output {context_dim} != UNet cross_attention_dim {unet.cross_attention_dim}")
        if unet.in_channels != 3 * vae.latent_channels:
            raise ValueError(f"GoT's UNet takes [noisy, reference, layout] latents: in_channels must be "
                             f"3 * {vae.latent_channels}, config has {unet.in_channels}")
        return cls(reasoner, unet, vae, context_dim, pooled_dim, dict(cfg.get("scheduler") or {}), dict(cfg))


class GoT(nnx.Module):
    """Reasoner, the two SSGM projectors, UNet and VAE (attribute names = checkpoint parts)."""

    def __init__(self, config: GoTConfig | Mapping[str, Any], *, options: ModelOptions = DEFAULT_OPTIONS,
                 rngs: nnx.Rngs):
        if not isinstance(config, GoTConfig):
            config = GoTConfig.from_dict(config)
        self.config = config
        self.options = options
        self.dtype = options.dtype
        hidden = config.reasoner.text.hidden_size
        self.reasoner = Qwen2_5_VLForConditionalGeneration(config.reasoner, options=options, rngs=rngs)
        self.projector = make_projector(hidden, config.context_dim, options=options, rngs=rngs)
        self.pooled_projector = make_projector(hidden, config.pooled_dim, options=options, rngs=rngs)
        self.unet = sdxl.UNet2DConditionModel(config.unet, options=options, rngs=rngs)
        self.vae = sdxl.AutoencoderKL(config.vae, options=options, rngs=rngs)

    @classmethod
    def from_checkpoint(cls, folder: str, *, mesh=None, rules=None, options: ModelOptions | None = None,
                        lora_seed: int = 0) -> "GoT":
        """Builds the model abstractly and restores a converted folder into it (sharded on ``mesh``).

        ``options`` default to float32 compute with the folder's stored ``param_dtype``. With LoRA in the
        options, the adapters (absent from converted folders) start fresh from ``lora_seed``: A random, B zero,
        so the model computes exactly the restored base model.
        """
        sharding.require_rules("GoT.from_checkpoint", mesh, rules)
        raw = orbax_io.read_config(folder)
        missing = [p for p in PARTS if p not in raw.get("parts", ())]
        if missing:
            raise ValueError(f"{folder}: a GoT checkpoint needs parts {list(PARTS)}; missing {missing}")
        if options is None:
            options = ModelOptions(param_dtype=raw.get("param_dtype") or "float32")
        abstract = nnx.eval_shape(lambda: cls(raw, options=options, rngs=nnx.Rngs(0)))
        # the parts' abstract modules are the abstract GoT's own (adapters are not restored: not stored)
        base = (nnx.eval_shape(lambda: cls(raw, options=options.without_lora(), rngs=nnx.Rngs(0)))
                if options.lora_rank else abstract)
        builders = {p: (lambda _cfg, p=p: getattr(base, p)) for p in PARTS}
        params, _ = orbax_io.load_checkpoint(folder, parts=builders, mesh=mesh, rules=rules,
                                             dtype=options.param_dtype, config=raw)
        graphdef, state = nnx.split(abstract)
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state)
        if options.lora_rank:
            model = materialize(model, jax.random.key(lora_seed), mesh=mesh, rules=rules)
        return model

    # --- SSGM ------------------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        return self.config.vae.latent_channels

    @property
    def vae_scale(self) -> int:
        return self.vae.downscale

    def semantic_guidance(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Query-token hidden states (B, 64, D) -> (context, null context, pooled text_embeds)."""
        hidden = hidden.astype(self.dtype)
        context = self.projector(hidden)
        null = self.projector(jnp.zeros_like(hidden))
        pooled = jnp.mean(self.pooled_projector(hidden), axis=1)
        return context, null, pooled

    def encode_mode(self, images: jax.Array) -> jax.Array:
        """Images (B, H, W, 3) in [-1, 1] -> VAE distribution mode (B, H/8, W/8, 4), unscaled (as released)."""
        return self.vae.encode(images.astype(self.dtype)).mode()

    def encode_mode_each(self, images: jax.Array) -> jax.Array:
        """:meth:`encode_mode` one image at a time (``lax.map``): the released batch-1 encodes, and memory
        bounded by one image at 1024 px whatever the batch."""
        return jax.lax.map(lambda im: self.encode_mode(im[None])[0], images)

    def layout_latents(self, canvases: jax.Array, box_mask: jax.Array) -> jax.Array:
        """Spatial guidance: canvases (B, N, H, W, 3) in [-1, 1] with ``box_mask`` (B, N) marking real
        canvases -> mean over each prompt's canvases of their VAE modes (B, H/8, W/8, 4), float32 (the mean is
        taken in float32 whatever the compute dtype)."""
        b, n = canvases.shape[:2]
        modes = self.encode_mode_each(canvases.reshape((b * n,) + canvases.shape[2:])).astype(jnp.float32)
        modes = modes.reshape((b, n) + modes.shape[1:])
        w = box_mask.astype(modes.dtype)[:, :, None, None, None]
        return jnp.sum(modes * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)

    def unet_input(self, noisy: jax.Array, reference: jax.Array, layout: jax.Array) -> jax.Array:
        """The UNet's 12-channel input: ``[noisy, reference, layout]`` latents (each (B, h, w, 4)) concatenated
        on the channel axis in that order, in the compute dtype. The one place that builds it: sampling
        (:meth:`guided_noise`) and the training loss both call this. Zero ``reference`` / ``layout`` are the
        dropped conditions of classifier-free guidance."""
        if not noisy.shape == reference.shape == layout.shape:
            raise ValueError(f"unet_input: noisy {noisy.shape}, reference {reference.shape} and layout "
                             f"{layout.shape} latents must have the same shape")
        if noisy.shape[-1] != self.latent_channels:
            raise ValueError(f"unet_input: latents have {noisy.shape[-1]} channels, the VAE has "
                             f"{self.latent_channels} (NHWC expected)")
        inp = jnp.concatenate([noisy, reference, layout], axis=-1).astype(self.dtype)
        return sharding.constrain(inp, "activation_batch", None, None, None)

    def guided_noise(self, latents_in: jax.Array, t, context, null_context, pooled, reference, layout, time_ids,
                     scales: jax.Array) -> jax.Array:
        """Four-way classifier-free guidance, one UNet call on a batch of 4B.

        ``latents_in`` (B, h, w, 4) is the scheduler-scaled noisy latent; ``reference`` / ``layout``
        (B, h, w, 4); ``context`` / ``null_context`` (B, 64, C); ``pooled`` (B, P) is shared by all
        four branches; ``time_ids`` (B, 6); ``scales`` (B, 3) = (g text, c layout, i reference) per
        prompt. Branches: (1) ctx, G_r, G_s; (2) ctx, G_r, 0; (3) null, G_r, 0; (4) null, 0, 0.
        """
        zeros = jnp.zeros_like(layout)
        x = jnp.concatenate([latents_in] * 4, axis=0)
        ref = jnp.concatenate([reference, reference, reference, zeros], axis=0)
        lay = jnp.concatenate([layout, zeros, zeros, zeros], axis=0)
        ctx = jnp.concatenate([context, context, null_context, null_context], axis=0)
        inp = self.unet_input(x, ref, lay)
        e = self.unet(inp, t, ctx, jnp.concatenate([pooled] * 4, axis=0), jnp.concatenate([time_ids] * 4, axis=0))
        e1, e2, e3, e4 = jnp.split(e.astype(jnp.float32), 4, axis=0)
        g, c, i = (scales[:, k, None, None, None].astype(jnp.float32) for k in range(3))
        return e4 + g * (e2 - e3) + c * (e1 - e2) + i * (e3 - e4)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Latents (B, h, w, 4) -> images (B, H, W, 3) float32 in [0, 1]."""
        img = self.vae.decode((latents / self.config.vae.scaling_factor).astype(self.dtype))
        return jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
