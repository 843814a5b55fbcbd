"""Decoders that turn ViT block outputs into dense predictions."""
from vitmha.heads.segmentation import (HEADS, LinearHead, MaskTransformerHead, SetrPupHead, SimpleFeaturePyramid,
                                       UperHead, build_head, run_head)

__all__ = ["HEADS", "LinearHead", "MaskTransformerHead", "SetrPupHead", "SimpleFeaturePyramid", "UperHead",
           "build_head", "run_head"]
