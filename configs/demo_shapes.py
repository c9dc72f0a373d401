r"""The demo-size GoT (hidden 64) trained from random weights on the synthetic shapes set (CPU or one GPU).

    python -m got_jax.data.shapes --out /data/shapes --size 64 --num-generation 2000 --num-editing 0 --seed 0
    python train.py --config configs/demo_shapes.py --workdir /tmp/demo \
        --config.data.sources="file:/data/shapes/annotations/generation.jsonl@shapes"

A placeholder until the demo-model issue tunes it: 2000 steps, batch 16 at 64 px, no LoRA (the small
reasoner trains fully). Expect the LM loss to fall below 1 within a few hundred steps (the GoT texts of the
shapes set are templated) and blobs at the planned boxes in the sample images after ~2000 steps.
"""

from configs import tiny_test


def get_config():
    c = tiny_test.get_config()
    c.stage = "demo"
    c.total_steps = 2000
    c.global_batch_size = 16
    c.model.demo_hidden = 64
    c.model.demo_vae_blocks = 0  # the demo VAE (8x down-sampling)
    c.model.lora_rank = 0  # the small reasoner is trained fully
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 100
    c.data.image_size = 64
    c.data.buckets = ((64, 64),)
    c.data.max_text_len = 320
    c.data.max_boxes = 4
    c.eval_examples = 64
    c.eval_every = 250
    c.eval_batches = 2
    c.sample_every = 500
    c.sample.size = 64
    c.sample.num_inference_steps = 20
    c.sample.max_new_tokens = 160
    c.sample.scale = 2
    c.log_every = 10
    c.save_every = 250
    c.keep_every = 1000
    return c
