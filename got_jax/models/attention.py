"""Attention kernels of got-jax behind one seam, chosen by :attr:`ModelOptions.attention_impl`.

Three call shapes cover every model (all q / k / v in (batch, length, heads, head_dim)):

* :func:`dense_attention` (SDXL UNet / VAE): no mask.
* :func:`masked_attention` (the reasoner): a boolean mask (B, T, S); grouped-query heads. When the caller
  also passes ``kv_valid`` (B, S) it promises the mask is ``causal & kv_valid`` with query ``i`` at key
  slot ``i`` (prefill, cache-free forward), which a kernel with causal + segment masks can use.
* :func:`segment_attention` (the vision tower): (L, H, D) where only equal segment ids meet; with
  ``chunk``, queries of each chunk see the previous, own and next chunk only (window attention).

Implementations (``attention_impl``):

* ``"xla"``: the exact einsum / softmax path (float32 scores and softmax); on CPU the UNet's large
  score matrices are query-blocked (same numbers). The reference every other kernel is tested against.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (fused flash attention) where
  cuDNN takes the shapes (bfloat16 / float16, head_dim a multiple of 8 and <= 128, more than one query);
  otherwise the ``"xla"`` path.
* ``"pallas"``: the Pallas TPU flash attention of ``jax.experimental.pallas.ops.tpu.flash_attention``
  (causal + segment ids; lengths padded to whole blocks with a padding segment); decode steps (one
  query) and arbitrary masks without ``kv_valid`` take the ``"xla"`` path.
* ``"auto"`` (the default): ``"cudnn"`` on GPU, ``"pallas"`` on TPU, ``"xla"`` elsewhere (:func:`resolve`).

Other names are looked up in :data:`got_jax.models.sdxl.layers.ATTENTION_FNS` (kernels registered with
``register_attention``) for the unmasked SDXL attention; masked calls with such names use ``"xla"``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BUILTIN = ("auto", "xla", "cudnn", "pallas")
QUERY_BLOCK = 64  # query rows per block of the CPU blocked attention
_BLOCKED_MIN_SCORES = 256 * 256  # score matrices (per batch and head) from this size on are blocked on CPU
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_PALLAS_PAD_SEGMENT = -7  # segment id of padding rows the Pallas wrapper adds (never a real id)


def backend() -> str:
    """The default backend's platform (``"cpu"``, ``"gpu"``, ``"tpu"``); tests replace this to fake one."""
    return jax.default_backend()


def resolve(impl: str, platform: str | None = None) -> str:
    """The kernel ``impl`` stands for: ``"auto"`` becomes ``"cudnn"`` on GPU, ``"pallas"`` on TPU, else ``"xla"``."""
    if impl != "auto":
        return impl
    platform = backend() if platform is None else platform
    return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "pallas"}.get(platform, "xla")


def cudnn_supports(q: jax.Array, k: jax.Array) -> bool:
    """Whether cuDNN's fused attention takes these operands (dtype, head_dim; one query = decode: no)."""
    h = q.shape[-1]
    return (q.dtype in _CUDNN_DTYPES and k.dtype == q.dtype and h % 8 == 0 and h <= 128 and q.shape[-3] > 1)


def pallas_supports(q: jax.Array, k: jax.Array) -> bool:
    """Whether the Pallas TPU flash kernel is used (more than one query, head_dim <= 256)."""
    return q.shape[-3] > 1 and q.shape[-1] <= 256 and k.dtype == q.dtype


# --------------------------------------------------------------------------------------------------
# The exact XLA paths (the reference of every kernel)
# --------------------------------------------------------------------------------------------------


def blocked_attention(q, k, v, block: int = QUERY_BLOCK):
    """Exact softmax attention computed ``block`` query rows at a time (``lax.map``).

    Same maths as ``jax.nn.dot_product_attention`` (max-subtracted softmax, float32 scores), but the
    (T, S) score matrix never exists whole: on CPU, where the full matrix does not fit in cache,
    this is about 3x faster for the UNet's 1024-4096-token self-attention.
    """
    b, t, n, h = q.shape
    pad = (-t) % block
    qh = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3) * (1.0 / math.sqrt(h))
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    blocks = qh.reshape(b, n, (t + pad) // block, block, h).transpose(2, 0, 1, 3, 4)

    def one(qb):
        s = jnp.einsum("bnqh,bnkh->bnqk", qb, kh, preferred_element_type=jnp.float32)
        p = jnp.exp(s - s.max(-1, keepdims=True))
        o = jnp.einsum("bnqk,bnkh->bnqh", p.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
        return (o / p.sum(-1, keepdims=True)).astype(q.dtype)

    out = jax.lax.map(one, blocks).transpose(1, 0, 3, 2, 4).reshape(b, t + pad, n, h)
    return out[:, :t]


def xla_dense_attention(q, k, v):
    """q (B, T, N, H), k / v (B, S, N, H) -> (B, T, N, H); scale 1/sqrt(H), no mask.

    ``jax.nn.dot_product_attention`` (XLA picks the fusion); on the CPU backend large score matrices go
    through :func:`blocked_attention` instead (same numbers, cache-sized blocks).
    """
    if backend() == "cpu" and q.shape[1] * k.shape[1] >= _BLOCKED_MIN_SCORES:
        return blocked_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def xla_masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention, softmax in float32. q (B,T,N,H), k/v (B,S,K,H), mask (B,T,S) bool."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k).astype(jnp.float32) * (h ** -0.5)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def _neighbours(a: jax.Array, chunk: int, fill) -> jax.Array:
    """(L, ...) -> (n, 3 * chunk, ...): chunks i-1, i, i+1 side by side (``fill`` beyond the ends)."""
    n = a.shape[0] // chunk
    pad = jnp.full((chunk,) + a.shape[1:], fill, a.dtype)
    b = jnp.concatenate([pad, a, pad]).reshape((n + 2, chunk) + a.shape[1:])
    return jnp.concatenate([b[:-2], b[1:-1], b[2:]], axis=1)


def _chunked(q, k, v, segments, chunk):
    """The window layout: q (n, chunk, H, D), k / v (n, 3 chunk, H, D), segment ids (n, chunk) / (n, 3 chunk)."""
    n = q.shape[0] // chunk
    kb, vb, sk = _neighbours(k, chunk, 0), _neighbours(v, chunk, 0), _neighbours(segments, chunk, -2)
    return q.reshape((n, chunk) + q.shape[1:]), kb, vb, segments.reshape(n, chunk), sk


def xla_segment_attention(q, k, v, segments, chunk, scale):
    """Softmax attention (float32 logits and softmax) of (L, H, D) q/k/v where only equal segment ids meet.

    With ``chunk`` (L a multiple of it, every segment at most ``chunk`` long and contiguous), queries
    of each chunk only look at keys of the previous, own and next chunk: exact, and O(L * 3 chunk)
    instead of O(L^2) for window attention.
    """
    dtype = q.dtype
    if chunk is None:
        mask = segments[:, None] == segments[None, :]
        logits = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32) * scale
        logits = jnp.where(mask[None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        return jnp.einsum("hqk,khd->qhd", probs, v)
    qb, kb, vb, sq, sk = _chunked(q, k, v, segments, chunk)
    logits = jnp.einsum("nqhd,nkhd->nhqk", qb, kb, preferred_element_type=jnp.float32) * scale
    mask = sq[:, None, :, None] == sk[:, None, None, :]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum("nhqk,nkhd->nqhd", probs, vb).reshape(q.shape)


# --------------------------------------------------------------------------------------------------
# cuDNN (jax.nn.dot_product_attention) and Pallas TPU flash attention
# --------------------------------------------------------------------------------------------------


def jax_nn_attention(q, k, v, mask=None, scale=None, implementation: str = "cudnn"):
    """``jax.nn.dot_product_attention`` on our layout: ``mask`` (B, T, S) bool broadcast over heads,
    grouped-query heads passed through (cuDNN takes them natively)."""
    m = None if mask is None else mask[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale, implementation=implementation)


def _block(length: int) -> int:
    return 512 if length >= 1024 else 128


def pallas_flash_attention(q, k, v, q_segments=None, kv_segments=None, *, causal: bool = False, scale=None):
    """Pallas TPU flash attention on our layout: q (B, T, N, H), k / v (B, S, K, H) (K divides N: k / v
    heads are repeated), optional segment ids (B, T) / (B, S) int32 (equal ids meet), ``causal`` with
    query ``i`` at key ``i``. T and S are padded to whole blocks with padding segments that only meet
    each other (so no real row sees a padding key); the padding rows are cut off."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa  # noqa: PLC0415 (TPU-only module)

    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if n != kh:
        k, v = jnp.repeat(k, n // kh, axis=2), jnp.repeat(v, n // kh, axis=2)
    bq, bk = _block(t), _block(s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    if tp != t or sp != s or q_segments is not None or kv_segments is not None:
        qs = jnp.zeros((b, t), jnp.int32) if q_segments is None else q_segments.astype(jnp.int32)
        ks = jnp.zeros((b, s), jnp.int32) if kv_segments is None else kv_segments.astype(jnp.int32)
        qs = jnp.pad(qs, ((0, 0), (0, tp - t)), constant_values=_PALLAS_PAD_SEGMENT)
        ks = jnp.pad(ks, ((0, 0), (0, sp - s)), constant_values=_PALLAS_PAD_SEGMENT)
        segment_ids = fa.SegmentIds(q=qs, kv=ks)
    else:
        segment_ids = None
    pad = lambda a, to: jnp.pad(a, ((0, 0), (0, to - a.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    sizes = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1, block_q_major_dkv=bq,
                          block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq, block_k_major_dq=bk,
                          block_k_dq=bk, block_q_dq=bq)
    out = fa.flash_attention(pad(q, tp), pad(k, sp), pad(v, sp), segment_ids=segment_ids, causal=causal,
                             sm_scale=h ** -0.5 if scale is None else scale, block_sizes=sizes)
    return out.transpose(0, 2, 1, 3)[:, :t]


# --------------------------------------------------------------------------------------------------
# The three call shapes
# --------------------------------------------------------------------------------------------------


def dense_attention(q, k, v, impl: str = "auto"):
    """Unmasked attention (SDXL UNet / VAE), scale 1/sqrt(H); registered kernel names are looked up too."""
    kind = resolve(impl)
    if kind == "cudnn" and cudnn_supports(q, k):
        return jax_nn_attention(q, k, v, implementation="cudnn")
    if kind == "pallas" and pallas_supports(q, k):
        return pallas_flash_attention(q, k, v)
    if kind in BUILTIN:
        return xla_dense_attention(q, k, v)
    from got_jax.models.sdxl.layers import get_attention  # noqa: PLC0415 (registry of custom kernels)

    return get_attention(kind)(q, k, v)


def masked_attention(q, k, v, mask, impl: str = "auto", kv_valid=None):
    """The reasoner's grouped-query attention (see the module docstring for ``kv_valid``)."""
    kind = resolve(impl)
    if kind == "cudnn" and cudnn_supports(q, k):
        return jax_nn_attention(q, k, v, mask, implementation="cudnn")
    if kind == "pallas" and kv_valid is not None and pallas_supports(q, k):
        seg_q = jnp.ones(q.shape[:2], jnp.int32)
        return pallas_flash_attention(q, k, v, seg_q, kv_valid.astype(jnp.int32), causal=True)
    return xla_masked_attention(q, k, v, mask)


def segment_attention(q, k, v, segments, chunk: int | None, scale: float, impl: str = "auto"):
    """The vision tower's attention: (L, H, D) q / k / v, equal ``segments`` meet (see module docstring)."""
    kind = resolve(impl)
    use_cudnn = kind == "cudnn" and cudnn_supports(q[None], k[None])
    use_pallas = kind == "pallas" and pallas_supports(q[None], k[None])
    if not (use_cudnn or use_pallas):
        return xla_segment_attention(q, k, v, segments, chunk, scale)
    if chunk is None:
        qb, kb, vb, sq, sk = q[None], k[None], v[None], segments[None], segments[None]
    else:
        qb, kb, vb, sq, sk = _chunked(q, k, v, segments, chunk)
    if use_cudnn:
        out = jax_nn_attention(qb, kb, vb, sq[:, :, None] == sk[:, None, :], scale, implementation="cudnn")
    else:
        out = pallas_flash_attention(qb, kb, vb, sq, sk, scale=scale)
    return out.reshape(q.shape)


def describe(impl: str, platform: str) -> str:
    """One line saying what ``impl`` runs on ``platform`` (for logs and benchmarks)."""
    kind = resolve(impl, platform)
    return f"attention {impl!r} on {platform}: {kind}" + (" (xla where the kernel does not apply)"
                                                            if kind in ("cudnn", "pallas") else "")
