"""Logical-axis sharding on 8 fake CPU devices (tests/conftest.py sets the device count)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import sample as sample_config
from configs.sharding_rules import RULES
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
    assert sharding.logical_to_spec(("embed", "mlp"), RULES, mesh=mesh, shape=(16, 64)) == P("fsdp", "tensor")
    # a dim the mesh does not divide stays replicated
    assert sharding.logical_to_spec(("embed", "mlp"), RULES, mesh=mesh, shape=(15, 64)) == P(None, "tensor")
    assert sharding.logical_to_spec(("activation_batch", None), RULES, mesh=mesh, shape=(8, 3)) == P(("data", "fsdp"), None)
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
    sharding.shard_model(model, mesh, RULES)
    assert model.up.kernel.get_value().sharding.spec == P("fsdp", "tensor")
    with sharding.use_mesh(mesh, RULES):
        out = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def _entry_points():
    """Library functions that take a mesh, each called with a mesh and no rules (name, call)."""
    from got_jax.checkpoint.orbax_io import load_checkpoint
    from got_jax.got.checkpoint import load_got_checkpoint
    from got_jax.got.demo import demo_pipeline
    from got_jax.got.model import GoT
    from got_jax.got.pipeline import GoTPipeline
    from got_jax.models.qwen2_5_vl import load_hf_checkpoint
    from got_jax.models.qwen2_5_vl.lora import materialize
    from got_jax.models.sdxl import load_diffusers_checkpoint

    return [
        ("load_hf_checkpoint", lambda folder, mesh: load_hf_checkpoint(folder, mesh=mesh)),
        ("load_diffusers_checkpoint", lambda folder, mesh: load_diffusers_checkpoint(folder, "unet", mesh=mesh)),
        ("load_checkpoint", lambda folder, mesh: load_checkpoint(folder, parts={}, mesh=mesh)),
        ("load_got_checkpoint", lambda folder, mesh: load_got_checkpoint(folder, mesh=mesh)),
        ("GoT.from_checkpoint", lambda folder, mesh: GoT.from_checkpoint(folder, mesh=mesh)),
        ("GoTPipeline.from_pretrained", lambda folder, mesh: GoTPipeline.from_pretrained(folder, mesh=mesh)),
        ("demo_pipeline", lambda folder, mesh: demo_pipeline(mesh=mesh)),
        ("materialize", lambda folder, mesh: materialize(None, jax.random.key(0), mesh=mesh)),
    ]


def test_mesh_without_rules_raises(tmp_path):
    """No library default rules: each entry point given a mesh but no rules fails first, naming itself and
    pointing at the config's rules (the folder does not exist, so reaching the loader would raise otherwise)."""
    assert not hasattr(sharding, "DEFAULT_RULES")
    mesh = sharding.make_mesh((1, 8, 1))
    missing = str(tmp_path / "nothing")
    for name, call in _entry_points():
        with pytest.raises(ValueError, match=rf"^{name}: a mesh was given without sharding rules; pass the rules "
                                             r"from the config \(e\.g\. configs\.sharding_rules\.RULES\)"):
            call(missing, mesh)
    with pytest.raises(ValueError, match="sharding rules are None"):
        with sharding.use_mesh(mesh, None):
            pass
    with pytest.raises(ValueError, match="sharding rules are None"):
        sharding.logical_to_spec(("embed",), None, mesh, (16,))


def test_sample_config_carries_rules():
    """sample.py's config holds the mesh shape and the production rules table (the entry point builds the
    shardings from them); every rule names a known logical axis and only mesh axes."""
    cfg = sample_config.get_config()
    assert tuple(cfg.mesh_shape) == () and tuple(cfg.rules) == RULES
    for name, axes in RULES:
        assert name in sharding.LOGICAL_AXES
        assert all(a in sharding.MESH_AXES for a in ((axes,) if isinstance(axes, str) else axes or ()))
    mesh = sharding.make_mesh((2, 2, 2))
    assert sharding.logical_to_spec(("vocab", "embed"), cfg.rules, mesh, (64, 16)) == P("tensor", "fsdp")
