"""Dataset loaders: the test split of each of the paper's datasets, in its publisher's layout.

See ``docs/datasets.md`` for where to get each dataset and the layout expected.
"""

from kanoclip.data.datasets import (
    KINDS,
    detect_kind,
    group_by_class,
    load_dataset,
    load_mask,
    load_train_normals,
    parse_data_arg,
    summarize,
    verify_images,
)
from kanoclip.data.sample import IMAGE_EXTENSIONS, Sample

__all__ = [
    "IMAGE_EXTENSIONS",
    "KINDS",
    "Sample",
    "detect_kind",
    "group_by_class",
    "load_dataset",
    "load_mask",
    "load_train_normals",
    "parse_data_arg",
    "summarize",
    "verify_images",
]
