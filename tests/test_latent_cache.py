"""The host latent cache (``config.loss.cache_latents``, :mod:`got_jax.train.latent_cache`).

Its latents are the step's own encodes (:func:`got_jax.train.losses.conditioning_latents`) computed once per
example: they must equal the in-step encodes of the same batch (float32, a different XLA program: atol 2e-6 on
latents of magnitude ~1), not depend on which other examples share their chunk (bit for bit: a resumed run
recomputes them), be found again by content (hits, duplicates within a batch), and stay correct past the memory
budget. ``tests/test_train_step.py`` checks a train step on cached latents against PyTorch, and
``tests/test_train_run.py`` a cached run against an uncached one and its resume.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import train_fixtures as fx

from got_jax.got.tokenizer import load_tokenizer
from got_jax.models.options import ModelOptions
from got_jax.train import losses
from got_jax.train import step as S
from got_jax.train.latent_cache import IMAGE_FIELDS, LATENT_FIELDS, LatentCache


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    m, _ = fx.to_jax(fx.torch_got(tok, seed=5), ModelOptions())
    return m


@pytest.fixture(scope="module")
def batches(tok):
    return {k: fx.pipeline_batch(tok, k, batch_size=4) for k in ("generation", "editing")}


def _schedule():
    from got_jax.diffusion.schedulers import TrainSchedule

    return TrainSchedule.from_config(fx.SCHEDULER)


@pytest.mark.parametrize("kind", ["generation", "editing"])
def test_cached_latents_equal_the_step_encodes(model, batches, kind):
    batch = batches[kind]
    cached = LatentCache(model, chunk=3).attach(batch)
    assert not set(IMAGE_FIELDS) & set(cached) and set(LATENT_FIELDS) <= set(cached)
    assert all(np.array_equal(cached[k], batch[k]) for k in batch if k not in IMAGE_FIELDS)
    want = jax.device_get(jax.jit(losses.conditioning_latents)(model, {k: batch[k] for k in IMAGE_FIELDS}))
    for name, w in zip(LATENT_FIELDS, want):
        assert cached[name].shape == w.shape and cached[name].dtype == np.float32, name
        assert float(np.abs(w).max()) > 0.1, f"{name}: latents too small for the test to see an error"
        np.testing.assert_allclose(cached[name], w, rtol=0, atol=2e-6, err_msg=name)
    if kind == "editing":  # real sources: the examples' reference latents differ
        assert not np.allclose(cached["reference_latents"][0], cached["reference_latents"][1])
    # what the step does with them: conditioning_latents hands them through; the draws get their shape
    got = jax.device_get(jax.jit(losses.conditioning_latents)(model, {k: cached[k] for k in LATENT_FIELDS}))
    assert all(np.array_equal(g, cached[n]) for g, n in zip(got, LATENT_FIELDS))
    prepared = S.prepare_batch(cached, model.config.reasoner)
    assert sorted(prepared["images"]) == sorted(S.LATENT_KEYS)
    d = S.draws_for(jax.random.key(0), prepared, model, _schedule(), losses.LossConfig())
    assert d.noise.shape == (1,) + cached["target_latents"].shape


def test_an_examples_latents_do_not_depend_on_its_chunk(model, batches):
    """Bit for bit: encoded alone (its chunk padded with copies of it) or beside three other examples."""
    batch = batches["editing"]
    cache = LatentCache(model, chunk=4)
    together = cache.encode(batch, [0, 1, 2, 3])
    for i in (0, 2):
        alone = cache.encode(batch, [i])[0]
        for name, a, t in zip(LATENT_FIELDS, alone, together[i]):
            assert np.array_equal(a, t), f"example {i}: {name} changes with its chunk"


def test_hits_duplicates_and_the_memory_budget(model, batches):
    batch = {k: np.array(v, copy=True) for k, v in batches["generation"].items()}
    for k in IMAGE_FIELDS:
        batch[k][1] = batch[k][0]  # example 1 is example 0 again
    cache = LatentCache(model, chunk=2)
    first = cache.attach(batch)
    assert cache.encoded == 3 and len(cache) == 3 and cache.misses == 4 and cache.hits == 0
    assert all(np.array_equal(first[n][0], first[n][1]) for n in LATENT_FIELDS)
    again = cache.attach(batch)
    assert cache.encoded == 3 and cache.hits == 4
    assert all(np.array_equal(first[n], again[n]) for n in LATENT_FIELDS)
    # a different example (another row order) is found by content
    perm = {k: (v[::-1] if k in IMAGE_FIELDS else v) for k, v in batch.items()}
    rev = cache.attach(perm)
    assert cache.encoded == 3 and all(np.array_equal(rev[n], first[n][::-1]) for n in LATENT_FIELDS)

    small = LatentCache(model, chunk=2, max_bytes=sum(first[n][0].nbytes for n in LATENT_FIELDS) * 2)
    out = small.attach(batch)
    assert len(small) == 2 and small.stats()["examples"] == 2  # full: the third example is not kept ...
    assert all(np.array_equal(out[n], first[n]) for n in LATENT_FIELDS)  # ... but its latents are right
    small.attach(batch)
    assert small.encoded == 4  # ... and encoded again on its next visit


def test_a_batch_without_image_fields_is_an_error(model, batches):
    batch = {k: v for k, v in batches["generation"].items() if k != "layout_canvases"}
    with pytest.raises(KeyError, match="layout_canvases"):
        LatentCache(model).attach(batch)
