"""Frozen-VAE conditioning latents cached on the host (``config.loss.cache_latents``): each example encoded once.

GoT's VAE is frozen, and the three latents the diffusion loss needs are deterministic functions of an
example's images (:func:`got_jax.train.losses.conditioning_latents`: the target's posterior mean x scaling
factor, the reference's VAE mode, the mean of the per-box modes of the layout canvases) - no random draw is
involved. A run that visits a small dataset many times (the demo: ~14,000 records, ~6 visits each) otherwise
pays those encodes - a target, a reference and ``max_boxes`` canvases per example - on every visit; at the
demo's sizes they are a third of a train step on the CPU.

:class:`LatentCache` keeps the latents of every example it has seen, keyed by a digest of the example's image
fields (``target_image``, ``reference_image``, ``layout_canvases``, ``layout_mask``: content, so the cache is
right for any source, mixture, order, ablation or process count). :meth:`LatentCache.attach` replaces a
pipeline batch's image fields by ``target_latents`` / ``reference_latents`` / ``layout_latents`` (host numpy,
float32); misses are encoded by the very function the step uses, jitted once for a chunk of ``chunk``
examples (the last chunk padded by repeating an example). An example's latents do not depend on the other
examples of its chunk (tested bit for bit), so a resumed run - whose cache starts empty - recomputes exactly
the values the interrupted run used. The step then skips its encodes (:func:`~got_jax.train.losses.
conditioning_latents` returns the given latents). They equal the in-step encodes to float32 rounding (XLA
fuses the two programs differently): ``tests/test_latent_cache.py`` states the tolerance.

Host memory: 3 x latent size per distinct example (the demo: 3 x 16 x 16 x 4 float32 = 12 KiB, 170 MiB for
14,000 examples). Past ``max_bytes`` (``config.loss.cache_latents_max_gib``) new examples are encoded but not
kept (logged once): still correct, only slower. For pod-scale data, store latents with the dataset instead.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from got_jax.got.model import GoT
from got_jax.train import losses
from got_jax.train.losses import IMAGE_FIELDS, LATENT_FIELDS

log = logging.getLogger(__name__)


class FrozenEncoder(nnx.Module):
    """A copy of GoT's frozen VAE with the GoT methods the conditioning latents use (``encode_mode``,
    ``layout_latents``; ``config``, ``dtype``): what :func:`got_jax.train.losses.conditioning_latents` needs of a
    model, on its own buffers (the train state is donated every step, and with it the model's VAE arrays), whole on
    this process's first device (each process encodes its own examples)."""

    def __init__(self, model):
        gdef, state = nnx.split(model.vae)
        if jax.process_count() > 1:  # the VAE may be sharded over processes: each process gets it whole
            from jax.experimental import multihost_utils  # noqa: PLC0415

            state = multihost_utils.process_allgather(state, tiled=True)
        else:
            state = jax.device_get(state)
        # on this process's first device, as new buffers (numpy -> device: a copy)
        self.vae = nnx.merge(gdef, jax.device_put(jax.tree.map(np.asarray, state), jax.local_devices()[0]))
        self.config = model.config
        self.dtype = model.dtype

    encode_mode = GoT.encode_mode
    encode_mode_each = GoT.encode_mode_each
    layout_latents = GoT.layout_latents


def example_key(batch: Mapping[str, Any], i: int) -> bytes:
    """Digest of example ``i``'s image fields (values, dtypes and shapes)."""
    h = hashlib.blake2b(digest_size=16)
    for k in IMAGE_FIELDS:
        a = np.ascontiguousarray(np.asarray(batch[k])[i])
        h.update(f"{k}{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.digest()


class LatentCache:
    """Host cache of conditioning latents (see the module docstring).

    ``LatentCache(model, chunk=8, max_bytes=4 GiB, encode_passes=0)``; ``attach(batch)`` -> the batch with
    :data:`LATENT_FIELDS` instead of :data:`IMAGE_FIELDS`. ``hits`` / ``misses`` / ``encoded`` count examples.
    """

    def __init__(self, model, *, chunk: int = 8, max_bytes: int = 4 << 30, encode_passes: int = 0):
        if chunk < 1:
            raise ValueError(f"LatentCache: chunk must be >= 1, got {chunk}")
        self.chunk, self.max_bytes = int(chunk), int(max_bytes)
        self.encoder = FrozenEncoder(model)
        gdef, state = nnx.split(self.encoder)
        self._state = state
        self._encode = jax.jit(lambda st, b: losses.conditioning_latents(nnx.merge(gdef, st), b, encode_passes))
        self._store: dict[bytes, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.nbytes = 0
        self.hits = self.misses = self.encoded = 0
        self._full_logged = False

    def __len__(self) -> int:
        return len(self._store)

    def encode(self, batch: Mapping[str, Any], rows) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Latents of examples ``rows`` of ``batch`` (no caching), in chunks of ``self.chunk``."""
        rows = list(rows)
        out = []
        for s in range(0, len(rows), self.chunk):
            part = rows[s:s + self.chunk]
            idx = part + [part[0]] * (self.chunk - len(part))
            chunk = {k: np.asarray(batch[k])[idx] for k in IMAGE_FIELDS}
            lat = [np.asarray(x) for x in jax.device_get(self._encode(self._state, chunk))]
            out.extend(tuple(x[j] for x in lat) for j in range(len(part)))
            self.encoded += len(part)
        return out

    def attach(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """``batch`` (a pipeline batch, numpy) with its image fields replaced by the cached latents."""
        missing = [k for k in IMAGE_FIELDS if k not in batch]
        if missing:
            raise KeyError(f"LatentCache.attach: the batch lacks {missing} (keys: {sorted(batch)})")
        n = int(np.shape(batch["target_image"])[0])
        keys = [example_key(batch, i) for i in range(n)]
        found: dict[int, tuple] = {}
        miss_rows, first_row = [], {}
        for i, key in enumerate(keys):
            if key in self._store:
                found[i] = self._store[key]
            elif key in first_row:  # the same example twice in one batch: encode it once
                continue
            else:
                first_row[key] = i
                miss_rows.append(i)
        self.hits += len(found)
        self.misses += n - len(found)
        for i, lat in zip(miss_rows, self.encode(batch, miss_rows)):
            found[i] = lat
            size = sum(x.nbytes for x in lat)
            if self.nbytes + size <= self.max_bytes:
                self._store[keys[i]] = lat
                self.nbytes += size
            elif not self._full_logged:
                self._full_logged = True
                log.warning("latent cache full (%d examples, %.2f GiB = loss.cache_latents_max_gib): new examples are "
                            "encoded without being kept", len(self._store), self.nbytes / 2**30)
        for i, key in enumerate(keys):
            if i not in found:
                found[i] = found[first_row[key]]
        out = {k: v for k, v in batch.items() if k not in IMAGE_FIELDS}
        for j, name in enumerate(LATENT_FIELDS):
            out[name] = np.stack([found[i][j] for i in range(n)])
        return out

    def stats(self) -> dict[str, float]:
        return {"examples": len(self._store), "hits": self.hits, "misses": self.misses, "encoded": self.encoded,
                "gib": self.nbytes / 2**30}
