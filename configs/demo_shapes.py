r"""The shipped demo GoT, trained from random weights on the synthetic shapes set in two stages (2-core CPU).

    python -m got_jax.data.shapes --out /data/shapes64 --size 64 --num-generation 12000 --num-editing 2000 --seed 0 \
        --task-weights position=8
    python train.py --config configs/demo_shapes.py --config.stage=vae --workdir /runs/demo_vae \
        --config.data.shapes_dir=/data/shapes64
    python train.py --config configs/demo_shapes.py --config.stage=got --workdir /runs/demo_got \
        --config.data.shapes_dir=/data/shapes64 --config.model.vae_from=/runs/demo_vae
    python -m got_jax.train.export --demo --config configs/demo_shapes.py --workdir /runs/demo_got \
        --config.model.vae_from=/runs/demo_vae --out /runs/demo_export   # without --out: into got_jax/assets/demo

Stages (``--config.stage``; fields left at None take the stage's value, explicit overrides win):

* ``vae``: the small AutoencoderKL (diffusers architecture, ``block_out_channels`` (16, 16, 32): 64 px images ->
  16x16x4 latents, two down-samplings) from random init on the target images of both kinds, the editing
  sources and each example's first layout canvas (the plan's boxes painted on black, which the GoT stage
  encodes with this VAE: ``vae.layout_canvases``). Loss: L1 reconstruction with the coloured pixels weighted
  5x (``vae.foreground_weight`` 4) + 1e-6 x KL (SD's autoencoder recipe without LPIPS / GAN;
  :mod:`got_jax.train.vae`). Writes ``<workdir>/vae_config.json`` at the end (scaling factor = 1 / latent std).
* ``got``: the GoT (Qwen2.5-VL reasoner hidden 64, 2 layers, bundled tokenizer, trained fully from random init:
  ``lora_rank`` 0; both projectors; the 2-level UNet) with the paper's losses and condition dropout, T2I and
  editing batches mixed 3:1 (``data.shapes_dir``, see ``configs/data_mixtures.shapes_files``), its frozen VAE from
  the ``vae`` stage (``--config.model.vae_from``, required: the VAE config must match, the error names the key).

Ablations (the paper's, GoT stage; documented in :mod:`got_jax.train.tasks`):

* ``--config.ablation.no_layout=True``: layout latents zeroed in every training example; the exported model's
  config records ``sampling_defaults: {"zero_layout": true}`` so sampling zeroes them too.
* ``--config.ablation.no_chain=True``: the chain is cut from every row (query tokens right after the prompt, no
  LM loss, one black layout canvas); the export records ``sampling_defaults: {"no_chain": true}``
  (``GoTPipeline(..., no_chain=True)`` generates no chain).

Budget: <= 45 min on a 2-core CPU for both stages. The shipped weights (``got_jax/assets/demo``, recipe 6), measured
with ``train.py``'s log on the 2-core dev machine (a persistent compilation cache from earlier runs; a cold one adds
2-3 min of compiles): 43.0 min in all (recipe 3's log, on a busier day: 10.4 min for the same VAE stage).

Recipe 6 (shipped) is recipe 4 below with ``loss.cache_latents`` (each example's frozen-VAE latents encoded once on
the host: GoT step 0.503 -> 0.376 s) and 4,200 GoT steps (35.5 min; held-out LM 0.126, diffusion 0.0066), exported
with guidance scales g 2.0, c 2.0 (``sample.guidance_scale`` / ``sample.layout_guidance_scale``, recorded as the
export's ``sampling_defaults``), chosen on seen combinations (``--combos train --seed 1``) of a 4,800-step run.
Shapes-GenEval: images 0.545 (0.451 at the paper's g 7.5, c 4.0; recipe 4: 0.392), plans 0.847, follows 1.000.
Recipe 4's description follows.

* data: 12,000 text-to-image scenes with the position task weighted 8 (7,385 position scenes, 923 of each other
  task) + 2,000 edits. A reasoner trained on the natural mix (1 position scene in 6) never learned that the
  relation word moves the boxes (recipe 1's position plans: 0.0). Since 3b54459 every object keeps 2 px clear of its
  grid cell's borders and plans list objects row by row (recipe 2's data: 1 px, caption order, and greedy plans that
  stacked every object in the centre box).
* vae stage, 1,800 steps at batch 4 (+ editing sources + one layout canvas per example), lr 3e-3: 7.5 min;
  held-out reconstruction 0.025 (L1, coloured pixels weighted 5x). Its VAE ceiling on shapes-GenEval (ground truth
  through the VAE, scored like images: ``got_jax.eval.shapes.vae_round_trips``) is 1.000 (recipe 3's: 0.972);
  recipe 1's 600 steps gave 0.667 (rounded squares, merged neighbours), which capped the image accuracy under the
  0.85 target.
* got stage, 3,600 steps at batch 16, lr 2e-3 (warmup 30, cosine): 36.4 min (12 evals, 8 sample images); held-out
  LM 0.130, diffusion 0.0079. Shapes-GenEval: images 0.392, plans 0.861 (position 1.000, colour attribution 0.167:
  colours swapped between the shapes), images following their plan 1.000 (each object painted in its planned box
  and colour; in most failed position images the two shapes are swapped between the boxes); README, "The shipped
  demo GoT". Recipe 3 (2,400 steps, 32.9 min): LM 0.138, diffusion 0.0107, images 0.194 (boxes filled as rounded
  squares and domes), plans 0.819.
* ``data.reasoner_size`` 56 (tiny_test's): the reasoner sees an editing source as 4 image tokens; the export records
  it (``reasoner_source_size``) and sampling uses it.

The paper's ablations (README): ``--config.ablation.no_layout=True`` on recipe 4 (3,600 steps on its VAE): held-out LM
0.135, diffusion 0.0094, images 0.205 (the full GoT: 0.392; two objects 0.104, colours 0.500), plans 0.847, follows
0.184. ``--config.ablation.no_chain=True`` on recipe 4: diffusion 0.0108, images 0.125 (colours 0.104). At 2,400 steps
(recipe 3) no layout had tied the full GoT (0.194 each) and no chain scored 0.139.

Image numbers measured before 8caa1ff (recipe 1's, and recipe 2's first ones: 0.056) went through a sampler that
clipped x0 to [-1, 1] (the demo's scheduler config lacked SDXL's ``clip_sample: false``) and are withdrawn. Recipe 2
(the same commands on the data before 3b54459): images 0.149, plans 0.625 by today's overlap-checking plan score,
follows 0.910.

Recipe 5's try, not shipped (``configs/demo_shapes_xattr16.py``: cross-attention also in the UNet's last up block,
2,900 GoT steps): images 0.191, diffusion 0.0088; the shipped recipe 4 keeps the demo UNet.

Recipe 1 (stop 24; data 6,000 unweighted scenes, ``--config.total_steps=600`` for the VAE and ``1200`` for the GoT):
plans 0.806 (position 0.0: greedy boxes all land in the centre cell), VAE ceiling 0.667. Earlier tries on a VAE
without layout canvases: lr 3e-4 x 600 steps (LM 2.37, no plan), lr 1e-3 x 600 (LM 0.53), lr 2e-3 x 900 (LM 0.20,
plans 0.806, every box painted blue). Position plans in recipe 1: the relation word did not move the reasoner's
boxes (teacher-forced, 0.07 nats between the true and the swapped relation); continued LM-only training moved it
only with position scenes weighted up (60%: 1.1 nats after 600 steps; the natural 1 in 6: 0.07-0.10 after 800).

Re-measure with ``--config.total_steps=6 --config.eval_every=-1 --config.sample_every=-1`` and scale the counts
(steps = minutes x 60 / (s/step)); compile adds ~1-3 min per stage and batch kind.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import tiny_test

VAE_STEPS = 1800  # see the budget in the docstring
GOT_STEPS = 4200


def get_config() -> ml_collections.ConfigDict:
    c = tiny_test.get_config()
    c.stage = "got"
    c.stages = {
        "vae": {"total_steps": VAE_STEPS, "global_batch_size": 4, "optim": {"learning_rate": 3e-3, "warmup_steps": 30},
                "eval_every": 300, "sample_every": 0, "save_every": 300, "data": {"editing_weight": 1.0}},
        "got": {"total_steps": GOT_STEPS, "global_batch_size": 16, "optim": {"learning_rate": 2e-3, "warmup_steps": 30},
                "eval_every": 300, "sample_every": 450, "save_every": 150, "data": {"editing_weight": 1.0}},
    }
    # None (typed, so --config.<field>=... still parses): the stage's value
    c.total_steps = placeholder(int)
    c.global_batch_size = placeholder(int)
    c.optim.learning_rate = placeholder(float)
    c.optim.warmup_steps = placeholder(int)
    c.eval_every = placeholder(int)
    c.sample_every = placeholder(int)
    c.save_every = placeholder(int)

    c.model.demo_hidden = 64
    c.model.demo_vae_blocks = 3  # (16, 16, 32): 64 px -> 16x16 latents
    c.model.lora_rank = 0  # the small reasoner is trained fully
    # diffusers UNet config keys replacing got_jax.got.demo's (configs/demo_shapes_xattr16.py: recipe 5's try)
    c.model.demo_unet = ml_collections.ConfigDict()
    # reasoner text_config keys replacing got_jax.got.demo's (e.g. num_hidden_layers; the width is demo_hidden)
    c.model.demo_reasoner = ml_collections.ConfigDict()
    c.model.vae_from = ""  # GoT stage: the vae stage's workdir
    c.loss.cache_latents = True  # each example's frozen-VAE latents encoded once (got_jax/train/latent_cache.py)

    c.vae = ml_collections.ConfigDict()
    c.vae.reconstruction = "l1"  # l1 (SD) | mse
    c.vae.kl_weight = 1e-6  # SD's
    c.vae.foreground_weight = 4.0  # extra L1 weight of coloured pixels (got_jax/train/vae.py); 0: SD's mean
    c.vae.layout_canvases = True  # also reconstruct the first layout canvas (boxes on black) of every example
    c.vae.num_summary_images = 4

    c.ablation = ml_collections.ConfigDict()
    c.ablation.no_layout = False
    c.ablation.no_chain = False

    c.data.shapes_dir = ""  # python -m got_jax.data.shapes --out DIR (used when data.sources is empty)
    c.data.generation_weight = 3.0
    c.data.editing_weight = placeholder(float)
    c.data.image_size = 64
    c.data.buckets = ((64, 64),)
    c.data.max_text_len = 320
    c.data.max_text_len_edit = 384
    c.data.max_boxes = 4
    c.eval_examples = 64
    c.eval_batches = 2
    c.sample.size = 64
    c.sample.num_inference_steps = 20
    c.sample.max_new_tokens = 160
    c.sample.scale = 2
    # guidance scales recorded in the export (sampling_defaults; sample.py, the shapes-GenEval and the sheet use them):
    # chosen on the combinations training may realise (--combos train --seed 1), not on the held-out benchmark
    c.sample.guidance_scale = 2.0
    c.sample.layout_guidance_scale = 2.0
    c.log_every = 10
    c.keep_every = 1000
    return c
