"""Segmentation metrics against a NumPy reference on known masks with ignored pixels."""
import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from vitmha.tasks.segmentation import dice_loss, segmentation_scores

IGNORE = 255


def numpy_reference(pred, target, num_classes, ignore=IGNORE):
    keep = target != ignore
    p, t = pred[keep], target[keep]
    iou, dice = [], []
    for c in range(num_classes):
        tp = np.sum((p == c) & (t == c))
        fp = np.sum((p == c) & (t != c))
        fn = np.sum((p != c) & (t == c))
        union = tp + fp + fn
        iou.append(tp / union if union else np.nan)
        dice.append(2 * tp / (2 * tp + fp + fn) if union else np.nan)
    return {"iou": np.array(iou), "miou": np.nanmean(iou), "dice_mean": np.nanmean(dice),
            "pixel_acc": np.mean(p == t)}


def scores(pred, target, num_classes):
    cm = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE)
    cm.update(torch.as_tensor(pred), torch.as_tensor(target))
    return segmentation_scores(cm.compute())


def test_known_masks_with_ignore_pixels():
    target = np.array([[0, 0, 1, 1],
                       [0, 255, 1, 1],
                       [2, 2, 255, 1],
                       [2, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 1, 0],   # the 2 under an ignore pixel must not count
                     [2, 2, 2, 1],
                     [0, 2, 2, 1]])
    got = scores(pred, target, 4)  # class 3 appears nowhere: NaN and left out of the mean
    ref = numpy_reference(pred, target, 4)
    np.testing.assert_allclose(got["iou"].numpy(), ref["iou"], equal_nan=True)
    # by hand: class 0: tp 2, fp 2 (pred 0 on a 1 and on a 2), fn 1 -> 2/5; class 1: tp 4, fp 1, fn 1 -> 4/6;
    # class 2: tp 4, fp 0 (its extra 2s are under ignore pixels), fn 1 -> 4/5; 10 of 13 valid pixels right
    np.testing.assert_allclose(got["iou"][:3].numpy(), [2 / 5, 4 / 6, 4 / 5])
    assert np.isnan(got["iou"][3].item())
    assert got["miou"].item() == pytest.approx((2 / 5 + 4 / 6 + 4 / 5) / 3)
    assert got["pixel_acc"].item() == pytest.approx(10 / 13)
    assert got["dice_mean"].item() == pytest.approx(ref["dice_mean"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_masks_match_numpy(seed):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 5, size=(3, 17, 23))
    target[rng.random(target.shape) < 0.2] = IGNORE
    pred = rng.integers(0, 5, size=target.shape)
    pred[pred == 4] = 0  # class 4 never predicted, still present in the target
    got, ref = scores(pred, target, 6), numpy_reference(pred, target, 6)
    np.testing.assert_allclose(got["iou"].numpy(), ref["iou"], equal_nan=True, rtol=1e-12)
    for k in ["miou", "dice_mean", "pixel_acc"]:
        assert got[k].item() == pytest.approx(ref[k], rel=1e-12), k


def test_a_class_only_predicted_counts_with_iou_zero():
    target = np.array([[0, 0], [0, 0]])
    pred = np.array([[0, 0], [0, 1]])
    got = scores(pred, target, 3)
    assert got["iou"][1].item() == 0.0 and np.isnan(got["iou"][2].item())
    assert got["miou"].item() == pytest.approx((3 / 4 + 0) / 2)


def test_dice_loss_ignores_ignore_pixels_and_is_zero_for_perfect_logits():
    target = torch.tensor([[[0, 1], [1, 255]]])
    perfect = torch.nn.functional.one_hot(target.clamp(max=1), 2).permute(0, 3, 1, 2).float() * 50
    perfect[..., 1, 1] = torch.tensor([-50.0, 50.0])  # whatever is predicted under the ignore pixel
    assert dice_loss(perfect, target, IGNORE, eps=1e-6).item() == pytest.approx(0.0, abs=1e-5)
    assert dice_loss(-perfect, target, IGNORE, eps=1e-6).item() == pytest.approx(1.0, abs=1e-5)
