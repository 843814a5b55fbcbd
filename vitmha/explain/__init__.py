"""Explanations of a ViT's decision on its patch grid, and how faithful they are.

    from vitmha.explain import Target, explain, deletion_curve, auc
    maps = explain(model, backbone, x, Target(class_index=281))   # {method: (gh, gw)}

Methods (``METHODS``): raw last-block attention, attention rollout, Chefer et al.'s gradient-weighted
attention, Grad-CAM on the token grid, integrated gradients, and occlusion (:mod:`vitmha.explain.methods`). Faithfulness: deletion
and insertion AUC, and the share of relevance inside an object's outline (:mod:`vitmha.explain.faithfulness`).
``tools/explain.py`` draws the methods side by side; ``benchmarks/faithfulness.py`` compares them.
"""
from vitmha.explain.faithfulness import (area_share, auc, baseline_image, deletion_curve, gaussian_blur,
                                         insertion_curve, perturbation_curve, relevance_share)
from vitmha.explain.figure import save_explanation_figure
from vitmha.explain.methods import (METHODS, Target, attention_map, chefer_map, explain, gradcam_map,
                                    ig_map, occlusion_map, patch_cells, record, rollout_map)

__all__ = [
    "METHODS", "Target", "explain", "attention_map", "rollout_map", "chefer_map", "gradcam_map", "ig_map",
    "occlusion_map", "record", "patch_cells", "perturbation_curve", "deletion_curve", "insertion_curve", "auc",
    "relevance_share", "area_share", "baseline_image", "gaussian_blur", "save_explanation_figure",
]
