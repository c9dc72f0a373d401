"""Evaluation: GenEval's scoring rules (``geneval``), a deterministic shapes detector (``detect``) and the
shapes-GenEval benchmark of a GoT checkpoint (``python -m got_jax.eval.shapes --ckpt DIR --out DIR``)."""
