"""Batch sampling for ``sample.py``: prompt files, resumable runs with JSONL records, plan <-> widget boxes.

* :mod:`got_jax.sampling.items`: the work list (``--prompt`` flags, a text or JSONL prompts file), per-row
  checks, output names and the per-process shard.
* :mod:`got_jax.sampling.runner`: the resumable, data-parallel loop that writes images, chains, layouts and
  one JSONL record per item.
* :mod:`got_jax.sampling.widget`: GoT plan boxes <-> ``jupyter_bbox_widget`` boxes (the notebooks).
"""
