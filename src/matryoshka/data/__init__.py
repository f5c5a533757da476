"""Datasets (Fashion-MNIST, image folders, webdataset tar shards), transforms and fault counting.

Every dataset yields `{"image": float (C, S, S) in [-1, 1], "label": int (-1 if none), "caption": str}`.
This package imports nothing from training, CLI or demo code.
"""

from .captions import (
    CLASS_SYNONYMS,
    TEMPLATES,
    all_captions_for_label,
    caption_for_label,
    caption_names_class,
    classes_named_in,
)
from .decoding import IMAGE_EXTENSIONS, decode_caption, decode_image
from .fashion_mnist import CLASS_NAMES, DatasetNotFoundError, FashionMNIST, load_arrays
from .faults import FAILURE_KINDS, NOTE_KINDS, DataFaultError, FaultCounter, SampleFault
from .folders import FaultTolerantFolder, ImageFolderDataset
from .transforms import (
    convert_channels,
    label_rows,
    make_grid,
    pil_to_tensor,
    resize_center_crop,
    tensor_to_pil,
    tensor_to_uint8,
    uint8_to_tensor,
)
from .webdataset_shards import ShardDataset, expand_braces, expand_shard_list, iter_tar_groups, write_shard

__all__ = [
    "CLASS_NAMES",
    "CLASS_SYNONYMS",
    "FAILURE_KINDS",
    "IMAGE_EXTENSIONS",
    "NOTE_KINDS",
    "TEMPLATES",
    "DataFaultError",
    "DatasetNotFoundError",
    "FashionMNIST",
    "FaultCounter",
    "FaultTolerantFolder",
    "ImageFolderDataset",
    "SampleFault",
    "ShardDataset",
    "all_captions_for_label",
    "caption_for_label",
    "caption_names_class",
    "classes_named_in",
    "convert_channels",
    "decode_caption",
    "decode_image",
    "expand_braces",
    "expand_shard_list",
    "iter_tar_groups",
    "load_arrays",
    "label_rows",
    "make_grid",
    "pil_to_tensor",
    "resize_center_crop",
    "tensor_to_pil",
    "tensor_to_uint8",
    "uint8_to_tensor",
    "write_shard",
]
