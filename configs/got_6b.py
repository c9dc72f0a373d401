r"""GoT-6B: Qwen2.5-VL-3B reasoner (LoRA r=32) + SDXL UNet, the paper's recipe, on a TPU v5e / v5p pod.

    # every host of the pod (gcloud ... --worker=all --command=...):
    python train.py --config configs/got_6b.py --workdir gs://BUCKET/got6b-pretrain \
        --config.init_from=/ckpt/got6b-init --config.data.data_dir=gs://BUCKET/tfds --config.stage=pretrain
    # then the FLUX-GoT finetune from the pretrained run's export, and the editing stage
    ... --config.stage=finetune --config.init_from=/ckpt/got6b-pretrained
    ... --config.stage=edit

Stages (``--config.stage``; fields left at None take the stage's value, explicit overrides win):

* ``pretrain``: 60k steps, lr 1e-4, 500 warmup, LAHR-GoT + JourneyDB-GoT + OmniEdit-GoT;
* ``finetune``: 10k steps, lr 5e-5, 200 warmup, FLUX-GoT + OmniEdit-GoT + SEED-Edit-Multiturn-GoT;
* ``edit``: 10k steps, lr 5e-5, 200 warmup, OmniEdit-GoT + SEED-Edit-Multiturn-GoT.

``init_from`` is a converted folder (``convert/got_checkpoint.py``): the released GoT-6B, or Qwen2.5-VL-3B-Instruct
+ SDXL-base assembled the way GoT initialises (12-channel ``conv_in``, resized embeddings). Global batch 128,
AdamW (0.9, 0.98, eps 1e-6, wd 0.05), cosine schedule, LM CE + epsilon MSE (noise offset 0.1), 5% condition
dropout; float32 master weights, bfloat16 compute, full remat of decoder / UNet blocks; all devices on
``fsdp`` (``benchmarks/train_scale.py`` prints the per-device memory of this setup). Expect the LM loss to
start near 1-2 (GoT-6B init) and the diffusion MSE near 0.1.
"""

import ml_collections

from configs import tiny_test


def get_config() -> ml_collections.ConfigDict:
    c = tiny_test.get_config()
    c.stage = "pretrain"
    c.stages = {
        "pretrain": {"total_steps": 60_000, "optim": {"learning_rate": 1e-4, "warmup_steps": 500},
                     "data": {"mixture": "pretrain"}},
        "finetune": {"total_steps": 10_000, "optim": {"learning_rate": 5e-5, "warmup_steps": 200},
                     "data": {"mixture": "finetune"}},
        "edit": {"total_steps": 10_000, "optim": {"learning_rate": 5e-5, "warmup_steps": 200},
                 "data": {"mixture": "edit"}},
    }
    c.total_steps = None
    c.optim.learning_rate = None
    c.optim.warmup_steps = None
    c.data.mixture = None
    c.global_batch_size = 128
    c.mesh_shape = (1, -1, 1)  # FSDP over every chip (v5e-64: 2 examples per chip)

    c.model.source = "reference"  # sizes only; weights come from init_from
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.model.lora_rank = 32
    c.model.lora_alpha = 32.0
    c.model.lora_dropout = 0.05

    c.optim.clip_norm = 1.0
    c.loss.vocab_chunk = 32768  # no (B, T, 151936) logits
    # frozen-VAE encodes of target / reference images in 2 passes: one image per chip per pass on a v5e-64 (2
    # examples per chip); on 8 examples of 1024 px per device 6.4 GiB of temporaries instead of 22.4 (XLA:CPU,
    # benchmarks/vae_encodes.py). It must divide the examples per chip.
    c.loss.vae_encode_passes = 2

    c.data.image_size = 1024
    c.data.buckets = ((1024, 1024),)  # one bucket: every data shard's batch has the same shape
    c.data.max_text_len = 1024
    c.data.max_text_len_edit = 1280
    c.data.max_boxes = 8
    c.data.reasoner_size = 448
    c.data.reasoner_max_patches = 1024
    c.data.worker_count = 8
    c.data.worker_buffer_size = 2

    c.eval_examples = 512
    c.eval_every = 2000
    c.eval_batches = 4
    c.sample_every = 5000
    c.sample.prompts = ("two red apples to the left of a blue vase", "a cat sitting on a wooden chair in a garden",
                        "three yellow balloons above a green car")
    c.sample.size = 1024
    c.sample.num_inference_steps = 50
    c.sample.max_new_tokens = 1024
    c.sample.scale = 1

    c.log_every = 50
    c.save_every = 1000
    c.keep = 3
    c.keep_every = 10_000
    return c
