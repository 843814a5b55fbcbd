"""Lightning data modules, albumentations pipelines and built-in datasets.

Every image data module also feeds self-supervised pre-training: batches are ``(images, targets)`` pairs (a
pre-training task reads ``batch[0]`` and ignores the labels), and :class:`UnlabeledFolderDataModule` reads a
plain folder of images without classes, its batches the image tensors alone.
"""
from vitmha.data.builtin import DigitsDataModule, SyntheticShapesDataModule
from vitmha.data.errors import DataValidationError, DatasetNotInstalledError
from vitmha.data.folder import ImageFolderDataModule
from vitmha.data.multilabel import (MultiLabelCSVDataModule, SyntheticShapesMultiLabelDataModule,
                                   export_multilabel_shapes)
from vitmha.data.realdata import FashionMNISTDataModule, MNIST5kDataModule, NucleiDataModule
from vitmha.data.sampling import EpochSeededSampler
from vitmha.data.segmentation import SegmentationFolderDataModule
from vitmha.data.sources import export_digits_folder, export_shapes_folder, read_idx
from vitmha.data.transforms import build_transforms
from vitmha.data.unlabeled import UnlabeledFolderDataModule

__all__ = [
    "ImageFolderDataModule",
    "UnlabeledFolderDataModule",
    "MultiLabelCSVDataModule",
    "SyntheticShapesMultiLabelDataModule",
    "export_multilabel_shapes",
    "SegmentationFolderDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "MNIST5kDataModule",
    "NucleiDataModule",
    "read_idx",
    "SyntheticShapesDataModule",
    "DataValidationError",
    "DatasetNotInstalledError",
    "EpochSeededSampler",
    "build_transforms",
    "export_digits_folder",
    "export_shapes_folder",
]
