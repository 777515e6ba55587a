"""A TFDS builder for the anomaly benchmarks (array_record files, no TensorFlow needed).

The builder reads a manually downloaded dataset (MVTec-AD, VisA, or any name that
``protocol.read_dataset`` knows) through our readers and ``decode.load_record``, and writes
``array_record`` files that ``tfds.data_source`` reads with NumPy only. TFDS 4.9 works without
TensorFlow for exactly this path: array_record files whose features are ``Tensor``/``Scalar``; so
the image is a uint8 ``Tensor`` stored as raw bytes (``Encoding.BYTES``), never
``tfds.features.Image`` (its PNG codec is TensorFlow's).

Two image layouts, chosen by the builder config:

- ``image_size=None`` (configs ``mvtec_ad``, ``visa``): the decoded RGB image at its original size,
  PNG-encoded by Pillow into a variable-length uint8 ``Tensor`` (lossless: reading it back gives the
  arrays ``load_record`` gives). Masks likewise, as 1-bit PNGs. Every transform can run on top.
- ``image_size=S``: the image resized to S x S with Pillow (``resample``, bicubic by default, the
  CLIP methods' filter) and the mask (binarised ``> 0`` at full size, as ``load_record`` does)
  resized with NEAREST, stored as fixed-shape uint8/bool tensors. A transform of the same size and
  filter then resizes S -> S, which Pillow returns unchanged, so batches equal those of the direct
  file path. Other mask-resize modes of ``transforms``, and augmentations that act on the
  full-size image before resizing (``acd_clip_train``'s noise and colour jitter), need the
  original-size layout to give the same pixels as the file path.

Build once, then read through the same grain pipeline as files::

    name = build("mvtec_ad", manual_dir="/data/mvtec_ad", data_dir="/data/tfds")
    source = TfdsSource(name, data_dir="/data/tfds", split="test")
    batches = pipeline.eval_batches(source, batch_size=32, transform=make_transform("clip", 518))

Record order in each split is the reader's order (shuffling at write time is disabled), so ``index``
means the same example in a ``TfdsSource`` and in a ``RecordSource`` over ``read_dataset``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from zsad_jax.data import decode, protocol
from zsad_jax.data.decode import DataError
from zsad_jax.data.pipeline import ExampleSource

BUILDER_NAME = "zsad_anomaly"
RESAMPLE_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclasses.dataclass(eq=False)
class AnomalyConfig(tfds.core.BuilderConfig):
    """Which dataset to read and how to store its images.

    Attributes:
      dataset: a ``protocol.read_dataset`` name (``mvtec_ad``, ``visa``, ``mpdd``, ``btad``, ...).
      image_size: side S of the stored square images, or ``None`` for original-size PNGs.
      resample: Pillow filter for resizing images (``bicubic``, ``bilinear``, ``nearest``).
      categories: categories to read (``None`` = all found).
      splits: splits to write.
    """

    dataset: str = "mvtec_ad"
    image_size: int | None = None
    resample: str = "bicubic"
    categories: tuple[str, ...] | None = None
    splits: tuple[str, ...] = ("train", "test")


def make_config(
    dataset: str,
    *,
    image_size: int | None = None,
    resample: str = "bicubic",
    categories: Sequence[str] | None = None,
    splits: Sequence[str] = ("train", "test"),
    name: str | None = None,
) -> AnomalyConfig:
    """A builder config; the default ``name`` spells out the choices (``mvtec_ad_518_bicubic``)."""
    if dataset not in protocol.READERS:
        raise ValueError(f"unknown dataset {dataset!r}; known datasets: {sorted(protocol.READERS)}")
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(f"unknown resample {resample!r}; known: {sorted(RESAMPLE_FILTERS)}")
    if image_size is not None and int(image_size) <= 0:
        raise ValueError(f"image_size must be positive or None, got {image_size}")
    categories = None if not categories else tuple(categories)
    if name is None:
        name = dataset if image_size is None else f"{dataset}_{int(image_size)}_{resample}"
        if categories is not None:
            # A subset gets its own directory; the digest keeps the name short and stable.
            name += "_" + hashlib.sha1(",".join(categories).encode()).hexdigest()[:8]
    return AnomalyConfig(
        name=name,
        description=f"{dataset}, images "
        + ("at original size (PNG)" if image_size is None else f"{image_size}px ({resample})"),
        dataset=dataset,
        image_size=None if image_size is None else int(image_size),
        resample=resample,
        categories=categories,
        splits=tuple(splits),
    )


def _encode_png(array: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    # Level 1: these are written once per dataset; size matters less than build time.
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def _decode_png(data: np.ndarray, what: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(np.asarray(data, np.uint8).tobytes())) as img:
            return np.asarray(img)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot decode the PNG bytes of {what} ({e})", what) from e


class ZsadAnomaly(tfds.core.GeneratorBasedBuilder):
    """MVTec-AD / VisA / other anomaly benchmarks from a manual download directory."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        make_config("mvtec_ad"),
        make_config("visa"),
        make_config("mvtec_ad", image_size=518),
        make_config("visa", image_size=518),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download the dataset yourself and pass its root as the manual directory:
    MVTec-AD: {root}/{category}/{train,test}/{good|defect}/*.png with {category}/ground_truth/;
    VisA: the VisA_20220922 folder holding {category}/Data/ and split_csv/1cls.csv.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        config: AnomalyConfig = self.builder_config
        size = config.image_size
        if size is None:
            image = tfds.features.Tensor(shape=(None,), dtype=np.uint8, encoding="bytes")
            mask = tfds.features.Tensor(shape=(None,), dtype=np.uint8, encoding="bytes")
        else:
            image = tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding="bytes")
            mask = tfds.features.Tensor(shape=(size, size), dtype=np.bool_, encoding="bytes")
        features = tfds.features.FeaturesDict(
            {
                "image": image,
                "gt_mask": mask,
                "has_mask": tfds.features.Scalar(dtype=np.bool_),
                "gt_label": tfds.features.Scalar(dtype=np.int32),
                "category": tfds.features.Scalar(dtype=np.str_),
                "defect_type": tfds.features.Scalar(dtype=np.str_),
                "path": tfds.features.Scalar(dtype=np.str_, doc="relative to the manual dir"),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{config.dataset} for zero-shot anomaly detection ({config.description})",
            features=features,
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # keep the reader's order so indices match RecordSource
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config: AnomalyConfig = self.builder_config
        root = os.fspath(dl_manager.manual_dir)
        generators, categories = {}, {}
        for split in config.splits:
            records = protocol.read_dataset(config.dataset, root, split, config.categories)
            categories[split] = list(dict.fromkeys(r.category for r in records))
            generators[split] = self._generate_examples(records, root)
        # Saved as metadata.json: the class_names order of TfdsSource.
        self.info.metadata["categories"] = categories
        return generators

    def _generate_examples(self, records, root: str):
        config: AnomalyConfig = self.builder_config
        for key, record in enumerate(records):
            sample = decode.load_record(record)
            image, mask = sample["image"], sample["gt_mask"]
            if config.image_size is None:
                image, mask = _encode_png(image), _encode_png(mask)
            else:
                size = (config.image_size, config.image_size)
                image = np.asarray(
                    Image.fromarray(image).resize(size, RESAMPLE_FILTERS[config.resample])
                )
                mask_img = Image.fromarray(mask.astype(np.uint8) * 255)
                mask = np.asarray(mask_img.resize(size, Image.Resampling.NEAREST)) > 0
            yield (
                key,
                {
                    "image": image,
                    "gt_mask": mask,
                    "has_mask": bool(sample["has_mask"]),
                    "gt_label": int(sample["gt_label"]),
                    "category": sample["category"],
                    "defect_type": record.defect_type,
                    "path": os.path.relpath(sample["path"], root),
                },
            )


def build(
    dataset: str,
    manual_dir: str,
    data_dir: str,
    *,
    image_size: int | None = None,
    resample: str = "bicubic",
    categories: Sequence[str] | None = None,
    splits: Sequence[str] = ("train", "test"),
    name: str | None = None,
) -> str:
    """Writes the array_record files (once; an existing build is reused).

    Returns:
      the name to read it back with: ``tfds.data_source(name, data_dir=data_dir)`` or
      ``TfdsSource(name, data_dir, split)``.
    """
    # Every refusal before the builder runs: TFDS creates data_dir's folders first and refuses an
    # empty manual_dir with an AssertionError (a traceback) after that.
    config = make_config(
        dataset,
        image_size=image_size,
        resample=resample,
        categories=categories,
        splits=splits,
        name=name,
    )
    if not os.path.isdir(manual_dir):
        raise FileNotFoundError(
            f"manual_dir {manual_dir} is not a directory: download {dataset} there first"
        )
    if not os.listdir(manual_dir):
        raise FileNotFoundError(f"manual_dir {manual_dir} is empty: download {dataset} there first")
    builder = ZsadAnomaly(
        config=_registered_or_custom(config), data_dir=data_dir, file_format="array_record"
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir,
            # Statistics would need TensorFlow; they are not used here.
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
        )
    )
    return f"{BUILDER_NAME}/{config.name}"


def _config_fields(config: AnomalyConfig) -> tuple:
    return (config.dataset, config.image_size, config.resample, config.categories, config.splits)


def _registered_or_custom(config: AnomalyConfig) -> AnomalyConfig | str:
    """TFDS refuses a custom config named like a predefined one: pass the predefined one's name."""
    for predefined in ZsadAnomaly.BUILDER_CONFIGS:
        if predefined.name == config.name:
            if _config_fields(predefined) != _config_fields(config):
                raise ValueError(
                    f"config name {config.name!r} is predefined with different settings "
                    f"{_config_fields(predefined)}; choose another name"
                )
            return config.name
    return config


class TfdsSource(ExampleSource):
    """Examples of one split of a ``build`` output, decoded to the ``load_record`` dict.

    Args:
      name: ``zsad_anomaly/<config>`` as returned by ``build``.
      data_dir: the TFDS data directory.
      split: ``train`` | ``test``.
      class_names: category order for ``class_id``; default: the split's categories in reader order.

    The TFDS data source is opened lazily and reopened after pickling (grain worker processes).
    ``path`` is relative to the manual directory the build read.
    """

    def __init__(
        self, name: str, data_dir: str, split: str, class_names: Sequence[str] | None = None
    ):
        self.name, self.data_dir, self.split = name, os.fspath(data_dir), split
        self._records = None
        if class_names is None:
            categories = self._data_source.dataset_info.metadata.get("categories", {})
            if split not in categories:
                raise ValueError(
                    f"{name} in {data_dir} has no category list for split {split!r} "
                    f"(splits: {sorted(categories)}); pass class_names"
                )
            class_names = categories[split]
        self.class_names = tuple(class_names)

    @property
    def _data_source(self):
        if self._records is None:
            self._records = tfds.data_source(self.name, data_dir=self.data_dir, split=self.split)
        return self._records

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_records": None}

    def __len__(self) -> int:
        return len(self._data_source)

    def load(self, index: int) -> dict[str, Any]:
        record = self._data_source[index]
        path = _text(record["path"])
        image, mask = record["image"], record["gt_mask"]
        if image.ndim == 1:  # original-size layout: PNG bytes
            image = _decode_png(image, f"{self.name}[{self.split}][{index}] image of {path}")
            mask = _decode_png(mask, f"{self.name}[{self.split}][{index}] mask of {path}")
        return {
            "image": np.asarray(image, np.uint8),
            "gt_mask": np.asarray(mask) > 0,
            "has_mask": bool(record["has_mask"]),
            "gt_label": int(record["gt_label"]),
            "category": _text(record["category"]),
            "path": path,
        }

    def describe(self, index: int) -> str:
        return f"{self.name}[{self.split}][{index}]"


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m zsad_jax.data.tfds_builder --dataset mvtec_ad --manual_dir D --data_dir T``; a
    refusal (no ``manual_dir``, an unknown dataset) raises, ``run_command`` makes it one line."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m zsad_jax.data.tfds_builder", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dataset", required=True, help="a protocol.read_dataset name")
    parser.add_argument("--manual_dir", required=True, help="the downloaded dataset's root")
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to write")
    parser.add_argument("--image_size", type=int, default=None, help="default: original size")
    parser.add_argument("--resample", default="bicubic", choices=sorted(RESAMPLE_FILTERS))
    parser.add_argument("--categories", nargs="*", default=None)
    args = parser.parse_args(argv)
    name = build(
        args.dataset,
        args.manual_dir,
        args.data_dir,
        image_size=args.image_size,
        resample=args.resample,
        categories=args.categories,
    )
    print(name)


if __name__ == "__main__":
    from zsad_jax.errors import run_command

    sys.exit(run_command(main))
