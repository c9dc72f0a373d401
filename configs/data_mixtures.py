"""Data mixtures of GoT's training stages: ``SPEC=WEIGHT`` strings read by ``got_jax/train/data.py``.

The paper names the datasets of each stage but not their weights; weights here are the published
dataset sizes in millions of examples (so every example is seen about equally often). Override a
stage's mixture with ``--config.data.mixture=NAME`` or give sources directly:
``--config.data.sources="tfds:got_generation/flux_got=1;file:/data/shapes/annotations/generation.jsonl@shapes=0.1"``.
TFDS sources are read from ``--config.data.data_dir`` (built with ``python -m got_jax.data.build``).

Generation and editing records have different shapes (editing adds the 448x448 source view for the
reasoner), so a mixture of both draws whole batches of one kind, the kind of step ``s`` chosen from
``(seed, s)`` with the kinds' summed weights (deterministic, so it resumes exactly).
"""

from __future__ import annotations

from got_jax.data import records

MIXTURES = {
    # pretraining: LAHR-GoT 3.77M + JourneyDB-GoT 4.09M + OmniEdit-GoT 0.74M
    "pretrain": "tfds:got_generation/laion_aesthetics_got=3.77;tfds:got_generation/journeydb_got=4.09;"
                "tfds:got_editing/omniedit_got=0.74",
    # finetuning: FLUX-GoT 0.6M + OmniEdit-GoT 0.74M + SEED-Edit-Multiturn-GoT 0.18M
    "finetune": "tfds:got_generation/flux_got=0.6;tfds:got_editing/omniedit_got=0.74;"
                "tfds:got_editing/seed_edit_multiturn_got=0.18",
    # editing only
    "edit": "tfds:got_editing/omniedit_got=0.74;tfds:got_editing/seed_edit_multiturn_got=0.18",
    # the synthetic shapes set built as TFDS (python -m got_jax.data.build got_generation --config shapes ...)
    "shapes": "tfds:got_generation/shapes=1",
    # the shapes set with its editing examples (the demo's GoT stage: T2I and editing mixed 3:1)
    "shapes_mixed": "tfds:got_generation/shapes=3;tfds:got_editing/shapes_edit=1",
}


def shapes_files(folder: str, generation_weight: float = 3.0, editing_weight: float = 1.0) -> str:
    """The ``file:`` sources of a ``python -m got_jax.data.shapes --out FOLDER`` set (``config.data.shapes_dir``):
    its generation and editing annotations, mixed ``generation_weight : editing_weight`` (an editing weight of 0
    leaves the editing examples out)."""
    out = f"file:{folder}/annotations/generation.jsonl@shapes={generation_weight:g}"
    if editing_weight > 0:
        out += f";file:{folder}/annotations/editing.jsonl@shapes_edit={editing_weight:g}"
    return out


def mixture(name: str) -> str:
    if name not in MIXTURES:
        raise KeyError(f"unknown data mixture {name!r}; known: {sorted(MIXTURES)} (configs/data_mixtures.py)")
    return MIXTURES[name]


def source_kind(spec) -> str:
    """"generation" or "editing" for a parsed source spec."""
    if spec.kind == "tfds":
        name = spec.target.split("/")[0]
        return {"got_generation": "generation", "got_editing": "editing"}.get(name, name)
    return records.MAPPINGS[spec.mapping].kind
