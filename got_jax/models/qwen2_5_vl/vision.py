"""The Qwen2.5-VL vision tower (ViT with 2-D rotary, window attention and a 2x2 patch merger) in Flax NNX.

Numerically the same as transformers' ``Qwen2_5_VisionTransformerPretrainedModel``: the output of
:class:`Qwen2_5_VisionTransformer` is what transformers returns as ``pooler_output`` (what
``get_image_features`` scatters into the ``<|image_pad|>`` positions), in the original patch order.

Everything that depends only on the image grids (rotary positions, the window permutation and the
attention segments) is computed on the host by :func:`prepare_vision_inputs` into a small
:class:`VisionAux` pytree. Attention never loops over windows: each patch carries a window segment id
and a full-attention (per image frame) segment id, and one masked attention per block does all windows
at once (window blocks only look at neighbouring chunks of the window-ordered sequence, so their cost
grows linearly with the patch count; full-attention blocks are dense per call). ``pad_to`` pads the
patch count to a fixed bucket so ``jit`` sees few shapes; padded patches form their own segment and
their outputs are zeros.

Torch checkpoint names (relative to the ``visual`` module) map onto this module through
:data:`got_jax.models.qwen2_5_vl.checkpoint.VISION_TABLE`; the transformers 4.x (``visual.*``) and 5.x
(``model.visual.*``) layouts only differ by that prefix.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from got_jax import sharding
from got_jax.models import attention
from got_jax.models.options import DEFAULT_OPTIONS, ModelOptions, remat_call
from got_jax.models.rng import KeyStream

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def _int_size(name: str, value: Any) -> int:
    """transformers allows ``patch_size`` etc. as int or a list of equal ints; we need one int."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"vision_config.{name}={value!r}: only equal sizes are supported")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Sizes of the Qwen2.5-VL vision tower (the ``vision_config`` of a Qwen2.5-VL config.json)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_chans: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6  # transformers hard-codes 1e-6 for every vision RMSNorm
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"VisionConfig: hidden_size {self.hidden_size} not divisible by "
                             f"num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"VisionConfig: head_dim {self.head_dim} must be a multiple of 4 for the 2-D rotary")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"VisionConfig: unsupported hidden_act {self.hidden_act!r}; known {sorted(_ACTIVATIONS)}")
        if self.merger_window <= 0:
            raise ValueError(f"VisionConfig: window_size {self.window_size} is smaller than one merged unit "
                             f"({self.spatial_merge_size * self.patch_size} px)")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"VisionConfig: fullatt_block_indexes {bad} outside 0..{self.depth - 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_unit(self) -> int:
        """Patches per merged token (spatial_merge_size ** 2)."""
        return self.spatial_merge_size ** 2

    @property
    def merger_window(self) -> int:
        """Window side in merged tokens (transformers' ``vit_merger_window_size``)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch: in_chans * temporal_patch_size * patch_size ** 2."""
        return self.in_chans * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def from_hf(cls, vision_config: Mapping[str, Any]) -> "VisionConfig":
        """From the ``vision_config`` dict of a transformers 4.x or 5.x Qwen2.5-VL config.json.

        4.x spells the input channels ``in_chans``, 5.x ``in_channels``; 5.x keeps the rotary theta
        in ``rope_parameters``. Unknown keys are ignored; a missing required key raises ``ValueError``.
        """
        d = dict(vision_config)
        required = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"vision_config lacks required keys {missing} (has {sorted(d)})")
        rope = d.get("rope_parameters") or {}
        kw = dict(
            depth=int(d["depth"]), hidden_size=int(d["hidden_size"]), intermediate_size=int(d["intermediate_size"]),
            num_heads=int(d["num_heads"]), out_hidden_size=int(d["out_hidden_size"]),
            in_chans=int(d.get("in_channels", d.get("in_chans", 3))),
            patch_size=_int_size("patch_size", d.get("patch_size", 14)),
            spatial_merge_size=int(d.get("spatial_merge_size", 2)),
            temporal_patch_size=_int_size("temporal_patch_size", d.get("temporal_patch_size", 2)),
            window_size=int(d.get("window_size", 112)),
            fullatt_block_indexes=tuple(int(i) for i in d.get("fullatt_block_indexes", (7, 15, 23, 31))),
            hidden_act=str(d.get("hidden_act", "silu")),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        )
        return cls(**kw)


# --------------------------------------------------------------------------------------------------
# Host-side precomputation
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class VisionAux:
    """Everything the tower needs that depends only on the image grids (arrays only; a jit-able pytree).

    ``P`` is the (padded) patch count and ``u = spatial_merge_size ** 2``. Per-patch arrays are in
    *window order* (the order the blocks run in); ``valid`` is in the original order.

    * ``window_index`` (P/u,) int32: merged token in the original order for each window-order slot
      (transformers' ``window_index``, padding slots map to themselves at the end).
    * ``reverse_index`` (P/u,) int32: its inverse permutation (``argsort(window_index)``).
    * ``position_ids`` (P, 2) int32: (row, column) of every patch in its image, window order.
    * ``window_segment_ids`` (P,) int32: window of every patch (window-attention blocks).
    * ``full_segment_ids`` (P,) int32: image frame of every patch (full-attention blocks).
    * ``valid`` (P/u,) bool: merged tokens that belong to an image (False for padding), original order.

    Padding patches have segment id -1 in both segment arrays (they only see each other).
    """

    window_index: Any
    reverse_index: Any
    position_ids: Any
    window_segment_ids: Any
    full_segment_ids: Any
    valid: Any

    @property
    def num_patches(self) -> int:
        """The padded patch count P (static: an array shape)."""
        return self.position_ids.shape[0]


def _grid_list(grid_thw: np.ndarray, cfg: VisionConfig) -> list[tuple[int, int, int]]:
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape (num_images, 3), got {grid.shape}")
    out = []
    for n, (t, h, w) in enumerate(grid.tolist()):
        m = cfg.spatial_merge_size
        if t < 1 or h < 1 or w < 1 or h % m or w % m:
            raise ValueError(f"grid_thw[{n}] = {(t, h, w)}: sizes must be positive and h, w multiples of "
                             f"spatial_merge_size {m}")
        out.append((int(t), int(h), int(w)))
    return out


def window_index(grid_thw: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """transformers' ``get_window_index`` in numpy, per merged token.

    Returns ``(window_index, window_ids, frame_ids)``: the original merged-token index of every
    window-order slot, and the window / image-frame each slot belongs to (consecutive ints).
    """
    ws = cfg.merger_window
    index, windows, frames = [], [], []
    offset = n_win = n_frame = 0
    for t, h, w in _grid_list(grid_thw, cfg):
        lh, lw = h // cfg.spatial_merge_size, w // cfg.spatial_merge_size
        nh, nw = -(-lh // ws), -(-lw // ws)
        idx = np.full((t, nh * ws, nw * ws), -1, np.int64)
        idx[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
        idx = idx.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, ws * ws)
        win = np.broadcast_to(np.arange(t * nh * nw).reshape(t, nh * nw, 1), idx.shape)
        frm = np.broadcast_to(np.arange(t).reshape(t, 1, 1), idx.shape)
        keep = idx >= 0
        index.append(idx[keep] + offset)
        # renumber windows consecutively over the non-empty ones
        _, win_ids = np.unique(win[keep], return_inverse=True)
        windows.append(win_ids + n_win)
        frames.append(frm[keep] + n_frame)
        offset += t * lh * lw
        n_win += int(win_ids.max()) + 1
        n_frame += t
    return (np.concatenate(index).astype(np.int32), np.concatenate(windows).astype(np.int32),
            np.concatenate(frames).astype(np.int32))


def position_ids(grid_thw: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    """(N, 2) (row, column) of every patch in the original (merge-block-major) patch order."""
    m = cfg.spatial_merge_size
    out = []
    for t, h, w in _grid_list(grid_thw, cfg):
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = [a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1) for a in (hh, ww)]
        out.append(np.tile(np.stack(blocks, -1), (t, 1)))
    return np.concatenate(out).astype(np.int32)


def num_patches(grid_thw: np.ndarray) -> int:
    """Total patch count of the images in ``grid_thw`` (sum of t * h * w)."""
    return int(np.prod(np.asarray(grid_thw), axis=-1).sum())


def prepare_vision_inputs(grid_thw: np.ndarray, cfg: VisionConfig, pad_to: int | None = None) -> VisionAux:
    """Host-side precomputation for :class:`Qwen2_5_VisionTransformer` (see :class:`VisionAux`).

    ``grid_thw`` (num_images, 3) is what the image processor returns as ``image_grid_thw``.
    ``pad_to`` pads the patch count to that many patches (a multiple of ``spatial_merge_size ** 2``).
    """
    u = cfg.merge_unit
    n = num_patches(grid_thw)
    p = n if pad_to is None else int(pad_to)
    if p < n:
        raise ValueError(f"pad_to={p} is smaller than the {n} patches of grid_thw {np.asarray(grid_thw).tolist()}")
    if p % u:
        raise ValueError(f"pad_to={p} must be a multiple of spatial_merge_size**2 = {u}")
    widx, wins, frames = window_index(grid_thw, cfg)
    nm, pm = n // u, p // u
    win_index = np.concatenate([widx, np.arange(nm, pm, dtype=np.int32)])
    reverse = np.argsort(win_index).astype(np.int32)
    pos = np.zeros((pm, u, 2), np.int32)
    pos[:nm] = position_ids(grid_thw, cfg).reshape(nm, u, 2)[widx]
    pad_seg = np.full(pm - nm, -1, np.int32)
    return VisionAux(
        window_index=win_index,
        reverse_index=reverse,
        position_ids=pos.reshape(p, 2),
        window_segment_ids=np.repeat(np.concatenate([wins, pad_seg]), u),
        full_segment_ids=np.repeat(np.concatenate([frames, pad_seg]), u),
        valid=np.arange(pm) < nm,
    )


def pad_pixel_values(pixel_values: np.ndarray, aux: VisionAux) -> np.ndarray:
    """Zero-pads ``pixel_values`` (N, patch_dim) to the ``aux.num_patches`` rows a padded call needs."""
    pv = np.asarray(pixel_values)
    extra = aux.num_patches - pv.shape[0]
    if extra < 0:
        raise ValueError(f"pixel_values has {pv.shape[0]} patches, more than the {aux.num_patches} of aux")
    return np.pad(pv, ((0, extra), (0, 0)))


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------

_INIT = nnx.initializers.normal(0.02)


def _param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
    return nnx.Param(sharding.param_init(init, *names)(rngs.params(), shape, dtype))


class Linear(nnx.Module):
    """``x @ kernel + bias`` with a kernel of any rank (in, *out) and logical names per dim."""

    def __init__(self, in_features: int, out_shape: tuple[int, ...], names: tuple[str | None, ...],
                 bias_names: tuple[str | None, ...] | None, *, options: ModelOptions, rngs: nnx.Rngs):
        self.kernel = _param(rngs, _INIT, (in_features, *out_shape), names, options.param_dtype)
        self.bias = (_param(rngs, nnx.initializers.zeros, out_shape, bias_names, options.param_dtype)
                     if bias_names is not None else nnx.data(None))
        self.dtype = options.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel[...].astype(self.dtype)
        y = jnp.einsum("li,i...->l...", x.astype(self.dtype), k)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """transformers' Qwen2RMSNorm: normalise in float32, cast back, then scale by ``weight``."""

    def __init__(self, dim: int, eps: float, *, options: ModelOptions, rngs: nnx.Rngs):
        self.weight = _param(rngs, nnx.initializers.ones, (dim,), ("norm",), options.param_dtype)
        self.eps = eps
        self.dtype = options.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * xf.astype(self.dtype)


class _Kernel(nnx.Module):
    """A bare kernel holder (so the parameter path reads ``patch_embed.proj.kernel``)."""

    def __init__(self, kernel: nnx.Param):
        self.kernel = kernel


class PatchEmbed(nnx.Module):
    """The Conv3d patch embedding (kernel = stride = (t, p, p), no bias) as one matmul per patch.

    ``proj.kernel`` is (in_chans, t, p, p, hidden): the torch (O, I, t, p, p) weight with O moved last,
    so flattening its first four dims matches the flattened pixel patch.
    """

    def __init__(self, cfg: VisionConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        shape = (cfg.in_chans, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size, cfg.hidden_size)
        self.proj = _Kernel(_param(rngs, _INIT, shape,
                                   ("conv_in", "conv_spatial", "conv_spatial", "conv_spatial", "embed"),
                                   options.param_dtype))
        self.dtype = options.dtype

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        k = self.proj.kernel[...]
        k = k.reshape(-1, k.shape[-1]).astype(self.dtype)
        if pixel_values.shape[-1] != k.shape[0]:
            raise ValueError(f"pixel_values has patches of length {pixel_values.shape[-1]}, the patch embedding "
                             f"expects in_chans*temporal_patch_size*patch_size**2 = {k.shape[0]}")
        return pixel_values.astype(self.dtype) @ k


def rotary_cos_sin(pos: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(L, head_dim) float32 cos / sin of the 2-D axial rotary for (row, column) positions ``pos``."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    freqs = pos.astype(jnp.float32)[..., None] * inv_freq  # (L, 2, head_dim/4)
    freqs = freqs.reshape(pos.shape[0], -1)  # [h freqs, w freqs]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


class VisionAttention(nnx.Module):
    """Fused-qkv self attention with 2-D rotary, restricted to equal segment ids.

    ``qkv.kernel`` is (hidden, 3, hidden) and ``qkv.bias`` (3, hidden): the torch (3*hidden, hidden)
    Linear with the q/k/v split made explicit so ``heads`` shards along head boundaries.
    """

    def __init__(self, cfg: VisionConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(options=options, rngs=rngs)
        self.qkv = Linear(d, (3, d), ("embed", None, "heads"), (None, "heads"), **kw)
        self.proj = Linear(d, (d,), ("heads", "embed"), ("embed",), **kw)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.dtype = options.dtype
        self.attention_impl = options.attention_impl

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array,
                 chunk: int | None) -> jax.Array:
        length = x.shape[0]
        qkv = self.qkv(x).reshape(length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        c, s = cos[:, None, :], sin[:, None, :]
        q = (q.astype(jnp.float32) * c + _rotate_half(q.astype(jnp.float32)) * s).astype(self.dtype)
        k = (k.astype(jnp.float32) * c + _rotate_half(k.astype(jnp.float32)) * s).astype(self.dtype)
        q = sharding.constrain(q, "activation_length", "activation_heads", None)
        out = segment_attention(q, k, v, segments, chunk, self.head_dim ** -0.5, self.attention_impl)
        return self.proj(out.reshape(length, -1))


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, chunk: int | None,
                      scale: float, impl: str = "xla") -> jax.Array:
    """Softmax attention (float32 logits and softmax) of (L, H, D) q/k/v where only equal segment ids meet.

    With ``chunk`` (L a multiple of it, every segment at most ``chunk`` long and contiguous), queries
    of each chunk only look at keys of the previous, own and next chunk: exact, and O(L * 3 chunk)
    instead of O(L^2) for window attention. ``impl`` picks the kernel (:mod:`got_jax.models.attention`).
    """
    return attention.segment_attention(q, k, v, segments, chunk, scale, impl)


class VisionMLP(nnx.Module):
    """SwiGLU-style MLP with biases: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: VisionConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(options=options, rngs=rngs)
        self.gate_proj = Linear(d, (f,), ("embed", "mlp"), ("mlp",), **kw)
        self.up_proj = Linear(d, (f,), ("embed", "mlp"), ("mlp",), **kw)
        self.down_proj = Linear(f, (d,), ("mlp", "embed"), ("embed",), **kw)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        h = _ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(sharding.constrain(h, "activation_length", "mlp"))


class VisionBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        kw = dict(options=options, rngs=rngs)
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attn = VisionAttention(cfg, **kw)
        self.mlp = VisionMLP(cfg, **kw)
        self.options = options

    def __call__(self, x, cos, sin, segments, chunk):
        """Runs under ``options.remat`` (``chunk`` is static)."""
        return remat_call(self.options, lambda m, *a: m.forward(*a, chunk), self, x, cos, sin, segments)

    def forward(self, x, cos, sin, segments, chunk):
        x = x + self.attn(self.norm1(x), cos, sin, segments, chunk)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, concatenate each 2x2 block of patches, Linear -> GELU (exact) -> Linear.

    ``mlp_0`` / ``mlp_2`` are torch's ``mlp.0`` / ``mlp.2`` (``mlp.1`` is the parameter-free GELU).
    """

    def __init__(self, cfg: VisionConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        kw = dict(options=options, rngs=rngs)
        wide = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp_0 = Linear(wide, (wide,), ("embed", "mlp"), ("mlp",), **kw)
        self.mlp_2 = Linear(wide, (cfg.out_hidden_size,), ("mlp", "embed"), ("embed",), **kw)
        self.merge_unit = cfg.merge_unit

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(x.shape[0] // self.merge_unit, -1)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


class Qwen2_5_VisionTransformer(nnx.Module):
    """The Qwen2.5-VL vision tower: flattened pixel patches -> merged image features for the LLM."""

    def __init__(self, cfg: VisionConfig, *, options: ModelOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        kw = dict(options=options, rngs=KeyStream(rngs))
        self.cfg = cfg
        self.dtype = options.dtype
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.blocks = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, **kw)

    def __call__(self, pixel_values: jax.Array, aux: VisionAux) -> jax.Array:
        """Merged features (R // spatial_merge_size**2, out_hidden_size) in the original token order.

        ``pixel_values`` (R, patch_dim) are the image processor's flattened patches, R either the real
        patch count (padded here to ``aux.num_patches`` and cut back) or already ``aux.num_patches``
        (then rows of padding come out as zeros after the real ones).
        """
        cfg, u = self.cfg, self.cfg.merge_unit
        rows, p = pixel_values.shape[0], aux.num_patches
        if rows > p or rows % u:
            raise ValueError(f"pixel_values has {rows} patches; aux was prepared for {p} (padded) patches and "
                             f"the count must be a multiple of spatial_merge_size**2 = {u}")
        if rows < p:
            pixel_values = jnp.pad(pixel_values, ((0, p - rows), (0, 0)))
        x = self.patch_embed(pixel_values)
        x = x.reshape(p // u, u, -1)[aux.window_index].reshape(p, -1)
        pos, win, full = aux.position_ids, aux.window_segment_ids, aux.full_segment_ids
        # window blocks attend chunk-locally when that is cheaper than all pairs; pad to whole chunks
        chunk = cfg.merger_window ** 2 * u
        if 3 * chunk < p:
            extra = -p % chunk
            x = jnp.pad(x, ((0, extra), (0, 0)))
            pos = jnp.pad(pos, ((0, extra), (0, 0)))
            win, full = (jnp.pad(a, (0, extra), constant_values=-1) for a in (win, full))
        else:
            chunk = None
        x = sharding.constrain(x, "activation_length", "activation_embed")
        cos, sin = rotary_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
        for i, block in enumerate(self.blocks):
            if i in cfg.fullatt_block_indexes:
                x = block(x, cos, sin, full, None)
            else:
                x = block(x, cos, sin, win, chunk)
        x = x[:p]
        out = self.merger(x)[aux.reverse_index]
        out = jnp.where(aux.valid[:, None], out, jnp.zeros((), out.dtype))
        return out[: rows // u]
