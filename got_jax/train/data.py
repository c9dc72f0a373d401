"""Training data for ``train.py``: weighted mixtures of GoT sources -> logical data shards -> global batches.

Sources are written as one string, ``SPEC=WEIGHT`` entries separated by ``;`` (named mixtures live in
``configs/data_mixtures.py``):

* ``tfds:NAME/CONFIG`` - a built ``got_generation`` / ``got_editing`` ArrayRecord dataset under ``data_dir``
  (``python -m got_jax.data.build ...``);
* ``file:PATH@MAPPING`` - an annotation file (``.jsonl`` / ``.json`` / ``.parquet``, images relative to its
  folder, or to the manual_dir of an ``annotations/`` file) read with the field mapping ``MAPPING`` of :data:`got_jax.data.records.MAPPINGS` (e.g. the
  synthetic shapes set: ``file:/data/shapes/annotations/generation.jsonl@shapes``).

Every source must hold records (checked before anything compiles). The last ``eval_examples`` records of
each source are held out for the evaluation loss; the rest are mixed with ``grain.MapDataset.mix`` (weights
per source) and fed to the Grain pipeline of :mod:`got_jax.data.pipeline`.

**Logical data shards.** The stream is split into ``num_shards`` shards (strided after the global shuffle;
each shard has its own Grain iterator with ``batch_size = global_batch / num_shards``). Process ``p`` of
``n`` runs shards ``p * num_shards / n ...`` and its local batch is their batches concatenated; the global
batch is the shards' batches in shard order. So the global batch sequence depends only on ``num_shards``,
not on the number of processes: a checkpoint resumes exactly on any process count that divides
``num_shards`` (the iterator state is one Grain state per shard, gathered to every process and stored as
JSON in the checkpoint step). A process count that does not divide the stored ``num_shards`` is an error
that names both numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import grain
import jax
import numpy as np

from got_jax.data import pipeline as P
from got_jax.data import records


class DataConfigError(ValueError):
    """A data source or data setting that cannot work (message names the source / field)."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str  # "tfds" | "file"
    target: str  # NAME/CONFIG or PATH
    mapping: str | None
    weight: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}" + (f"@{self.mapping}" if self.mapping else "")


def parse_sources(text: str) -> list[SourceSpec]:
    """``"tfds:got_generation/flux_got=2;file:/d/gen.jsonl@shapes=1"`` -> specs (weight defaults to 1)."""
    out = []
    for entry in [e.strip() for e in str(text).split(";") if e.strip()]:
        spec, _, w = entry.partition("=")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise DataConfigError(f"data source {entry!r}: weight {w!r} is not a number") from None
        if weight <= 0:
            raise DataConfigError(f"data source {entry!r}: weight must be > 0")
        kind, sep, target = spec.partition(":")
        if not sep or kind not in ("tfds", "file"):
            raise DataConfigError(f"data source {spec!r}: write 'tfds:NAME/CONFIG' or 'file:PATH@MAPPING'")
        mapping = None
        if kind == "file":
            target, sep, mapping = target.rpartition("@")
            if not sep or not target:
                raise DataConfigError(f"data source {spec!r}: a file source needs '@MAPPING' (one of "
                                      f"{sorted(records.MAPPINGS)})")
            if mapping not in records.MAPPINGS:
                raise DataConfigError(f"data source {spec!r}: unknown mapping {mapping!r}; known {sorted(records.MAPPINGS)}")
        elif target.count("/") != 1:
            raise DataConfigError(f"data source {spec!r}: a TFDS source is 'tfds:NAME/CONFIG'")
        out.append(SourceSpec(kind, target, mapping, weight))
    if not out:
        raise DataConfigError("config.data.sources is empty: name at least one source (see configs/data_mixtures.py)")
    return out


class _Slice:
    """Records ``[start, stop)`` of a random-access source."""

    def __init__(self, source, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.source[self.start + int(i)]


class _AsSequence:
    """A ``grain.MapDataset`` as a plain random-access source (what :func:`P.make_dataset` takes)."""

    def __init__(self, ds: grain.MapDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[int(i)]


def image_root(annotation_file: str) -> str:
    """Where a ``file:`` source's image paths are relative to: the annotation file's folder, or, for a file in
    the ``annotations/`` folder of a manual_dir (the layout ``got_jax.data.shapes`` writes and the TFDS builders
    read), that manual_dir."""
    folder = os.path.dirname(os.path.abspath(annotation_file))
    return os.path.dirname(folder) if os.path.basename(folder) == "annotations" else folder


def open_source(spec: SourceSpec, data_dir: str | None, kind: str):
    """The records of one source (random access); raises :class:`DataConfigError` if it has none."""
    if spec.kind == "file":
        if not os.path.isfile(spec.target):
            raise DataConfigError(f"data source {spec}: no such annotation file {spec.target!r}")
        mapping = records.MAPPINGS[spec.mapping]
        if mapping.kind != kind:
            raise DataConfigError(f"data source {spec}: mapping {spec.mapping!r} gives {mapping.kind} records, the "
                                  f"stage trains on {kind}")
        try:
            recs = P.records_source(list(records.read_records(spec.target, mapping, image_root(spec.target))))
        except records.RecordError as e:
            raise DataConfigError(f"data source {spec}: {e}") from None
    else:
        name, config = spec.target.split("/")
        if not data_dir:
            raise DataConfigError(f"data source {spec}: set config.data.data_dir (the TFDS data_dir it was built in)")
        want = {"generation": "got_generation", "editing": "got_editing"}[kind]
        if name != want:
            raise DataConfigError(f"data source {spec}: the stage trains on {kind} records ({want}), not {name}")
        folder = os.path.join(data_dir, name, config)
        if not os.path.isdir(folder):
            raise DataConfigError(f"data source {spec}: nothing built at {folder} (run python -m got_jax.data.build "
                                  f"{name} --config {config} --manual_dir ... --data_dir {data_dir})")
        try:
            recs = P.tfds_source(name, config, data_dir)
        except Exception as e:  # tfds raises several types for a half-built folder
            raise DataConfigError(f"data source {spec}: cannot open {folder} ({type(e).__name__}: {e})") from None
    if len(recs) == 0:
        raise DataConfigError(f"data source {spec}: holds no records")
    return recs


def split_sources(specs: Sequence[SourceSpec], data_dir: str | None, kind: str, eval_examples: int):
    """(train source, eval source or None) over all specs: the last ``eval_examples`` of each are held out."""
    trains, weights, evals = [], [], []
    for spec in specs:
        recs = open_source(spec, data_dir, kind)
        n_eval = min(int(eval_examples), len(recs) // 2) if eval_examples else 0
        if len(recs) - n_eval <= 0:
            raise DataConfigError(f"data source {spec}: {len(recs)} records leave none for training")
        trains.append(_Slice(recs, 0, len(recs) - n_eval))
        weights.append(spec.weight)
        if n_eval:
            evals.append(_Slice(recs, len(recs) - n_eval, len(recs)))
    if len(trains) == 1:
        train = trains[0]
    else:
        train = _AsSequence(grain.MapDataset.mix([grain.MapDataset.source(t) for t in trains], weights))
    ev = None
    if evals:
        ev = evals[0] if len(evals) == 1 else _AsSequence(grain.MapDataset.concatenate(
            [grain.MapDataset.source(e) for e in evals]))
    return train, ev


# --------------------------------------------------------------------------------------------------
# Sharded loader
# --------------------------------------------------------------------------------------------------


class ShardedLoader:
    """This process's logical shards of the training stream (see the module docstring).

    ``next()`` -> the process-local batch (numpy, shards concatenated in order); ``get_state()`` ->
    ``{shard index: Grain state}`` of this process's shards; :func:`gather_state` makes the global one.
    """

    def __init__(self, source, pipeline_cfg: P.PipelineConfig, tokenizer, *, num_shards: int, global_batch: int,
                 process_index: int, process_count: int):
        if num_shards % process_count:
            raise DataConfigError(f"data num_shards={num_shards} is not divisible by the {process_count} processes "
                                  "(the stored shards of a checkpoint must split evenly over processes)")
        if global_batch % num_shards:
            raise DataConfigError(f"global batch {global_batch} is not divisible by data num_shards={num_shards}")
        if num_shards > 1 and len(pipeline_cfg.buckets) > 1:
            raise DataConfigError(f"{len(pipeline_cfg.buckets)} aspect-ratio buckets with {num_shards} data shards: "
                                  "the shards' batches would disagree in shape; use one bucket or one shard")
        per = num_shards // process_count
        self.num_shards = num_shards
        self.shards = list(range(process_index * per, (process_index + 1) * per))
        self.iters = {}
        for s in self.shards:
            cfg = dataclasses.replace(pipeline_cfg, batch_size=global_batch // num_shards, shard_index=s,
                                      shard_count=num_shards)
            self.iters[s] = iter(P.make_dataset(source, cfg, tokenizer))

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(self.iters[s]) for s in self.shards]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> dict[str, Any]:
        return {str(s): self.iters[s].get_state() for s in self.shards}

    def set_state(self, state: dict[str, Any]) -> None:
        stored = int(state.get("num_shards", -1))
        if stored != self.num_shards:
            raise DataConfigError(f"checkpoint data state has num_shards={stored}, this run {self.num_shards}; set "
                                  f"--config.data.num_shards={stored} to resume the stream exactly")
        for s in self.shards:
            self.iters[s].set_state(state["shards"][str(s)])

    def metrics(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for it in self.iters.values():
            for k, v in it.metrics().items():
                if k != "bad_fraction":
                    total[k] = total.get(k, 0) + v
        total["bad_fraction"] = (total["seen"] - total["ok"]) / total["seen"] if total.get("seen") else 0.0
        return total


def gather_state(loader: ShardedLoader) -> dict[str, Any]:
    """The global data state (every shard's Grain state), identical on every process."""
    local = loader.get_state()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        raw = np.frombuffer(json.dumps(local).encode(), np.uint8)
        lengths = multihost_utils.process_allgather(np.asarray([raw.size], np.int32))
        padded = np.zeros(int(np.max(lengths)), np.uint8)
        padded[: raw.size] = raw
        every = multihost_utils.process_allgather(padded)
        merged: dict[str, Any] = {}
        for i in range(every.shape[0]):
            merged.update(json.loads(bytes(every[i, : int(np.ravel(lengths)[i])]).decode()))
        local = merged
    return {"num_shards": loader.num_shards, "shards": local}


def global_batch_arrays(prepared, shardings):
    """Process-local numpy leaves -> global ``jax.Array``s with ``shardings`` (multi-process); identity otherwise."""
    if jax.process_count() == 1:
        return prepared
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), prepared, shardings)
