r"""The shipped demo GoT, trained from random weights on the synthetic shapes set in two stages (2-core CPU).

    python -m got_jax.data.shapes --out /data/shapes --size 64 --num-generation 6000 --num-editing 2000 --seed 0
    python train.py --config configs/demo_shapes.py --config.stage=vae --workdir /tmp/demo_vae \
        --config.data.shapes_dir=/data/shapes
    python train.py --config configs/demo_shapes.py --config.stage=got --workdir /tmp/demo_got \
        --config.data.shapes_dir=/data/shapes --config.model.vae_from=/tmp/demo_vae
    python -m got_jax.train.export --demo --config configs/demo_shapes.py --workdir /tmp/demo_got \
        --config.model.vae_from=/tmp/demo_vae        # -> got_jax/assets/demo (load_demo(): sample.py's default)

Stages (``--config.stage``; fields left at None take the stage's value, explicit overrides win):

* ``vae``: the small AutoencoderKL (diffusers architecture, ``block_out_channels`` (16, 16, 32): 64 px images ->
  16x16x4 latents, two down-samplings) from random init on the target images of both kinds and the editing
  sources. Loss: L1 reconstruction + 1e-6 x KL (SD's autoencoder recipe without LPIPS / GAN;
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

Budget: <= 45 min on a 2-core CPU for both stages. Measured (``train.py`` log, 2-core dev machine, 64 px):

* vae stage, batch 8: 1.8-2.2 s/step after compile (100 steps in 317 s including compile and the final eval).
  Quality (held-out L1 on [-1, 1] pixels, and the reconstructions in TensorBoard ``vae/*``):

  - 100 steps, lr 1e-3: L1 0.108, every image decodes to the white background (the shapes are lost);
  - 400 steps, lr 1e-3: L1 0.068, shapes and positions kept as dark blobs, colours lost;
  - 600 steps, lr 3e-3 (warmup 30; 21.6 min beside a test run): L1 0.045, shapes, sizes and positions
    right, blue right, green and yellow drift to orange. These are this config's vae defaults; the colours need more steps than the
    45 minutes leave for the GoT stage, so the demo's budget or its VAE (for instance more latent channels)
    has to change before the demo can be trained in that time.
* got stage, batch 16 (the VAE's encodes included), from the 600-step VAE above: 1.5 s/step on the quiet
  machine (0.67 steps/s; 600 steps, lr 3e-4, in 17.1 min including compiles, 3 evals and 3 sample images; the
  old ~8 s/step was the loaded machine's). At 600 steps: held-out LM loss 2.37, diffusion loss 0.156. The
  sampled chain has the GoT template (``<|object_ref_start|>`` ... ``<|box_end|> (colour)``, ending in
  ``<|im_gen_start|>``) but not the prompt's objects, its boxes are malformed (``(6,6,6,6,6,29,2)``), and the
  image is colour blobs with no shapes: 600 steps are far from a demo that draws its plan. At lr 1e-3 (same
  run otherwise, 16.5 min) it learns much faster: held-out LM 0.53, diffusion 0.054 at step 600 (step 200:
  train LM 1.0 vs 3.0 at 3e-4); the chain is well formed (``a yellow triangle ... (344,344),(547,504) ...
  (yellow)``) but still not the prompt's objects, and the image has one orange-purple blob where its box is.
  ``GOT_STEPS`` and the learning rate stay placeholders; the 45 minutes leave ~900 GoT steps after the VAE stage.

Re-measure with ``--config.total_steps=6 --config.eval_every=-1 --config.sample_every=-1`` and scale the counts
(steps = minutes x 60 / (s/step)); compile adds ~1-3 min per stage and batch kind.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import tiny_test

VAE_STEPS = 600  # see the budget in the docstring
GOT_STEPS = 225


def get_config() -> ml_collections.ConfigDict:
    c = tiny_test.get_config()
    c.stage = "got"
    c.stages = {
        "vae": {"total_steps": VAE_STEPS, "global_batch_size": 8, "optim": {"learning_rate": 3e-3, "warmup_steps": 30},
                "eval_every": 300, "sample_every": 0, "save_every": 300, "data": {"editing_weight": 1.0}},
        "got": {"total_steps": GOT_STEPS, "global_batch_size": 16, "optim": {"learning_rate": 3e-4, "warmup_steps": 20},
                "eval_every": 75, "sample_every": 0, "save_every": 50, "data": {"editing_weight": 1.0}},
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
    c.model.vae_from = ""  # GoT stage: the vae stage's workdir

    c.vae = ml_collections.ConfigDict()
    c.vae.reconstruction = "l1"  # l1 (SD) | mse
    c.vae.kl_weight = 1e-6  # SD's
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
    c.log_every = 10
    c.keep_every = 1000
    return c
