"""albumentations pipelines from YAML-like specs, and mean/std resolution."""
import albumentations as A
import numpy as np
import pytest
import torch

from vitmha.data import build_transforms
from vitmha.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, classification_eval, classification_train,
                                    resolve_mean_std, segmentation_train)

IMG = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)


def test_spec_of_names_and_class_paths_builds_and_appends_normalize_and_tensor():
    spec = [
        "HorizontalFlip",
        {"class_path": "albumentations.OneOf", "init_args": {"p": 0.3},
         "transforms": ["Blur", {"class_path": "ColorJitter", "init_args": {"brightness": [0.1, 0.2]}}]},
        {"class_path": "albumentations.Resize", "init_args": {"height": 16, "width": 16}},
    ]
    t = build_transforms(spec, default=None)
    names = [type(x).__name__ for x in t.transforms]
    assert names == ["HorizontalFlip", "OneOf", "Resize", "Normalize", "ToTensorV2"]
    out = t(image=IMG)["image"]
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32


def test_misspelt_transform_is_named_with_its_index():
    with pytest.raises(ValueError, match=r"train_transforms\[2\]: albumentations has no transform 'HorizntalFlip'"):
        build_transforms(["HorizontalFlip", "Blur", "HorizntalFlip"], default=None)


def test_bad_init_args_name_the_entry_and_the_field():
    with pytest.raises(ValueError, match=r"val_transforms\[0\] \(Resize\): height"):
        build_transforms([{"class_path": "Resize", "init_args": {"height": 0, "width": 8}}], default=None,
                         name="val_transforms")


def test_non_transform_class_path_is_rejected():
    with pytest.raises(ValueError, match=r"\[0\]: 'os.path' is not an albumentations transform"):
        build_transforms([{"class_path": "os.path"}], default=None)


def test_albumentations_serialised_dict_is_accepted():
    d = A.to_dict(A.Compose([A.HorizontalFlip(p=1.0), A.Resize(8, 8)]))
    out = build_transforms(d, default=None)(image=IMG)["image"]
    assert out.shape == (3, 8, 8)


def test_none_spec_returns_the_default():
    default = classification_eval(16, IMAGENET_MEAN, IMAGENET_STD)
    assert build_transforms(None, default=default) is default


def test_default_pipelines_give_normalized_float_tensors_of_image_size():
    m, s = IMAGENET_MEAN, IMAGENET_STD
    for t in (classification_train(24, m, s), classification_eval(24, m, s), classification_eval(24, m, s, 0.875)):
        out = t(image=IMG)["image"]
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    out = segmentation_train(24, m, s)(image=IMG, mask=np.zeros(IMG.shape[:2], np.uint8))
    assert out["image"].shape == (3, 24, 24) and out["mask"].shape == (24, 24)


def test_mean_std_explicit_beats_backbone_beats_imagenet():
    assert resolve_mean_std() == (IMAGENET_MEAN, IMAGENET_STD)
    assert resolve_mean_std([0.1, 0.2, 0.3], [1, 1, 1], backbone="vit_tiny_patch16_224") == ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    mean, std = resolve_mean_std(backbone="vit_tiny_patch16_224")  # augreg weights use 0.5/0.5
    assert mean == pytest.approx((0.5, 0.5, 0.5)) and std == pytest.approx((0.5, 0.5, 0.5))
