"""Input-pipeline configs for GoT training (aspect-ratio buckets at ~1024^2 pixels, SDXL-style).

    from configs.data_got import generation_config, editing_config
    cfg = generation_config(shard_index=jax.process_index(), shard_count=jax.process_count())

``worker_count`` defaults to 0 (decoding in the main process, with threads), which works in any script.
Grain worker processes (``generation_config(worker_count=8)``, for more throughput at 1024 px)
are started with ``spawn``: each re-imports the main script, so the code that builds and iterates the
pipeline must then sit under ``if __name__ == "__main__":`` (without it the workers fail at start-up).
"""

from __future__ import annotations

import dataclasses

from got_jax.data.pipeline import PipelineConfig

# (height, width), all multiples of 64, about 1024 * 1024 pixels
BUCKETS_1024 = (
    (1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344), (1344, 768), (640, 1536), (1536, 640),
)

_COMMON = dict(buckets=BUCKETS_1024, max_boxes=8, num_query_tokens=64, reasoner_size=448, reasoner_max_patches=1024,
               cond_dropout_prob=0.05, worker_count=0, worker_buffer_size=2, max_bad_fraction=0.05)


def generation_config(**overrides) -> PipelineConfig:
    """T2I examples (LAHR-GoT, JourneyDB-GoT, FLUX-GoT): GoT text ~812 characters -> 1024 tokens."""
    return dataclasses.replace(PipelineConfig(kind="generation", max_text_len=1024, **_COMMON), **overrides)


def editing_config(**overrides) -> PipelineConfig:
    """Editing examples (OmniEdit-GoT, SEED-Edit-Multiturn-GoT): +256 image tokens for the 448x448 view."""
    return dataclasses.replace(PipelineConfig(kind="editing", max_text_len=1280, **_COMMON), **overrides)
