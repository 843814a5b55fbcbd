"""Lightning tasks: image classification and semantic segmentation on vitmha backbones."""
from vitmha.tasks.classification import ImageClassifier
from vitmha.tasks.segmentation import SemanticSegmenter

__all__ = ["ImageClassifier", "SemanticSegmenter"]
