"""Attention kernels behind ``ModelOptions.attention_impl`` (got_jax/models/attention.py) against the exact XLA path.

* Pallas TPU flash attention: run on CPU in Pallas' TPU interpret mode (``force_tpu_interpret_mode``), the same
  kernel code as on a TPU (Mosaic lowering itself is not exercised), with the backend faked to ``"tpu"`` so
  ``"auto"`` selects it. Covered: unmasked SDXL self / cross attention with lengths that are not whole blocks;
  the reasoner's causal + left-padding mask with grouped-query heads and a KV cache longer than the prompt;
  the vision tower's segment attention (full and chunked window layout, -1 padding patches); a whole tiny
  reasoner (prefill logits, greedy decode) with ``"auto"`` on the faked TPU equals it on CPU.
* cuDNN: cannot run without a GPU. Its wrapper (our layout, the (B, T, S) mask broadcast over heads, grouped
  heads, the window layout) is run through ``jax.nn.dot_product_attention(implementation="xla")`` with the
  backend faked to ``"gpu"``, and the test asserts it was called (bfloat16) or skipped (float32, decode).
* Selection: ``resolve`` per faked backend, the cuDNN / Pallas applicability rules, unknown names.

Tolerances: float32 kernels ``max abs err <= 2e-5`` (outputs are O(1)); bfloat16 ``<= 2e-2``. The reasoner's
padding query rows (all keys masked) carry no information and are excluded, as in the model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from got_jax.models import attention as A
from got_jax.models.options import ModelOptions
from got_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from got_jax.models.qwen2_5_vl.generate import forward, generate
from got_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration
from got_jax.models.sdxl import layers


def _qkv(seed, b, t, s, n, kh, h, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, t, n, h), dtype), jax.random.normal(ks[1], (b, s, kh, h), dtype),
            jax.random.normal(ks[2], (b, s, kh, h), dtype))


def _err(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


@pytest.fixture
def fake(monkeypatch):
    """fake("tpu") makes ``attention.backend()`` report that platform (and drops compiled caches)."""
    def set_platform(name):
        jax.clear_caches()
        monkeypatch.setattr(A, "backend", lambda: name)
    yield set_platform
    jax.clear_caches()


def _causal_padding(b, t, s, pads):
    valid = np.zeros((b, s), bool)
    for i, p in enumerate(pads):
        valid[i, p:t] = True
    causal = np.arange(s)[None, :] <= np.arange(t)[:, None]
    return jnp.asarray(causal[None] & valid[:, None, :]), jnp.asarray(valid)


def test_selection_by_backend_and_applicability(fake):
    assert [A.resolve("auto", p) for p in ("cpu", "gpu", "tpu")] == ["xla", "cudnn", "pallas"]
    assert A.resolve("xla", "tpu") == "xla" and A.resolve("pallas", "cpu") == "pallas"
    fake("gpu")
    assert A.resolve("auto") == "cudnn"
    q, k, _ = _qkv(0, 1, 8, 8, 4, 2, 64, jnp.bfloat16)
    assert A.cudnn_supports(q, k)
    assert not A.cudnn_supports(q.astype(jnp.float32), k.astype(jnp.float32))  # cuDNN flash: half precision only
    assert not A.cudnn_supports(q[:, :1], k)  # decode step (one query): XLA
    q2, k2, _ = _qkv(0, 1, 8, 8, 4, 2, 512, jnp.bfloat16)  # the VAE's 512-wide single head
    assert not A.cudnn_supports(q2, k2) and not A.pallas_supports(q2, k2)
    assert A.pallas_supports(q, k) and not A.pallas_supports(q[:, :1], k)
    with pytest.raises(ValueError, match="unknown attention implementation 'nope'"):
        A.dense_attention(q, k, k, "nope")
    assert set(A.BUILTIN) <= set(layers.ATTENTION_FNS)


# ---------------------------------------------------------------------------------------------------------
# Pallas TPU flash attention in interpret mode
# ---------------------------------------------------------------------------------------------------------


def test_pallas_dense_self_and_cross_attention(fake):
    fake("tpu")
    calls = []
    real = A.pallas_flash_attention
    with pltpu.force_tpu_interpret_mode():
        for t, s in ((150, 150), (130, 77)):  # UNet self-attention / cross-attention to 77 tokens, odd lengths
            q, k, v = _qkv(t, 1, t, s, 2, 2, 32)
            A.pallas_flash_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)
            try:
                out = layers.get_attention("auto")(q, k, v)
            finally:
                A.pallas_flash_attention = real
            ref = jax.nn.dot_product_attention(q, k, v, implementation="xla")
            assert _err(out, ref) <= 2e-5, (t, s)
    assert len(calls) == 2


def test_pallas_reasoner_causal_left_padding_gqa(fake):
    fake("tpu")
    b, t, s, pads = 3, 140, 160, (0, 5, 139)  # cache longer than the prompt; one row with a single real token
    q, k, v = _qkv(1, b, t, s, 4, 2, 16)
    mask, valid = _causal_padding(b, t, s, pads)
    ref = A.xla_masked_attention(q, k, v, mask)
    with pltpu.force_tpu_interpret_mode():
        out = jax.jit(A.masked_attention, static_argnums=4)(q, k, v, mask, "auto", valid)
        no_hint = jax.jit(A.masked_attention, static_argnums=4)(q, k, v, mask, "auto")  # no kv_valid: exact XLA
    real_rows = np.asarray(valid[:, :t])
    assert np.isfinite(np.asarray(out)).all()
    for i in range(b):
        assert _err(out[i][real_rows[i]], ref[i][real_rows[i]]) <= 2e-5, i
    assert _err(no_hint, jax.jit(A.xla_masked_attention)(q, k, v, mask)) == 0.0


@pytest.mark.parametrize("chunk", [None, 16])
def test_pallas_vision_segments(fake, chunk):
    fake("tpu")
    length = 64
    seg = np.repeat(np.arange(5), [16, 16, 8, 8, 16]).astype(np.int32)  # windows of the vision tower
    seg[-8:] = -1  # padding patches (they only see each other)
    q, k, v = (x[0] for x in _qkv(2, 1, length, length, 2, 2, 16))
    ref = A.xla_segment_attention(q, k, v, jnp.asarray(seg), chunk, 0.25)
    with pltpu.force_tpu_interpret_mode():
        out = A.segment_attention(q, k, v, jnp.asarray(seg), chunk, 0.25, "auto")
    assert _err(out, ref) <= 2e-5


def _tiny_reasoner(options):
    cfg = Qwen2_5_VLConfig.from_hf_config({
        "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True, "eos_token_id": 1,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}})
    return Qwen2_5_VLForConditionalGeneration(cfg, options=options, rngs=nnx.Rngs(3))


def test_pallas_in_the_reasoner_prefill_and_decode(fake):
    """The model path: ``kv_valid`` reaches the kernel from the cache-free forward and from generate's prefill."""
    model = _tiny_reasoner(ModelOptions(attention_impl="auto"))
    rng = np.random.RandomState(0)
    ids = rng.randint(2, 97, (2, 130))
    mask = np.ones_like(ids)
    mask[1, :37] = 0  # left padding
    fake("cpu")
    ref = forward(model, ids, attention_mask=mask).logits
    ref_tok = generate(model, ids, attention_mask=mask, max_new_tokens=3, stop_token_ids=()).tokens
    fake("tpu")
    with pltpu.force_tpu_interpret_mode():
        out = forward(model, ids, attention_mask=mask).logits
        tok = generate(model, ids, attention_mask=mask, max_new_tokens=3, stop_token_ids=()).tokens
    real = mask.astype(bool)
    scale = max(1.0, float(jnp.max(jnp.abs(ref))))
    assert _err(out[real], ref[real]) <= 2e-5 * scale
    np.testing.assert_array_equal(np.asarray(tok), np.asarray(ref_tok))


# ---------------------------------------------------------------------------------------------------------
# cuDNN wrapper (run through jax.nn.dot_product_attention's XLA implementation)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def cudnn_as_xla(fake, monkeypatch):
    fake("gpu")
    calls = []
    real = A.jax_nn_attention

    def as_xla(q, k, v, mask=None, scale=None, implementation="cudnn"):
        assert implementation == "cudnn"
        calls.append(q.shape)
        return real(q, k, v, mask, scale, implementation="xla")

    monkeypatch.setattr(A, "jax_nn_attention", as_xla)
    return calls


def test_cudnn_wrapper_masks_and_layouts(cudnn_as_xla):
    calls = cudnn_as_xla
    bf = jnp.bfloat16
    # reasoner: causal + left padding, grouped heads
    q, k, v = _qkv(3, 2, 24, 32, 4, 2, 16, bf)
    mask, valid = _causal_padding(2, 24, 32, (0, 9))
    out = A.masked_attention(q, k, v, mask, "auto", valid)
    ref = A.xla_masked_attention(q, k, v, mask)
    rows = np.asarray(valid[:, :24])
    for i in range(2):
        assert _err(out[i][rows[i]], ref[i][rows[i]]) <= 2e-2
    # SDXL self attention (no mask)
    q, k, v = _qkv(4, 2, 40, 40, 2, 2, 32, bf)
    assert _err(A.dense_attention(q, k, v, "auto"), A.xla_dense_attention(q, k, v)) <= 2e-2
    # vision: full and window (chunked) segment attention
    seg = jnp.asarray(np.repeat(np.arange(4), 8).astype(np.int32))
    q, k, v = (x[0] for x in _qkv(5, 1, 32, 32, 2, 2, 16, bf))
    for chunk in (None, 8):
        assert _err(A.segment_attention(q, k, v, seg, chunk, 0.25, "auto"),
                    A.xla_segment_attention(q, k, v, seg, chunk, 0.25)) <= 2e-2
    assert len(calls) == 4
    # float32 and decode steps are not cuDNN's: the exact path, bit for bit
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    assert _err(A.segment_attention(q32, k32, v32, seg, 8, 0.25, "auto"),
                A.xla_segment_attention(q32, k32, v32, seg, 8, 0.25)) == 0.0
    q, k, v = _qkv(6, 2, 1, 32, 4, 2, 16, bf)
    m1 = jnp.ones((2, 1, 32), bool)
    assert _err(A.masked_attention(q, k, v, m1, "auto"), A.xla_masked_attention(q, k, v, m1)) == 0.0
    assert len(calls) == 4
