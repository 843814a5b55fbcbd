"""Lightning tasks: image classification (single- and multi-label) and semantic segmentation on vitmha backbones."""
from vitmha.tasks.classification import ImageClassifier
from vitmha.tasks.multilabel import MultiLabelClassifier
from vitmha.tasks.segmentation import SemanticSegmenter

__all__ = ["ImageClassifier", "MultiLabelClassifier", "SemanticSegmenter"]
