"""The Qwen2.5-VL reasoner in Flax NNX: text decoder with M-RoPE, image-feature scatter, LM head.

Numerically the same as transformers' ``Qwen2_5_VLForConditionalGeneration`` (5.x). Parameter paths
follow the 5.x checkpoint keys (``language_model.layers.{i}.self_attn.q_proj.kernel`` for
``model.language_model.layers.{i}.self_attn.q_proj.weight``); ``checkpoint.py`` maps the rest.

Positions are multimodal (M-RoPE): every token has a (temporal, height, width) position; text tokens
have three equal ones, image tokens their grid coordinates, and text after an image continues from
the largest position so far. :func:`get_rope_index` computes them on the host from the token ids,
``image_grid_thw`` and the attention mask, plus ``rope_deltas`` (next position minus valid length),
which decoding uses to place generated tokens.

The decoder is functional about its KV cache: :meth:`Qwen2_5_VLForConditionalGeneration.decode`
takes a :class:`KVCache` of fixed size and returns the updated one, so generation loops can run in
``lax.while_loop``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from got_jax import sharding
from got_jax.models.attention import masked_attention, xla_masked_attention
from got_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig
from got_jax.models.options import DEFAULT_OPTIONS, ModelOptions, remat_call
from got_jax.models import rng
from got_jax.models.qwen2_5_vl.vision import Qwen2_5_VisionTransformer, RMSNorm, VisionAux, prepare_vision_inputs

_INIT = nnx.initializers.normal(0.02)


def _param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
    return nnx.Param(sharding.param_init(init, *names)(rngs.params(), shape, dtype))


# --------------------------------------------------------------------------------------------------
# Positions (host side)
# --------------------------------------------------------------------------------------------------


def get_rope_index(input_ids: np.ndarray, cfg: Qwen2_5_VLConfig, image_grid_thw: np.ndarray | None = None,
                   attention_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions ``(3, B, T)`` int32 and ``rope_deltas`` ``(B,)`` int32, like transformers.

    Image tokens are the ``cfg.image_token_id`` positions; images are consumed in ``image_grid_thw``
    order across the batch, each taking ``t*h*w / merge**2`` tokens. Padding (mask 0) gets position 0.
    ``rope_deltas[b]`` is ``max position + 1 - number of valid tokens``: the generated token at text
    offset ``n`` (counting valid tokens) sits at ``n + rope_deltas[b]``.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
    b, t = ids.shape
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    grids = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in np.asarray(image_grid_thw)]
    m = cfg.spatial_merge_size
    pos = np.zeros((3, b, t), np.int64)
    deltas = np.zeros((b,), np.int64)
    gi = 0
    for row in range(b):
        valid = np.nonzero(mask[row])[0]
        tokens = ids[row, valid]
        is_img = tokens == cfg.image_token_id
        out = np.zeros((3, len(tokens)), np.int64)
        cur, i = 0, 0
        while i < len(tokens):
            if not is_img[i]:
                j = i
                while j < len(tokens) and not is_img[j]:
                    j += 1
                out[:, i:j] = np.arange(j - i) + cur
                cur += j - i
                i = j
                continue
            if gi >= len(grids):
                raise ValueError(f"row {row}: more image tokens (id {cfg.image_token_id}) than the "
                                 f"{len(grids)} images in image_grid_thw")
            gt, gh, gw = grids[gi]
            gi += 1
            lh, lw = gh // m, gw // m
            n = gt * lh * lw
            if i + n > len(tokens) or not is_img[i:i + n].all():
                raise ValueError(f"row {row}: image {gi - 1} with grid {(gt, gh, gw)} needs {n} consecutive image "
                                 f"tokens at valid position {i}")
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(lh), np.arange(lw), indexing="ij")
            out[:, i:i + n] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur
            cur += max(gh, gw) // m
            i += n
        pos[:, row, valid] = out
        deltas[row] = (out.max() + 1 if len(tokens) else 0) - len(tokens)
    if gi != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but the input ids hold tokens for {gi}")
    return pos.astype(np.int32), deltas.astype(np.int32)


def mrope_cos_sin(positions: jax.Array, cfg: TextConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin (B, T, head_dim) for M-RoPE ``positions`` (3, B, T), as transformers builds them."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    # which of (t, h, w) drives each frequency
    axis = np.repeat(np.arange(3), cfg.mrope_section)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # (3, B, T, F)
    freqs = jnp.where(axis == 0, freqs[0], jnp.where(axis == 1, freqs[1], freqs[2]))  # (B, T, F)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, N, H); cos/sin (B, T, H)."""
    return x * cos[:, :, None] + _rotate_half(x) * sin[:, :, None]


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def lora_a_init(n_in: int):
    """PEFT's ``kaiming_uniform_(a=sqrt(5))`` for ``lora_A``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in over the
    leading ``n_in`` dims of an (*in, r) array."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)


class DenseGeneral(nnx.Module):
    """An einsum projection ``kernel`` (with optional ``bias``); ``eq`` names the dimensions.

    The kernel's leading dimensions are the contracted (input) ones, the rest the output ones. With
    ``lora=True`` (and ``options.lora_rank = r > 0``) it also holds a PEFT-style adapter:
    ``lora_a`` (*in, r) (``nnx.LoRAParam``, kaiming-uniform as PEFT: U(+-1/sqrt(fan_in))), ``lora_b``
    (r, *out) zeros, and adds ``options.lora_scale * B(A(dropout(x)))`` to the output. ``lora_dropout``
    is an ``nnx.Dropout`` drawing from the ``dropout`` stream of the ``rngs`` given at construction
    (the ``default`` stream when there is none); it is the identity when the rate is 0 or the model is in
    eval mode (``model.eval()``). ``A`` carries the kernel's input logical names + ``lora_rank``, ``B``
    ``lora_rank`` + the output names. :meth:`merged_kernel` is ``kernel + scale * A @ B``.
    """

    def __init__(self, eq: str, shape: tuple[int, ...], names: tuple[str, ...], bias_shape=None, bias_names=None,
                 *, options: ModelOptions, rngs: nnx.Rngs, lora: bool = False):
        self.eq = eq
        self.kernel = _param(rngs, _INIT, shape, names, options.param_dtype)
        self.bias = (_param(rngs, nnx.initializers.zeros, bias_shape, bias_names, options.param_dtype)
                     if bias_shape is not None else nnx.data(None))
        self.dtype = options.dtype
        x_spec, k_spec = eq.split("->")[0].split(",")
        self.n_in = sum(1 for c in k_spec if c in x_spec)  # contracted dims lead the kernel
        self.lora_scale = options.lora_scale if lora else 0.0
        if lora and options.lora_rank:
            r, n = options.lora_rank, self.n_in
            self.lora_a = nnx.LoRAParam(sharding.param_init(lora_a_init(n), *names[:n], "lora_rank")(
                rngs.params(), (*shape[:n], r), options.param_dtype))
            self.lora_b = nnx.LoRAParam(sharding.param_init(nnx.initializers.zeros, "lora_rank", *names[n:])(
                rngs.params(), (r, *shape[n:]), options.param_dtype))
            self.lora_dropout = (rng.dropout(options.lora_dropout, rngs) if options.lora_dropout > 0
                                 else nnx.data(None))
        else:
            self.lora_a = self.lora_b = self.lora_dropout = nnx.data(None)

    @property
    def has_lora(self) -> bool:
        return self.lora_a is not None

    def _lora_eqs(self) -> tuple[str, str]:
        lhs, out = self.eq.split("->")
        x_spec, k_spec = lhs.split(",")
        k_in, k_out = k_spec[:self.n_in], k_spec[self.n_in:]
        mid = "".join(c for c in x_spec if c not in k_in) + "R"
        return f"{x_spec},{k_in}R->{mid}", f"{mid},R{k_out}->{out}"

    def lora_delta(self) -> jax.Array:
        """``scale * A @ B`` in the kernel's shape, float32 (zero array without LoRA)."""
        if not self.has_lora:
            return jnp.zeros(self.kernel.shape, jnp.float32)
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        return jnp.tensordot(a, b, axes=1) * self.lora_scale

    def merged_kernel(self) -> jax.Array:
        """The base kernel with the adapter folded in (``kernel + scale * A @ B``), in the kernel's dtype."""
        k = self.kernel[...]
        return (k.astype(jnp.float32) + self.lora_delta()).astype(k.dtype) if self.has_lora else k

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.einsum(self.eq, x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.has_lora:
            eq_a, eq_b = self._lora_eqs()
            h = self.lora_dropout(x) if self.lora_dropout is not None else x
            h = jnp.einsum(eq_a, h, self.lora_a[...].astype(self.dtype))
            y = y + jnp.einsum(eq_b, h, self.lora_b[...].astype(self.dtype)) * jnp.asarray(self.lora_scale, self.dtype)
        return y


class KVCache(NamedTuple):
    """Per-layer keys and values (tuples of (B, S, K, H)) of a fixed length S, plus which slots hold tokens."""

    k: tuple
    v: tuple
    valid: jax.Array  # (B, S) bool

    @classmethod
    def zeros(cls, cfg: TextConfig, batch: int, length: int, dtype) -> "KVCache":
        shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
        return cls(zeros, zeros, jnp.zeros((batch, length), bool))


attention = xla_masked_attention  # the exact path (kernels: got_jax.models.attention.masked_attention)


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        d, n, kv, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(options=options, rngs=rngs)
        on = options.lora_on
        self.q_proj = DenseGeneral("BTD,DNH->BTNH", (d, n, h), ("embed", "heads", "kv"), (n, h), ("heads", "kv"),
                                   lora=on("q_proj"), **kw)
        self.k_proj = DenseGeneral("BTD,DNH->BTNH", (d, kv, h), ("embed", "kv_heads", "kv"), (kv, h),
                                   ("kv_heads", "kv"), lora=on("k_proj"), **kw)
        self.v_proj = DenseGeneral("BTD,DNH->BTNH", (d, kv, h), ("embed", "kv_heads", "kv"), (kv, h),
                                   ("kv_heads", "kv"), lora=on("v_proj"), **kw)
        self.o_proj = DenseGeneral("BTNH,NHD->BTD", (n, h, d), ("heads", "kv", "embed"), lora=on("o_proj"), **kw)
        self.attention_impl = options.attention_impl

    def __call__(self, x, cos, sin, mask, cache_kv=None, index=None, kv_valid=None):
        """Returns (output, (k, v)): the full cache entries (after the update) when ``cache_kv`` is given.

        ``kv_valid`` (B, S) or None: given, ``mask`` is ``causal & kv_valid`` (query i at slot i), which
        lets the fused kernels of :func:`~got_jax.models.attention.masked_attention` use it."""
        q = _apply_rope(self.q_proj(x), cos, sin)
        k = _apply_rope(self.k_proj(x), cos, sin)
        v = self.v_proj(x)
        if cache_kv is not None:
            ck, cv = cache_kv
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
        q = sharding.constrain(q, "activation_batch", "activation_length", "activation_heads", None)
        out = masked_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.attention_impl, kv_valid)
        return self.o_proj(out), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(options=options, rngs=rngs)
        on = options.lora_on
        self.gate_proj = DenseGeneral("BTD,DF->BTF", (d, f), ("embed", "mlp"), lora=on("gate_proj"), **kw)
        self.up_proj = DenseGeneral("BTD,DF->BTF", (d, f), ("embed", "mlp"), lora=on("up_proj"), **kw)
        self.down_proj = DenseGeneral("BTF,FD->BTD", (f, d), ("mlp", "embed"), lora=on("down_proj"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        kw = dict(options=options, rngs=rngs)
        self.options = options
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x, cos, sin, mask, cache_kv=None, index=None, kv_valid=None):
        """(output, (k, v)); without a cache the layer runs under ``options.remat`` (training)."""
        if cache_kv is None:
            if kv_valid is None:
                return remat_call(self.options, lambda m, *a: m.forward(*a), self, x, cos, sin, mask)
            return remat_call(self.options, lambda m, x, c, s, mk, kv: m.forward(x, c, s, mk, None, None, kv),
                              self, x, cos, sin, mask, kv_valid)
        return self.forward(x, cos, sin, mask, cache_kv, index, kv_valid)

    def forward(self, x, cos, sin, mask, cache_kv=None, index=None, kv_valid=None):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_kv, index, kv_valid)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return sharding.constrain(x, "activation_batch", "activation_length", "activation_embed"), kv


class TextModel(nnx.Module):
    """Embedding, decoder layers and the final norm (transformers' ``Qwen2_5_VLTextModel``)."""

    def __init__(self, cfg: TextConfig, *, options: ModelOptions, rngs: nnx.Rngs):
        kw = dict(options=options, rngs=rng.KeyStream(rngs))
        self.cfg = cfg
        self.dtype = options.dtype
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=options.dtype,
                                      param_dtype=options.param_dtype,
                                      embedding_init=sharding.param_init(_INIT, "vocab", "embed"), rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

    def __call__(self, embeds, positions, mask, cache: KVCache | None = None, index=None, kv_valid=None):
        """Final-norm hidden states (B, T, D) and the updated cache (None without one).

        ``positions`` (3, B, T) M-RoPE positions; ``mask`` (B, T, S) which keys each query may see
        (S = T without a cache, the cache length with one); ``index`` is the cache slot of token 0.
        ``kv_valid`` (B, S): pass it when ``mask == causal & kv_valid`` with token 0 at slot 0 (prefill),
        so fused attention kernels can take the mask as causal + segments.
        """
        cos, sin = mrope_cos_sin(positions, self.cfg, self.dtype)
        x = embeds.astype(self.dtype)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            ckv = None if cache is None else (cache.k[i], cache.v[i])
            x, (k, v) = layer(x, cos, sin, mask, ckv, index, kv_valid)
            ks.append(k)
            vs.append(v)
        new_cache = None if cache is None else cache._replace(k=tuple(ks), v=tuple(vs))
        return self.norm(x), new_cache


# --------------------------------------------------------------------------------------------------
# The multimodal model
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class ModelOutput:
    """``logits`` (B, T, V) float32 and ``hidden_states`` (B, T, D): last layer after the final norm."""

    logits: Any
    hidden_states: Any


class Qwen2_5_VLForConditionalGeneration(nnx.Module):
    """Qwen2.5-VL: vision tower (``visual``, absent when the config has none), language model, LM head.

    ``options`` (:class:`~got_jax.models.options.ModelOptions`) sets dtypes, remat of the decoder layers
    and vision blocks, and the LoRA adapters on the decoder projections.
    """

    def __init__(self, cfg: Qwen2_5_VLConfig, *, options: ModelOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        kw = dict(options=options, rngs=rng.KeyStream(rngs))
        self.cfg = cfg
        self.options = options
        self.dtype = options.dtype
        self.visual = Qwen2_5_VisionTransformer(cfg.vision, **kw) if cfg.vision is not None else nnx.data(None)
        self.language_model = TextModel(cfg.text, **kw)
        t = cfg.text
        self.lm_head = (nnx.data(None) if t.tie_word_embeddings else
                        DenseGeneral("BTD,DV->BTV", (t.hidden_size, t.vocab_size), ("embed", "vocab"), **kw))

    # --- pieces -------------------------------------------------------------------------------

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM-head logits in float32 (tied: hidden @ embedding.T)."""
        if self.lm_head is None:
            emb = self.language_model.embed_tokens.embedding[...].astype(self.dtype)
            out = jnp.einsum("BTD,VD->BTV", hidden.astype(self.dtype), emb)
        else:
            out = self.lm_head(hidden)
        return sharding.constrain(out.astype(jnp.float32), "activation_batch", "activation_length", "vocab")

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
              vision_aux: VisionAux | None = None) -> jax.Array:
        """Token embeddings with image features scattered into the ``image_token_id`` positions (in order)."""
        x = self.language_model.embed_tokens(input_ids)
        if pixel_values is None:
            return x
        if self.visual is None:
            raise ValueError("pixel_values given but the model has no vision tower (config without vision_config)")
        feats = self.visual(pixel_values, vision_aux).astype(x.dtype)
        is_img = input_ids == self.cfg.image_token_id
        idx = jnp.cumsum(is_img.reshape(-1)) - 1
        gathered = feats[jnp.clip(idx, 0, feats.shape[0] - 1)].reshape(x.shape)
        return jnp.where(is_img[..., None], gathered, x)

    def prepare(self, input_ids, image_grid_thw=None, attention_mask=None, pad_to=None):
        """Host-side inputs: (positions (3,B,T), rope_deltas (B,), mask (B,T) bool, vision aux or None)."""
        ids = np.asarray(input_ids)
        mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        positions, deltas = get_rope_index(ids, self.cfg, image_grid_thw, mask)
        aux = None
        if image_grid_thw is not None:
            if self.cfg.vision is None:
                raise ValueError("image_grid_thw given but the model has no vision tower")
            n_tok = int((ids == self.cfg.image_token_id).sum())
            m2 = self.cfg.vision.merge_unit
            n_feat = int(np.prod(np.asarray(image_grid_thw), axis=-1).sum()) // m2
            if n_tok != n_feat:
                raise ValueError(f"Image features and image tokens do not match: {n_tok} tokens with id "
                                 f"{self.cfg.image_token_id}, {n_feat} features from image_grid_thw")
            aux = prepare_vision_inputs(np.asarray(image_grid_thw), self.cfg.vision, pad_to=pad_to)
        return positions, deltas, mask, aux

    def forward(self, input_ids, positions, mask, pixel_values=None, vision_aux=None,
                with_logits: bool = True) -> ModelOutput:
        """Cache-free forward on prepared inputs (jit-able). ``mask`` (B, T) marks real tokens.

        ``with_logits=False`` skips the LM head (``logits`` is None).
        """
        x = self.embed(input_ids, pixel_values, vision_aux)
        t = input_ids.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        attn_mask = causal[None] & mask[:, None, :]
        hidden, _ = self.language_model(x, positions, attn_mask, kv_valid=mask)
        return ModelOutput(logits=self.logits(hidden) if with_logits else None, hidden_states=hidden)

    def __call__(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None) -> ModelOutput:
        """Like transformers: logits and last hidden states for (host) ``input_ids`` (B, T).

        ``pixel_values`` (patches, patch_dim) and ``image_grid_thw`` (images, 3) are what the image
        processor returns. Positions are computed on the host, so call this eagerly (or use
        :meth:`prepare` + :meth:`forward` under ``jit``).
        """
        positions, _, mask, aux = self.prepare(input_ids, image_grid_thw, attention_mask)
        pv = None if pixel_values is None else jnp.asarray(pixel_values)
        return self.forward(jnp.asarray(input_ids), jnp.asarray(positions), jnp.asarray(mask), pv, aux)


def count_params(model: nnx.Module) -> int:
    """Number of parameters (works on abstract models from ``nnx.eval_shape``)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
