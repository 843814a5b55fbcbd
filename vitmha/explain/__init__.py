"""Explanations of a ViT's decision on its patch grid, and how faithful they are.

    from vitmha.explain import Target, explain, deletion_curve, auc
    maps = explain(model, backbone, x, Target(class_index=281))   # {method: (gh, gw)}

Methods (``METHODS``): raw last-block attention, attention rollout, Chefer et al.'s gradient-weighted
attention and Grad-CAM on the token grid (:mod:`vitmha.explain.attention`, read through hooks,
:mod:`vitmha.explain.hooks`); integrated gradients, occlusion, LIME and KernelSHAP through Captum
(:mod:`vitmha.explain.attribution`). Faithfulness: deletion and insertion AUC, and the share of relevance
inside an object's outline (:mod:`vitmha.explain.faithfulness`). ``vitmha explain`` draws the methods side by
side; ``benchmarks/faithfulness.py`` compares them.

Layers, each importing only those above it: ``target`` (Target, baselines, patch cells) → ``hooks`` →
``attention``, ``attribution`` → ``methods`` → ``faithfulness``, ``figure``.
"""
from vitmha.explain.attention import attention_map, chefer_map, gradcam_map, rollout_map
from vitmha.explain.attribution import DEFAULT_SAMPLES, ig_map, kernelshap_map, lime_map, occlusion_map, patch_mask
from vitmha.explain.faithfulness import (area_share, auc, deletion_curve, insertion_curve, perturbation_curve,
                                         relevance_share)
from vitmha.explain.figure import save_explanation_figure
from vitmha.explain.hooks import record
from vitmha.explain.methods import METHODS, SAMPLED, explain
from vitmha.explain.target import Target, baseline_image, patch_cells
from vitmha.robustness import gaussian_blur

__all__ = [
    "METHODS", "SAMPLED", "DEFAULT_SAMPLES", "Target", "explain", "attention_map", "rollout_map", "chefer_map",
    "gradcam_map", "ig_map", "occlusion_map", "lime_map", "kernelshap_map", "record", "patch_cells", "patch_mask",
    "perturbation_curve", "deletion_curve", "insertion_curve", "auc", "relevance_share", "area_share",
    "baseline_image", "gaussian_blur", "save_explanation_figure",
]
