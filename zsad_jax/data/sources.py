"""The example source of one side (``train`` or ``test``) of a config's ``data`` section.

Files (the default): ``protocol.read_dataset(<side>_set, <side>_root, <side>_split, categories)``.
TFDS (pod runs whose data lives in a bucket): set ``data.tfds_dir`` to the TFDS data directory
written by ``python -m zsad_jax.data.tfds_builder --dataset NAME --manual_dir D --data_dir T``; the
side's dataset is then read as ``zsad_anomaly/<dataset>`` from there, through the same pipeline.
"""

from __future__ import annotations

from typing import Any

from zsad_jax.data import pipeline, protocol

SIDES = {
    "train": ("train_set", "train_root", "train_split", "categories"),
    "test": ("test_set", "test_root", "test_split", "test_categories"),
}


def split_source(data: Any, side: str) -> pipeline.ExampleSource:
    """``data``: the ``config.data`` block; ``side``: ``"train"`` or ``"test"``."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {sorted(SIDES)}, got {side!r}")
    set_field, root_field, split_field, categories_field = SIDES[side]
    dataset, split = str(data[set_field]), str(data[split_field])
    categories = list(data.get(categories_field) or ())
    tfds_dir = data.get("tfds_dir")
    if tfds_dir:
        from zsad_jax.data import tfds_builder  # TFDS is slow to import; only load it when used.

        if categories:
            raise ValueError(
                f"config.data.{categories_field}={categories} selects files only; with "
                f"config.data.tfds_dir build the TFDS dataset with those --categories instead"
            )
        name = f"{tfds_builder.BUILDER_NAME}/{dataset}"
        return tfds_builder.TfdsSource(name, str(tfds_dir), split)
    records = protocol.read_dataset(dataset, data[root_field], split, categories or None)
    return pipeline.RecordSource(records)
