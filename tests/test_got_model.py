"""The GoT model assembled at full size from the public reference configs (abstractly, no weights)."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from got_jax.got.model import GoT, GoTConfig

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "reference")


def _full_config() -> dict:
    def load(name):
        with open(os.path.join(REF, name)) as f:
            return json.load(f)

    unet = load("sdxl_base_unet_config.json") | {"in_channels": 12}
    return {"reasoner": load("qwen2_5_vl_3b_config.json"), "unet": unet, "vae": load("sdxl_vae_config.json"),
            "scheduler": load("sdxl_scheduler_config.json"),
            "projectors": {"projector": {"in_features": 2048, "out_features": 2048},
                           "pooled_projector": {"in_features": 2048, "out_features": 1280}}}


def test_full_size_got_param_count():
    """Reasoner 3,754,622,976 + UNet (12 ch) 2,567,486,724 + VAE 83,653,863 + the two projectors."""
    cfg = GoTConfig.from_dict(_full_config())
    assert (cfg.context_dim, cfg.pooled_dim) == (2048, 1280)
    abstract = nnx.eval_shape(lambda: GoT(cfg, rngs=nnx.Rngs(0)))
    n = {part: sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(getattr(abstract, part), nnx.Param)))
         for part in ("reasoner", "projector", "pooled_projector", "unet", "vae")}
    assert n == {"reasoner": 3_754_622_976, "projector": 2048 * 2048 + 2048, "pooled_projector": 2048 * 1280 + 1280,
                 "unet": 2_567_486_724, "vae": 83_653_863}


@pytest.mark.parametrize("change,match", [
    ({"unet": {"in_channels": 4}}, "in_channels must be 3 \\* 4"),
    ({"projectors": {"projector": {"in_features": 1024, "out_features": 2048}}}, "in_features=1024"),
    ({"projectors": {"projector": {"in_features": 2048, "out_features": 1024}}}, "cross_attention_dim 2048"),
])
def test_inconsistent_configs_are_named(change, match):
    cfg = _full_config()
    for k, v in change.items():
        cfg[k] = cfg[k] | v if k == "unet" else v
    with pytest.raises(ValueError, match=match):
        GoTConfig.from_dict(cfg)
    with pytest.raises(ValueError, match="lacks sections"):
        GoTConfig.from_dict({"unet": {}})
