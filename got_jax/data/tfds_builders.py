"""TFDS builders ``got_generation`` and ``got_editing`` over local GoT annotations + images.

No downloads: everything is read from ``manual_dir``, laid out as::

    manual_dir/
      annotations/*.jsonl | *.json | *.parquet   # GoT annotation rows
      <image paths as named in the rows, relative to manual_dir>
      image_table/*.parquet                      # only for configs with join_images (OmniEdit-GoT)

One builder config per source dataset picks the :data:`got_jax.data.records.MAPPINGS` entry. The synthetic
shapes set (``python -m got_jax.data.shapes --out DIR``) writes both kinds into one such folder:
``--config shapes`` reads ``annotations/generation*`` and ``--config shapes_edit`` ``annotations/editing*``
of the same ``--manual_dir DIR``.
Images are stored as their original encoded bytes (no re-encoding); write ArrayRecord with::

    python -m got_jax.data.build got_generation --config laion_aesthetics_got \
        --manual_dir /data/LAHR-GoT --data_dir /data/tfds --file_format array_record

(``tfds build got_generation --imports got_jax.data.tfds_builders ...`` is equivalent where
apache_beam is installed: the tfds 4.9.10 CLI imports it at start-up.)

Annotation rows that cannot be mapped (missing column, id absent from the joined image table)
are skipped and counted in the log; image problems (missing / corrupt file) are left to the
input pipeline, which skips and counts them per reason.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from got_jax.data import records

log = logging.getLogger(__name__)

_ANNOTATION_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclasses.dataclass
class GotBuilderConfig(tfds.core.BuilderConfig):
    """Which field mapping to use, and whether images come from a joined table (by id)."""

    mapping: str = "shapes"
    join_images: bool = False
    annotations: str = "*"  # glob of the annotation files under manual_dir/annotations/


# The synthetic shapes set keeps both kinds in one folder (python -m got_jax.data.shapes --out DIR).
_ANNOTATION_GLOBS = {"shapes": "generation*", "shapes_edit": "editing*"}


def _annotation_files(manual_dir: Path, pattern: str = "*") -> list[Path]:
    folder = manual_dir / "annotations"
    files = sorted(p for p in folder.glob(pattern) if p.suffix.lower() in _ANNOTATION_SUFFIXES) if folder.is_dir() else []
    if not files:
        what = "*.jsonl, *.json, *.parquet" if pattern == "*" else f"{pattern} with suffix .jsonl, .json or .parquet"
        raise FileNotFoundError(f"no annotation files ({what}) under {folder}")
    return files


def _generate(manual_dir: Path, config: GotBuilderConfig):
    mapping = records.MAPPINGS[config.mapping]
    image_rows = None
    if config.join_images:
        tables = sorted((manual_dir / "image_table").glob("*.parquet"))
        if not tables:
            raise FileNotFoundError(f"config {config.name} joins images by id but {manual_dir / 'image_table'} has no *.parquet")
        image_rows = records.index_rows(tables, mapping.id)
    bad = 0
    seen: set[str] = set()
    for path in _annotation_files(manual_dir, config.annotations):
        for n, row in enumerate(records.read_rows(path)):
            where = f"{path} row {n}"
            try:
                if image_rows is not None:
                    row = records.join_images(row, image_rows, mapping, where)
                rec = records.row_to_record(row, mapping, manual_dir, where)
            except records.RecordError as e:
                bad += 1
                log.warning("skipping annotation: %s", e)
                continue
            key = rec.id if rec.id not in seen else f"{rec.id}#{path.name}:{n}"
            seen.add(key)
            yield key, dataclasses.asdict(rec)
    if bad:
        log.warning("config %s: skipped %d malformed annotation rows", config.name, bad)


def _configs(kind: str) -> list[GotBuilderConfig]:
    out = []
    for name, m in records.MAPPINGS.items():
        if m.kind == kind:
            out.append(GotBuilderConfig(name=name, mapping=name, join_images=name == "omniedit_got",
                                        annotations=_ANNOTATION_GLOBS.get(name, "*"),
                                        description=f"{name} annotations ({kind})"))
    return out


_BYTES = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)  # noqa: E731  encoded image bytes, as stored


class GotGeneration(tfds.core.GeneratorBasedBuilder):
    """GoT text-to-image examples: id, caption, GoT text, encoded image bytes."""

    VERSION = tfds.core.Version("1.0.0")
    # set here: tfds 4.9.10 finds them through the importlib_resources backport, not installed
    pkg_dir_path = epath.Path(__file__).parent
    code_path = epath.Path(__file__)
    BUILDER_CONFIGS = _configs("generation")
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(), "caption": tfds.features.Text(), "got": tfds.features.Text(), "image": _BYTES(),
        }))

    def _split_generators(self, dl_manager):
        return {"train": _generate(Path(dl_manager.manual_dir), self.builder_config)}

    def _generate_examples(self, *args):  # unused: _split_generators returns the generator itself
        raise AssertionError("unreachable")


class GotEditing(tfds.core.GeneratorBasedBuilder):
    """GoT editing examples: id, instruction, GoT plan, encoded source and target image bytes."""

    VERSION = tfds.core.Version("1.0.0")
    # set here: tfds 4.9.10 finds them through the importlib_resources backport, not installed
    pkg_dir_path = epath.Path(__file__).parent
    code_path = epath.Path(__file__)
    BUILDER_CONFIGS = _configs("editing")
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(), "instruction": tfds.features.Text(), "got": tfds.features.Text(),
            "source_image": _BYTES(), "target_image": _BYTES(),
        }))

    def _split_generators(self, dl_manager):
        return {"train": _generate(Path(dl_manager.manual_dir), self.builder_config)}

    def _generate_examples(self, *args):
        raise AssertionError("unreachable")


BUILDERS = {"got_generation": GotGeneration, "got_editing": GotEditing}


def build(name: str, config: str, manual_dir: str, data_dir: str, file_format: str = "array_record"):
    """``tfds build`` equivalent (the ``tfds`` CLI of tfds 4.9.10 imports apache_beam at start-up)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown builder {name!r}; expected one of {sorted(BUILDERS)}")
    builder = BUILDERS[name](config=config, data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder

