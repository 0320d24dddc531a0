"""Data: VTAB-1k list files, image folders and idx files; segmentation pairs; preprocessing.

>>> ds = open_dataset("../shared/data/vtab1k/cifar10", "train800val200")
>>> ds.transform = eval_transform(data_config(model))
"""

from vpeft.data.datasets import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageDataset,
    available_splits,
    open_dataset,
    read_classes,
    write_list_split,
)
from vpeft.data.idx import IdxError, read_idx, write_idx
from vpeft.data.segmentation import (
    IGNORE_INDEX,
    SegEvalTransform,
    SegmentationDataset,
    SegTrainTransform,
    collate_segmentation,
    open_segmentation_dataset,
)
from vpeft.data.transforms import data_config, eval_transform, model_input_size

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "DataError",
    "IdxError",
    "ImageDataset",
    "SegEvalTransform",
    "SegTrainTransform",
    "SegmentationDataset",
    "available_splits",
    "collate_segmentation",
    "data_config",
    "eval_transform",
    "model_input_size",
    "open_dataset",
    "open_segmentation_dataset",
    "read_classes",
    "read_idx",
    "write_idx",
    "write_list_split",
]
