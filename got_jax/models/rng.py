"""Parameter keys for model constructors without one traced RNG update per parameter.

``nnx.Rngs`` advances a counter held in a ``Variable`` on every draw. Under ``nnx.eval_shape`` (how every
full-size model is built abstractly: checkpoint loading, parameter counts, ``train.py`` start-up) each
update costs time that grows with the traced program, so building the full GoT drew ~1,600 keys in
100-150 s. :class:`KeyStream` draws one key from the ``Rngs`` and folds a Python counter into it, which
keeps the build linear.
"""

from __future__ import annotations

import jax
from flax import nnx


class KeyStream:
    """Stands in for ``nnx.Rngs`` inside model constructors: ``params()`` folds a Python counter into one key.

    ``source`` is the ``nnx.Rngs`` it was made from. :meth:`stream` makes the ``nnx.RngStream`` a module
    keeps for call time (an ``nnx.Dropout``'s) the same way: one key drawn from ``source``'s stream of that
    name (its ``default`` stream when it has none), a counter folded in per stream.
    """

    def __init__(self, rngs: "nnx.Rngs | KeyStream"):
        self.source = rngs.source if isinstance(rngs, KeyStream) else rngs
        self._base = rngs.params()
        self._n = 0
        self._stream_bases: dict[str, tuple[jax.Array, int]] = {}

    def params(self) -> jax.Array:
        self._n += 1
        return jax.random.fold_in(self._base, self._n)

    def stream(self, tag: str) -> nnx.RngStream:
        base, n = self._stream_bases.get(tag) or (self.source[tag](), 0)
        self._stream_bases[tag] = (base, n + 1)
        return nnx.RngStream(jax.random.fold_in(base, n + 1), tag=tag)


def dropout(rate: float, rngs: "nnx.Rngs | KeyStream") -> nnx.Dropout:
    """An ``nnx.Dropout`` holding its own ``dropout`` stream (from :meth:`KeyStream.stream` or, for an
    ``nnx.Rngs``, forked from it as ``nnx.Dropout`` does)."""
    if not isinstance(rngs, KeyStream):
        return nnx.Dropout(rate, rngs=rngs)
    layer = nnx.Dropout(rate)
    layer.rngs = rngs.stream("dropout")
    return layer
