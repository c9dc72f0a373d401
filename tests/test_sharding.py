"""Logical-axis sharding on 8 fake CPU devices (tests/conftest.py sets the device count)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from got_jax import sharding


class MLP(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.normal(0.02)
        self.up = nnx.Linear(16, 64, rngs=rngs, kernel_init=sharding.param_init(init, "embed", "mlp"))
        self.down = nnx.Linear(64, 16, rngs=rngs, kernel_init=sharding.param_init(init, "mlp", "embed"))

    def __call__(self, x):
        h = sharding.constrain(jax.nn.gelu(self.up(x)), "activation_batch", "mlp")
        return self.down(h)


def test_rules_to_specs():
    mesh = sharding.make_mesh((2, 2, 2))
    assert sharding.logical_to_spec(("embed", "mlp"), mesh=mesh, shape=(16, 64)) == P("fsdp", "tensor")
    # a dim the mesh does not divide stays replicated
    assert sharding.logical_to_spec(("embed", "mlp"), mesh=mesh, shape=(15, 64)) == P(None, "tensor")
    assert sharding.logical_to_spec(("activation_batch", None), mesh=mesh, shape=(8, 3)) == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="unknown logical axis"):
        sharding.param_init(nnx.initializers.zeros, "nonsense")
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh((2, 4, 2))


def test_sharded_model_matches_unsharded():
    assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
    mesh = sharding.make_mesh((2, 2, 2))
    model = MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 16))
    ref = model(x)
    sharding.shard_model(model, mesh)
    assert model.up.kernel.get_value().sharding.spec == P("fsdp", "tensor")
    with sharding.use_mesh(mesh):
        out = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
