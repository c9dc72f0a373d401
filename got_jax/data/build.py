"""CLI: build a GoT TFDS dataset (ArrayRecord) from local annotations + images (no downloads).

    python -m got_jax.data.build got_generation --config shapes --manual_dir DIR --data_dir OUT
"""

from __future__ import annotations

import argparse

from got_jax.data import records, tfds_builders


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name", choices=sorted(tfds_builders.BUILDERS))
    p.add_argument("--config", required=True, help="source dataset: " + ", ".join(records.MAPPINGS))
    p.add_argument("--manual_dir", required=True, help="folder with annotations/ and the images")
    p.add_argument("--data_dir", required=True, help="TFDS data_dir to write into")
    p.add_argument("--file_format", default="array_record", choices=["array_record", "tfrecord"])
    a = p.parse_args(argv)
    b = tfds_builders.build(a.name, a.config, a.manual_dir, a.data_dir, a.file_format)
    print(f"built {b.info.full_name} in {b.data_dir}: {b.info.splits['train'].num_examples} examples")


if __name__ == "__main__":
    main()
