"""Lightning data modules, albumentations pipelines and built-in datasets."""
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

__all__ = [
    "ImageFolderDataModule",
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
