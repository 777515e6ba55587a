"""The unit every dataset reader yields: one image on disk with its labels."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Record:
    """One image of a dataset split.

    Attributes:
      path: image file.
      category: the product/object class (``bottle``, ``pcb1``, ...), as named by the dataset.
      gt_label: 0 normal, 1 anomalous.
      mask_path: pixel mask file (non-zero = anomalous); ``None`` for normal images and for datasets
        with image-level labels only (then ``has_mask`` is False for anomalous images too).
      defect_type: ``good`` for normal images, otherwise the defect folder/name if known.
      has_mask: whether pixel ground truth exists (normal images have an implicit all-zero mask).
    """

    path: str
    category: str
    gt_label: int
    mask_path: str | None = None
    defect_type: str = ""
    has_mask: bool = True
