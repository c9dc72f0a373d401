r"""Recipe 7's try: the demo GoT with a 4-layer reasoner (the shipped demo's has 2), 3,900 GoT steps.

Why: the shipped demo (recipe 6) plans positions right (1.000) but draws each planned shape in its own box only at
chance (shapes-GenEval ``draws``: position 0.125), and its colour-attribution plans give a shape the other's colour
(0.333). Both are binding failures. Diagnostics on recipe 6 (README, "The shipped demo GoT"): the drawn shape
follows the cross-attention context, not the pooled ``text_embeds`` (16 single-object prompts with either signal
taken from another prompt), yet swapping the two shapes between a plan's objects moves the 64 query hidden states
by only 14% and the drawn shapes not at all. The query states are the reasoner's last layer attending over the
prompt and plan; two layers leave little room to route each object's colour and shape into its own tokens. This
config doubles the depth and trains 3,900 steps instead of 4,200 to stay near the 45-min budget (same data, VAE
stage, seed and schedule otherwise).

Measured on 2026-12-02 (not shipped): GoT stage 42.1 min (over the budget; beside other jobs), held-out LM 0.137,
diffusion 0.0086 (recipe 6: 0.126, 0.0066). Shapes-GenEval at g 2, c 2: plans 0.903 (colour attribution 0.500,
counting 0.917: better than recipe 6's 0.847) but images 0.208 and draws 0.208 (recipe 6: 0.545, 0.566): the
deeper reasoner plans better, and the UNet, with fewer and slower steps, draws worse::

    python train.py --config configs/demo_shapes_deep.py --config.stage=got --workdir /runs/demo_deep \
        --config.data.shapes_dir=/data/shapes64 --config.model.vae_from=/runs/demo_vae
    python -m got_jax.train.export --demo --config configs/demo_shapes_deep.py --workdir /runs/demo_deep \
        --config.model.vae_from=/runs/demo_vae --out /runs/demo_deep_export
    python -m got_jax.eval.shapes --ckpt /runs/demo_deep_export --out /runs/demo_deep_eval
"""

import ml_collections

from configs import demo_shapes


def get_config() -> ml_collections.ConfigDict:
    c = demo_shapes.get_config()
    c.stages.got.total_steps = 3900
    c.model.demo_reasoner = ml_collections.ConfigDict({"num_hidden_layers": 4})
    return c
