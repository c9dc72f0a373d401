"""A tiny GoT trained on the synthetic shapes set: for tests and CI (CPU, seconds per step).

    python -m got_jax.data.shapes --out /tmp/shapes --size 32 --num-generation 64 --num-editing 0
    python train.py --config configs/tiny_test.py --workdir /tmp/tiny \
        --config.data.sources="file:/tmp/shapes/annotations/generation.jsonl@shapes"

Expect: 8 steps of a 2-layer, hidden-32 reasoner with LoRA r=4 + a 2-block UNet at 32 px, the loss
falling from about 12 (LM cross-entropy over the 554-token test vocabulary + diffusion MSE ~1), an
Orbax checkpoint every 2 steps in ``<workdir>/checkpoints``, TensorBoard events in
``<workdir>/tensorboard`` and per-step metrics in ``<workdir>/metrics.jsonl``. Run it again to resume.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import sharding_rules


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "tiny"
    c.stages = {}
    c.seed = 0
    c.init_from = ""
    c.total_steps = 8
    c.global_batch_size = 8
    c.mesh_shape = (1, -1, 1)  # (data, fsdp, tensor); -1 = the remaining devices
    c.num_devices = 0  # 0 = all visible devices
    c.rules = sharding_rules.RULES  # logical axis -> mesh axes (configs/sharding_rules.py)
    c.compilation_cache_dir = ""

    c.model = ml_collections.ConfigDict()
    c.model.source = "demo"  # demo | reference (GoT-6B sizes); init_from overrides
    c.model.demo_hidden = 32
    c.model.demo_vae_blocks = 2  # VAE downsamples 2x: 32 px images -> 16x16 latents (0 = the demo's 4 levels)
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.attention_impl = "xla"
    c.model.remat = "none"
    c.model.lora_rank = 4
    c.model.lora_alpha = 8.0
    c.model.lora_dropout = 0.0
    c.model.use_rslora = False

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 2
    c.optim.end_learning_rate = 0.0
    c.optim.decay_steps = 0  # the cosine's horizon; 0: total_steps (set it to extend a run without changing its schedule)
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
    c.optim.weight_decay = 0.05
    c.optim.clip_norm = 1.0
    c.optim.grad_accum = 1

    c.loss = ml_collections.ConfigDict()
    c.loss.lm_weight = 1.0
    c.loss.diffusion_weight = 1.0
    c.loss.noise_offset = 0.1
    c.loss.cond_dropout_prob = 0.05
    c.loss.vocab_chunk = 0  # 0 = whole-vocabulary logits
    c.loss.vae_encode_passes = 0  # frozen-VAE encodes of target / reference images: 0 = the whole batch at once
    c.loss.cache_latents = False  # encode each example once, keep its latents on the host (got_jax/train/latent_cache.py)
    c.loss.cache_latents_max_gib = 4.0  # host memory for them; past it new examples are encoded each visit

    c.data = ml_collections.ConfigDict()
    c.data.sources = ""  # e.g. "file:/tmp/shapes/annotations/generation.jsonl@shapes" (see configs/data_mixtures.py)
    c.data.mixture = "shapes"  # used when sources is empty
    c.data.data_dir = ""  # TFDS data_dir of tfds: sources
    c.data.num_shards = 0  # logical data shards; 0 = number of processes
    c.data.image_size = 32
    c.data.buckets = ((32, 32),)
    c.data.max_text_len = 256
    c.data.max_text_len_edit = 320
    c.data.max_boxes = 3
    c.data.reasoner_size = 56
    c.data.reasoner_max_patches = 16
    c.data.worker_count = 0
    c.data.worker_buffer_size = 1

    c.eval_examples = 8  # held out per source
    c.eval_every = -1  # >0: every N steps and at the end; 0: at the end only; -1: never
    c.eval_batches = 1
    c.sample_every = -1  # same convention as eval_every
    c.sample = ml_collections.ConfigDict()
    c.sample.prompts = ("a red circle to the left of a blue square",)
    c.sample.size = 32
    c.sample.num_inference_steps = 2
    c.sample.max_new_tokens = 8
    c.sample.scale = 4
    # guidance scales of the training-time samples, recorded by an export as sampling_defaults (None: the paper's)
    c.sample.guidance_scale = placeholder(float)
    c.sample.layout_guidance_scale = placeholder(float)
    c.sample.image_guidance_scale = placeholder(float)

    c.log_every = 1
    c.save_every = 2
    c.keep = 3
    c.keep_every = 0
    c.async_checkpoints = True
    c.stop_at_step = 0  # >0: save and stop there (same schedule as the full run)
    c.debug_sigkill_after_save = 0  # tests only: SIGKILL this process right after saving that step
    return c
