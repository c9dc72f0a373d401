"""SDXL ``UNet2DConditionModel`` in Flax NNX, NHWC, matching diffusers 0.42.1 numerically.

Call: ``unet(sample, timesteps, encoder_hidden_states, text_embeds=None, time_ids=None) -> (B, H, W, out)``

* ``sample`` NHWC latents (B, H, W, in_channels) — 12 channels for GoT (noisy latents + layout + source);
  H and W must be divisible by ``2 ** (len(block_out_channels) - 1)``.
* ``timesteps`` (B,) or scalar, int or float.
* ``encoder_hidden_states`` (B, S, cross_attention_dim).
* ``text_embeds`` (B, P) and ``time_ids`` (B, K) for the SDXL ``text_time`` added embedding
  (P + K * addition_time_embed_dim = projection_class_embeddings_input_dim).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from got_jax import sharding
from got_jax.models.options import DEFAULT_OPTIONS, ModelOptions
from got_jax.models.rng import KeyStream
from got_jax.models.sdxl.config import UNetConfig
from got_jax.models.sdxl.layers import (Conv, Downsample2D, GroupNorm, ResnetBlock2D, TimestepEmbedding,
                                        Transformer2DModel, Upsample2D, timestep_embedding)


class _Block(nnx.Module):
    """A down or up block: resnets, optional cross-attention transformers, optional resampler."""

    def __init__(self, cfg: UNetConfig, ins: list[int], cout: int, i_cfg: int, attn: bool, resample: str | None, *,
                 kw):
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nnx.List([ResnetBlock2D(c, cout, cfg.time_embed_dim, g, eps, cfg.resnet_out_scale_factor, **kw)
                                 for c in ins])
        self.attentions = (nnx.List([Transformer2DModel(cout, cfg.num_attention_heads[i_cfg],
                                                        cfg.transformer_layers_per_block[i_cfg],
                                                        cfg.cross_attention_dim, g, **kw)
                                     for _ in ins]) if attn else None)
        self.downsamplers = (nnx.List([Downsample2D(cout, cfg.downsample_padding, **kw)])
                             if resample == "down" else None)
        self.upsamplers = nnx.List([Upsample2D(cout, **kw)]) if resample == "up" else None


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet, then (transformer, resnet) pairs."""

    def __init__(self, cfg: UNetConfig, *, kw):
        c, g, eps = cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nnx.List([ResnetBlock2D(c, c, cfg.time_embed_dim, g, eps, cfg.mid_block_scale_factor, **kw)
                                 for _ in range(2)])
        self.attentions = nnx.List([Transformer2DModel(c, cfg.num_attention_heads[-1],
                                                       cfg.transformer_layers_per_block[-1], cfg.cross_attention_dim,
                                                       g, **kw)])

    def __call__(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nnx.Module):
    """The SDXL UNet (see module docstring for the call convention).

    ``options``: dtypes, attention kernel, and remat of every resnet and transformer block.
    """

    def __init__(self, cfg: UNetConfig, *, options: ModelOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = options.dtype
        kw = dict(options=options, rngs=KeyStream(rngs))
        boc, n, L = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
        self.conv_in = Conv(cfg.in_channels, boc[0], cfg.conv_in_kernel, **kw)
        self.time_embedding = TimestepEmbedding(boc[0], cfg.time_embed_dim, **kw)
        self.add_embedding = (TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim, **kw)
                              if cfg.addition_embed_type == "text_time" else None)
        down = []
        cout = boc[0]
        for i, t in enumerate(cfg.down_block_types):
            cin, cout = cout, boc[i]
            down.append(_Block(cfg, [cin] + [cout] * (L - 1), cout, i, t.startswith("CrossAttn"),
                               "down" if i < n - 1 else None, kw=kw))
        self.down_blocks = nnx.List(down)
        self.mid_block = UNetMidBlock2DCrossAttn(cfg, kw=kw)
        up = []
        rboc = list(reversed(boc))
        cout = rboc[0]
        for i, t in enumerate(cfg.up_block_types):
            prev, cout, cin = cout, rboc[i], rboc[min(i + 1, n - 1)]
            ins = [(prev if j == 0 else cout) + (cin if j == L else cout) for j in range(L + 1)]
            up.append(_Block(cfg, ins, cout, n - 1 - i, t.startswith("CrossAttn"), "up" if i < n - 1 else None,
                             kw=kw))
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, boc[0], cfg.norm_eps, **kw)
        self.conv_out = Conv(boc[0], cfg.out_channels, cfg.conv_out_kernel, **kw)

    def __call__(self, sample, timesteps, encoder_hidden_states, text_embeds=None, time_ids=None):
        cfg = self.cfg
        b, h, w, c = sample.shape
        if c != cfg.in_channels:
            raise ValueError(f"UNet: sample has {c} channels, config in_channels={cfg.in_channels} (NHWC expected)")
        f = 2 ** (len(cfg.block_out_channels) - 1)
        if h % f or w % f:
            raise ValueError(f"UNet: latent size {h}x{w} must be divisible by {f}")
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        temb = self.time_embedding(timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                                      cfg.freq_shift).astype(self.dtype))
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("UNet with addition_embed_type='text_time' needs text_embeds and time_ids")
            tid = timestep_embedding(jnp.asarray(time_ids).reshape(-1), cfg.addition_time_embed_dim,
                                     cfg.flip_sin_to_cos, cfg.freq_shift).reshape(b, -1)
            add = jnp.concatenate([jnp.asarray(text_embeds, jnp.float32), tid], axis=-1)
            if add.shape[-1] != cfg.projection_class_embeddings_input_dim:
                raise ValueError(f"UNet: text_embeds {tuple(text_embeds.shape)} + time_ids {tuple(time_ids.shape)} "
                                 f"give {add.shape[-1]} features, config expects "
                                 f"{cfg.projection_class_embeddings_input_dim}")
            temb = temb + self.add_embedding(add.astype(self.dtype))
        context = sharding.constrain(encoder_hidden_states.astype(self.dtype), "activation_batch", None, None)
        x = sharding.constrain(self.conv_in(sample), "activation_batch", None, None, None)
        skips = [x]
        for blk in self.down_blocks:
            for j, res in enumerate(blk.resnets):
                x = res(x, temb)
                if blk.attentions is not None:
                    x = blk.attentions[j](x, context)
                skips.append(x)
            if blk.downsamplers is not None:
                x = blk.downsamplers[0](x)
                skips.append(x)
        x = self.mid_block(x, temb, context)
        for blk in self.up_blocks:
            for j, res in enumerate(blk.resnets):
                x = res(jnp.concatenate([x, skips.pop()], axis=-1), temb)
                if blk.attentions is not None:
                    x = blk.attentions[j](x, context)
            if blk.upsamplers is not None:
                x = blk.upsamplers[0](x)
        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        return sharding.constrain(x, "activation_batch", None, None, None)
