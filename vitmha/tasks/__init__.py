"""Lightning tasks on vitmha backbones: image classification (single- and multi-label) and semantic
segmentation; :mod:`vitmha.tasks.base` holds the options they share."""
from vitmha.tasks.base import BackboneTask, SupervisedTask
from vitmha.tasks.classification import ImageClassifier
from vitmha.tasks.multilabel import MultiLabelClassifier
from vitmha.tasks.segmentation import SemanticSegmenter

__all__ = ["BackboneTask", "SupervisedTask", "ImageClassifier", "MultiLabelClassifier", "SemanticSegmenter"]
