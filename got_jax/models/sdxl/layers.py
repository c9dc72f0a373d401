"""Building blocks shared by the SDXL UNet and the AutoencoderKL (all NHWC).

Parameter names follow diffusers' state-dict keys (``conv1``, ``time_emb_proj``, ``to_q``, ...); conv and
linear weights are called ``kernel`` (layout (kh, kw, in, out) / (in, out)), norm parameters ``weight`` / ``bias``.

Attention looks its kernel up by name (``ModelOptions.attention_impl``) in :data:`ATTENTION_FNS`: the
built-in ``"auto"`` (cuDNN on GPU, Pallas flash attention on TPU, exact XLA elsewhere), ``"xla"``,
``"cudnn"`` and ``"pallas"`` of :mod:`got_jax.models.attention`, or a kernel added with :func:`register_attention`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from got_jax import sharding
from got_jax.models import attention
from got_jax.models.attention import QUERY_BLOCK, blocked_attention, dense_attention  # noqa: F401 (re-exported)
from got_jax.models.options import DEFAULT_OPTIONS, ModelOptions, remat_call
from got_jax.models.sdxl.conv import conv2d

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


# the built-in kernels of got_jax.models.attention ("auto" picks by backend) plus two plain XLA variants
ATTENTION_FNS: dict[str, AttentionFn] = {
    **{name: functools.partial(dense_attention, impl=name) for name in attention.BUILTIN},
    "blocked": blocked_attention, "dot_product_attention": jax.nn.dot_product_attention}


def register_attention(name: str, fn: AttentionFn) -> None:
    """Registers an attention kernel ``fn(q, k, v) -> out`` (all (B, T, N, H)) under ``name``."""
    ATTENTION_FNS[name] = fn


def get_attention(name: str) -> AttentionFn:
    if name not in ATTENTION_FNS:
        raise ValueError(f"unknown attention implementation {name!r}; registered: {sorted(ATTENTION_FNS)}")
    return ATTENTION_FNS[name]


_init = nnx.initializers


class Conv(nnx.Module):
    """A 2D convolution over NHWC with 'same'-style symmetric ``padding`` and a bias."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, padding: int | None = None, *,
                 options: ModelOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        self.kernel = nnx.Param(sharding.param_init(_init.lecun_normal(), "conv_spatial", "conv_spatial", "conv_in",
                                                    "conv_out")(rngs.params(), (k, k, cin, cout), options.param_dtype))
        self.bias = nnx.Param(sharding.param_init(_init.zeros, "conv_out")(rngs.params(), (cout,),
                                                                           options.param_dtype))
        self.stride = stride
        self.padding = k // 2 if padding is None else padding
        self.dtype = options.dtype
        self.weight_grad = options.conv_weight_grad

    def __call__(self, x, padding=None):
        pad = self.padding if padding is None else padding
        pad = [(pad, pad)] * 2 if isinstance(pad, int) else pad
        y = conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, pad,
                   weight_grad=self.weight_grad)
        return y + self.bias[...].astype(self.dtype)


class Linear(nnx.Module):
    """``x @ kernel (+ bias)`` with logical axis names ``names`` on the kernel."""

    def __init__(self, din: int, dout: int, *, bias: bool = True, names=("embed", "mlp"),
                 options: ModelOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        self.kernel = nnx.Param(sharding.param_init(_init.lecun_normal(), *names)(rngs.params(), (din, dout),
                                                                                 options.param_dtype))
        self.bias = (nnx.Param(sharding.param_init(_init.zeros, names[1])(rngs.params(), (dout,),
                                                                           options.param_dtype))
                     if bias else None)
        self.dtype = options.dtype

    def __call__(self, x):
        y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    """torch ``GroupNorm`` over the last (channel) axis of an NHWC or (B, T, C) tensor, computed in float32."""

    def __init__(self, groups: int, channels: int, eps: float, *, options: ModelOptions = DEFAULT_OPTIONS,
                 rngs: nnx.Rngs):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels do not divide into {groups} groups")
        pd = options.param_dtype
        self.weight = nnx.Param(sharding.param_init(_init.ones, "norm")(rngs.params(), (channels,), pd))
        self.bias = nnx.Param(sharding.param_init(_init.zeros, "norm")(rngs.params(), (channels,), pd))
        self.groups, self.eps, self.dtype = groups, eps, options.dtype

    def __call__(self, x):
        # Per-channel reductions first, then per group (XLA:CPU reduces a contiguous channel axis much faster
        # than a (groups, channels/group) split); two passes (mean, then centred squares) as torch does, and the
        # normalisation folded into one per-channel scale and shift.
        b, c = x.shape[0], x.shape[-1]
        g = self.groups
        x32 = x.astype(jnp.float32)
        axes = tuple(range(1, x.ndim - 1))
        n = np.prod(x.shape[1:-1]) * (c // g)
        mean = x32.sum(axes).reshape(b, g, c // g).sum(-1) / n  # (B, G)
        mean_c = jnp.repeat(mean, c // g, axis=-1)  # (B, C)
        bshape = (b,) + (1,) * len(axes) + (c,)
        var = jnp.square(x32 - mean_c.reshape(bshape)).sum(axes).reshape(b, g, c // g).sum(-1) / n
        scale = jnp.repeat(jax.lax.rsqrt(var + self.eps), c // g, axis=-1) * self.weight[...].astype(jnp.float32)
        shift = self.bias[...].astype(jnp.float32) - mean_c * scale
        return (x32 * scale.reshape(bshape) + shift.reshape(bshape)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """torch ``LayerNorm`` (affine) over the last axis, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5, *, options: ModelOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        self.weight = nnx.Param(sharding.param_init(_init.ones, "norm")(rngs.params(), (dim,), options.param_dtype))
        self.bias = nnx.Param(sharding.param_init(_init.zeros, "norm")(rngs.params(), (dim,), options.param_dtype))
        self.eps, self.dtype = eps, options.dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...] + self.bias[...]).astype(self.dtype)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers ``get_timestep_embedding``: (N,) -> (N, dim) sinusoids, float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    emb = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """``linear_1 -> silu -> linear_2`` (diffusers ``TimestepEmbedding``)."""

    def __init__(self, din: int, dout: int, *, options: ModelOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        kw = dict(options=options, rngs=rngs)
        self.linear_1 = Linear(din, dout, names=("embed", "mlp"), **kw)
        self.linear_2 = Linear(dout, dout, names=("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
    """diffusers ``ResnetBlock2D`` (default time-embedding shift, silu, optional 1x1 shortcut)."""

    def __init__(self, cin: int, cout: int, temb_channels: int | None, groups: int, eps: float,
                 output_scale_factor: float = 1.0, *, options: ModelOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        kw = dict(options=options, rngs=rngs)
        self.norm1 = GroupNorm(groups, cin, eps, **kw)
        self.conv1 = Conv(cin, cout, 3, **kw)
        self.time_emb_proj = (Linear(temb_channels, cout, names=("embed", "conv_out"), **kw)
                              if temb_channels else None)
        self.norm2 = GroupNorm(groups, cout, eps, **kw)
        self.conv2 = Conv(cout, cout, 3, **kw)
        self.conv_shortcut = Conv(cin, cout, 1, **kw) if cin != cout else None
        self.output_scale_factor = output_scale_factor
        self.options = options

    def __call__(self, x, temb=None):
        """Runs under ``options.remat``."""
        if temb is None:
            return remat_call(self.options, lambda m, a: m.forward(a), self, x)
        return remat_call(self.options, lambda m, a, t: m.forward(a, t), self, x, temb)

    def forward(self, x, temb=None):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = (x + h) / self.output_scale_factor if self.output_scale_factor != 1.0 else x + h
        return sharding.constrain(out, "activation_batch", None, None, None)


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv; ``padding=0`` pads (0, 1) on bottom/right first, as diffusers' VAE does."""

    def __init__(self, channels: int, padding: int = 1, *, options: ModelOptions = DEFAULT_OPTIONS,
                 rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, 3, stride=2, padding=padding, options=options, rngs=rngs)
        self.pad = padding

    def __call__(self, x):
        if self.pad == 0:
            return self.conv(x, padding=[(0, 1), (0, 1)])
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, *, options: ModelOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, 3, options=options, rngs=rngs)

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Attention(nnx.Module):
    """diffusers ``Attention`` with ``to_q/to_k/to_v`` (bias optional) and ``to_out.0``; (B, T, C) in and out."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, *, qkv_bias: bool = False,
                 options: ModelOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"attention width {dim} does not divide into {heads} heads")
        kw = dict(options=options, rngs=rngs)
        kv_dim = kv_dim or dim
        self.to_q = Linear(dim, dim, bias=qkv_bias, names=("embed", "heads"), **kw)
        self.to_k = Linear(kv_dim, dim, bias=qkv_bias, names=("embed", "heads"), **kw)
        self.to_v = Linear(kv_dim, dim, bias=qkv_bias, names=("embed", "heads"), **kw)
        self.to_out = nnx.List([Linear(dim, dim, names=("heads", "embed"), **kw)])
        self.heads = heads
        self.attention_impl = options.attention_impl

    def __call__(self, x, context=None):
        context = x if context is None else context
        b, t, c = x.shape
        q = self.to_q(x).reshape(b, t, self.heads, -1)
        k = self.to_k(context).reshape(b, context.shape[1], self.heads, -1)
        v = self.to_v(context).reshape(b, context.shape[1], self.heads, -1)
        q = sharding.constrain(q, "activation_batch", None, "activation_heads", None)
        o = get_attention(self.attention_impl)(q, k, v).reshape(b, t, c)
        return self.to_out[0](o)


class GEGLU(nnx.Module):
    """``proj`` to 2x width, ``hidden * gelu(gate)`` (exact gelu)."""

    def __init__(self, din: int, dout: int, *, options: ModelOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        self.proj = Linear(din, dout * 2, names=("embed", "mlp"), options=options, rngs=rngs)

    def __call__(self, x):
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """GEGLU feed-forward: torch ``net.0.proj`` -> ``geglu.proj``, ``net.2`` -> ``out``."""

    def __init__(self, dim: int, mult: int = 4, *, options: ModelOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        kw = dict(options=options, rngs=rngs)
        self.geglu = GEGLU(dim, dim * mult, **kw)
        self.out = Linear(dim * mult, dim, names=("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.out(self.geglu(x))


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention, GEGLU feed-forward, each pre-LayerNorm with a residual."""

    def __init__(self, dim: int, heads: int, cross_dim: int, *, options: ModelOptions = DEFAULT_OPTIONS,
                 rngs: nnx.Rngs):
        kw = dict(options=options, rngs=rngs)
        self.norm1 = LayerNorm(dim, **kw)
        self.attn1 = Attention(dim, heads, **kw)
        self.norm2 = LayerNorm(dim, **kw)
        self.attn2 = Attention(dim, heads, cross_dim, **kw)
        self.norm3 = LayerNorm(dim, **kw)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nnx.Module):
    """GroupNorm (eps 1e-6) -> linear ``proj_in`` -> transformer blocks -> linear ``proj_out`` + residual."""

    def __init__(self, channels: int, heads: int, layers: int, cross_dim: int, groups: int, *,
                 options: ModelOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        kw = dict(options=options, rngs=rngs)
        self.norm = GroupNorm(groups, channels, 1e-6, **kw)
        self.proj_in = Linear(channels, channels, names=("embed", "mlp"), **kw)
        self.transformer_blocks = nnx.List([BasicTransformerBlock(channels, heads, cross_dim,
                                                                  **kw)
                                            for _ in range(layers)])
        self.proj_out = Linear(channels, channels, names=("mlp", "embed"), **kw)
        self.options = options

    def __call__(self, x, context):
        """Runs under ``options.remat``."""
        return remat_call(self.options, lambda m, a, c: m.forward(a, c), self, x, context)

    def forward(self, x, context):
        b, h, w, c = x.shape
        y = self.proj_in(self.norm(x).reshape(b, h * w, c))
        y = sharding.constrain(y, "activation_batch", "activation_length", None)
        for blk in self.transformer_blocks:
            y = blk(y, context)
        return self.proj_out(y).reshape(b, h, w, c) + x
