"""diffusers ``AutoencoderKL`` in Flax NNX (NHWC images and latents).

``vae.encode(x)`` takes images (B, H, W, in_channels) in [-1, 1] and returns a :class:`DiagonalGaussian`
over unscaled latents (B, H/f, W/f, latent_channels); ``vae.decode(z)`` maps unscaled latents back;
``vae.tiled_decode(z)`` decodes overlapping tiles and blends them like diffusers' ``tiled_decode``.
Multiply / divide by ``cfg.scaling_factor`` yourself (as diffusers pipelines do).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from got_jax import sharding
from got_jax.models.options import DEFAULT_OPTIONS, ModelOptions
from got_jax.models.rng import KeyStream
from got_jax.models.sdxl.config import VAEConfig
from got_jax.models.sdxl.layers import (Conv, Downsample2D, GroupNorm, Linear, ResnetBlock2D, Upsample2D,
                                        get_attention)

_EPS = 1e-6


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """diffusers ``DiagonalGaussianDistribution`` over NHWC moments (mean | logvar on the channel axis)."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


class VAEAttention(nnx.Module):
    """Single-head spatial self-attention with ``group_norm`` and a residual (VAE mid block)."""

    def __init__(self, c: int, groups: int, *, options: ModelOptions, rngs):
        kw = dict(options=options, rngs=rngs)
        self.group_norm = GroupNorm(groups, c, _EPS, **kw)
        self.to_q = Linear(c, c, names=("embed", "heads"), **kw)
        self.to_k = Linear(c, c, names=("embed", "heads"), **kw)
        self.to_v = Linear(c, c, names=("embed", "heads"), **kw)
        self.to_out = nnx.List([Linear(c, c, names=("heads", "embed"), **kw)])

    def __call__(self, x):
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, h * w, 1, c)
        q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
        o = get_attention("xla")(q, k, v).reshape(b, h * w, c)
        return self.to_out[0](o).reshape(b, h, w, c) + x


class UNetMidBlock2D(nnx.Module):
    def __init__(self, c: int, groups: int, add_attention: bool, *, kw):
        self.resnets = nnx.List([ResnetBlock2D(c, c, None, groups, _EPS, **kw) for _ in range(2)])
        self.attentions = nnx.List([VAEAttention(c, groups, **kw)]) if add_attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class _Block(nnx.Module):
    def __init__(self, ins: list[int], cout: int, groups: int, resample: str | None, *, kw):
        self.resnets = nnx.List([ResnetBlock2D(c, cout, None, groups, _EPS, **kw) for c in ins])
        self.downsamplers = nnx.List([Downsample2D(cout, 0, **kw)]) if resample == "down" else None
        self.upsamplers = nnx.List([Upsample2D(cout, **kw)]) if resample == "up" else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, kw):
        boc, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = Conv(cfg.in_channels, boc[0], 3, **kw)
        blocks, cout = [], boc[0]
        for i in range(n):
            cin, cout = cout, boc[i]
            blocks.append(_Block([cin] + [cout] * (cfg.layers_per_block - 1), cout, g,
                                 "down" if i < n - 1 else None, kw=kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = UNetMidBlock2D(boc[-1], g, cfg.mid_block_add_attention, kw=kw)
        self.conv_norm_out = GroupNorm(g, boc[-1], _EPS, **kw)
        self.conv_out = Conv(boc[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, kw):
        rboc, g, n = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = Conv(cfg.latent_channels, rboc[0], 3, **kw)
        self.mid_block = UNetMidBlock2D(rboc[0], g, cfg.mid_block_add_attention, kw=kw)
        blocks, cout = [], rboc[0]
        for i in range(n):
            prev, cout = cout, rboc[i]
            blocks.append(_Block([prev] + [cout] * cfg.layers_per_block, cout, g, "up" if i < n - 1 else None, kw=kw))
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = GroupNorm(g, rboc[-1], _EPS, **kw)
        self.conv_out = Conv(rboc[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """Encoder + decoder + quant convs; ``encode`` / ``decode`` / ``tiled_decode`` (see module docstring)."""

    def __init__(self, cfg: VAEConfig, *, options: ModelOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        self.cfg = cfg
        # the VAE is frozen (never differentiated): its resnet blocks run without remat whatever the options
        kw = dict(options=options.replace(remat="none"), rngs=KeyStream(rngs))
        self.encoder = Encoder(cfg, kw=kw)
        self.decoder = Decoder(cfg, kw=kw)
        lc = cfg.latent_channels
        self.quant_conv = Conv(2 * lc, 2 * lc, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv(lc, lc, 1, **kw) if cfg.use_post_quant_conv else None

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.cfg.block_out_channels) - 1)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images (B, H, W, C) -> posterior over latents (B, H/f, W/f, latent_channels)."""
        if x.shape[-1] != self.cfg.in_channels:
            raise ValueError(f"VAE.encode: image has {x.shape[-1]} channels, expected {self.cfg.in_channels} (NHWC)")
        x = sharding.constrain(x, "activation_batch", None, None, None)
        m = self.encoder(x)
        if self.quant_conv is not None:
            m = self.quant_conv(m)
        return DiagonalGaussian.from_moments(m.astype(jnp.float32))

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
        if z.shape[-1] != self.cfg.latent_channels:
            raise ValueError(f"VAE.decode: latents have {z.shape[-1]} channels, expected {self.cfg.latent_channels}")
        z = sharding.constrain(z, "activation_batch", None, None, None)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def tiled_decode(self, z: jax.Array, tile_sample_size: int | None = None, overlap: float = 0.25) -> jax.Array:
        """diffusers ``tiled_decode``: decode overlapping latent tiles, blend seams linearly, crop.

        Tile size defaults to ``cfg.sample_size`` pixels (latent tile = sample / f), as in diffusers.
        """
        ts = tile_sample_size or self.cfg.sample_size
        tl = int(ts / self.downscale)
        step = int(tl * (1 - overlap))
        blend = int(ts * overlap)
        limit = ts - blend
        H, W = z.shape[1], z.shape[2]
        rows = [[self.decode(z[:, i:i + tl, j:j + tl]) for j in range(0, W, step)] for i in range(0, H, step)]
        out_rows = []
        for i, row in enumerate(rows):
            out_row = []
            for j in range(len(row)):
                tile = row[j]
                if i > 0:
                    tile = _blend(rows[i - 1][j], tile, blend, axis=1)
                if j > 0:
                    tile = _blend(row[j - 1], tile, blend, axis=2)
                row[j] = tile  # diffusers blends in place: later neighbours see the blended tile
                out_row.append(tile[:, :limit, :limit])
            out_rows.append(jnp.concatenate(out_row, axis=2))
        return jnp.concatenate(out_rows, axis=1)


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """Linear cross-fade of the first ``extent`` rows (axis 1) / columns (axis 2) of ``b`` from ``a``'s last."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return b
    w = (jnp.arange(extent, dtype=jnp.float32) / extent).astype(b.dtype)
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    w = w.reshape(shape)
    a_tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    b_head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    mixed = a_tail * (1 - w) + b_head * w
    return jnp.concatenate([mixed, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis=axis)
