"""Lightning tasks on vitmha backbones: image classification (single- and multi-label), semantic
segmentation and masked-autoencoder pre-training; :mod:`vitmha.tasks.base` holds the options they share."""
from vitmha.tasks.base import BackboneTask, SupervisedTask
from vitmha.tasks.classification import ImageClassifier
from vitmha.tasks.mae import MaskedAutoencoder
from vitmha.tasks.multilabel import MultiLabelClassifier
from vitmha.tasks.segmentation import SemanticSegmenter

__all__ = ["BackboneTask", "SupervisedTask", "ImageClassifier", "MaskedAutoencoder", "MultiLabelClassifier",
           "SemanticSegmenter"]
