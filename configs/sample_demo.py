"""Defaults of ``python sample.py`` without ``--ckpt``: the shipped demo GoT (``got_jax/assets/demo``, trained at 64 px
by ``configs/demo_shapes.py``) on CPU, with the settings its shapes-GenEval figures were measured with
(``python -m got_jax.eval.shapes`` defaults: DDPM 50 steps, greedy chains, float32, and the guidance scales the
demo's config.json records in ``sampling_defaults``; without them the paper's g 7.5, c 4.0). Also the defaults of
``--random_weights`` (the tiny random-weight GoT of the tests)."""

import json
import os

try:
    from configs import sample  # installed (pip install -e .) or run from the repository root
except ImportError:  # loaded by path (--config=/path/to/configs/sample_demo.py) from elsewhere
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "_got_jax_sample_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample.py"))
    sample = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sample)


def get_config():
    c = sample.get_config()
    c.height = 64
    c.width = 64
    c.num_inference_steps = 50
    c.max_new_tokens = 256  # the longest shapes chain (an editing plan) is ~200 tokens
    c.max_boxes = 4  # the demo was trained with at most 4 boxes
    c.dtype = "float32"
    for k, v in demo_guidance().items():
        setattr(c, k, v)
    return c


def demo_guidance(folder: str | None = None) -> dict:
    """The guidance scales the demo folder's config.json records (``sampling_defaults``; {} if none or no folder)."""
    from got_jax.got.demo import DEMO_DIR  # noqa: PLC0415
    from got_jax.got.pipeline import GUIDANCE_SCALES  # noqa: PLC0415

    folder = DEMO_DIR if folder is None else folder
    try:
        with open(os.path.join(folder, "config.json")) as f:
            defaults = json.load(f).get("sampling_defaults") or {}
    except (OSError, ValueError):
        return {}
    return {k: float(defaults[k]) for k in GUIDANCE_SCALES if k in defaults}
