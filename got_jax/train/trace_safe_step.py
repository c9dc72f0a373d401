"""A wrapper of :class:`got_jax.train.step.TrainStep` whose gradient trace owns every Variable it touches.

``TrainStep._step`` closes over the non-trainable state (``rest``) inside ``jax.grad``; modules merged from it
then hold Variables of the outer trace, and anything that writes a Variable inside the gradient trace fails
with flax's ``TraceContextError``: ``nnx.remat`` (``ModelOptions.remat="full"|"dots"``, the got_6b recipe) and
the LoRA-dropout reseed (``lora_dropout > 0``). Passing ``rest`` through ``jax.grad`` as a (non-differentiated)
argument *and copying its Variables inside the gradient trace* (``jax.grad`` closes over non-differentiated
arguments, so passing alone is not enough) fixes both; the arithmetic is unchanged. To be folded into ``TrainStep`` by its owners.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from got_jax.train import losses
from got_jax.train import step as S


class TraceSafeTrainStep(S.TrainStep):
    def _step(self, state, prepared, key, draws):
        ts = nnx.merge(self.graphdef, state)
        model, optimizer = ts.model, ts.optimizer
        k_draw, k_drop = jax.random.split(key)
        if draws is None:
            draws = S.draws_for(k_draw, prepared, model, self.schedule, self.loss_cfg)
        gdef, params, rest = nnx.split(model, optimizer.wrt, ...)
        loss_fn = getattr(self, "loss_fn", losses.got_loss)

        def micro_loss(p, r, mb, d, i):
            # jax.grad does not trace non-differentiated arguments: copy ``r``'s Variables into this trace
            r = jax.tree.map(lambda x: x, r)
            m = nnx.merge(gdef, p, r)
            S._reseed_dropout(m, jax.random.fold_in(k_drop, i))
            return loss_fn(m, mb["inputs"], mb["images"], d, self.schedule, self.loss_cfg)

        grad_fn = jax.grad(micro_loss, has_aux=True)
        accum = jax.tree.leaves(prepared)[0].shape[0]

        def body(acc, xs):
            mb, d, i = xs
            g, metrics = grad_fn(params, rest, mb, d, i)
            return jax.tree.map(jnp.add, acc, g), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, metrics = jax.lax.scan(body, zeros, (prepared, draws, jnp.arange(accum)))
        grads = jax.tree.map(lambda g: g / accum, grads)
        metrics = {k: jnp.mean(v) for k, v in metrics.items()}
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["learning_rate"] = jnp.asarray(self.lr(optimizer.step[...]), jnp.float32)
        if self.return_grads:
            metrics["grads"] = grads
        optimizer.update(model, grads)
        return nnx.state(ts), metrics
